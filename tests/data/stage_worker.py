"""Run by test_pretrain_stages.py under `torchrun --nproc_per_node 2`: each rank reads a
two-stage PretrainPlan over a local corpus straight through (saving its plan state mid-stage-2
on the way), logs the all-reduced token metrics, then reads again with a fresh plan resumed
from the saved state; it saves both runs' batches."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bitnet_train.data.config import MixtureConfig, PretrainDataConfig, SourceConfig  # noqa: E402
from bitnet_train.data.tokenizer import load_tokenizer  # noqa: E402
from bitnet_train.train.data_plan import PretrainPlan  # noqa: E402
from bitnet_train.train.schedules import ScheduleConfig  # noqa: E402

STEPS, SAVE_AT, GRAD_ACCUM = 16, 11, 2


def plan_for(corpus: Path, tokenizer, rank: int) -> PretrainPlan:
    def src(name: str, weight: float) -> SourceConfig:
        return SourceConfig(name=name, path=str(corpus / name), weight=weight)

    cfg = PretrainDataConfig(
        seq_len=32, tokenize_batch_size=4, seed=11,
        stage1=MixtureConfig(sources=[src("alpha", 1.0), src("beta", 1.0)]),
        stage2=MixtureConfig(sources=[src("alpha", 2.0), src("gamma", 1.0)]))
    return PretrainPlan(cfg, tokenizer, rank=rank, world_size=2, micro_batch_size=2,
                        total_steps=STEPS, schedule=ScheduleConfig(warmup_steps=1,
                                                                   stage_boundary=0.5),
                        grad_accum=GRAD_ACCUM)


def read(plan: PretrainPlan, first: int, save_to: Path | None = None) -> list:
    batches = []
    for step in range(first, STEPS):
        if save_to is not None and step == SAVE_AT:
            torch.save(plan.state_dict(), save_to)
        batches.append([b["input_ids"] for b in plan.batches_for_step(step, GRAD_ACCUM)])
    return batches


def main(corpus: str, tokenizer_dir: str, out: str) -> None:
    logging.basicConfig(level=logging.INFO)  # the epoch wraps are logged at INFO
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2, acc.num_processes
    rank, out_dir = acc.process_index, Path(out)
    tokenizer = load_tokenizer(tokenizer_dir)
    state = out_dir / f"state{rank}.pt"
    plan = plan_for(Path(corpus), tokenizer, rank)
    batches = read(plan, 0, save_to=state)
    metrics = plan.log_metrics(acc)  # all-reduces: every rank calls it
    # a fresh plan (as after a restart) from the state written mid-stage-2
    restarted = plan_for(Path(corpus), tokenizer, rank)
    restarted.load_state_dict(torch.load(state, weights_only=True))
    torch.save({"batches": batches, "resumed": read(restarted, SAVE_AT), "metrics": metrics,
                "local": plan.stream.stats()}, out_dir / f"rank{rank}.pt")
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:4])
