"""Which micro-batches each optimizer step trains on.

- `PretrainPlan`: step-based; an infinite stream per pretraining stage, switched to the stage-2
  mixture at the schedule's boundary. Its state is the stage and the stream's position.
- `EpochPlan`: epoch-based (SFT, DPO); a step's micro-batches are a pure function of the step
  (epoch = step // steps_per_epoch), so resuming needs no data state beyond the step. The last
  step of an epoch takes the remaining micro-batches (fewer than grad_accum when they do not
  divide evenly), so every epoch is exactly one pass.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bitnet_train.data.pretrain import build_pretrain_stream
from bitnet_train.errors import ConfigError
from bitnet_train.train.config import TrainConfig, derive_grad_accum
from bitnet_train.train.schedules import ScheduleConfig, stage_at
from bitnet_train.train.trainer import BatchPlan

log = logging.getLogger(__name__)


class PretrainPlan(BatchPlan):
    def __init__(self, data_cfg, tokenizer, rank: int, world_size: int, micro_batch_size: int,
                 total_steps: int, schedule: ScheduleConfig) -> None:
        self.cfg, self.tokenizer = data_cfg, tokenizer
        self.rank, self.world_size, self.micro = rank, world_size, micro_batch_size
        self.total_steps, self.schedule = total_steps, schedule
        self.stage = 0
        self.stream = None

    def _stage_for(self, step: int) -> int:
        if self.cfg.stage2 is None:
            return 1
        return stage_at(step, self.total_steps, self.schedule)

    def _switch(self, stage: int) -> None:
        if self.stage:
            log.info("switching the data mixture to stage %d", stage)
        self.stage = stage
        self.stream = build_pretrain_stream(self.cfg, self.tokenizer, stage=stage, rank=self.rank,
                                            world_size=self.world_size, batch_size=self.micro)

    def batches_for_step(self, step: int, grad_accum: int) -> list[dict[str, Tensor]]:
        stage = self._stage_for(step)
        if stage != self.stage:
            self._switch(stage)
        return [next(self.stream) for _ in range(grad_accum)]

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "stream": self.stream.state_dict() if self.stream else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["stage"]:
            self._switch(state["stage"])
            self.stream.load_state_dict(state["stream"])


class EpochPlan(BatchPlan):
    """dataset: an EpochDataset (SFT rows or preference pairs) with random-access batches."""

    def __init__(self, dataset, epochs: int, micro_batch_size: int, grad_accum: int) -> None:
        if epochs <= 0:
            raise ConfigError("epoch-based data (SFT, DPO) needs trainer.epochs > 0")
        self.dataset, self.epochs, self.micro = dataset, epochs, micro_batch_size
        self.batches_per_epoch = dataset.num_batches(micro_batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / grad_accum)
        self.total_steps = epochs * self.steps_per_epoch
        self.grad_accum = grad_accum
        self.ref_logps: Tensor | None = None  # (num_rows, 2) when precomputed (DPO)
        self.counts: dict[str, int] = {}

    def rows_of(self, epoch: int, index: int) -> np.ndarray:
        return self.dataset.rank_rows(epoch)[index * self.micro:(index + 1) * self.micro]

    def batches_for_step(self, step: int, grad_accum: int) -> list[dict[str, Tensor]]:
        if step >= self.total_steps:
            return []
        epoch, k = divmod(step, self.steps_per_epoch)
        first = k * self.grad_accum
        last = min(first + self.grad_accum, self.batches_per_epoch)
        out = []
        for i in range(first, last):
            rows = self.rows_of(epoch, i)
            batch = self.dataset.collate(rows.tolist())
            if self.ref_logps is not None:
                ref = self.ref_logps[torch.as_tensor(rows)]
                batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])  # chosen then rejected
            out.append(batch)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state["dataset"])  # validates data / world size unchanged

    def all_rows(self) -> np.ndarray:
        """Every row this rank visits in any epoch."""
        return np.unique(np.concatenate([self.dataset.rank_rows(e) for e in range(self.epochs)]))


@torch.no_grad()
def precompute_reference_logps(plan: EpochPlan, reference, device, loss_impl: str) -> None:
    """One pass of the frozen reference over every pair this rank will see; then the reference
    can be freed. Stores (num_rows, 2) summed log-probs (chosen, rejected) on the plan."""
    from bitnet_train.train.objectives.dpo import reference_logps

    table = torch.full((plan.dataset.num_rows, 2), float("nan"))
    from bitnet_train.train.parallelize import is_fsdp

    # a sharded reference runs collectives in every forward: every process must run as many,
    # so each takes all its epochs' rows (the same count everywhere), repeats included
    rows = (np.concatenate([plan.dataset.rank_rows(e) for e in range(plan.epochs)])
            if is_fsdp(reference) else plan.all_rows())
    for start in range(0, len(rows), plan.micro):
        chunk = rows[start:start + plan.micro]
        batch = {k: v.to(device) for k, v in plan.dataset.collate(chunk.tolist()).items()}
        lp = reference_logps(reference, batch, loss_impl).float().cpu()
        n = len(chunk)
        table[torch.as_tensor(chunk), 0] = lp[:n]
        table[torch.as_tensor(chunk), 1] = lp[n:]
    plan.ref_logps = table


def data_counts(dataset) -> dict[str, int]:
    """Encoding counts of an epoch dataset (seen, kept, truncated, dropped, ... per source)."""
    if hasattr(dataset, "log_dict"):
        return dataset.log_dict()
    stats = getattr(dataset, "stats", None) or {}
    out: dict[str, int] = {}
    for name, st in stats.items():
        out.update(st.as_dict(f"data/{name}/"))
    out["data/rows"] = dataset.num_rows
    return out


def build_batch_plan(cfg: TrainConfig, tokenizer, accelerator, objective,
                     num_shards: int = 0) -> BatchPlan:
    """The plan of `cfg.objective.name`'s data for this process: the logical data shards it
    owns (train/data_shards.py; `num_shards` 0: one per process). Sets plan.total_steps and
    cfg.trainer.grad_accum (derived from global_batch_tokens when set)."""
    from bitnet_train.train.data_shards import ShardedPlan, owned_shards, per_shard_accum

    rank, world = accelerator.process_index, accelerator.num_processes
    num_shards = num_shards or world
    shards = owned_shards(rank, world, num_shards)
    name = cfg.objective.name
    if name == "pretrain":
        if cfg.trainer.max_steps <= 0:
            raise ConfigError("pretraining is step-based: set trainer.max_steps > 0")
        ga = derive_grad_accum(cfg.trainer, cfg.data.seq_len, world)
        cfg.trainer.grad_accum = ga
        per_shard = per_shard_accum(ga, world, num_shards)
        plans = {}
        for s in shards:
            plans[s] = PretrainPlan(cfg.data, tokenizer, s, num_shards,
                                    cfg.trainer.micro_batch_size, cfg.trainer.max_steps,
                                    cfg.schedule)
            plans[s].total_steps = cfg.trainer.max_steps
        return ShardedPlan(plans, num_shards, per_shard)
    per_shard = per_shard_accum(cfg.trainer.grad_accum, world, num_shards)
    # the main process encodes first and fills datasets' cache; the others then read it
    with accelerator.main_process_first():
        if name == "sft":
            from bitnet_train.data.sft import build_sft_dataset

            dataset = build_sft_dataset(cfg.data, tokenizer, rank=shards[0],
                                        world_size=num_shards)
        else:
            from bitnet_train.data.preference import build_preference_dataset

            dataset = build_preference_dataset(cfg.data, tokenizer, rank=shards[0],
                                               world_size=num_shards)
    counts = data_counts(dataset)
    if counts and accelerator.is_main_process:
        # truncated / dropped conversations and pairs are counted, never silent
        log.info("data: %s", ", ".join(f"{k.removeprefix('data/')}={v}"
                                       for k, v in counts.items() if "/total/" in k or
                                       k in ("data/rows", "data/examples_per_epoch")))
    plans = {}
    for s in shards:
        plan = EpochPlan(dataset if s == shards[0] else dataset.for_rank(s, num_shards),
                         cfg.trainer.epochs, cfg.trainer.micro_batch_size, per_shard)
        if cfg.trainer.max_steps:
            plan.total_steps = min(plan.total_steps, cfg.trainer.max_steps)
        if name == "dpo" and cfg.objective.precompute_reference:
            precompute_reference_logps(plan, objective.reference, accelerator.device,
                                       cfg.objective.loss_impl)
        plans[s] = plan
    if name == "dpo" and cfg.objective.precompute_reference:
        objective.reference = None  # freed: batches now carry ref_logps
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    sharded = ShardedPlan(plans, num_shards, per_shard)
    sharded.counts = counts
    return sharded
