"""Atomic publication: whole artifacts or none, the umask's file modes, nothing lost by mistake."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from bitnet_train.atomic import atomic_directory, atomic_file
from bitnet_train.errors import CheckpointError, WriteError


def plain_mode(directory: Path) -> int:
    """The mode `open()` gives a new file here: the expectation, measured, not computed."""
    probe = directory / "probe"
    probe.write_text("x")
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    return mode


def test_files_written_through_mkstemp_get_the_plain_mode(tmp_path):
    """safetensors writes through a temporary file (mode 0600); published files must not be."""
    with atomic_directory(tmp_path / "out", marker="config.json") as tmp:
        fd, name = tempfile.mkstemp(dir=tmp)
        os.close(fd)
        os.replace(name, tmp / "model.safetensors")
        (tmp / "config.json").write_text("{}")
    published = tmp_path / "out" / "model.safetensors"
    assert stat.S_IMODE(published.stat().st_mode) == plain_mode(tmp_path) != 0o600


def test_refuses_to_replace_a_directory_of_other_files(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="non-empty directory without config.json"):
        with atomic_directory(home, marker="config.json") as tmp:
            (tmp / "config.json").write_text("{}")
    assert (home / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no temporary left


def test_replaces_an_earlier_output_and_keeps_it_on_error(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out, marker="config.json") as tmp:
        (tmp / "config.json").write_text("1")
    with pytest.raises(WriteError, match=r"write failed while writing .*out.*previous version "
                                         r"is intact") as err:
        with atomic_directory(out, marker="config.json") as tmp:
            (tmp / "config.json").write_text("2")
            raise RuntimeError("failed half way")
    assert isinstance(err.value.__cause__, RuntimeError)  # whatever a library raised, named
    assert (out / "config.json").read_text() == "1"
    with atomic_directory(out, marker="config.json") as tmp:
        (tmp / "config.json").write_text("3")
    assert (out / "config.json").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_file_leaves_no_partial_file(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")
    with pytest.raises(OSError):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
