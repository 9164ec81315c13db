"""Logical data shards: a run's data is a fixed number of streams, whatever the process count.

A run's data is split, when the run starts, into `num_shards` logical shards (the
`parallel.data_shards` setting; by default the number of processes then). Shard s is what
process s of a `num_shards`-process run would read: a PretrainPlan of stream s of num_shards,
or an EpochPlan over rows s, s + num_shards, ... of each epoch's permutation. Process r of W
owns shards r, r + W, r + 2W, ... (W must divide num_shards), and every optimizer step takes
`per_shard` consecutive micro-batches from each shard, so the step's global batch is the same
`num_shards * per_shard` micro-batches for any W; only which process computes them changes.

Guarantee on a resume with another number of processes W' (a divisor of num_shards): every
shard continues exactly at its checkpointed position (the datasets state, the shuffle buffer
and the packer's leftover tokens for a pretraining stream; epoch and row for SFT / DPO), so no
document or row is repeated or skipped, and from the resumed step on the run trains on exactly
the micro-batches the uninterrupted run would have (the same global batch per step, summed in
another order). Per-process accumulation becomes `per_shard * num_shards / W'`. A W' that does
not divide num_shards is refused (start a run with `parallel.data_shards` = a multiple of every
process count you mean to use).

Each shard's state is saved in its own file (`data_state_shard{s}.pt`) by the process owning
it, and read back by whichever process owns it after the resume.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bitnet_train.errors import CheckpointError, ConfigError
from bitnet_train.train.batch_plan import BatchPlan

log = logging.getLogger(__name__)

SHARD_FILE = "data_state_shard{:05d}.pt"
LEGACY_RANK_FILE = "data_state_rank{}.pt"


def owned_shards(rank: int, world_size: int, num_shards: int) -> list[int]:
    """The logical shards process `rank` of `world_size` reads: rank, rank + W, ..."""
    if num_shards % world_size:
        raise ConfigError(
            f"the run's data has {num_shards} logical shards, which {world_size} processes "
            f"cannot split evenly; use a number of processes that divides {num_shards}, or "
            f"start a new run with parallel.data_shards set to a multiple of {world_size}")
    return list(range(rank, num_shards, world_size))


def per_shard_accum(grad_accum: int, world_size: int, num_shards: int) -> int:
    """Micro-batches per shard per step, from the per-process accumulation."""
    k = num_shards // world_size
    if grad_accum % k:
        fit = k * max(1, grad_accum // k)
        raise ConfigError(
            f"trainer.grad_accum={grad_accum}: each of the {world_size} processes reads "
            f"{k} data shards, so its accumulation must be a multiple of {k} (the global batch "
            f"is data_shards x micro-batches per shard); use trainer.grad_accum={fit} or "
            "trainer.global_batch_tokens")
    return grad_accum // k


def resolve_num_shards(configured: int, world_size: int, checkpoint: int | None) -> int:
    """The run's shard count: the checkpoint's when resuming, else the config's (0: W)."""
    if checkpoint is not None:
        if configured and configured != checkpoint:
            raise ConfigError(
                f"parallel.data_shards={configured}, but the checkpoint being resumed was "
                f"written with {checkpoint} data shards, which a run cannot change; drop the "
                "override (0 keeps the checkpoint's)")
        return checkpoint
    return configured or world_size


def checkpoint_num_shards(meta: dict[str, Any], path: Path | None) -> int | None:
    """Data shards of a checkpoint: from its metadata, or (checkpoints written before shards
    existed) the number of per-rank data states in it."""
    if "data_shards" in meta:
        return int(meta["data_shards"])
    if path is None:
        return None
    legacy = sorted(path.glob(LEGACY_RANK_FILE.format("*")))
    return len(legacy) or None


class ShardedPlan(BatchPlan):
    """The micro-batches of this process: those of the logical shards it owns (see module
    docstring). `plans` maps shard -> its own plan (PretrainPlan / EpochPlan)."""

    def __init__(self, plans: dict[int, BatchPlan], num_shards: int, per_shard: int) -> None:
        if not plans:
            raise ConfigError("a process must own at least one data shard")
        self.plans, self.num_shards, self.per_shard = plans, num_shards, per_shard
        steps = {p.total_steps for p in plans.values()}
        if len(steps) != 1:
            raise ConfigError(f"data shards disagree on the run length: {sorted(steps)} steps")
        self.total_steps = steps.pop()
        self.counts: dict[str, int] = {}
        self.heldout = None  # trainer.eval_every's held-out set (the same on every process)
        self.heldout_ref_logps: Tensor | None = None

    def log_metrics(self, accelerator) -> dict[str, float]:
        plans = list(self.plans.values())
        combined = getattr(plans[0], "log_metrics_of", None)  # streams summed, one reduction
        return combined(plans, accelerator) if combined else plans[0].log_metrics(accelerator)

    def batches_for_step(self, step: int, grad_accum: int) -> list[dict[str, Tensor]]:
        if grad_accum != self.per_shard * len(self.plans):
            raise ValueError(f"grad_accum={grad_accum} but this process reads "
                             f"{len(self.plans)} shards x {self.per_shard} micro-batches")
        per = [p.batches_for_step(step, self.per_shard) for p in self.plans.values()]
        # shard by shard in turn: the i-th micro-batch of every shard, then the (i+1)-th
        return [b[i] for i in range(max(map(len, per), default=0)) for b in per if i < len(b)]

    def state_dict(self) -> dict[str, Any]:
        return {"num_shards": self.num_shards, "per_shard": self.per_shard,
                "shards": {s: p.state_dict() for s, p in self.plans.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, plan in self.plans.items():
            plan.load_state_dict(state["shards"][s])


def save_data_state(plan: BatchPlan, directory: Path, rank: int) -> None:
    """Write the data position of this process: one file per owned shard (a ShardedPlan), or
    one per rank for any other plan."""
    if isinstance(plan, ShardedPlan):
        for s, p in plan.plans.items():
            torch.save(p.state_dict(), directory / SHARD_FILE.format(s))
    else:
        torch.save(plan.state_dict(), directory / LEGACY_RANK_FILE.format(rank))


def load_data_state(plan: BatchPlan, directory: Path, rank: int) -> None:
    """Restore what `save_data_state` wrote, whichever process wrote each shard."""
    directory = Path(directory)
    if not isinstance(plan, ShardedPlan):
        plan.load_state_dict(_load(directory / LEGACY_RANK_FILE.format(rank), directory, rank))
        return
    for s, p in plan.plans.items():
        file = directory / SHARD_FILE.format(s)
        if not file.exists():  # written before logical shards: shard s was rank s's stream
            file = directory / LEGACY_RANK_FILE.format(s)
        p.load_state_dict(_load(file, directory, s))


def _load(file: Path, directory: Path, shard: int) -> Any:
    try:
        return torch.load(file, weights_only=False)
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"{directory} has no data state for shard {shard} ({file.name}): it was written "
            "with fewer data shards or is incomplete. Resume with a number of processes that "
            "divides the checkpoint's data_shards, or start the data from scratch"
        ) from exc
