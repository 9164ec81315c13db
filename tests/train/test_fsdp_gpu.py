"""FSDP2 on several GPUs against one GPU, at the 2B4T width (2 layers): every gradient of the
first step, and 20 steps of DDP / FSDP2 / ternary all-gather through the real run().

Needs 2 GPUs (4 where noted by `BITNET_FSDP_GPUS=4`). Run on the device machine:
    pytest -m gpu tests/train/test_fsdp_gpu.py -s
The error tables print with -s. Tolerances follow tests/train/test_fast_paths_gpu.py: a path
passes when its error against the fp32 eager 1-GPU reference is at most twice the bf16 eager
1-GPU reference's own error plus a small floor; a shard's absmean, a dropped or doubled
gradient, or a frozen lm_head are off by tens of percent and fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port
from tests.train.fsdp_gpu_worker import GPU_RUN
from tests.train.helpers import make_tokenizer, pretrain_config, write_corpus

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
GPUS = int(os.environ.get("BITNET_FSDP_GPUS", "2"))
BF16_PARAMS = {"fsdp2_bf16_params"}  # parallel.param_dtype=bfloat16


def _launch(*args: str, timeout: int = 1800) -> None:
    if torch.cuda.device_count() < GPUS:
        pytest.skip(f"needs {GPUS} GPUs, found {torch.cuda.device_count()}")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(GPUS),
         "--master_port", str(free_port()), str(ROOT / "tests/train/fsdp_gpu_worker.py"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]


def test_fsdp2_first_step_equals_one_gpu_every_gradient(tmp_path):
    out = tmp_path / "grads.json"
    _launch("gradients", str(out))
    got = json.loads(out.read_text())
    for variant, r in got.items():
        worst = max(r["grads"].items(), key=lambda kv: kv[1][0] - 2 * kv[1][1])
        print(f"{variant}: loss err {r['loss_err']:.2e} (bf16 {r['loss_bf16_err']:.2e}); "
              f"worst gradient {worst[0]}: {worst[1][0]:.2e} (bf16 {worst[1][1]:.2e})")
        assert r["loss_err"] <= 2 * r["loss_bf16_err"] + 1e-3, variant
        for name, (err, bf16_err) in r["grads"].items():
            if variant in BF16_PARAMS:
                # weights rounded to bf16 before ternarizing: another (documented) contract,
                # measured at 3x the bf16 reference's error; a zeroed, halved or doubled
                # gradient is off by 0.5 to 1.0
                assert err <= 0.3, (variant, name, err, bf16_err)
            else:
                assert err <= 2 * bf16_err + 2e-3, (variant, name, err, bf16_err)


def test_ddp_and_fsdp2_track_one_gpu_for_20_steps(tmp_path):
    """The issue's symptom (FSDP2 at loss 9.91 where DDP reached 7.16 after 20 steps) cannot
    hide here. Measured on 2 H200s (2026-11-30, lr 1.2e-3): DDP equals the 1-GPU run to 4
    digits for 3 steps (loss 12.3295, 2.5039, 0.9067), then the two drift apart as bf16
    summation-order noise flips ternary codes (step 7: 1.064 vs 1.186; the loss jumped 0.9 ->
    5.2 at step 3). So: the first 3 steps within 1% for every variant; over 20 steps (at a
    calmer lr) each FSDP2 variant strays from one GPU at most twice as far as DDP does, plus
    2%, and ends within 10%."""
    make_tokenizer(tmp_path)
    write_corpus(tmp_path / "corpus")
    out = tmp_path / "steps.json"
    _launch("steps", str(tmp_path), str(out))
    got = json.loads(out.read_text())
    shutil.copytree(tmp_path / "tokenizer", tmp_path / "one" / "tokenizer")
    from bitnet_train.train.run import run

    one = run(pretrain_config(tmp_path / "one", tmp_path / "corpus", *GPU_RUN,
                              "trainer.grad_accum=4"))
    ref = [(h.metrics["loss"], h.metrics["grad_norm"]) for h in one.history]
    assert len(ref) == 20 and all(len(hist) == 20 for hist in got.values())
    stray = {}
    for name, hist in got.items():
        for h, (loss, norm) in zip(hist, ref):
            print(f"{name} step {h['step']}: loss {h['loss']:.4f} / {loss:.4f}, "
                  f"grad norm {h['grad_norm']:.3f} / {norm:.3f}")
        stray[name] = sum(abs(h["loss"] - loss) / loss for h, (loss, _) in zip(hist, ref)) / 20
    print("mean relative loss deviation from 1 GPU:", stray)
    for name, hist in got.items():
        for h, (loss, norm) in list(zip(hist, ref))[:3]:
            assert h["loss"] == pytest.approx(loss, rel=1e-2), (name, h["step"])
            assert h["grad_norm"] == pytest.approx(norm, rel=1e-2), (name, h["step"])
        assert hist[-1]["loss"] == pytest.approx(ref[-1][0], rel=0.1), name
        if name != "ddp":
            assert stray[name] <= 2 * stray["ddp"] + 0.02, (name, stray)
