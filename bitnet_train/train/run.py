"""Build a run from its config, in a fixed order, and train it.

model (on the meta device for FSDP2) -> (reference, for DPO) -> parallelize (kernels ->
attention -> AC -> compile -> FSDP2) -> initialise the shards -> optimizer -> accelerate
prepare (DDP only) -> checkpointer -> data (logical shards) -> trainer (resume) -> fit ->
DIR/final (gathered whole once, on the CPU, written by rank 0)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf

from bitnet_train.errors import CheckpointError, ConfigError
from bitnet_train.model import BitNetConfig, BitNetForCausalLM, build_model
from bitnet_train.train.checkpoint import Checkpointer
from bitnet_train.train.config import ModelSection, ParallelConfig, TrainConfig, to_train_config
from bitnet_train.train.data_plan import build_batch_plan
from bitnet_train.train.data_shards import checkpoint_num_shards, resolve_num_shards
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
    """Hydra entry: validate at the edge, log the resolved config, run."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    train_cfg = to_train_config(cfg)
    if train_cfg.output_dir is None:
        from hydra.core.hydra_config import HydraConfig

        train_cfg.output_dir = HydraConfig.get().runtime.output_dir
    return run(train_cfg, resolved_yaml=resolved)


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except Exception:  # noqa: BLE001 - a missing git is not an error for training
        return "unknown"


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


def run(cfg: TrainConfig, resolved_yaml: str | None = None,
        destroy_process_group: bool = True) -> RunResult:
    """Train `cfg` to the end and save DIR/final with `save_model`.

    `destroy_process_group`: end with accelerate's end_training, which also destroys the
    process group; False only finishes the trackers, for more distributed work (another run)
    in the same processes."""
    from bitnet_train.data.tokenizer import load_tokenizer
    from bitnet_train.io import save_model

    output_dir = resolve_output_dir(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.parallel.strategy != "ddp":
        maybe_init_cpu_collectives(cfg.parallel.cpu_offload)
    accelerator = build_accelerator(cfg, output_dir)
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        (output_dir / "config.yaml").write_text(resolved_yaml or json.dumps(
            dataclasses.asdict(cfg), default=str, indent=2))
        log.info("run %s at git %s in %s", cfg.run_name, _git_revision(), output_dir)

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
    log.info("fast paths: %s (strategy %s)", applied, strategy)
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
    resume_path = resume_target(cfg, checkpointer)
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
            tokenizer.save_pretrained(str(tmp / "tokenizer"))

    if accelerator.is_main_process and cfg.logger.tracker != "none":
        accelerator.init_trackers(cfg.logger.project, config=_flat_config(cfg))
        if getattr(plan, "counts", None):
            accelerator.log(plan.counts, step=0)
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
        progress_bar=cfg.trainer.progress_bar, state_io=state_io,
    )
    if resume_path is not None:
        checkpointer.check_compatible(resume_path, unwrapped.config.to_hf_dict())
        log.info("resuming from %s", resume_path)
        trainer.load_checkpoint(resume_path)
    trainer.fit()
    final_dir = output_dir / "final"
    # a sharded model is gathered whole once, on the CPU of rank 0 (every rank joins)
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


def resume_target(cfg: TrainConfig, checkpointer: Checkpointer) -> Path | None:
    """The checkpoint `trainer.resume` asks for (None: start fresh)."""
    mode = cfg.trainer.resume
    if mode == "never":
        return None
    path = checkpointer.latest() if mode == "auto" else Path(mode)
    if path is None:
        return None
    if mode != "auto" and not (path / "COMPLETE").exists():
        raise CheckpointError(f"trainer.resume={mode}: not a complete checkpoint (no COMPLETE)")
    return path


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
