"""Run by test_heldout.py under `torchrun --nproc_per_node 2` (and in-process with one): the
held-out token loss of a fixed model on 5 fixed batches, all-reduced; rank 0 writes it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bitnet_train.eval.heldout import TokenLossEvaluator  # noqa: E402
from bitnet_train.model import build_model  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402


def items() -> list[tuple[str, dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(5):  # an odd count: one process runs a weightless extra batch
        ids = torch.randint(3, 512, (2 + i % 2, 12), generator=gen)
        labels = ids.clone()
        labels[:, : 1 + i] = -100
        out.append(("ab"[i % 2], {"input_ids": ids, "labels": labels}))
    return out


def evaluate_once(accelerator: Accelerator | None = None) -> dict[str, float]:
    acc = accelerator or Accelerator(cpu=True)
    model = acc.prepare(build_model(tiny_config(initializer_range=0.1), seed=0))
    return TokenLossEvaluator(items(), acc, loss_impl="torch")(model)


if __name__ == "__main__":
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2, acc.num_processes
    metrics = evaluate_once(acc)
    if acc.is_main_process:
        Path(sys.argv[1]).write_text(json.dumps(metrics))
    acc.wait_for_everyone()
