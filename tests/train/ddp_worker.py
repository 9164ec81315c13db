"""Run by test_trainer.py under `torchrun --nproc_per_node 2`: one SGD(lr=1) step on this rank's
half of a fixed batch (two accumulation micro-batches), then rank 0 saves the weights; once
under DDP (accelerate) and once under FSDP2 (the model sharded by parallelize, gathered whole
to save)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bitnet_train.model import BitNetForCausalLM  # noqa: E402
from bitnet_train.train.checkpoint import Checkpointer  # noqa: E402
from bitnet_train.train.objectives.language_model import LanguageModelObjective  # noqa: E402
from bitnet_train.train.parallelize import FSDPSettings, parallelize  # noqa: E402
from bitnet_train.train.schedules import ScheduleConfig  # noqa: E402
from bitnet_train.train.sharding import (  # noqa: E402
    build_mesh,
    build_meta_model,
    gather_full_model,
    init_sharded,
)
from bitnet_train.train.trainer import Trainer  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.train.test_trainer import ListPlan, fixed_batch  # noqa: E402


def one_step(acc: Accelerator, reduction: str, strategy: str, out: str) -> None:
    cpu = torch.device("cpu")
    if strategy == "fsdp2":
        model, _ = build_meta_model(tiny_config())
        parallelize(model, cpu, kernels="reference", attention="sdpa",
                    fsdp=FSDPSettings(mesh=build_mesh(cpu)))
        init_sharded(model, cpu, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
    else:
        model = BitNetForCausalLM(tiny_config())
        model.init_weights(0)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        model, opt = acc.prepare(model, opt)
    ids, labels = fixed_batch()
    r = acc.process_index
    mine = [{"input_ids": ids[4 * r + i:4 * r + i + 2], "labels": labels[4 * r + i:4 * r + i + 2]}
            for i in (0, 2)]
    trainer = Trainer(
        accelerator=acc, model=model, objective=LanguageModelObjective(reduction, "torch"),
        optimizer=opt, schedule=ScheduleConfig(warmup_steps=0, stage_boundary=1.0, lr_peak=1.0,
                                               lr_stage1_end=1.0, wd_peak=0.0),
        data=ListPlan([mine]), checkpointer=Checkpointer(Path(out).parent / f"ck{r}", 1),
        total_steps=1, grad_accum=2, grad_clip=0.0, progress_bar=False,
    )
    trainer.train_step()
    whole = gather_full_model(model, tiny_config()) if strategy == "fsdp2" \
        else acc.unwrap_model(model)
    if acc.is_main_process:
        torch.save(whole.state_dict(), out)
    acc.wait_for_everyone()


def main(reduction: str, out: str) -> None:
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2, acc.num_processes
    for strategy in ("ddp", "fsdp2"):
        one_step(acc, reduction, strategy, out.replace(".pt", f"_{strategy}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
