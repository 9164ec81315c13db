"""Integrity manifests (sizes + SHA-256) and the recognition of a full disk."""

from __future__ import annotations

import errno
import hashlib
import json

import pytest
from safetensors import SafetensorError

from bitnet_train.errors import IntegrityError
from bitnet_train.integrity import (
    MANIFEST_FILE,
    build_manifest,
    publish_file,
    sidecar_path,
    verify_directory,
    verify_file,
    write_manifest,
)
from bitnet_train.write_errors import describe_bytes, is_disk_full


def _tree(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(bytes(range(256)) * 300)
    (root / "sub" / "b.json").write_text('{"x": 1}')
    (root / "empty").write_bytes(b"")


def test_manifest_records_size_and_sha256_of_every_file(tmp_path):
    _tree(tmp_path)
    manifest = write_manifest(tmp_path)
    on_disk = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert on_disk == manifest
    assert sorted(manifest["files"]) == ["a.bin", "empty", "sub/b.json"]  # not itself
    want = hashlib.sha256((tmp_path / "a.bin").read_bytes()).hexdigest()  # an independent hash
    assert manifest["files"]["a.bin"] == {"bytes": 76800, "sha256": want}
    assert manifest["total_bytes"] == 76800 + 8
    assert verify_directory(tmp_path) is True


def test_no_manifest_means_nothing_verified(tmp_path):
    _tree(tmp_path)
    assert verify_directory(tmp_path) is False


@pytest.mark.parametrize("damage", ["truncate", "extend", "flip_one_bit", "delete"])
def test_each_kind_of_damage_names_the_file(tmp_path, damage):
    _tree(tmp_path)
    write_manifest(tmp_path)
    target = tmp_path / "a.bin"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(data[:1000])
    elif damage == "extend":
        target.write_bytes(data + b"\0")
    elif damage == "flip_one_bit":
        data[5000] ^= 0x10
        target.write_bytes(data)
    else:
        target.unlink()
    with pytest.raises(IntegrityError) as err:
        verify_directory(tmp_path)
    assert err.value.file == "a.bin" and str(target) in str(err.value)
    expected = {"truncate": "truncated", "extend": "longer than written",
                "flip_one_bit": "SHA-256 differs", "delete": "missing"}[damage]
    assert expected in str(err.value)


def test_a_damaged_manifest_is_told_from_a_damaged_file(tmp_path):
    _tree(tmp_path)
    write_manifest(tmp_path)
    manifest_file = tmp_path / MANIFEST_FILE
    m = json.loads(manifest_file.read_text())
    m["files"]["a.bin"]["bytes"] += 1  # as a flipped digit would
    manifest_file.write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="manifest itself is damaged"):
        verify_directory(tmp_path)
    manifest_file.write_text(manifest_file.read_text()[:40])
    with pytest.raises(IntegrityError, match="not valid JSON"):
        verify_directory(tmp_path)


def test_build_manifest_of_listed_files_only(tmp_path):
    _tree(tmp_path)
    m = build_manifest(tmp_path, ["sub/b.json"])
    assert list(m["files"]) == ["sub/b.json"] and m["total_bytes"] == 8


def test_publish_file_renames_and_writes_a_sidecar(tmp_path):
    final = tmp_path / "model.gguf"
    final.write_bytes(b"old")
    (tmp_path / "model.gguf.manifest.json").write_text("stale")
    tmp = tmp_path / "model.gguf.tmp"
    tmp.write_bytes(b"new bytes" * 100)
    assert publish_file(tmp, final) == final
    assert not tmp.exists() and final.read_bytes() == b"new bytes" * 100
    sidecar = json.loads(sidecar_path(final).read_text())
    assert list(sidecar["files"]) == ["model.gguf"]
    assert verify_file(final) is True
    final.write_bytes(b"new bytes" * 99)
    with pytest.raises(IntegrityError, match="truncated"):
        verify_file(final)
    renamed = tmp_path / "other.gguf"
    final.rename(renamed)
    sidecar_path(final).rename(sidecar_path(renamed))
    with pytest.raises(IntegrityError, match="renamed"):
        verify_file(renamed)


@pytest.mark.parametrize("exc, free, full", [
    (OSError(errno.ENOSPC, "No space left on device"), 10**12, True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), 10**12, True),
    # what safetensors raises on a full disk
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
     10**12, True),
    # what torch.save raises on a full disk says nothing about space: the free space decides
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
     1000, True),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
     10**12, False),
    (SafetensorError("Error while serializing: I/O error: File too large (os error 27)"),
     10**12, False),
    (PermissionError(errno.EACCES, "Permission denied"), 10**12, False),
])
def test_disk_full_is_recognised_whatever_raised_it(exc, free, full):
    assert is_disk_full(exc, free=free, still_needed=5000) is full


def test_disk_full_seen_through_an_exception_chain():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("serialiser failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)


def test_describe_bytes():
    assert [describe_bytes(n) for n in (None, 12, 4_500, 2_400_000_000)] == [
        "an unknown amount", "12 B", "4.50 kB", "2.40 GB"]
