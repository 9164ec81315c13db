"""A write error at each file of a checkpoint, and of final/, whatever library raises it.

Every case trains the tiny run to step 4 with checkpoints at steps 2 and 4 and makes the write of
one file of the step-4 checkpoint fail the way its library fails on a full disk (safetensors:
SafetensorError "os error 28"; torch.save: RuntimeError "unexpected pos", which names no errno;
Python writes: OSError ENOSPC / EDQUOT). Two cases use a real failure instead: a file size limit
(RLIMIT_FSIZE) that makes the kernel refuse the write, so safetensors and torch raise exactly
what they raise on a full disk, with EFBIG in place of ENOSPC.
"""

from __future__ import annotations

import errno
import pathlib
import resource
import shutil
import signal
from pathlib import Path

import accelerate.utils.other as acc_other
import pytest
import torch
from safetensors import SafetensorError

import bitnet_train.export.hf as hf_writer  # writes final/ (save_model -> write_master)
import bitnet_train.train.checkpoint as ckpt_mod
from bitnet_train.data.tokenizer import load_tokenizer
from bitnet_train.errors import TrainingError, WriteError
from bitnet_train.train.checkpoint import Checkpointer, verify
from bitnet_train.train.run import run
from bitnet_train.train.trainer import Trainer
from tests.train.helpers import make_tokenizer, pretrain_config, write_corpus

RUN = ["trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.keep_last=3"]
STAGING = ".tmp-step_00000004"
NO_SPACE = "No space left on device"
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("write_errors")
    make_tokenizer(root)
    corpus = write_corpus(root / "corpus")
    reference = run(pretrain_config(_fresh(root, root / "reference"), corpus, *RUN))
    weights = {k: v.clone() for k, v in reference.trainer.accelerator.unwrap_model(
        reference.trainer.model).state_dict().items()}
    return root, corpus, weights


def _fresh(root: Path, where: Path) -> Path:
    shutil.copytree(root / "tokenizer", where / "tokenizer")
    return where


def _in_staging(path) -> bool:
    return STAGING in str(path)


def _fail_safetensors(monkeypatch, exc):
    orig = acc_other.safe_save_file

    def save(obj, filename, *a, **k):
        if _in_staging(filename):
            Path(filename).write_bytes(b"\0" * 4096)  # what a full disk leaves behind
            raise exc
        return orig(obj, filename, *a, **k)

    monkeypatch.setattr(acc_other, "safe_save_file", save)


def _fail_torch_save(monkeypatch, name, exc):
    orig = torch.save

    def save(obj, f, *a, **k):
        if _in_staging(f) and Path(f).name == name:
            Path(f).write_bytes(b"PK\3\4" * 1024)
            raise exc
        return orig(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)


def _fail_tokenizer(monkeypatch, root, exc):
    cls = type(load_tokenizer(str(root / "tokenizer")))
    orig = cls.save_pretrained

    def save_pretrained(self, directory, *a, **k):
        if _in_staging(directory):
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / "tokenizer.json").write_text('{"trunc')
            raise exc
        return orig(self, directory, *a, **k)

    monkeypatch.setattr(cls, "save_pretrained", save_pretrained)


def _fail_write_text(monkeypatch, name, exc):
    """metadata.json is written by the background commit thread."""
    orig = pathlib.Path.write_text

    def write_text(self, *a, **k):
        if _in_staging(self) and self.name == name:
            raise exc
        return orig(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


def _fail_marker(monkeypatch, exc):
    orig = ckpt_mod._write_synced

    def write_synced(path, text):
        if _in_staging(path) and Path(path).name == ckpt_mod.COMPLETE:
            Path(path).write_text(text[:10])
            raise exc
        return orig(path, text)

    monkeypatch.setattr(ckpt_mod, "_write_synced", write_synced)


def enospc():
    return OSError(errno.ENOSPC, NO_SPACE)


CASES = {
    # file of the step-4 checkpoint -> (how its write fails, free bytes seen, full disk?)
    "model.safetensors": (lambda mp, root: _fail_safetensors(mp, SafetensorError(
        f"Error while serializing: I/O error: {NO_SPACE} (os error 28)")), None, True),
    "optimizer.bin": (lambda mp, root: _fail_torch_save(
        mp, "optimizer.bin", RuntimeError(TORCH_FULL)), 0, True),
    "optimizer.bin, space left": (lambda mp, root: _fail_torch_save(
        mp, "optimizer.bin", RuntimeError(TORCH_FULL)), None, False),
    "random_states_0.pkl": (lambda mp, root: _fail_torch_save(
        mp, "random_states_0.pkl", enospc()), None, True),
    "data_state_shard00000.pt": (lambda mp, root: _fail_torch_save(
        mp, "data_state_shard00000.pt", enospc()), None, True),
    "trainer_state.pt": (lambda mp, root: _fail_torch_save(
        mp, "trainer_state.pt", OSError(errno.EDQUOT, "Disk quota exceeded")), None, True),
    "tokenizer/": (lambda mp, root: _fail_tokenizer(mp, root, enospc()), None, True),
    "metadata.json": (lambda mp, root: _fail_write_text(mp, "metadata.json", enospc()), None,
                      True),
    "COMPLETE": (lambda mp, root: _fail_marker(mp, enospc()), None, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_write_error_at_each_checkpoint_file(assets, tmp_path, monkeypatch, case):
    root, corpus, _ = assets
    inject, free, full = CASES[case]
    inject(monkeypatch, root)
    if free is not None:  # the filesystem as a full disk leaves it
        monkeypatch.setattr(ckpt_mod, "free_bytes", lambda path: free)
    cfg = pretrain_config(_fresh(root, tmp_path), corpus, *RUN)
    with pytest.raises(TrainingError) as err:
        run(cfg)
    msg = str(err.value)
    ck = tmp_path / "run" / "checkpoints"
    head = "disk full while writing" if full else "writing checkpoint step 4"
    assert msg.startswith(f"{head}") and f"checkpoint step 4 to {ck}" in msg, msg
    assert "it needs about" in msg and "is free there" in msg  # bytes needed, bytes free
    assert "an unknown amount is free" not in msg
    assert f"the previous checkpoint {ck / 'step_00000002'} is intact" in msg
    # the staging directory is gone and the previous checkpoint still verifies
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000002"]
    verify(ck / "step_00000002")


def _limit_file_size(monkeypatch, limit: int) -> None:
    """During the step-4 checkpoint only, refuse writes past `limit` bytes per file."""
    orig = Trainer.save_checkpoint

    def save_checkpoint(self):
        if self.step != 4:
            return orig(self)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, not the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            return orig(self)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old)

    monkeypatch.setattr(Trainer, "save_checkpoint", save_checkpoint)


@pytest.mark.parametrize("limit, library_error", [
    (300_000, "SafetensorError"),  # model.safetensors (431 kB) is refused first
    (600_000, "RuntimeError"),     # optimizer.bin (878 kB), by torch.save
])
def test_real_write_failure_then_resume_is_exact(assets, tmp_path, monkeypatch, limit,
                                                 library_error):
    root, corpus, reference = assets
    cfg = pretrain_config(_fresh(root, tmp_path), corpus, *RUN)
    with monkeypatch.context() as mp:
        _limit_file_size(mp, limit)
        with pytest.raises(TrainingError) as err:
            run(cfg)
    ck = tmp_path / "run" / "checkpoints"
    assert f"writing checkpoint step 4 to {ck} failed ({library_error}:" in str(err.value)
    assert "previous checkpoint" in str(err.value)
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000002"]
    # space is back: the relaunch resumes from step 2 and ends where the uninterrupted run did
    resumed = run(cfg)
    assert [h.step for h in resumed.history] == [2, 3]
    got = resumed.trainer.accelerator.unwrap_model(resumed.trainer.model).state_dict()
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_final_write_error_names_the_directory_and_is_cleaned(assets, tmp_path, monkeypatch):
    root, corpus, reference = assets
    cfg = pretrain_config(_fresh(root, tmp_path), corpus, *RUN)
    orig = hf_writer.save_file

    def full(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError(f"Error while serializing: I/O error: {NO_SPACE} (os error 28)")

    with monkeypatch.context() as mp:
        mp.setattr(hf_writer, "save_file", full)
        with pytest.raises(WriteError) as err:
            run(cfg)
    final = tmp_path / "run" / "final"
    assert str(err.value).startswith(f"disk full while writing {final} (SafetensorError")
    weights = sum(v.numel() * v.element_size() for k, v in reference.items()
                  if k != "lm_head.weight")
    assert f"it needs about {weights / 1e3:.2f} kB" in str(err.value)  # the tensors (tied head)
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".final")]
    assert Checkpointer(final.parent / "checkpoints", 3).latest().name == "step_00000004"
    hf_writer.save_file = orig
    resumed = run(cfg)  # nothing left to train: writes final/ from the step-4 checkpoint
    assert resumed.history == []
    from bitnet_train.io import load_model

    model, _ = load_model(final)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
