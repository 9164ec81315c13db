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
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from bitnet_train.errors import TrainingError
from bitnet_train.train.checkpoint import Checkpointer
from bitnet_train.train.objectives.base import Objective
from bitnet_train.train.parallelize import is_fsdp
from bitnet_train.train.schedules import ScheduleConfig, apply_schedule
from bitnet_train.train.state_io import AccelerateStateIO, StateIO

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
        on_log: Callable[[StepResult], None] | None = None,
        state_io: StateIO | None = None,
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
        self.on_log = on_log
        self.state_io: StateIO = state_io or AccelerateStateIO(accelerator)
        self.step = 0
        self.history: list[StepResult] = []
        self.last_checkpoint: str | None = None
        self._gradients_checked = False

    # -- one step ---------------------------------------------------------------------------
    def _fetch(self) -> tuple[list[dict[str, Tensor]], int, int]:
        """The step's micro-batches on the device, with their item and token counts.

        Counted on the host before the copy (the data comes from CPU loaders), so counting costs
        no device sync; pinned, non-blocking copies let the copy overlap queued GPU work.
        """
        batches = self.data.batches_for_step(self.step, self.grad_accum)
        count = sum(self.objective.count(b) for b in batches)
        tokens = sum(int(b["input_ids"].numel()) for b in batches)
        dev = self.accelerator.device
        return [{k: _to_device(v, dev) for k, v in b.items()} for b in batches], count, tokens

    def _reduce_sum(self, values: Tensor) -> Tensor:
        """All-reduce (sum) a vector over processes, on the device, without a host sync."""
        return self.accelerator.reduce(values, reduction="sum")

    def _sync_context(self, sync: bool):
        """DDP: no all-reduce but on a step's last micro-batch. FSDP2 reduce-scatters every
        micro-batch (keeping whole gradients between them would cost a whole fp32 model per
        process, torchtitan's choice too); its root (embeddings, lm_head) stays gathered until
        the last one, so they are all-gathered once per step rather than per micro-batch."""
        if is_fsdp(self.model):
            self.model.set_reshard_after_backward(sync, recurse=False)
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.model) if not sync else contextlib.nullcontext()

    def forward_backward_step(self, batch: dict[str, Tensor], scale: Tensor, sync: bool):
        """Forward one micro-batch and backpropagate `scale * loss_sum`."""
        with self._sync_context(sync), self.accelerator.autocast():
            out = self.objective.micro_step(self.model, batch)
            self.accelerator.backward(out.loss_sum * scale)
        return out

    def train_step(self) -> StepResult | None:
        """One optimizer step over `grad_accum` micro-batches; None when the data is exhausted.

        One host sync per step: metric sums, the item count and the gradient norm stay on the
        device (summed over processes in one all-reduce) until a single `.tolist()` before the
        checks and the optimizer step.
        """
        batches, local_count, local_tokens = self._fetch()
        if not batches:
            return None
        dev = self.accelerator.device
        count = self._reduce_sum(torch.tensor([float(local_count)], dtype=torch.float64,
                                              device=dev))
        world = self.accelerator.num_processes
        # DDP (and FSDP2's reduce-scatter) average gradients over processes: multiply by world
        # to undo it
        scale = (world / count.clamp(min=1.0) if self.objective.reduction == "mean"
                 else torch.full_like(count, float(world))).float().squeeze(0)
        sums: dict[str, Tensor] = {}
        for i, batch in enumerate(batches):
            out = self.forward_backward_step(batch, scale, sync=i == len(batches) - 1)
            for k, v in out.metric_sums.items():
                v = v.detach().float().reshape(())
                sums[k] = sums[k] + v if k in sums else v
        keys = sorted(sums)
        params = [p for p in self.model.parameters() if p.grad is not None]
        total_norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params \
            else torch.zeros((), device=dev)
        norm_value = total_norm.full_tensor() if hasattr(total_norm, "full_tensor") \
            else total_norm  # DTensor gradients (FSDP2): the norm of the whole model
        local = torch.stack([sums[k] for k in keys]
                            + [torch.tensor(float(local_tokens), device=dev)])
        host = torch.cat([self._reduce_sum(local), count.float(),
                          norm_value.float().reshape(1).to(dev)]).tolist()
        totals, global_count, grad_norm = host[:-2], host[-2], host[-1]  # the step's one sync
        loss_total = totals[keys.index("loss")] if "loss" in keys else 0.0
        if global_count == 0:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(
                f"step {self.step}: no item in the global batch carries a label (every label "
                "is -100); check the data's masking and max_len"
            )
        if not math.isfinite(loss_total):
            self.optimizer.zero_grad(set_to_none=True)
            where = self.last_checkpoint or "none written yet"
            raise TrainingError(
                f"non-finite loss ({loss_total}) at step {self.step}; the update was not applied. "
                f"Last good checkpoint: {where}. Lower the learning rate or inspect the data of "
                "this step, then resume with trainer.resume=auto."
            )
        if not self._gradients_checked:
            check_gradients(self.accelerator.unwrap_model(self.model), self.step)
            self._gradients_checked = True
        if self.grad_clip > 0:  # with the norm already computed: no second pass, no sync
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, total_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {k: totals[i] / global_count for i, k in enumerate(keys)}
        metrics["grad_norm"] = grad_norm
        metrics["items"] = global_count
        metrics["tokens"] = totals[-1]
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
        if not self.last_checkpoint or not self.last_checkpoint.endswith(f"{self.step:08d}"):
            self.save_checkpoint()
        return self.history

    def _log(self, result: StepResult, tokens_per_s: float) -> None:
        m = dict(result.metrics)
        m["tokens_per_s"] = tokens_per_s
        if self.flops_per_token and self.peak_tflops:
            # tokens_per_s counts every process; MFU is per GPU, against one GPU's peak
            per_gpu = tokens_per_s / self.accelerator.num_processes
            m["mfu"] = per_gpu * self.flops_per_token / (self.peak_tflops * 1e12)
        if torch.cuda.is_available():
            m["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            m["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.accelerator.log(m, step=result.step + 1)
        if self.on_log is not None:
            self.on_log(StepResult(step=result.step, metrics=m))
        if self.accelerator.is_main_process:
            shown = " ".join(f"{k}={v:.4g}" for k, v in m.items())
            log.info("step %d/%d %s", result.step + 1, self.total_steps, shown)

    # -- checkpoints ------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step}

    def save_checkpoint(self) -> str:
        """Model and optimizer (`state_io`: accelerate's state, or sharded for FSDP2) + data
        position, atomically.

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
            from bitnet_train.train.data_shards import save_data_state

            self.state_io.save(staging)
            # each logical data shard's position, written by the process reading it
            save_data_state(self.data, staging, acc.process_index)
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
        return self.last_checkpoint

    def load_checkpoint(self, path) -> None:
        """Restore everything `save_checkpoint` wrote; training continues exactly."""
        from bitnet_train.train.data_shards import load_data_state

        self.state_io.load(Path(path))
        state = torch.load(f"{path}/trainer_state.pt", weights_only=False)
        self.step = int(state["step"])
        load_data_state(self.data, Path(path), self.accelerator.process_index)
        self.last_checkpoint = str(path)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@torch.no_grad()
def check_gradients(model: nn.Module, step: int) -> None:
    """Raise TrainingError naming every trainable parameter whose gradient is missing, non-finite
    or exactly zero after a backward.

    Run once, after the first backward of a run: a fast path that silently drops gradients
    (torch 2.11's compile did, for every decoder weight) must stop the run at its first step,
    not train the embeddings alone for days. One host sync, once. Sharded (DTensor) gradients
    are reduced to the whole tensor's norm: a shard may legitimately be all zeros.
    """
    names, norms, missing = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            missing.append(name)
            continue
        norm = torch.linalg.vector_norm(p.grad.detach().float())
        if hasattr(norm, "full_tensor"):  # DTensor
            norm = norm.full_tensor()
        names.append(name)
        norms.append(norm)
    values = torch.stack(norms).tolist() if norms else []
    bad = missing + [f"{n} (norm {v})" for n, v in zip(names, values)
                     if not math.isfinite(v) or v == 0.0]
    if bad:
        shown = ", ".join(bad[:12]) + (f", ... ({len(bad)} in all)" if len(bad) > 12 else "")
        raise TrainingError(
            f"step {step}: after the first backward, {len(bad)} of {len(names) + len(missing)} "
            f"trainable parameters have a missing, non-finite or all-zero gradient: {shown}. "
            "Nothing was updated. A fast path (trainer.compile, trainer.kernels) that drops "
            "gradients, a frozen branch or a NaN in the data does this: rerun with "
            "trainer.compile=false trainer.kernels=reference to tell which."
        )


def check_optimizer_covers(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise TrainingError naming every trainable parameter the optimizer does not update.

    accelerate's FSDP2 preparation moves a model to the meta device and back; a model that
    loses its weight tying there comes back with a separate lm_head that no optimizer group
    holds, which then trains with a frozen random output layer (the FSDP2 run of issue 9
    that fell behind DDP). Checked once, before the first step.
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise TrainingError(
            f"{len(missing)} trainable parameter(s) are in no optimizer group: "
            f"{', '.join(missing[:8])}. They would never be updated; a wrapper that replaced "
            "parameters after the optimizer was built (or untied lm_head from the embeddings) "
            "does this. Build the optimizer after parallelizing, and keep tied weights tied.")
