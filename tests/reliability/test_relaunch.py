"""A refused relaunch leaves the run directory exactly as it was (through `run` and through
train.py, whose Hydra app writes nothing there either); an accepted one cleans up what a killed
final/ write left."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet_train.atomic import recover_atomic_directory
from bitnet_train.errors import CheckpointError
from bitnet_train.io import load_model, save_model
from bitnet_train.model import build_model
from bitnet_train.train.run import run
from tests.conftest import tiny_config
from tests.train.helpers import TINY_MODEL, make_tokenizer, pretrain_config, write_corpus

ROOT = Path(__file__).resolve().parents[2]


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under root with its modification time and bytes (and every directory)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file()
                                       else b"<dir>")
            for p in sorted(root.rglob("*"))}


def test_refused_relaunch_leaves_the_run_directory_untouched(tmp_path):
    make_tokenizer(tmp_path)
    corpus = write_corpus(tmp_path / "corpus")
    run(pretrain_config(tmp_path, corpus, "trainer.max_steps=4", "trainer.checkpoint_every=2"))
    run_dir = tmp_path / "run"
    before = snapshot(run_dir)
    bigger = ["model.hidden_size=128", "model.intermediate_size=256"]
    with pytest.raises(CheckpointError, match="hidden_size=64 there, hidden_size=128"):
        run(pretrain_config(tmp_path, corpus, "trainer.max_steps=6", *bigger))
    assert snapshot(run_dir) == before
    # the same through the command line (Hydra composes the config and owns logging)
    args = [f"{o}" for o in TINY_MODEL if "hidden_size" not in o and "intermediate" not in o]
    cmd = [sys.executable, "train.py", "+recipe=demo_pretrain", f"tokenizer={tmp_path}/tokenizer",
           f"output_dir={run_dir}", f"data.stage1.sources.0.path={corpus}", "data.seq_len=32",
           "data.shuffle_buffer=0", "trainer.micro_batch_size=4", "trainer.max_steps=6",
           "trainer.progress_bar=false", "schedule.warmup_steps=2", "logger=none", *args,
           *bigger]
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and "hidden_size=64 there" in proc.stderr, proc.stderr[-2000:]
    assert snapshot(run_dir) == before


def test_leftovers_of_a_killed_final_write_are_recovered(tmp_path):
    model = build_model(tiny_config(), seed=1)
    final = save_model(model, tmp_path / "final")
    # killed while filling: a torn temporary directory
    torn = tmp_path / ".final.tmp-123-abcd"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\0" * 10)
    assert recover_atomic_directory(final) == [torn]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    # killed between the two renames: final/ is missing, the previous one sits in .final.old-*
    old = tmp_path / ".final.old-123-abcd"
    os.replace(final, old)
    shutil.copytree(old, tmp_path / ".final.tmp-123-abcd")
    removed = recover_atomic_directory(final)
    assert removed == [tmp_path / ".final.tmp-123-abcd"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    load_model(final)  # the previous complete directory, verified against its manifest
