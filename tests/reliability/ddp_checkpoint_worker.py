"""Run by test_ddp_checkpoint.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Two steps with a checkpoint after each; at the second checkpoint, the write of rank 1's data
state fails (ENOSPC). Every rank must raise (none may wait forever at a barrier), the staging
directory must go, and the first checkpoint must still resume on both ranks. Each rank writes
what it saw to OUT/rank{r}.txt.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bitnet_train.errors import TrainingError  # noqa: E402
from bitnet_train.model import BitNetForCausalLM  # noqa: E402
from bitnet_train.train.checkpoint import Checkpointer  # noqa: E402
from bitnet_train.train.objectives.language_model import LanguageModelObjective  # noqa: E402
from bitnet_train.train.schedules import ScheduleConfig  # noqa: E402
from bitnet_train.train.trainer import Trainer  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.train.test_trainer import ListPlan, fixed_batch  # noqa: E402


def build(acc: Accelerator, root: Path) -> Trainer:
    model = BitNetForCausalLM(tiny_config())
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)
    ids, labels = fixed_batch()
    r = acc.process_index
    mine = {"input_ids": ids[4 * r:4 * r + 4], "labels": labels[4 * r:4 * r + 4]}
    return Trainer(
        accelerator=acc, model=model, objective=LanguageModelObjective("mean", "torch"),
        optimizer=opt, schedule=ScheduleConfig(warmup_steps=0, stage_boundary=1.0),
        data=ListPlan([[mine], [mine], [mine]]), checkpointer=Checkpointer(root / "ck", 5),
        total_steps=3, grad_accum=1, grad_clip=1.0, progress_bar=False,
    )


def main(out: str) -> None:
    root = Path(out)
    acc = Accelerator(cpu=True)
    r = acc.process_index
    trainer = build(acc, root)
    lines = []
    real_save = torch.save

    def full(obj, f, *a, **k):
        if "data_state" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    for _ in range(2):
        trainer.train_step()
        trainer.step += 1
        if trainer.step == 2 and r == 1:
            torch.save = full
        try:
            trainer.save_checkpoint()
            lines.append(f"saved {trainer.step}")
        except TrainingError as exc:
            lines.append(f"error {trainer.step}: {exc}")
        finally:
            if trainer.step == 2 and r == 1:
                torch.save = real_save
    if acc.is_main_process:
        trainer.checkpointer.wait()
    acc.wait_for_everyone()
    resumed = build(Accelerator(cpu=True), root)  # a fresh one: save/load_state cover its models
    resumed.load_checkpoint(trainer.checkpointer.latest())
    lines.append(f"resumed at {resumed.step}")
    (root / f"rank{r}.txt").write_text("\n".join(lines) + "\n")
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
