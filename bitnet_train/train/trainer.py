"""One accelerate training loop for every stage; the stage differs only by data and objective.

    fit() -> for each optimizer step: apply_schedule -> train_step -> log -> maybe checkpoint
    train_step() -> fetch the step's micro-batches -> all-reduce their item count ->
                    forward_backward each (no DDP sync but on the last) -> clip -> optimizer step

The loss scaling lives here, once: a micro-batch's loss sum is multiplied by
`world_size / global_count` (reduction mean) or `world_size` (reduction sum). DDP averages
gradients over processes and we never let accelerate divide by the accumulation steps, so the
step's gradient is exactly that of the mean (or sum) over the whole global batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from bitnet_train.errors import CheckpointError, TrainingError
from bitnet_train.train.checkpoint import Checkpointer
from bitnet_train.train.objectives.base import Objective
from bitnet_train.train.schedules import ScheduleConfig, apply_schedule

log = logging.getLogger(__name__)

# bf16 dense peaks (TFLOP/s) for the MFU estimate, by device-name fragment.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


class BatchPlan:
    """Where a run's micro-batches come from, step by step (see data_plan.py)."""

    total_steps: int

    def batches_for_step(self, step: int, grad_accum: int) -> list[dict[str, Tensor]]:
        """The micro-batches of optimizer step `step` ([] when the data is exhausted)."""
        raise NotImplementedError  # pragma: no cover - protocol

    def state_dict(self) -> dict[str, Any]:  # pragma: no cover - protocol
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:  # pragma: no cover - protocol
        raise NotImplementedError


@dataclass
class StepResult:
    step: int
    metrics: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Owns the loop; everything it works on is built outside (see run.py)."""

    accelerator: Accelerator
    model: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    schedule: ScheduleConfig
    data: BatchPlan
    checkpointer: Checkpointer
    total_steps: int
    step: int

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        schedule: ScheduleConfig,
        data: BatchPlan,
        checkpointer: Checkpointer,
        total_steps: int,
        grad_accum: int,
        grad_clip: float,
        checkpoint_every: int = 0,
        log_every: int = 10,
        save_extra: Callable[[Any], None] | None = None,
        checkpoint_metadata: dict[str, Any] | None = None,
        flops_per_token: float = 0.0,
        peak_tflops: float = 0.0,
        progress_bar: bool = True,
    ) -> None:
        self.accelerator = accelerator
        self.model = model
        self.objective = objective
        self.optimizer = optimizer
        self.schedule = schedule
        self.data = data
        self.checkpointer = checkpointer
        self.total_steps = total_steps
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip
        self.checkpoint_every = checkpoint_every
        self.log_every = log_every
        self.save_extra = save_extra
        self.checkpoint_metadata = checkpoint_metadata or {}
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.progress_bar = progress_bar
        self.step = 0
        self.history: list[StepResult] = []
        self.last_checkpoint: str | None = None
        self.checkpointed_step: int | None = None
        """The step `last_checkpoint` holds (saved or resumed from); None before any."""

    # -- one step ---------------------------------------------------------------------------
    def _fetch(self) -> list[dict[str, Tensor]]:
        dev = self.accelerator.device
        return [{k: v.to(dev) for k, v in b.items()}
                for b in self.data.batches_for_step(self.step, self.grad_accum)]

    def _global_sum(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="sum").item())

    def forward_backward_step(self, batch: dict[str, Tensor], scale: float, sync: bool):
        """Forward one micro-batch and backpropagate `scale * loss_sum`."""
        ctx = self.accelerator.no_sync(self.model) if not sync else contextlib.nullcontext()
        with ctx, self.accelerator.autocast():
            out = self.objective.micro_step(self.model, batch)
            self.accelerator.backward(out.loss_sum * scale)
        return out

    def train_step(self) -> StepResult | None:
        """One optimizer step over `grad_accum` micro-batches; None when the data is exhausted."""
        batches = self._fetch()
        if not batches:
            return None
        local_count = sum(self.objective.count(b) for b in batches)
        global_count = self._global_sum(float(local_count))
        if global_count == 0:
            raise TrainingError(
                f"step {self.step}: no item in the global batch carries a label (every label "
                "is -100); check the data's masking and max_len"
            )
        world = self.accelerator.num_processes
        scale = world / global_count if self.objective.reduction == "mean" else float(world)
        sums: dict[str, float] = {}
        tokens = 0
        for i, batch in enumerate(batches):
            out = self.forward_backward_step(batch, scale, sync=i == len(batches) - 1)
            for k, v in out.metric_sums.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            tokens += int(batch["input_ids"].numel())
        loss_total = self._global_sum(sums.get("loss", 0.0))
        if not math.isfinite(loss_total):
            self.optimizer.zero_grad(set_to_none=True)
            where = self.last_checkpoint or "none written yet"
            raise TrainingError(
                f"non-finite loss ({loss_total}) at step {self.step}; the update was not applied. "
                f"Last good checkpoint: {where}. Lower the learning rate or inspect the data of "
                "this step, then resume with trainer.resume=auto."
            )
        grad_norm = (
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            if self.grad_clip > 0 else _grad_norm(self.model)
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {k: self._global_sum(v) / global_count for k, v in sums.items()}
        metrics["grad_norm"] = float(grad_norm)
        metrics["items"] = global_count
        metrics["tokens"] = self._global_sum(float(tokens))
        if self.objective.reduction == "sum":
            metrics["loss_sum"] = loss_total
        return StepResult(step=self.step, metrics=metrics)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> list[StepResult]:
        """Run from `self.step` to `total_steps` (or the end of the data)."""
        from tqdm.auto import tqdm

        acc = self.accelerator
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train",
                   disable=not (self.progress_bar and acc.is_main_process), dynamic_ncols=True)
        t0, tok0 = time.perf_counter(), 0.0
        while self.step < self.total_steps:
            sched = apply_schedule(self.optimizer, self.step, self.total_steps, self.schedule)
            result = self.train_step()
            if result is None:
                log.info("data exhausted at step %d", self.step)
                break
            result.metrics.update({"lr": sched["lr"], "weight_decay": sched["weight_decay"]})
            tok0 += result.metrics["tokens"]
            self.step += 1
            self.history.append(result)
            bar.update(1)
            bar.set_postfix(loss=f"{result.metrics.get('loss', float('nan')):.4f}",
                            lr=f"{sched['lr']:.2e}")
            if self.step % self.log_every == 0 or self.step == self.total_steps:
                dt = time.perf_counter() - t0
                self._log(result, tok0 / max(dt, 1e-9))
                t0, tok0 = time.perf_counter(), 0.0
            if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        if self.checkpointed_step != self.step:  # the last step is not saved yet
            self.save_checkpoint()
        return self.history

    def _log(self, result: StepResult, tokens_per_s: float) -> None:
        m = dict(result.metrics)
        m["tokens_per_s"] = tokens_per_s
        if self.flops_per_token and self.peak_tflops:
            m["mfu"] = tokens_per_s * self.flops_per_token / (self.peak_tflops * 1e12)
        if torch.cuda.is_available():
            m["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            m["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.accelerator.log(m, step=result.step + 1)
        if self.accelerator.is_main_process:
            shown = " ".join(f"{k}={v:.4g}" for k, v in m.items())
            log.info("step %d/%d %s", result.step + 1, self.total_steps, shown)

    # -- checkpoints ------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step}

    def save_checkpoint(self) -> str:
        """Accelerate state (model, optimizer, every rank's RNG) + data position, atomically.

        Every rank writes into one staging directory (accelerate saves per-rank RNG files);
        only the main process creates it and publishes it (COMPLETE marker, rename), so a crash
        at any point leaves no directory that looks like a whole checkpoint.
        """
        acc = self.accelerator
        ckpt = self.checkpointer
        if acc.is_main_process:
            ckpt.begin(self.step)
        acc.wait_for_everyone()
        staging = ckpt.staging_dir(self.step)
        try:
            with _without_tied_head_notice():
                acc.save_state(str(staging))
            # each rank reads its own shard of the data: one stream state per rank
            torch.save(self.data.state_dict(), staging / f"data_state_rank{acc.process_index}.pt")
            if acc.is_main_process:
                torch.save(self.trainer_state(), staging / "trainer_state.pt")
                if self.save_extra is not None:
                    self.save_extra(staging)
        except OSError as exc:
            if acc.is_main_process:
                ckpt.abort(self.step)
            raise TrainingError(
                f"could not write checkpoint step {self.step} to {ckpt.root}: {exc}. "
                f"Previous checkpoint: {self.last_checkpoint or 'none'} (intact). Free space or "
                "lower trainer.keep_last, then resume with trainer.resume=auto."
            ) from exc
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            meta = dict(self.checkpoint_metadata, step=self.step)
            path = str(ckpt.commit(self.step, meta))
            log.info("checkpoint %s", path)
        acc.wait_for_everyone()
        self.last_checkpoint = path or str(ckpt.root / f"step_{self.step:08d}")
        self.checkpointed_step = self.step
        return self.last_checkpoint

    def load_checkpoint(self, path) -> None:
        """Restore everything `save_checkpoint` wrote; training continues exactly."""
        self.accelerator.load_state(str(path))
        state = torch.load(f"{path}/trainer_state.pt", weights_only=False)
        self.step = int(state["step"])
        data_file = f"{path}/data_state_rank{self.accelerator.process_index}.pt"
        try:
            data_state = torch.load(data_file, weights_only=False)
        except FileNotFoundError as exc:
            raise CheckpointError(
                f"{path} has no data state for process {self.accelerator.process_index} "
                f"({data_file}): it was written by fewer processes. Resume with the same number "
                "of processes as the run that wrote it."
            ) from exc
        self.data.load_state_dict(data_state)
        self.last_checkpoint = str(path)
        self.checkpointed_step = self.step


TIED_HEAD_NOTICE = "Removed shared tensor {'lm_head.weight'} while saving"
"""What accelerate's save_state warns at every checkpoint of a model with a tied lm_head."""


class _DropTiedHeadNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TIED_HEAD_NOTICE not in record.getMessage()


@contextlib.contextmanager
def _without_tied_head_notice():
    """Silence accelerate's notice about the tied lm_head, and only it: safetensors cannot store
    shared tensors, the tie is restored on load, and exact resume is tested; any other shared
    tensor is still reported."""
    logger = logging.getLogger("accelerate.utils.other")
    drop = _DropTiedHeadNotice()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@torch.no_grad()
def _grad_norm(model: nn.Module) -> float:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0
