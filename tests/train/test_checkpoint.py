"""Atomic checkpoint storage: whole checkpoints only, pruning, clean failure, shape checks."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from bitnet_train.errors import CheckpointError, TrainingError
from bitnet_train.train.checkpoint import Checkpointer, check_compatible, load_metadata
from tests.conftest import tiny_config


def _payload(text: str):
    def write(tmp: Path) -> None:
        (tmp / "model.bin").write_text(text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "rng.pkl").write_text("rng")

    return write


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_save_latest_and_prune(tmp_path):
    ck = Checkpointer(tmp_path / "ckpt", keep_last=2)
    assert ck.latest() is None and ck.all() == []
    meta = {"model_config": tiny_config().to_hf_dict(), "objective": "pretrain"}
    paths = [ck.save(step, _payload(f"w{step}"), meta) for step in (100, 200, 300)]
    assert paths[-1] == tmp_path / "ckpt" / "step_00000300"
    assert _entries(tmp_path / "ckpt") == ["step_00000200", "step_00000300"]  # no tmp left
    assert ck.all() == paths[1:]
    assert ck.latest() == paths[2]
    assert (paths[2] / "model.bin").read_text() == "w300"
    assert (paths[2] / "sub" / "rng.pkl").is_file()
    md = load_metadata(paths[2])
    assert md["step"] == 300 and md["objective"] == "pretrain"
    assert md["model_config"]["hidden_size"] == 64
    assert "time" in md and "git_revision" in md


def test_keep_last_zero_keeps_everything_and_steps_sort_numerically(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=0)
    for step in (5, 100_000_000, 40):  # the 9-digit step outgrows the zero padding
        ck.save(step, _payload("x"), {})
    assert [p.name for p in ck.all()] == ["step_00000005", "step_00000040", "step_100000000"]


def test_write_failing_midway_leaves_nothing_complete_looking(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3)
    first = ck.save(10, _payload("good"), {})

    def broken(tmp: Path) -> None:
        (tmp / "model.bin").write_text("half")
        raise RuntimeError("serialiser exploded")

    with pytest.raises(TrainingError, match="serialiser exploded") as err:
        ck.save(20, broken, {})
    assert str(first) in str(err.value)  # says the previous checkpoint is intact
    assert _entries(tmp_path) == ["step_00000010"]
    assert ck.latest() == first


def test_disk_full_gives_a_clear_error_and_cleans_up(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    first = ck.save(10, _payload("good"), {})

    def full(tmp: Path) -> None:
        (tmp / "model.bin").write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(TrainingError) as err:
        ck.save(20, full, {})
    msg = str(err.value)
    assert msg.startswith(f"disk full while writing checkpoint step 20 to {tmp_path}")
    assert "trainer.keep_last" in msg and f"previous checkpoint {first} is intact" in msg
    assert isinstance(err.value.__cause__, OSError)
    assert _entries(tmp_path) == ["step_00000010"]


def test_interrupt_is_not_disguised_but_still_cleaned_up(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)

    def interrupted(tmp: Path) -> None:
        (tmp / "model.bin").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ck.save(1, interrupted, {})
    assert _entries(tmp_path) == []


def test_torn_and_temporary_dirs_are_ignored_and_cleaned(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=5)
    good = ck.save(10, _payload("good"), {})
    torn = tmp_path / "step_00000020"  # e.g. an interrupted copy: everything but COMPLETE
    torn.mkdir()
    (torn / "metadata.json").write_text(json.dumps({"step": 20}))
    stale = tmp_path / ".tmp-step_00000030"
    stale.mkdir()
    (stale / "COMPLETE").write_text("30\n")  # even a marker inside a .tmp dir does not count
    assert ck.latest() == good and ck.all() == [good]
    with pytest.raises(CheckpointError, match="COMPLETE"):
        load_metadata(torn)
    assert ck.cleanup_torn() == [stale]
    assert not stale.exists() and torn.exists()  # a step dir is never deleted by guesswork


def test_saving_an_existing_step_replaces_it(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    ck.save(10, _payload("old"), {})
    path = ck.save(10, _payload("new"), {})
    assert (path / "model.bin").read_text() == "new"
    assert _entries(tmp_path) == ["step_00000010"]


def test_multi_process_protocol_begin_commit_abort(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    staging = ck.begin(7)
    assert staging == ck.staging_dir(7) and ck.latest() is None
    for rank in range(2):  # what each rank's save_state would add
        (staging / f"random_states_{rank}.pkl").write_text(str(rank))
    path = ck.commit(7, {"note": "x"})
    assert ck.latest() == path and (path / "random_states_1.pkl").is_file()
    ck.begin(8)
    ck.abort(8)
    assert _entries(tmp_path) == ["step_00000007"]


def test_check_compatible_names_the_first_differing_key(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=1)
    path = ck.save(1, _payload("w"), {"model_config": tiny_config().to_hf_dict()})
    ck.check_compatible(path, tiny_config().to_hf_dict())  # same shape: fine
    ck.check_compatible(path, tiny_config(initializer_range=0.5).to_hf_dict())  # init only
    with pytest.raises(CheckpointError) as err:
        check_compatible(path, tiny_config(hidden_size=128, intermediate_size=320).to_hf_dict())
    msg = str(err.value)
    assert "hidden_size=64 there, hidden_size=128" in msg
    assert "intermediate_size" not in msg and "model=" in msg


def test_check_compatible_without_model_config(tmp_path):
    path = Checkpointer(tmp_path, keep_last=1).save(1, _payload("w"), {})
    with pytest.raises(CheckpointError, match="model_config"):
        check_compatible(path, tiny_config().to_hf_dict())


def test_complete_marker_holds_the_manifest_of_every_file(tmp_path):
    import hashlib

    from bitnet_train.train.checkpoint import read_manifest, verify

    ck = Checkpointer(tmp_path, keep_last=2)
    path = ck.save(5, _payload("weights"), {"note": "x"})
    manifest = read_manifest(path)
    assert sorted(manifest["files"]) == ["metadata.json", "model.bin", "sub/rng.pkl"]
    want = hashlib.sha256(b"weights").hexdigest()
    assert manifest["files"]["model.bin"] == {"bytes": 7, "sha256": want}
    verify(path)
    (path / "sub" / "rng.pkl").write_text("RNG")  # same size, other bytes
    with pytest.raises(CheckpointError, match=r"sub/rng\.pkl is damaged"):
        verify(path)


def test_newest_intact_skips_damaged_and_legacy_markers_still_load(tmp_path, caplog):
    ck = Checkpointer(tmp_path, keep_last=5)
    old = ck.save(1, _payload("a"), {})
    (old / "COMPLETE").write_text("1\n")  # a checkpoint written before manifests
    new = ck.save(2, _payload("b"), {})
    (new / "model.bin").write_text("")
    path, damaged = ck.newest_intact()
    assert path == old and [p for p, _ in damaged] == [new]
    assert "predates integrity manifests" in caplog.text
    moved = ck.quarantine(new)
    assert moved.name == "step_00000002.damaged" and ck.all() == [old]
    assert ck.step_of(old) == 1


def test_background_commit_publishes_and_its_failure_surfaces_at_the_next_begin(tmp_path,
                                                                               monkeypatch):
    import bitnet_train.train.checkpoint as ckpt_mod

    ck = Checkpointer(tmp_path, keep_last=2)
    (ck.begin(1) / "model.bin").write_text("one")
    ck.commit_async(1, {})
    assert ck.wait() == tmp_path / "step_00000001" and ck.latest().name == "step_00000001"

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "_write_synced", full)
    (ck.begin(2) / "model.bin").write_text("two")
    ck.commit_async(2, {})
    with pytest.raises(TrainingError, match="disk full while writing checkpoint step 2"):
        ck.begin(3)  # joins the failed commit first
    assert _entries(tmp_path) == ["step_00000001"]
