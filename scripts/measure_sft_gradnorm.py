"""Gradient norms of SFT steps, summed vs mean loss, with and without clipping.

With `objective.reduction=sum` the step's gradient is the sum over its label tokens, so its
norm grows with the tokens in the batch; `optim.grad_clip=1.0` then clips every step. This
runs the same steps (same initial weights, same batches) under five settings and prints, per
step: label tokens N, the gradient norm before clipping, that norm / N (the mean loss's), the
clipping threshold, whether the step was clipped, and the norm of the weight update.

  sum   grad_clip=0                     sum   grad_clip=1 per step   sum   grad_clip=1 per item
  mean  grad_clip=0                     mean  grad_clip=1 per step

CPU, small scale (the demo's chat data and tokenizer; random or demo-pretrained weights):
    BITNET_DEMO_DIR=demo_out python scripts/measure_sft_gradnorm.py +recipe=demo_sft \\
        model.init=null --steps 6
GPU, the recipe's shape (2B4T model from its pretrained weights, packed 4096-token rows,
micro-batch 4; grad_accum 8 per GPU, or 64 on one GPU for the recipe's whole 256-row batch):
    python scripts/measure_sft_gradnorm.py +recipe=sft_2b4t model.init=DIR \\
        tokenizer=DIR data=demo_sft data.max_len=4096 trainer.grad_accum=64 --steps 5
Takes the same Hydra overrides as train.py; nothing is written but a scratch directory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SETTINGS = [  # (reduction, grad_clip, grad_clip_per)
    ("sum", 0.0, "step"), ("sum", 1.0, "step"), ("sum", 1.0, "item"),
    ("mean", 0.0, "step"), ("mean", 1.0, "step"),
]


def measure(overrides: list[str], setting: tuple[str, float, str], steps: int,
            scratch: Path) -> list[dict[str, float]]:
    """Run `steps` optimizer steps of the SFT config under one setting; per-step metrics."""
    from bitnet_train.data.tokenizer import load_tokenizer
    from bitnet_train.train.checkpoint import Checkpointer
    from bitnet_train.train.config import compose, to_train_config
    from bitnet_train.train.data_plan import build_batch_plan
    from bitnet_train.train.run import (
        build_accelerator,
        build_objective,
        build_optimizer,
        build_or_load_model,
    )
    from bitnet_train.train.schedules import apply_schedule
    from bitnet_train.train.trainer import Trainer

    reduction, clip, per = setting
    cfg = to_train_config(compose([*overrides, f"objective.reduction={reduction}",
                                   f"optim.grad_clip={clip}", f"optim.grad_clip_per={per}",
                                   "logger=none", f"output_dir={scratch}"]))
    if cfg.objective.name != "sft":
        raise SystemExit(f"this measures SFT; the config's objective is {cfg.objective.name}")
    accelerator = build_accelerator(cfg, scratch)
    tokenizer = load_tokenizer(cfg.tokenizer)
    model = build_or_load_model(cfg.model, cfg.seed)
    model.train()
    objective = build_objective(cfg, model)
    optimizer = build_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    plan = build_batch_plan(cfg, tokenizer, accelerator, objective)
    trainer = Trainer(accelerator=accelerator, model=model, objective=objective,
                      optimizer=optimizer, schedule=cfg.schedule, data=plan,
                      checkpointer=Checkpointer(scratch / "ck", keep_last=1),
                      total_steps=plan.total_steps, grad_accum=cfg.trainer.grad_accum,
                      grad_clip=clip, grad_clip_per=per, progress_bar=False)
    rows = []
    for step in range(min(steps, plan.total_steps)):
        apply_schedule(optimizer, step, plan.total_steps, cfg.schedule)
        before = [p.detach().clone() for p in model.parameters()]
        result = trainer.train_step()
        trainer.step += 1
        with torch.no_grad():
            update = torch.sqrt(sum(((p - b).float() ** 2).sum()
                                    for p, b in zip(model.parameters(), before)))
        m = result.metrics
        n = m["items"]
        norm = m["grad_norm"]
        rows.append({"step": step, "items": n, "grad_norm": norm,
                     "per_item": norm / n if reduction == "sum" else norm,
                     "threshold": trainer.clip_threshold(n), "clipped": m["clipped"],
                     "update": float(update), "loss": m["loss"]})
        del before
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +recipe=sft_2b4t")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    header = (f"{'setting':<26} {'step':>4} {'tokens N':>9} {'grad norm':>11} {'norm / N':>10} "
              f"{'clip at':>10} {'clipped':>7} {'|update|':>10} {'loss':>8}")
    print(header)
    for setting in SETTINGS:
        with tempfile.TemporaryDirectory() as scratch:
            rows = measure(args.overrides, setting, args.steps, Path(scratch))
        reduction, clip, per = setting
        name = f"{reduction} clip={clip:g}" + (f" per {per}" if clip else "")
        for r in rows:
            clip_at = f"{r['threshold']:.4g}" if r["threshold"] else "-"
            print(f"{name:<26} {r['step']:>4} {r['items']:>9.0f} {r['grad_norm']:>11.4g} "
                  f"{r['per_item']:>10.4g} {clip_at:>10} {'yes' if r['clipped'] else 'no':>7} "
                  f"{r['update']:>10.4g} {r['loss']:>8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
