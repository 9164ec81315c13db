"""Plot a recipe's learning-rate and weight-decay schedules to a PNG, stage boundary marked.

    python scripts/plot_schedule.py +recipe=pretrain_2b4t [--out schedule.png] [--steps N]

Takes the same overrides as train.py. The run length is trainer.max_steps (or --steps for
epoch-based recipes, whose length depends on the data).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from bitnet_train.train.config import compose  # noqa: E402
from bitnet_train.train.schedules import (  # noqa: E402
    ScheduleConfig,
    lr_at,
    stage_boundary_step,
    wd_at,
)


def plot(schedule: ScheduleConfig, total_steps: int, out: Path, title: str) -> Path:
    steps = list(range(total_steps))
    lrs = [lr_at(s, total_steps, schedule) for s in steps]
    wds = [wd_at(s, total_steps, schedule) for s in steps]
    boundary = stage_boundary_step(total_steps, schedule)
    fig, ax_lr = plt.subplots(figsize=(8, 4))
    ax_lr.plot(steps, lrs, color="tab:blue", label="learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel("learning rate", color="tab:blue")
    ax_wd = ax_lr.twinx()
    ax_wd.plot(steps, wds, color="tab:orange", linestyle=":", label="weight decay")
    ax_wd.set_ylabel("weight decay", color="tab:orange")
    if boundary < total_steps:
        ax_lr.axvline(boundary, color="gray", linestyle="--", label=f"stage 2 (step {boundary})")
    handles = ax_lr.get_legend_handles_labels()[0] + ax_wd.get_legend_handles_labels()[0]
    ax_lr.legend(handles=handles, loc="upper right")
    ax_lr.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="schedule.png")
    parser.add_argument("--steps", type=int, default=0, help="override the run length")
    args, overrides = parser.parse_known_args(argv)
    cfg = compose(overrides)
    schedule = OmegaConf.to_object(cfg.schedule)
    total = args.steps or int(cfg.trainer.max_steps)
    if total <= 0:
        parser.error("this recipe is epoch-based: pass --steps N")
    recipe = next((o.split("=", 1)[1] for o in overrides if o.startswith("+recipe=")), "config")
    path = plot(schedule, total, Path(args.out), f"{recipe}: {total} steps")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
