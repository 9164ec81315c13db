"""Build a run from its config, in a fixed order, and train it.

model (on the meta device for FSDP2) -> (reference, for DPO) -> parallelize (kernels ->
attention -> AC -> compile -> FSDP2) -> initialise the shards -> optimizer -> accelerate
prepare (DDP only) -> checkpointer and the checkpoint to resume -> data (logical shards, and
the held-out set) -> held-out evaluator -> trainer (resume) -> fit -> DIR/final (gathered
whole once, on the CPU, written by rank 0)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from omegaconf import DictConfig

from bitnet_train.errors import CheckpointError, ConfigError
from bitnet_train.integrity import refuse_non_finite
from bitnet_train.model import BitNetConfig, BitNetForCausalLM, build_model
from bitnet_train.provenance import code_version
from bitnet_train.train.checkpoint import Checkpointer, verify
from bitnet_train.train.config import (
    ModelSection,
    ParallelConfig,
    TrainConfig,
    check_search_path,
    config_yaml,
    to_train_config,
    with_derived_values,
)
from bitnet_train.train.data_plan import build_batch_plan
from bitnet_train.train.data_shards import checkpoint_num_shards, resolve_num_shards
from bitnet_train.train.divergence import DivergenceGuard
from bitnet_train.train.objectives.dpo import DPOObjective, make_reference
from bitnet_train.train.objectives.language_model import LanguageModelObjective
from bitnet_train.train.parallelize import FSDPSettings, parallelize
from bitnet_train.train.schedules import param_groups, stage_boundary_step
from bitnet_train.train.sharding import (
    build_mesh,
    build_meta_model,
    gather_full_model,
    init_sharded,
    maybe_init_cpu_collectives,
    resolve_strategy,
)
from bitnet_train.train.state_io import AccelerateStateIO, ShardedStateIO, StateIO
from bitnet_train.train.trainer import (
    PEAK_TFLOPS,
    StepResult,
    Trainer,
    check_optimizer_covers,
)

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run leaves: its directory, final model dir and per-step metrics."""

    output_dir: Path
    final_dir: Path
    history: list[StepResult]
    trainer: Trainer


def run_from_hydra(cfg: DictConfig) -> RunResult:
    """Hydra entry: validate at the edge, run (config.yaml records the resolved config)."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from hydra.core.hydra_config import HydraConfig

    check_search_path(HydraConfig.get().runtime.config_sources)
    train_cfg = to_train_config(cfg)
    if train_cfg.output_dir is None:
        train_cfg.output_dir = HydraConfig.get().runtime.output_dir
    return run(train_cfg)


def build_accelerator(cfg: TrainConfig, output_dir: Path) -> Accelerator:
    """Mixed precision bf16 on CUDA, fp32 on CPU; trackers through accelerate."""
    use_cpu = cfg.trainer.device == "cpu" or not torch.cuda.is_available()
    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible")
    mp = cfg.trainer.mixed_precision
    mixed = ("no" if use_cpu else "bf16") if mp == "auto" else mp
    trackers: list[str] = []
    if cfg.logger.tracker != "none":
        trackers = [cfg.logger.tracker]
        if cfg.logger.tracker == "wandb":
            os.environ.setdefault("WANDB_MODE", cfg.logger.wandb_mode)
            os.environ.setdefault("WANDB_DIR", str(output_dir))
    return Accelerator(cpu=use_cpu, mixed_precision=mixed, log_with=trackers or None,
                       project_dir=str(output_dir))


def build_or_load_model(section: ModelSection, seed: int) -> BitNetForCausalLM:
    """Random init from the config, or the weights of `model.init` (shapes checked)."""
    arch = section.architecture()
    if not section.init:
        return build_model(arch, seed=seed)
    from bitnet_train.io import load_model

    model, _ = load_model(section.init)
    check_same_architecture(arch, model.config, source=section.init)
    return model


ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "hidden_act", "tie_word_embeddings",
               "quantization")


def check_same_architecture(expected: BitNetConfig, found: BitNetConfig, source: str) -> None:
    """CheckpointError naming the first field where `found` (from `source`) differs."""
    for key in ARCH_FIELDS:
        a, b = getattr(expected, key), getattr(found, key)
        if a != b:
            raise CheckpointError(
                f"{source} holds a model with {key}={b}, but the config asks for {key}={a}. "
                f"Choose the matching model group (e.g. model={found.name}) or another checkpoint."
            )


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over decay / no-decay groups; LR and WD are set by the schedule every step."""
    groups = param_groups(model, decay_embeddings=cfg.optim.decay_embeddings)
    fused = cfg.optim.fused
    if fused is None:
        fused = torch.cuda.is_available() and cfg.trainer.device != "cpu"
    return torch.optim.AdamW(groups, lr=cfg.schedule.lr_peak, betas=tuple(cfg.optim.betas),
                             eps=cfg.optim.eps, fused=bool(fused))


def build_objective(cfg: TrainConfig, model: BitNetForCausalLM):
    o = cfg.objective
    if o.name in ("pretrain", "sft"):
        return LanguageModelObjective(reduction=o.reduction, loss_impl=o.loss_impl,
                                      liger_chunk_mem=o.liger_chunk_mem)
    return DPOObjective(beta=o.beta, loss_impl=o.loss_impl, reference=make_reference(model))


def flops_per_token(config: BitNetConfig, seq_len: int) -> float:
    """Training FLOPs per token, the MFU convention (PaLM, torchtitan): 6 x (projection
    parameters + lm_head) for the matrix products, plus causal attention, 6 x layers x hidden x
    seq_len (QK^T and AV over the half of the (L, L) scores a causal mask keeps, times 3 for
    forward and backward). Ternary products count as dense products; document masking, which
    skips more, is not credited."""
    from bitnet_train.model.size import model_size

    size = model_size(config)
    dense = size.ternary_params + config.vocab_size * config.hidden_size
    return 6.0 * dense + 6.0 * config.num_hidden_layers * config.hidden_size * seq_len


def resolve_output_dir(cfg: TrainConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    return Path("outputs") / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}-{cfg.run_name}"


class HeldFileLogs:
    """Hold the records bound for log files (Hydra's train.log) from creation until `release`
    writes them, or `discard` drops them: a relaunch refused before its first step then writes
    nothing under the run directory. Console output is not held."""

    def __init__(self) -> None:
        self.root = logging.getLogger()
        self.files = [h for h in self.root.handlers if isinstance(h, logging.FileHandler)]
        self.records: list[logging.LogRecord] = []
        holder = self

        class _Hold(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                holder.records.append(record)

        self.hold = _Hold(level=min((h.level for h in self.files), default=logging.NOTSET))
        for h in self.files:
            self.root.removeHandler(h)
        if self.files:
            self.root.addHandler(self.hold)

    def _restore(self) -> None:
        self.root.removeHandler(self.hold)
        for h in self.files:
            self.root.addHandler(h)

    def release(self) -> None:
        self._restore()
        for h in self.files:
            for record in self.records:
                if record.levelno >= h.level:
                    h.handle(record)

    def discard(self) -> None:
        self._restore()


def run(cfg: TrainConfig, destroy_process_group: bool = True) -> RunResult:
    """Train `cfg` to the end and save DIR/final with `save_model`.

    `destroy_process_group`: end with accelerate's end_training, which also destroys the
    process group; False only finishes the trackers, for more distributed work (another run)
    in the same processes."""
    output_dir = resolve_output_dir(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    held_logs = HeldFileLogs()  # nothing reaches train.log before the relaunch is accepted
    try:
        result = _build_and_resume(cfg, output_dir)
    except BaseException:
        held_logs.discard()
        raise
    held_logs.release()
    return _train(output_dir, *result, destroy_process_group=destroy_process_group)


def _build_and_resume(cfg: TrainConfig, output_dir: Path):
    """Everything before the first step, up to an accepted resume (see `run`)."""
    from bitnet_train.data.tokenizer import load_tokenizer, save_tokenizer
    from bitnet_train.io import write_model_config

    if cfg.parallel.strategy != "ddp":
        maybe_init_cpu_collectives(cfg.parallel.cpu_offload)
    accelerator = build_accelerator(cfg, output_dir)
    cfg = with_derived_values(cfg, accelerator.num_processes)
    set_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.tokenizer)
    if cfg.objective.name in ("sft", "dpo") and not tokenizer.chat_template:
        from bitnet_train.data.chat import CHAT_TEMPLATE

        # the released 2B4T template; saved with the tokenizer, so exports carry it
        tokenizer.chat_template = CHAT_TEMPLATE
    strategy = resolve_strategy(cfg.parallel.strategy, accelerator, cfg.parallel.cpu_offload)
    # FSDP2 over several processes: built on the meta device, shards filled after sharding
    sharded = strategy == "fsdp2" and accelerator.num_processes > 1
    model, objective, applied = build_parallel_model(cfg, accelerator.device, tokenizer, sharded)
    if strategy == "fsdp2" and not sharded:  # one process: the whole model, no accelerate
        model.to(accelerator.device)
    applied["strategy"] = strategy
    optimizer = build_optimizer(model, cfg)
    if applied["kernels"] == "triton":
        from bitnet_train.kernels.modules import watch_optimizer

        watch_optimizer(optimizer, model)  # ternary codes: recomputed once per optimizer step
    if applied.get("ternary_all_gather"):
        from bitnet_train.train.ternary_all_gather import watch_optimizer_scales

        watch_optimizer_scales(optimizer, model)  # one all-reduce of the scales per step
    if strategy == "ddp":
        model, optimizer = accelerator.prepare(model, optimizer)
        state_io: StateIO = AccelerateStateIO(accelerator)
    else:  # sharded (or whole on one process) by us; checkpoints through DCP
        state_io = ShardedStateIO(model, optimizer)
    check_optimizer_covers(model, optimizer)
    objective.setup(model, accelerator)

    checkpointer = Checkpointer(output_dir / "checkpoints", keep_last=cfg.trainer.keep_last)
    # the checkpoint to resume decides the data's logical shards (data_shards.py)
    resume_path, damaged = resume_target(cfg, checkpointer, accelerator)
    resume_meta = checkpointer.load_metadata(resume_path) if resume_path else {}
    num_shards = resolve_num_shards(cfg.parallel.data_shards, accelerator.num_processes,
                                    checkpoint_num_shards(resume_meta, resume_path))
    plan = build_batch_plan(cfg, tokenizer, accelerator, objective, num_shards)
    check_same_global_batch(plan, resume_meta, cfg.trainer.grad_accum)
    total_steps = plan.total_steps
    stage_boundary_step(total_steps, cfg.schedule)  # a schedule that does not fit fails now
    unwrapped: BitNetForCausalLM = accelerator.unwrap_model(model)
    seq_len = getattr(cfg.data, "seq_len", None) or getattr(cfg.data, "max_len", 2048)
    peak = cfg.trainer.peak_tflops or _guess_peak_tflops()

    def save_extra(tmp: Path) -> None:
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp / "tokenizer")
        write_model_config(tmp, unwrapped, tokenizer)  # the checkpoint loads as a model dir

    trainer = Trainer(
        accelerator=accelerator, model=model, objective=objective, optimizer=optimizer,
        schedule=cfg.schedule, data=plan, checkpointer=checkpointer, total_steps=total_steps,
        grad_accum=cfg.trainer.grad_accum, grad_clip=cfg.optim.grad_clip,
        checkpoint_every=cfg.trainer.checkpoint_every, log_every=cfg.trainer.log_every,
        save_extra=save_extra,
        checkpoint_metadata={"model_config": unwrapped.config.to_hf_dict(),
                             "objective": cfg.objective.name, "strategy": strategy,
                             "processes": accelerator.num_processes,
                             "data_shards": getattr(plan, "num_shards", None),
                             "per_shard_accum": getattr(plan, "per_shard", None)},
        flops_per_token=flops_per_token(unwrapped.config, seq_len), peak_tflops=peak,
        progress_bar=cfg.trainer.progress_bar, grad_clip_per=cfg.optim.grad_clip_per,
        divergence=DivergenceGuard(cfg.trainer.on_divergence, cfg.trainer.divergence_sigma,
                                   cfg.trainer.divergence_window, cfg.trainer.divergence_max_skips),
        evaluator=build_evaluator(cfg, plan, objective, accelerator),
        eval_every=cfg.trainer.eval_every, state_io=state_io,
    )
    if resume_path is not None:
        _resume(trainer, resume_path, damaged, checkpointer, unwrapped)
    return cfg, accelerator, trainer, plan, tokenizer, model, unwrapped, applied


def _train(output_dir: Path, cfg: TrainConfig, accelerator: Accelerator, trainer: Trainer,
           plan: Any, tokenizer: Any, model: torch.nn.Module, unwrapped: BitNetForCausalLM,
           applied: dict[str, Any], destroy_process_group: bool = True) -> RunResult:
    """Train an accepted run (`_build_and_resume`'s results) to the end and save DIR/final."""
    from bitnet_train.atomic import recover_atomic_directory
    from bitnet_train.io import save_model

    # Only now, with the relaunch accepted, does anything under output_dir change: a refused
    # one (another model shape, damaged checkpoints) leaves the run directory as it was.
    if accelerator.is_main_process:
        log.info("run %s (%s) in %s; fast paths %s", cfg.run_name, code_version(), output_dir,
                 applied)
        (output_dir / "config.yaml").write_text(config_yaml(cfg))
        for leftover in recover_atomic_directory(output_dir / "final"):
            log.info("removed %s, left by a write of final/ that was killed", leftover)
        if cfg.logger.tracker != "none":
            accelerator.init_trackers(cfg.logger.project, config=_flat_config(cfg))
            if getattr(plan, "counts", None):
                accelerator.log(plan.counts, step=0)
    trainer.fit()
    final_dir = output_dir / "final"
    # a sharded model is gathered whole once, on the CPU of rank 0 (every rank joins)
    sharded = applied["strategy"] == "fsdp2" and accelerator.num_processes > 1
    whole = gather_full_model(model, unwrapped.config) if sharded else unwrapped
    if accelerator.is_main_process:
        save_model(whole, final_dir, tokenizer=tokenizer)
        log.info("final model saved to %s", final_dir)
    del whole
    accelerator.wait_for_everyone()
    if destroy_process_group:
        accelerator.end_training()
    else:
        for tracker in accelerator.trackers:
            tracker.finish()
    return RunResult(output_dir=output_dir, final_dir=final_dir, history=trainer.history,
                     trainer=trainer)


def build_evaluator(cfg: TrainConfig, plan, objective, accelerator):
    """The held-out evaluator of the plan's held-out set (None when trainer.eval_every = 0)."""
    if cfg.trainer.eval_every <= 0 or getattr(plan, "heldout", None) is None:
        return None
    from bitnet_train.eval.heldout import build_heldout_evaluator

    return build_heldout_evaluator(
        cfg.objective.name, plan.heldout, accelerator,
        cfg.trainer.eval_batch_size or cfg.trainer.micro_batch_size,
        loss_impl=cfg.objective.loss_impl, beta=cfg.objective.beta,
        reference=getattr(objective, "reference", None),
        ref_logps=getattr(plan, "heldout_ref_logps", None))


def resume_target(cfg: TrainConfig, checkpointer: Checkpointer, acc: Accelerator
                  ) -> tuple[Path | None, list]:
    """The checkpoint `trainer.resume` asks for (None: start fresh), and the newer ones that
    failed verification (each with its error).

    The main process verifies the integrity manifests and tells every rank its choice. A
    damaged newest checkpoint is named with its damaged file and skipped for the previous whole
    one. Nothing on disk changes here: a refused resume leaves the run directory as it was.
    """
    mode = cfg.trainer.resume
    if mode == "never":
        return None, []
    if mode == "auto":
        found = checkpointer.newest_intact() if acc.is_main_process else None
        path, damaged = broadcast_object_list([found])[0]
        for bad, err in damaged:
            log.error("checkpoint %s is damaged: %s", bad, err)
        if path is None and damaged:
            raise CheckpointError(
                f"every checkpoint under {checkpointer.root} failed verification (newest "
                f"first: {'; '.join(str(e) for _, e in damaged)}). Nothing was changed. Restore "
                "the files, or start over with trainer.resume=never and a new output_dir."
            )
        if path is not None and damaged:
            log.warning("falling back to %s, the newest checkpoint that verifies", path)
        return path, damaged
    path = Path(mode)
    if not (path / "COMPLETE").exists():
        raise CheckpointError(f"trainer.resume={mode}: not a complete checkpoint (no COMPLETE)")
    if acc.is_main_process:
        verify(path)
    return path, []


def _resume(trainer: Trainer, path: Path, damaged: list, checkpointer: Checkpointer,
            model: BitNetForCausalLM) -> None:
    """Continue from checkpoint `path` (`resume_target`'s); once it loaded, the damaged newer
    checkpoints are moved aside to step_XXXXXXXX.damaged."""
    checkpointer.check_compatible(path, model.config.to_hf_dict())
    log.info("resuming from %s", path)
    trainer.load_checkpoint(path)
    refuse_non_finite_params(model, path, trainer.accelerator)
    if trainer.accelerator.is_main_process:
        for bad, _ in damaged:
            log.warning("moved the damaged checkpoint aside to %s; delete it once inspected",
                        checkpointer.quarantine(bad))


def refuse_non_finite_params(model: torch.nn.Module, source: Path, acc: Accelerator) -> None:
    """`integrity.refuse_non_finite` over the model's parameters; a sharded (FSDP2) model
    counts each process's shards and sums the counts in one all-reduce."""
    from torch.distributed.tensor import DTensor

    params = list(model.named_parameters())
    if not any(isinstance(p, DTensor) for _, p in params):
        refuse_non_finite(params, source)
        return
    counts = torch.stack([(~p.to_local().isfinite()).sum().float() for _, p in params])
    counts = acc.reduce(counts, reduction="sum").tolist()
    for (name, p), bad in zip(params, counts):
        if bad:
            raise CheckpointError(
                f"{source}: tensor {name} holds {int(bad)} non-finite value(s) (NaN or infinity)"
                f" of {p.numel()}; the weights are damaged or come from a diverged run. Load "
                "another checkpoint.")


def build_parallel_model(cfg: TrainConfig, device: torch.device, tokenizer: Any, sharded: bool
                         ) -> tuple[BitNetForCausalLM, Any, dict[str, str | bool]]:
    """model -> objective (DPO: its frozen reference) -> parallelize both -> (sharded) fill the
    shards; returns (model, objective, what parallelize applied)."""
    initial_state = None
    if sharded:
        model, initial_state = build_meta_model(cfg.model.architecture(), cfg.model.init)
        if cfg.model.init:
            check_same_architecture(cfg.model.architecture(), model.config,
                                    source=cfg.model.init)
    else:
        model = build_or_load_model(cfg.model, cfg.seed)
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(
            f"tokenizer {cfg.tokenizer} has {len(tokenizer)} tokens but model.vocab_size="
            f"{model.config.vocab_size}; use a model config whose vocab_size covers the tokenizer"
        )
    model.config.bos_token_id = model.config.bos_token_id or tokenizer.bos_token_id
    model.config.eos_token_id = model.config.eos_token_id or tokenizer.eos_token_id
    model.train()
    objective = build_objective(cfg, model)
    fsdp = fsdp_settings(cfg.parallel, device) if sharded else None
    fast = dict(kernels=cfg.trainer.kernels, attention=cfg.trainer.attention,
                compile=cfg.trainer.compile, fsdp=fsdp)
    ac = cfg.trainer.activation_checkpointing
    applied = parallelize(model, device, activation_checkpointing=ac, **fast)
    reference = getattr(objective, "reference", None)
    if reference is not None:  # the frozen DPO reference runs the same forward, as fast
        parallelize(reference, device, **fast)
    if sharded:
        # CPU offload: shards (and the optimizer) in CPU memory, buffers where the compute is
        shard_device = torch.device("cpu") if cfg.parallel.cpu_offload else device
        for m in (model, reference):
            if m is not None:
                init_sharded(m, shard_device, cfg.seed, initial_state, buffer_device=device)
    return model, objective, applied


def check_same_global_batch(plan: Any, meta: dict[str, Any], grad_accum: int) -> None:
    """A resumed run keeps its global batch: the same micro-batches per data shard per step."""
    was = meta.get("per_shard_accum")
    now = getattr(plan, "per_shard", None)
    if was is None or now is None or was == now:
        return
    k = len(plan.plans)
    raise ConfigError(
        f"the checkpoint trained on {was} micro-batches per data shard per step; with "
        f"trainer.grad_accum={grad_accum} this run would take {now}, changing the global batch. "
        f"Use trainer.grad_accum={was * k} ({k} shard(s) per process), or "
        "trainer.global_batch_tokens")


def fsdp_settings(parallel: ParallelConfig, device: torch.device) -> FSDPSettings:
    """The `parallel` section as apply_fsdp's settings, over every process."""
    return FSDPSettings(mesh=build_mesh(device),
                        param_dtype=getattr(torch, parallel.param_dtype),
                        reshard_after_forward=parallel.reshard_after_forward,
                        cpu_offload=parallel.cpu_offload,
                        ternary_all_gather=parallel.ternary_all_gather)


def _guess_peak_tflops() -> float:
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)


def _flat_config(cfg: TrainConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if dataclasses.is_dataclass(obj):
            obj = dataclasses.asdict(obj)
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, list | tuple):
            out[prefix] = json.dumps(obj, default=str)
        elif isinstance(obj, int | float | str | bool) or obj is None:
            out[prefix] = obj if not (isinstance(obj, float) and math.isnan(obj)) else None
        else:
            out[prefix] = str(obj)

    walk("", cfg)
    return out
