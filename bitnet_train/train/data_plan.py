"""Which micro-batches each optimizer step trains on.

- `PretrainPlan`: step-based; one infinite stream per rank that switches to the stage-2
  mixture at the schedule's boundary and continues each source it keeps. Its state is the
  stream's position; it logs the realised token share per source.
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
from bitnet_train.errors import ConfigError, TrainingError
from bitnet_train.train.batch_plan import BatchPlan
from bitnet_train.train.config import TrainConfig
from bitnet_train.train.schedules import ScheduleConfig, stage_at, stage_boundary_step

log = logging.getLogger(__name__)


class PretrainPlan(BatchPlan):
    """One infinite stream per rank; it switches itself to the stage-2 mixture after the
    batches of the steps before the schedule's boundary, continuing every source it keeps."""

    def __init__(self, data_cfg, tokenizer, rank: int, world_size: int, micro_batch_size: int,
                 total_steps: int, schedule: ScheduleConfig, grad_accum: int = 1,
                 exclude=None) -> None:
        self.cfg, self.total_steps, self.schedule = data_cfg, total_steps, schedule
        self.heldout = None  # data.heldout.PretrainHeldOut when trainer.eval_every > 0
        boundary = stage_boundary_step(total_steps, schedule)
        two_stages = data_cfg.stage2 is not None and boundary < total_steps
        self.stream = build_pretrain_stream(
            data_cfg, tokenizer, rank=rank, world_size=world_size, batch_size=micro_batch_size,
            stage2_after=boundary * grad_accum if two_stages else None,
            exclude=exclude)  # held-out documents per source, never trained on
        self._names = sorted({s.name for s in data_cfg.stage1.sources}
                             | {s.name for s in (data_cfg.stage2 or data_cfg.stage1).sources})

    def batches_for_step(self, step: int, grad_accum: int) -> list[dict[str, Tensor]]:
        batches = [next(self.stream) for _ in range(grad_accum)]
        expected = 1 if self.cfg.stage2 is None else stage_at(step, self.total_steps,
                                                              self.schedule)
        if self.stream.stage != expected:
            raise TrainingError(
                f"step {step} belongs to stage {expected} but the data stream is in stage "
                f"{self.stream.stage}: the checkpoint's data position was written with another "
                "trainer.grad_accum, number of processes or schedule; resume with the same ones"
            )
        return batches

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])

    def log_metrics(self, accelerator) -> dict[str, float]:
        """Realised token share per source over the current stage and tokens per source over
        the run (summed over ranks), and the epoch each source is in (this rank's)."""
        return self.log_metrics_of([self], accelerator)

    @staticmethod
    def log_metrics_of(plans: list[PretrainPlan], accelerator) -> dict[str, float]:
        """`log_metrics` over the streams of every plan this process reads (its data shards),
        with one all-reduce."""
        names = plans[0]._names
        every = [p.stream.stats() for p in plans]
        stats = every[0]
        stage_n = [sum(st["stage_tokens"].get(n, 0) for st in every) for n in names]
        run_n = [sum(st["packed_tokens"].get(n, 0) for st in every) for n in names]
        counts = torch.tensor(stage_n + run_n, dtype=torch.float64, device=accelerator.device)
        counts = accelerator.reduce(counts, reduction="sum").tolist()
        stage_n, run_n = counts[:len(names)], counts[len(names):]
        total = sum(stage_n) or 1.0
        out: dict[str, float] = {"data/stage": float(stats["stage"])}
        for name, s, r in zip(names, stage_n, run_n):
            if name in stats["stage_tokens"]:
                out[f"data/token_share/{name}"] = s / total
            out[f"data/tokens/{name}"] = r
            if name in stats["epochs"]:
                out[f"data/epoch/{name}"] = float(stats["epochs"][name])
        return out


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
        self.heldout = getattr(dataset, "heldout", None)  # trainer.eval_every's data
        self.heldout_ref_logps: Tensor | None = None  # (held-out pairs, 2), DPO precomputed

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

    def all_rows(self, unique: bool = True) -> np.ndarray:
        """Every row this rank visits in the plan's steps: every epoch's, or fewer when
        trainer.max_steps ends the run early (precomputed reference log-probs cover these).
        unique=False: in visiting order, repeats included (the same count on every rank)."""
        rows = []
        for step in range(self.total_steps):
            epoch, k = divmod(step, self.steps_per_epoch)
            first = k * self.grad_accum * self.micro
            last = min((k + 1) * self.grad_accum, self.batches_per_epoch) * self.micro
            rows.append(self.dataset.rank_rows(epoch)[first:last])
        if not rows:
            return np.zeros(0, dtype=np.int64)
        return np.unique(np.concatenate(rows)) if unique else np.concatenate(rows)


@torch.no_grad()
def reference_logps_table(dataset, rows: np.ndarray, reference, device, micro: int,
                          loss_impl: str) -> Tensor:
    """(dataset.num_rows, 2) summed log-probs (chosen, rejected) of the frozen reference over
    the pairs `rows` (NaN elsewhere)."""
    from bitnet_train.train.objectives.dpo import reference_logps

    table = torch.full((dataset.num_rows, 2), float("nan"))
    for start in range(0, len(rows), micro):
        chunk = rows[start:start + micro]
        batch = {k: v.to(device) for k, v in dataset.collate(chunk.tolist()).items()}
        lp = reference_logps(reference, batch, loss_impl).float().cpu()
        n = len(chunk)
        table[torch.as_tensor(chunk), 0] = lp[:n]
        table[torch.as_tensor(chunk), 1] = lp[n:]
    return table


def precompute_reference_logps(plan: EpochPlan, reference, device, loss_impl: str,
                               heldout: bool = True) -> None:
    """One pass of the frozen reference over every pair this rank will see (and the held-out
    pairs); then the reference can be freed. Stores the tables on the plan."""
    from bitnet_train.train.parallelize import is_fsdp

    # a sharded reference runs collectives in every forward: every process must run as many,
    # so each takes its rows in visiting order (the same count everywhere), repeats included
    rows = plan.all_rows(unique=not is_fsdp(reference))
    plan.ref_logps = reference_logps_table(plan.dataset, rows, reference, device, plan.micro,
                                           loss_impl)
    if heldout and plan.heldout is not None:
        plan.heldout_ref_logps = reference_logps_table(
            plan.heldout, np.arange(plan.heldout.num_rows), reference, device, plan.micro,
            loss_impl)


def build_batch_plan(cfg: TrainConfig, tokenizer, accelerator, objective,
                     num_shards: int = 0) -> BatchPlan:
    """The plan of `cfg.objective.name`'s data for this process: the logical data shards it
    owns (train/data_shards.py; `num_shards` 0: one per process); sets plan.total_steps.
    `cfg` holds its derived values already (`with_derived_values`); nothing here changes it."""
    from bitnet_train.train.data_shards import ShardedPlan, owned_shards, per_shard_accum

    rank, world = accelerator.process_index, accelerator.num_processes
    num_shards = num_shards or world
    shards = owned_shards(rank, world, num_shards)
    # grad_accum is per process; each owned shard gives per_shard micro-batches of a step
    per_shard = per_shard_accum(cfg.trainer.grad_accum, world, num_shards)
    name = cfg.objective.name
    # trainer.eval_every: a held-out set carved from the data before training (data.heldout)
    heldout = cfg.trainer.eval_size if cfg.trainer.eval_every > 0 else 0
    if name == "pretrain":
        if cfg.trainer.max_steps <= 0:
            raise ConfigError("pretraining is step-based: set trainer.max_steps > 0")
        carved = None
        if heldout:
            from bitnet_train.data.heldout import carve_pretrain_heldout

            carved = carve_pretrain_heldout(cfg.data, tokenizer, heldout)
            if accelerator.is_main_process:
                log.info("held out %d rows of %d tokens per source (%s documents)", heldout,
                         cfg.data.seq_len, carved.documents())
        # grad_accum was derived from trainer.global_batch_tokens before config.yaml was written
        plans = {}
        for s in shards:
            plans[s] = PretrainPlan(cfg.data, tokenizer, s, num_shards,
                                    cfg.trainer.micro_batch_size, cfg.trainer.max_steps,
                                    cfg.schedule, grad_accum=per_shard,
                                    exclude=carved.exclude if carved else None)
            plans[s].total_steps = cfg.trainer.max_steps
        sharded = ShardedPlan(plans, num_shards, per_shard)
        sharded.heldout = carved  # the same held-out rows on every process
        return sharded
    # the main process encodes first and fills datasets' cache; the others then read it
    with accelerator.main_process_first():
        if name == "sft":
            from bitnet_train.data.sft import build_sft_dataset

            dataset = build_sft_dataset(cfg.data, tokenizer, rank=shards[0],
                                        world_size=num_shards, heldout=heldout)
        else:
            from bitnet_train.data.preference import build_preference_dataset

            dataset = build_preference_dataset(cfg.data, tokenizer, rank=shards[0],
                                               world_size=num_shards, heldout=heldout)
    counts = dataset.log_dict()  # seen, kept, truncated, dropped ... per source, and totals
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
                                       cfg.objective.loss_impl, heldout=s == shards[0])
        plans[s] = plan
    if name == "dpo" and cfg.objective.precompute_reference:
        objective.reference = None  # freed: batches now carry ref_logps
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    sharded = ShardedPlan(plans, num_shards, per_shard)
    sharded.counts = counts
    first = plans[shards[0]]
    sharded.heldout, sharded.heldout_ref_logps = first.heldout, first.heldout_ref_logps
    return sharded
