"""kill -9 anywhere in a tiny run, then `trainer.resume=auto`: the losses and the final weights
equal the uninterrupted run's, bit for bit, and the run directory holds no leftovers.

Each seed draws a chain of launches of the same run directory: three killed at random points
(inside a step, in the middle of a checkpoint file, while the background thread hashes, before
COMPLETE, between COMPLETE and the rename, or at a random moment after a random step), one killed
while final/ is written, and a last one that must finish. Every launch resumes from what the
previous one left. The launches are forked from one runner process (tests/reliability/
crash_runner.py), which keeps the whole module at a few seconds per seed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.helpers import make_tokenizer, write_corpus

ROOT = Path(__file__).resolve().parents[2]
SEEDS = (0, 1, 2, 3, 4)
OVERRIDES = ["trainer.max_steps=16", "trainer.checkpoint_every=2", "trainer.keep_last=2",
             "data.shuffle_buffer=16"]
CALL_TARGETS = {  # target -> largest nth drawn (all reached within a launch's first checkpoints)
    "optimizer_step": 3, "model_file": 2, "torch_save": 6, "hash": 9, "complete": 2,
    "publish": 2,
}


def _targets() -> list[str]:
    """Three kill targets per seed, drawn so that every target occurs in some seed."""
    every = [*CALL_TARGETS, "time"]
    rng = random.Random(1234)
    picks = every + rng.choices(every, k=3 * len(SEEDS) - len(every))
    rng.shuffle(picks)
    return picks


def kill_chain(seed: int) -> list[dict | None]:
    rng = random.Random(seed)
    kills: list[dict | None] = []
    for target in _targets()[3 * seed: 3 * seed + 3]:
        if target == "time":
            kills.append({"kind": "time", "after_step": rng.randint(1, 2),
                          "delay": round(rng.uniform(0.0, 0.2), 3)})
        else:
            kills.append({"kind": "call", "target": target,
                          "nth": rng.randint(1, CALL_TARGETS[target])})
    kills.append({"kind": "call", "target": ("final_file", "final_rename")[seed % 2], "nth": 1})
    kills.append(None)  # the launch that must finish
    return kills


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """Run the reference and every seed's chain in one runner process; returns (root, results)."""
    root = tmp_path_factory.mktemp("kill")
    make_tokenizer(root)
    corpus = write_corpus(root / "corpus")
    runs = [{"name": "reference", "launches": [None]}]
    runs += [{"name": f"seed{s}", "launches": kill_chain(s)} for s in SEEDS]
    for r in runs:
        r["workdir"] = str(root / r["name"])
        shutil.copytree(root / "tokenizer", root / r["name"] / "tokenizer")
    spec = root / "spec.json"
    spec.write_text(json.dumps({"corpus": str(corpus), "overrides": OVERRIDES, "runs": runs}))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "tests.reliability.crash_runner", str(spec)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, json.loads((root / "results.json").read_text()), proc.stderr


def _losses(workdir: Path) -> list[tuple[int, int, float]]:
    lines = (workdir / "losses.jsonl").read_text().splitlines()
    return [(d["launch"], d["step"], d["loss"]) for d in map(json.loads, lines)]


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_kill_anywhere_then_resume_is_exact(crashed, seed):
    root, results, stderr = crashed
    ref = {step: loss for _, step, loss in _losses(root / "reference")}
    assert sorted(ref) == list(range(16)), results["reference"]
    launches = results[f"seed{seed}"]
    statuses = [launch["status"] for launch in launches]
    assert statuses[-1] == "exit 0", (statuses, stderr[-3000:])
    # the test must have crashed the run: every kill on a call, and the final/ one, hit
    for launch in launches[:-1]:
        if launch["kill"]["kind"] == "call":
            assert launch["status"] == "signal 9", launches
    # every step any launch trained gave the reference's loss, bit for bit
    seen = _losses(root / f"seed{seed}")
    assert {step for _, step, _ in seen} == set(range(16))
    for launch, step, loss in seen:
        assert loss == ref[step], (seed, launch, step, loss, ref[step], launches)
    # and the final weights are the reference's
    got = load_file(root / f"seed{seed}" / "run" / "final" / "model.safetensors")
    want = load_file(root / "reference" / "run" / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # nothing torn is left: no staging dirs, no .final.tmp / .final.old from the killed write
    run_dir = root / f"seed{seed}" / "run"
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".final.")]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_00000014", "step_00000016"]
