"""One accelerate training loop for every stage; the stage differs only by data and objective.

    fit() -> for each optimizer step: apply_schedule -> train_step -> log -> maybe evaluate
             -> maybe checkpoint (held-out evaluation also at the start and the end)
    train_step() -> fetch the step's micro-batches -> all-reduce their item count ->
                    forward_backward each (no DDP sync but on the last) -> clip ->
                    divergence check (stop, or skip the update) -> optimizer step

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
from torch.distributed.tensor import DTensor

from bitnet_train.errors import TrainingError
from bitnet_train.train.batch_plan import BatchPlan
from bitnet_train.train.checkpoint import Checkpointer
from bitnet_train.train.data_shards import load_data_state, save_data_state
from bitnet_train.train.divergence import DivergenceGuard
from bitnet_train.train.objectives.base import Objective
from bitnet_train.train.parallelize import is_fsdp
from bitnet_train.train.schedules import ScheduleConfig, apply_schedule, stage_at
from bitnet_train.train.state_io import AccelerateStateIO, StateIO

log = logging.getLogger(__name__)

# bf16 dense peaks (TFLOP/s) for the MFU estimate, by device-name fragment.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


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
    divergence: DivergenceGuard
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
        grad_clip_per: str = "step",
        divergence: DivergenceGuard | None = None,
        evaluator: Callable[[nn.Module], dict[str, float]] | None = None,
        eval_every: int = 0,
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
        self.grad_clip_per = grad_clip_per
        self.checkpoint_every = checkpoint_every
        self.log_every = log_every
        self.save_extra = save_extra
        self.checkpoint_metadata = checkpoint_metadata or {}
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.progress_bar = progress_bar
        self.divergence = divergence or DivergenceGuard()
        self.evaluator = evaluator
        self.eval_every = eval_every
        self.eval_history: list[StepResult] = []
        self._eval_postfix: dict[str, str] = {}
        self.state_io: StateIO = state_io or AccelerateStateIO(accelerator)
        self.step = 0
        self.history: list[StepResult] = []
        self.last_checkpoint: str | None = None
        self.checkpointed_step: int | None = None
        """The step `last_checkpoint` holds (saved or resumed from); None before any."""
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
        if not self._gradients_checked and math.isfinite(loss_total):
            # a finite loss with missing or poisoned gradients: name the parameters
            check_gradients(self.accelerator.unwrap_model(self.model), self.step)
            self._gradients_checked = True
        # a non-finite or spiking loss / grad norm is judged before the update (divergence.py)
        skip = self._check_divergence(loss_total / global_count, grad_norm)
        clip = self.clip_threshold(global_count)
        if not skip:
            if clip > 0:  # with the norm already computed: no second pass, no sync
                torch.nn.utils.clip_grads_with_norm_(params, clip, total_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {k: totals[i] / global_count for i, k in enumerate(keys)}
        metrics["grad_norm"] = grad_norm
        metrics["clipped"] = float(not skip and 0 < clip < grad_norm)
        metrics["skipped_steps"] = float(self.divergence.skipped)
        metrics["items"] = global_count
        metrics["tokens"] = totals[-1]
        if self.objective.reduction == "sum":
            metrics["loss_sum"] = loss_total
        return StepResult(step=self.step, metrics=metrics)

    def clip_threshold(self, global_count: float) -> float:
        """The step's clipping norm: grad_clip, times the global item count when clipping per
        item of a summed loss (whose gradient grows with the tokens in the batch)."""
        if self.grad_clip_per == "item" and self.objective.reduction == "sum":
            return self.grad_clip * global_count
        return self.grad_clip

    # -- divergence -------------------------------------------------------------------------
    def _check_divergence(self, loss: float, grad_norm: float) -> bool:
        """Judge this step before its update (train/divergence.py): False applies it, True skips
        it (trainer.on_divergence=skip); a divergence it may not skip raises TrainingError.
        Uses the loss and grad norm the step has already brought to the host: no extra sync."""
        guard = self.divergence
        if self.step > 0 and (stage_at(self.step, self.total_steps, self.schedule)
                              != stage_at(self.step - 1, self.total_steps, self.schedule)):
            guard.reset_history()  # new LR stage (and data mixture): a new normal
        verdict = guard.observe(self.step, loss, grad_norm)
        if verdict == "ok":
            return False
        if verdict == "skip":
            if self.accelerator.is_main_process:
                log.warning("step %d: %s; update skipped (%d in a row, at most %d; %d in this "
                            "run)", self.step + 1, guard.last.describe(), guard.consecutive,
                            guard.max_skips, guard.skipped)
            return True
        self.optimizer.zero_grad(set_to_none=True)
        raise self._divergence_error()

    def _divergence_error(self) -> TrainingError:
        """The stop message: the step (numbered as the log numbers them), why, and the newest
        checkpoint written before the divergence began."""
        guard, ckpt, acc = self.divergence, self.checkpointer, self.accelerator
        if acc.is_main_process:
            try:
                ckpt.wait()  # a checkpoint still being published may be the one to name
            except TrainingError as exc:
                log.error("%s", exc)
        acc.wait_for_everyone()
        began = guard.began if guard.began is not None else self.step
        trusted = guard.trusted_up_to(self.step)
        good = [p for p in ckpt.all() if ckpt.step_of(p) <= trusted]
        what = f"training diverged at step {self.step + 1}: {guard.last.describe()}"
        if began != self.step:
            what += (f"; it began at step {began + 1} and the {guard.consecutive} updates since "
                     f"were skipped (trainer.divergence_max_skips={guard.max_skips})")
        why = (f"checkpoints from step_{trusted + 1:08d} on hold the weights whose loss "
               f"diverged" if guard.suspect else "")
        if good:
            where = (f"Newest checkpoint written before the divergence began: {good[-1]}"
                     f"{f' ({why})' if why else ''}. Resume from it with "
                     f"trainer.resume={good[-1]}")
        else:
            where = (f"No checkpoint written before the divergence began is left "
                     f"(trainer.keep_last={ckpt.keep_last}){f'; {why}' if why else ''}. "
                     "Restart")
        steps = (f"step {began + 1}" if began == self.step
                 else f"steps {began + 1}-{self.step + 1}")
        return TrainingError(
            f"{what}. The update was not applied. {where} after lowering the learning rate or "
            f"leaving out the data of {steps}; or set "
            "trainer.on_divergence=skip to skip such steps (trainer.divergence_sigma sets the "
            "spike threshold)."
        )

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> list[StepResult]:
        """Run from `self.step` to `total_steps` (or the end of the data)."""
        from tqdm.auto import tqdm

        acc = self.accelerator
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train",
                   disable=not (self.progress_bar and acc.is_main_process), dynamic_ncols=True)
        t0, tok0 = time.perf_counter(), 0.0
        self.maybe_evaluate(start=True)
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
                            lr=f"{sched['lr']:.2e}", **self._eval_postfix)
            if self.step % self.log_every == 0 or self.step == self.total_steps:
                dt = time.perf_counter() - t0
                self._log(result, tok0 / max(dt, 1e-9))
                t0, tok0 = time.perf_counter(), 0.0
            self.maybe_evaluate()
            if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                self.save_checkpoint()
        self.maybe_evaluate(end=True)
        bar.close()
        if self.checkpointed_step != self.step:  # the last step is not saved yet
            self.save_checkpoint()
        if self.accelerator.is_main_process:
            self.checkpointer.wait()  # the last checkpoint is published when fit returns
        return self.history

    def maybe_evaluate(self, start: bool = False, end: bool = False) -> dict[str, float] | None:
        """Run the held-out evaluator at the start, every `eval_every` steps and at the end (once
        per step); log its metrics to the trackers, the log and the progress bar."""
        if self.evaluator is None or self.eval_every <= 0:
            return None
        if self.eval_history and self.eval_history[-1].step == self.step:
            return None  # already evaluated at this step
        if not (start or end or self.step % self.eval_every == 0):
            return None
        metrics = self.evaluator(self.model)
        self.eval_history.append(StepResult(step=self.step, metrics=metrics))
        self.accelerator.log(metrics, step=self.step)
        loss = metrics.get("heldout/loss")
        if loss is not None:
            self._eval_postfix = {"heldout": f"{loss:.4f}"}
        if self.accelerator.is_main_process:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            log.info("held-out at step %d/%d: %s", self.step, self.total_steps, shown)
        return metrics

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
        m.update(self.data.log_metrics(self.accelerator))
        self.accelerator.log(m, step=result.step + 1)
        if self.accelerator.is_main_process:
            shown = " ".join(f"{k}={v:.4g}" for k, v in m.items())
            log.info("step %d/%d %s", result.step + 1, self.total_steps, shown)

    # -- checkpoints ------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "divergence": self.divergence.state_dict()}

    def save_checkpoint(self) -> str:
        """Model and optimizer (`state_io`: accelerate's state, or sharded for FSDP2) + data
        position, atomically.

        Every rank writes into one staging directory (accelerate saves per-rank RNG files);
        only the main process creates it and publishes it (COMPLETE marker, rename), so a crash
        at any point leaves no directory that looks like a whole checkpoint.
        """
        acc = self.accelerator
        ckpt = self.checkpointer
        error: Exception | None = None
        try:
            if acc.is_main_process:
                ckpt.begin(self.step)  # joins the previous background commit
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it (below)
            error = exc
        self._raise_if_any_failed(error)
        staging = ckpt.staging_dir(self.step)
        try:
            with _without_tied_head_notice():
                self.state_io.save(staging)
            # each logical data shard's position, written by the process reading it
            save_data_state(self.data, staging, acc.process_index)
            if acc.is_main_process:
                torch.save(self.trainer_state(), staging / "trainer_state.pt")
                if self.save_extra is not None:
                    self.save_extra(staging)
        except Exception as exc:  # noqa: BLE001 - any library's write error, named below
            error = exc
        self._raise_if_any_failed(error)
        if acc.is_main_process:
            # fsync, hashing (integrity manifest) and the rename run while the next steps
            # train; a checkpoint written during a divergence prunes nothing older
            meta = dict(self.checkpoint_metadata, step=self.step)
            ckpt.commit_async(self.step, meta, prune=self.divergence.began is None)
            log.info("checkpoint step %d written; publishing %s", self.step,
                     ckpt.root / f"step_{self.step:08d}")
        self.last_checkpoint = str(ckpt.root / f"step_{self.step:08d}")
        self.checkpointed_step = self.step
        return self.last_checkpoint

    def _raise_if_any_failed(self, error: Exception | None) -> None:
        """A collective: if writing failed on any rank, every rank raises (none is left
        waiting at a barrier) and the main process removes the staging directory."""
        failed = torch.tensor([1.0 if error is not None else 0.0], device=self.accelerator.device)
        if self._reduce_sum(failed).item() == 0:
            return
        ckpt = self.checkpointer
        if isinstance(error, TrainingError):  # already explained (e.g. by the previous commit)
            if self.accelerator.is_main_process:
                ckpt.abort(self.step)
            raise error
        if error is not None:
            raise ckpt.write_failure(self.step, error, self._checkpoint_bytes()) from error
        if self.accelerator.is_main_process:
            ckpt.abort(self.step)
        raise TrainingError(
            f"checkpoint step {self.step}: another process failed to write its part to "
            f"{ckpt.staging_dir(self.step)} (its log says why); the partial checkpoint was "
            "removed and the previous one is intact"
        )

    def _checkpoint_bytes(self) -> int:
        """Bytes of model and optimizer state, the bulk of a checkpoint (an estimate for the
        first checkpoint's disk-full message; later ones use the previous checkpoint's size)."""
        seen: set[int] = set()
        total = 0
        tensors = list(self.accelerator.unwrap_model(self.model).state_dict().values())
        tensors += [v for s in self.optimizer.state.values() for v in s.values()
                    if isinstance(v, Tensor)]
        for t in tensors:
            if isinstance(t, DTensor):
                t = t.to_local()  # this process's shard
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def load_checkpoint(self, path) -> None:
        """Restore everything `save_checkpoint` wrote; training continues exactly."""
        self.state_io.load(Path(path))
        state = torch.load(f"{path}/trainer_state.pt", weights_only=False)
        self.step = int(state["step"])
        if "divergence" in state:  # checkpoints from before the guard have none
            self.divergence.load_state_dict(state["divergence"])
        load_data_state(self.data, Path(path), self.accelerator.process_index)
        self.last_checkpoint = str(path)
        self.checkpointed_step = self.step


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
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
