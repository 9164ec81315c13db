"""Two-stage learning-rate and weight-decay schedules of BitNet b1.58 (2B4T report, section 3).

Pure functions of the optimizer step; the trainer calls `apply_schedule` before every step.

Shape, for ``total_steps = T``, stage boundary ``b = stage_boundary_step(T, cfg)``,
warmup ``W = warmup_length(T, cfg)`` (``warmup_steps``, else ``warmup_ratio * T``)::

    lr   |    /~~--__                       stage 1: linear warmup, then a cosine from lr_peak
         |   /       ~~--__                   that would reach lr_stage1_end at step b
         |  /              |                stage 2: an abrupt drop to lr_stage2_peak at step b,
         | /               |~~--__            then a cosine that would reach lr_floor at step T
         |/                |      ~~--__
         +-----------------+-----------> step
         0   W             b            T

    wd   = wd_peak * lr(step) / lr_peak     in stage 1 (the same curve, scaled to peak at wd_peak)
         = 0                                in stage 2, exactly

Step convention: ``step`` counts optimizer steps from 0 (the first update) to T - 1 (the last).
- Warmup: ``lr = lr_peak * (step + 1) / W`` for ``step < W``, so step 0 already learns
  (lr_peak / W, not 0) and step W - 1 is the first at lr_peak.
- Each cosine runs over a half-open range of steps and reaches its end value one step past it
  (as transformers' ``get_cosine_schedule_with_warmup``): stage 1's cosine covers [W, b) and
  would reach lr_stage1_end at b, which is already stage 2; stage 2's covers [b, T) and would
  reach lr_floor at T, so the last step never runs at a zero learning rate.
- ``b = floor(stage_boundary * T + 0.5)`` (nearest step, halves up); ``stage_boundary = 1``
  gives a single-stage schedule (warmup + cosine), which is what SFT and DPO use.

Weight decay, read of the report ("a cosine schedule peaking at 0.1" in stage 1, "disabled" in
stage 2): it follows the stage-1 learning-rate curve scaled so that its peak is ``wd_peak``:
warmup, peak at step W - 1, cosine down to ``wd_peak * lr_stage1_end / lr_peak`` at the
boundary, then 0 for every stage-2 step. This is the literal reading of "peaking" (a cosine
with a peak, like the LR's), needs no extra knob, and keeps WD > 0 at every stage-1 step; the
drop to 0 at the boundary mirrors the LR's drop. The values are the ``weight_decay`` of torch's
decoupled AdamW (the update subtracts ``lr * wd * p``).

`total_steps` is an argument, not a config field: the trainer knows it (from trainer.max_steps,
or from the data for epoch-based SFT/DPO), so one schedule config serves runs of any length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bitnet_train.errors import ConfigError


@dataclass
class ScheduleConfig:
    """The `schedule` group. Defaults: the 1.3B-3.9B row of Microsoft's BitNet b1.58 training
    notes (peak LR 1.2e-3 then 8e-4, weight decay 0.1 then 0, 375 warmup steps)."""

    warmup_steps: int = 375
    """Linear warmup length in optimizer steps (0: start at lr_peak)."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the total steps T, used when warmup_steps is 0 (as in
    transformers, warmup_steps > 0 takes precedence): W = floor(warmup_ratio * T + 0.5). For
    recipes whose length is often overridden (the demo's `trainer.max_steps=5`)."""
    stage_boundary: float = 0.5
    """Fraction of total steps where stage 2 starts, in (0, 1]; 1 = a single stage."""
    lr_peak: float = 1.2e-3
    """Stage-1 peak learning rate, reached at the end of warmup."""
    lr_stage1_end: float = 1.0e-3
    """Where the stage-1 cosine would arrive at the boundary; must be >= lr_stage2_peak, so the
    boundary is a drop. Not published; 1e-3 keeps stage 1 at a high LR, as the notes describe."""
    lr_stage2_peak: float = 8.0e-4
    """The lower peak the LR drops to at the boundary (stage 2, the cooldown)."""
    lr_floor: float = 0.0
    """Where the stage-2 cosine would arrive at the last step + 1."""
    wd_peak: float = 0.1
    """Peak weight decay (stage 1); stage 2 uses 0."""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(
                f"schedule.warmup_ratio={self.warmup_ratio} must be in [0, 1) (0: use "
                "warmup_steps)"
            )
        if not 0.0 < self.stage_boundary <= 1.0:
            raise ConfigError(
                f"schedule.stage_boundary={self.stage_boundary} must be in (0, 1] (a fraction of "
                "the total steps; 1 means a single stage)"
            )
        if self.lr_peak <= 0.0:
            raise ConfigError(f"schedule.lr_peak must be > 0, got {self.lr_peak}")
        if not 0.0 <= self.lr_stage1_end <= self.lr_peak:
            raise ConfigError(
                f"schedule.lr_stage1_end={self.lr_stage1_end} must be in [0, lr_peak="
                f"{self.lr_peak}]: the stage-1 cosine decays from the peak"
            )
        if self.wd_peak < 0.0:
            raise ConfigError(f"schedule.wd_peak must be >= 0, got {self.wd_peak}")
        if self.stage_boundary == 1.0:
            return  # single stage: the stage-2 fields are unused
        if not 0.0 < self.lr_stage2_peak <= self.lr_stage1_end:
            raise ConfigError(
                f"schedule.lr_stage2_peak={self.lr_stage2_peak} must be in (0, lr_stage1_end="
                f"{self.lr_stage1_end}]: the LR drops at the stage boundary. Lower lr_stage2_peak "
                "or raise lr_stage1_end (or set stage_boundary=1 for a single stage)"
            )
        if not 0.0 <= self.lr_floor <= self.lr_stage2_peak:
            raise ConfigError(
                f"schedule.lr_floor={self.lr_floor} must be in [0, lr_stage2_peak="
                f"{self.lr_stage2_peak}]"
            )


def warmup_length(total_steps: int, cfg: ScheduleConfig) -> int:
    """Warmup steps of a run of `total_steps`: warmup_steps, or warmup_ratio's share of the run
    when warmup_steps is 0."""
    if cfg.warmup_steps == 0:
        return math.floor(cfg.warmup_ratio * total_steps + 0.5)
    return cfg.warmup_steps


def stage_boundary_step(total_steps: int, cfg: ScheduleConfig) -> int:
    """First step of stage 2 (== total_steps for a single stage). Validates the run length."""
    if total_steps <= 0:
        raise ConfigError(f"the schedule needs total_steps > 0, got {total_steps}")
    boundary = min(total_steps, math.floor(cfg.stage_boundary * total_steps + 0.5))
    warmup = warmup_length(total_steps, cfg)
    if boundary < 1 or warmup > boundary:
        key = "warmup_steps" if cfg.warmup_steps else "warmup_ratio"
        raise ConfigError(
            f"schedule.{key}={getattr(cfg, key)} ({warmup} warmup steps) does not fit in stage 1 "
            f"(steps [0, {boundary}) of {total_steps} with stage_boundary={cfg.stage_boundary});"
            f" lower schedule.{key} or train for more steps"
        )
    return boundary


def stage_at(step: int, total_steps: int, cfg: ScheduleConfig) -> int:
    """1 or 2: the stage that optimizer step `step` belongs to."""
    return 1 if step < stage_boundary_step(total_steps, cfg) else 2


def _cosine(start: float, end: float, progress: float) -> float:
    """Half-cosine from `start` (progress 0) to `end` (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _stage1_lr(step: int, boundary: int, warmup: int, cfg: ScheduleConfig) -> float:
    if step < warmup:
        return cfg.lr_peak * (step + 1) / warmup
    return _cosine(cfg.lr_peak, cfg.lr_stage1_end, (step - warmup) / (boundary - warmup))


def lr_at(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Learning rate of optimizer step `step` (0-based). Steps >= total_steps get the floor."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    boundary = stage_boundary_step(total_steps, cfg)
    if step < boundary:
        return _stage1_lr(step, boundary, warmup_length(total_steps, cfg), cfg)
    return _cosine(cfg.lr_stage2_peak, cfg.lr_floor, (step - boundary) / (total_steps - boundary))


def wd_at(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Weight decay of step `step`: the stage-1 LR curve scaled to peak at wd_peak; 0 in stage 2."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    boundary = stage_boundary_step(total_steps, cfg)
    if step >= boundary:
        return 0.0
    lr = _stage1_lr(step, boundary, warmup_length(total_steps, cfg), cfg)
    return cfg.wd_peak * lr / cfg.lr_peak


def apply_schedule(
    optimizer: torch.optim.Optimizer, step: int, total_steps: int, cfg: ScheduleConfig
) -> dict[str, float]:
    """Set every param group's lr, and weight_decay where the group's `apply_weight_decay` is
    True (0 elsewhere), for optimizer step `step`. Returns {"lr": ..., "weight_decay": ...}."""
    lr, wd = lr_at(step, total_steps, cfg), wd_at(step, total_steps, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = wd if group.get("apply_weight_decay") else 0.0
    return {"lr": lr, "weight_decay": wd}


def param_groups(model: nn.Module, decay_embeddings: bool = False) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on the matrices of linear projections only.

    Decayed: the 2-D weight of every BitLinear and nn.Linear (the latent weights of the ternary
    projections; an untied lm_head). Not decayed: norms, biases, and embeddings, including an
    lm_head tied to them (shrinking rarely-seen token rows toward 0 only hurts), unless
    `decay_embeddings`. Frozen parameters are left out. Each group carries
    `apply_weight_decay`, which `apply_schedule` reads; groups with no parameters are dropped.
    """
    from bitnet_train.model.bitlinear import BitLinear

    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrix_ids = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, BitLinear | nn.Linear) and m.weight.ndim == 2
    }
    decay_ids = (matrix_ids - embedding_ids) | (embedding_ids if decay_embeddings else set())
    decay, no_decay = [], []
    for p in model.parameters():  # yields a tied parameter once
        if p.requires_grad:
            (decay if id(p) in decay_ids else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": 0.0, "apply_weight_decay": True, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "apply_weight_decay": False, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]
