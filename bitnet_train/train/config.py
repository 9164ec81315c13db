"""Typed configuration of a run: Hydra structured configs, converted to dataclasses at the edge.

`register_configs()` puts every schema in Hydra's ConfigStore; the YAML tree shipped inside the
package (`bitnet_train/configs/`, recipes as its `recipe` group) fills them in. An unknown key or a
wrong type fails at composition, before anything is allocated. `to_train_config(cfg)` turns the
composed DictConfig into plain dataclasses: nothing downstream reads Hydra objects.

A user's own config directory joins Hydra's search path (`bitnet-train --config-dir DIR ...`,
`hydra.searchpath=[file:///abs/DIR]`, or `compose(..., config_dirs=[DIR])`): its `recipe/`,
`model/`, `data/` ... files are then found beside the shipped ones. Hydra searches the shipped
tree first, so a user file may not reuse a shipped name (`check_user_config_dir` says so).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from bitnet_train.data.config import PretrainDataConfig
from bitnet_train.data.preference import PreferenceDataConfig
from bitnet_train.data.sft import SFTDataConfig
from bitnet_train.errors import ConfigError
from bitnet_train.model.config import BitNetConfig
from bitnet_train.train.schedules import ScheduleConfig

OBJECTIVES = ("pretrain", "sft", "dpo")
AC_MODES = ("none", "full", "selective")
STRATEGIES = ("auto", "ddp", "fsdp2")


@dataclass
class ModelSection(BitNetConfig):
    """The `model` group: a BitNetConfig plus where its weights start from."""

    init: str | None = None
    """Directory written by `save_model` (e.g. a run's DIR/final) or a transformers BitNet dir
    (bf16 master or packed). None: random init. Its config.json must match the fields above."""

    def architecture(self) -> BitNetConfig:
        fields = {f.name for f in dataclasses.fields(BitNetConfig)}
        return BitNetConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in fields})


@dataclass
class OptimConfig:
    """AdamW. Learning rate and weight decay come from `schedule`, step by step."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global grad norm to this; 0 disables clipping."""
    grad_clip_per: str = "step"
    """What grad_clip bounds. step: the norm of the step's gradient. item: its norm per item
    (label token, or pair): the threshold is grad_clip x the step's global item count when
    objective.reduction=sum, so a summed loss is clipped exactly when the mean loss would be
    and keeps its scale otherwise (the same as step for reduction=mean)."""
    fused: bool | None = None
    """Fused CUDA AdamW; None picks it on CUDA."""
    decay_embeddings: bool = False
    """Apply weight decay to embeddings (and a tied lm_head) too."""

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.grad_clip_per not in ("step", "item"):
            raise ConfigError(f"optim.grad_clip_per={self.grad_clip_per!r}; choose step or item")
        check_number("optim.grad_clip", self.grad_clip, low=0.0, note="0 disables clipping")
        check_number("optim.eps", self.eps, low=0.0, strict=True)


@dataclass
class ObjectiveConfig:
    """What one step optimises."""

    name: str = "pretrain"
    """pretrain | sft | dpo."""
    reduction: str = "mean"
    """sum | mean. sum: the step's gradient is that of the SUM of token losses over the whole
    global batch (2B4T SFT); mean: of their mean. Pretrain and DPO use mean."""
    beta: float = 0.1
    """DPO temperature."""
    precompute_reference: bool = False
    """DPO: compute reference log-probs in one pass before training, then free the reference."""
    loss_impl: str = "auto"
    """auto | liger | torch. auto: Liger's fused kernels on CUDA, PyTorch on CPU."""
    liger_chunk_mem: int = 8
    """Liger fused linear cross-entropy: transient logits per chunk <= liger_chunk_mem x tokens x
    hidden elements (Liger's chunk_mem_const; its default is 1). 8 cuts 16k tokens at the 2B4T
    vocabulary into 4 chunks instead of 32: +10.6% tokens/s for 0.4 GiB more peak memory on an
    H200 (2B4T cut to 8 layers, scripts/bench_train.py)."""

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ConfigError(f"objective.name={self.name!r}; choose one of {OBJECTIVES}")
        if self.reduction not in ("sum", "mean"):
            raise ConfigError(f"objective.reduction={self.reduction!r}; choose sum or mean")
        if self.liger_chunk_mem < 1:
            raise ConfigError(f"objective.liger_chunk_mem={self.liger_chunk_mem}: must be >= 1")
        if self.loss_impl not in ("auto", "liger", "torch"):
            raise ConfigError(f"objective.loss_impl={self.loss_impl!r}; choose auto, liger, torch")
        check_number("objective.beta", self.beta, low=0.0, strict=True)


@dataclass
class TrainerConfig:
    """The loop: length, batch, precision, checkpoints."""

    max_steps: int = 0
    """Optimizer steps of a step-based run (pretraining). 0: derive from `epochs`."""
    epochs: int = 0
    """Exact number of passes over the data (SFT, DPO). 0: step-based."""
    micro_batch_size: int = 8
    """Sequences (pairs, for DPO) per process per forward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each process (ignored if global_batch_tokens > 0)."""
    global_batch_tokens: int = 0
    """Tokens per optimizer step over all processes. When > 0, grad_accum is derived at start:
    global_batch_tokens / (micro_batch_size * seq_len * processes), which must be a whole number."""
    mixed_precision: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU) | bf16 | no."""
    device: str = "auto"
    """auto | cpu | cuda."""
    checkpoint_every: int = 0
    """Save every N optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Complete checkpoints to keep."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint under output_dir, if any | never |
    a checkpoint directory."""
    log_every: int = 10
    eval_every: int = 0
    """Held-out evaluation every N optimizer steps, and at the start and the end of the run
    (0: none, and no data is held out). The held-out set is carved from the stage's own data
    before training and never trained on: pretraining, the first `eval_size` packed rows of
    every source (loss per source and overall); SFT, `eval_size` conversations per source
    (assistant-token loss); DPO, `eval_size` pairs per source (reward accuracy and margin)."""
    eval_size: int = 32
    """Held-out rows (pretraining), conversations (SFT) or pairs (DPO) per source."""
    eval_batch_size: int = 0
    """Sequences (pairs, for DPO) per held-out forward; 0: micro_batch_size."""
    compile: bool = False
    """torch.compile each decoder block (CUDA)."""
    kernels: str = "auto"
    """auto | triton | reference. triton: decoder layers on the fused Triton kernels (RMSNorm +
    int8 activation codes in one pass, int8 tensor-core products, ternary codes once per
    optimizer step); reference: the plain model. auto: triton on CUDA, reference on the CPU."""
    attention: str = "auto"
    """auto | flex | sdpa. flex: FlexAttention with a block-sparse document-causal mask; sdpa:
    scaled_dot_product_attention with a dense mask (the reference). auto: flex on CUDA."""
    activation_checkpointing: str = "none"
    """none | full | selective, per decoder block. full: keep only each block's input and
    recompute the block in backward (the least memory); selective: keep the outputs of the
    matrix products and attention, recompute the elementwise work around them (quantizers,
    norms, RoPE, the activation: cheap to redo, costly to keep)."""
    peak_tflops: float = 0.0
    """Accelerator bf16 dense peak for the MFU estimate; 0: guess from the device name."""
    progress_bar: bool = True
    on_divergence: str = "stop"
    """What a diverging step does (a non-finite loss or grad norm, or a spike, see
    divergence_sigma); its update is never applied. stop: raise, naming the step and the newest
    checkpoint written before the divergence began | skip: skip the update (the batch is used
    up), count it (metric skipped_steps) and continue; stop after divergence_max_skips in a row."""
    divergence_sigma: float = 6.0
    """A loss or grad norm more than this many standard deviations above the mean of the last
    divergence_window accepted steps is a spike. 0: only non-finite values count."""
    divergence_window: int = 128
    """Accepted steps the spike statistics cover; spikes are judged once half of it is filled."""
    divergence_max_skips: int = 10
    """With on_divergence=skip: consecutive skipped updates after which the run stops."""

    def __post_init__(self) -> None:
        # intervals and counts, each with what its smallest value means
        for key, low, note in (("log_every", 1, ""), ("checkpoint_every", 0, "0: only at the end"),
                               ("keep_last", 0, "0 keeps all"), ("eval_every", 0, "0: off"),
                               ("divergence_window", 2, ""), ("divergence_max_skips", 1, "")):
            check_number(f"trainer.{key}", getattr(self, key), low=low, note=note)
        check_number("trainer.peak_tflops", self.peak_tflops, low=0.0, note="0: guess")
        check_number("trainer.divergence_sigma", self.divergence_sigma, low=0.0,
                     note="0: only non-finite values count")
        if self.on_divergence not in ("stop", "skip"):
            raise ConfigError(f"trainer.on_divergence={self.on_divergence!r}: stop|skip")
        if self.max_steps < 0 or self.epochs < 0:
            raise ConfigError("trainer.max_steps and trainer.epochs must be >= 0")
        if self.global_batch_tokens < 0:
            raise ConfigError("trainer.global_batch_tokens must be >= 0 (0: use grad_accum)")
        if self.micro_batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("trainer.micro_batch_size and trainer.grad_accum must be positive")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ConfigError(f"trainer.mixed_precision={self.mixed_precision!r}: auto|bf16|no")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"trainer.device={self.device!r}: auto|cpu|cuda")
        if self.kernels not in ("auto", "triton", "reference"):
            raise ConfigError(f"trainer.kernels={self.kernels!r}: auto|triton|reference")
        if self.attention not in ("auto", "flex", "sdpa"):
            raise ConfigError(f"trainer.attention={self.attention!r}: auto|flex|sdpa")
        if self.eval_every < 0 or self.eval_batch_size < 0:
            raise ConfigError("trainer.eval_every and trainer.eval_batch_size must be >= 0 "
                              "(0: no held-out evaluation / micro_batch_size)")
        if self.eval_every > 0 and self.eval_size < 1:
            raise ConfigError(f"trainer.eval_size={self.eval_size}: held-out evaluation "
                              "(trainer.eval_every > 0) needs at least 1 item per source")
        if self.activation_checkpointing not in AC_MODES:
            raise ConfigError(f"trainer.activation_checkpointing="
                              f"{self.activation_checkpointing!r}: none|full|selective")


@dataclass
class ParallelConfig:
    """How the model is spread over processes (bitnet_train.train.parallelize)."""

    strategy: str = "auto"
    """auto | ddp | fsdp2. ddp: every process holds the whole model, gradients all-reduced
    (accelerate's DDP). fsdp2: parameters, gradients and optimizer states sharded over the
    processes with torch's fully_shard, one group per decoder block plus the root, applied by
    bitnet-train itself; checkpoints sharded (torch.distributed.checkpoint). auto: fsdp2 when
    accelerate was launched with FSDP version 2 (bitnet_train/configs/accelerate/fsdp2.yaml),
    else ddp."""
    param_dtype: str = "float32"
    """FSDP2: dtype the parameters are all-gathered in (float32 | bfloat16); gradients are
    always reduced in float32. float32 computes exactly what DDP computes (ternary codes from
    the fp32 master weights, the residual stream in fp32 under bf16 autocast). bfloat16 halves
    the all-gather bytes but rounds every weight to bf16 before it is ternarized, and the
    embeddings feed the residual stream in bf16. ternary_all_gather keeps the contract at a
    sixteenth of the float32 bytes for the projections."""
    reshard_after_forward: bool = True
    """FSDP2: free each block's gathered weights after its forward and gather them again for
    its backward (ZeRO-3; less memory). false: keep them between forward and backward (fewer
    all-gathers, ZeRO-2-like memory)."""
    cpu_offload: bool = False
    """FSDP2: keep sharded parameters, gradients and optimizer states in CPU memory (the
    optimizer step runs on the CPU); for models that do not fit otherwise."""
    ternary_all_gather: bool = False
    """FSDP2: all-gather each BitLinear weight as 2-bit ternary codes quantized on its fp32
    shard with the whole tensor's absmean (one all-reduce of partial sums per step for all
    layers), instead of float weights. Embeddings and norms are gathered in param_dtype."""
    data_shards: int = 0
    """Logical data streams of the run, fixed when it starts (0: the number of processes then).
    Process r of W reads shards r, r + W, ... in turn, so a checkpoint resumes on any number of
    processes that divides data_shards, each stream continuing exactly where it stopped (see
    bitnet_train/train/data_shards.py)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"parallel.strategy={self.strategy!r}: auto|ddp|fsdp2")
        if self.param_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"parallel.param_dtype={self.param_dtype!r}: float32|bfloat16")
        if self.data_shards < 0:
            raise ConfigError(f"parallel.data_shards={self.data_shards}: must be >= 0 "
                              "(0: the number of processes at the start of the run)")


@dataclass
class LoggerConfig:
    """Metrics trackers through accelerate."""

    tracker: str = "wandb"
    """wandb | tensorboard | none."""
    project: str = "bitnet-train"
    wandb_mode: str = "offline"
    """offline needs no account; `wandb sync` uploads later."""

    def __post_init__(self) -> None:
        if self.tracker not in ("wandb", "tensorboard", "none"):
            raise ConfigError(f"logger.tracker={self.tracker!r}: wandb|tensorboard|none")


@dataclass
class TrainConfig:
    """One run. `data` is validated against the schema of `objective.name`'s data."""

    model: ModelSection = field(default_factory=ModelSection)
    data: Any = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    tokenizer: str = "microsoft/bitnet-b1.58-2B-4T"
    """Hub id or local directory of a transformers tokenizer."""
    output_dir: str | None = None
    """Where checkpoints, logs and DIR/final go. None: a fresh folder under outputs/."""
    seed: int = 0
    run_name: str = "run"


DATA_SCHEMAS: dict[str, type] = {
    "pretrain": PretrainDataConfig,
    "sft": SFTDataConfig,
    "dpo": PreferenceDataConfig,
}


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="model", name="model_schema", node=ModelSection)
    cs.store(group="data", name="pretrain_schema", node=PretrainDataConfig)
    cs.store(group="data", name="sft_schema", node=SFTDataConfig)
    cs.store(group="data", name="dpo_schema", node=PreferenceDataConfig)
    cs.store(group="optim", name="optim_schema", node=OptimConfig)
    cs.store(group="schedule", name="schedule_schema", node=ScheduleConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Validate the composed config against the schemas and return plain dataclasses.

    The data section is checked against the schema of the objective (pretrain/sft/dpo), so a
    key that belongs to another stage fails here with OmegaConf's message naming it.
    """
    objective = cfg.objective.name
    if objective not in DATA_SCHEMAS:
        raise ConfigError(f"objective.name={objective!r}; choose one of {OBJECTIVES}")
    schema = OmegaConf.structured(DATA_SCHEMAS[objective])
    data = OmegaConf.to_object(OmegaConf.merge(schema, cfg.data))
    rest = OmegaConf.merge(OmegaConf.structured(TrainConfig), {k: v for k, v in cfg.items()
                                                                if k not in ("data", "hydra")})
    out: TrainConfig = OmegaConf.to_object(rest)  # runs each __post_init__ validation
    out.data = data
    check_across_sections(out)
    return out


def check_number(key: str, value: float, low: float, strict: bool = False,
                 note: str = "") -> None:
    """ConfigError naming `key` unless `value` is a finite number >= `low` (> when strict)."""
    ok = isinstance(value, int | float) and math.isfinite(value) and (
        value > low if strict else value >= low)
    if not ok:
        bound = f"{'>' if strict else '>='} {low}"
        raise ConfigError(f"{key}={value} must be a finite number {bound}"
                          f"{f' ({note})' if note else ''}")


def check_across_sections(cfg: TrainConfig) -> None:
    """Bounds that tie two sections together, named by key: sequence lengths within the
    model's positions, and a seed that every RNG accepts."""
    if not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed={cfg.seed} must be an integer in [0, 2**32) (numpy's range)")
    length_key = "data.seq_len" if hasattr(cfg.data, "seq_len") else "data.max_len"
    length = getattr(cfg.data, length_key.split(".")[1], None)
    limit = cfg.model.max_position_embeddings
    if length is not None and length > limit:
        raise ConfigError(
            f"{length_key}={length} exceeds model.max_position_embeddings={limit}: rows longer "
            "than the positions the model declares would train positions that exported configs "
            f"and engines do not allow. Lower {length_key} or raise "
            "model.max_position_embeddings."
        )


def config_dir() -> Path:
    """The config tree shipped inside the package (`bitnet_train/configs`), wherever it is
    installed: a checkout, an editable install or a wheel."""
    return Path(__file__).resolve().parents[1] / "configs"


def check_user_config_dir(path: str | Path) -> None:
    """Refuse a user config directory that is missing or that shadows a shipped config.

    Hydra searches the package's tree first, so a user's `model/tiny.yaml` would be silently
    ignored in favour of ours: give it a new name (its `defaults` can start from ours).
    """
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"config directory {path} does not exist; give a directory holding "
                          "recipe/, model/, data/ ... YAML files")
    shipped = config_dir()
    for file in sorted(path.rglob("*.yaml")):
        rel = file.relative_to(path)
        if (shipped / rel).is_file():
            renamed = rel.parent / f"my_{rel.name}"
            raise ConfigError(
                f"{file} has the group and name of a shipped config ({rel}); Hydra would use "
                f"the shipped one and ignore yours. Rename it (e.g. {renamed}); its defaults "
                f"list can start from ours: `defaults: [{rel.stem}, _self_]`"
            )


def check_search_path(config_sources: Sequence[Any]) -> None:
    """`check_user_config_dir` for every file directory Hydra added beside the package's tree
    (`hydra.runtime.config_sources`: `--config-dir`, `hydra.searchpath`)."""
    for source in config_sources:
        if source.schema == "file" and source.provider != "main":
            check_user_config_dir(source.path)


def search_path_override(config_dirs: Sequence[str | Path]) -> str:
    """The `hydra.searchpath=[...]` override that adds the user's `config_dirs` to the search
    path (after the package's own tree; each is checked by `check_user_config_dir`)."""
    entries = []
    for d in config_dirs:
        path = Path(d).expanduser().resolve()
        check_user_config_dir(path)
        entries.append(f"file://{path}")
    return f"hydra.searchpath=[{','.join(entries)}]"


def compose(
    overrides: list[str] | None = None,
    config_name: str = "config",
    config_dirs: Sequence[str | Path] = (),
) -> DictConfig:
    """Compose the config as `bitnet-train` would, for scripts and tests (no output dir, no
    logging). `config_dirs`: the user's own config directories, searched before the package's."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    extra = [search_path_override(config_dirs)] if config_dirs else []
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=[*extra, *(overrides or [])])


def with_derived_values(cfg: TrainConfig, processes: int) -> TrainConfig:
    """`cfg` with what is derived at start filled in, so that the written config.yaml records
    what the run uses: trainer.grad_accum from trainer.global_batch_tokens (pretraining)."""
    if cfg.objective.name != "pretrain" or cfg.trainer.global_batch_tokens <= 0:
        return cfg
    grad_accum = derive_grad_accum(cfg.trainer, cfg.data.seq_len, processes)
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer,
                                                                grad_accum=grad_accum))


def config_yaml(cfg: TrainConfig) -> str:
    """The run's config as YAML: every field of every section, defaults and derived values
    included (what `config.yaml` in the output directory holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def derive_grad_accum(trainer: TrainerConfig, seq_len: int, processes: int) -> int:
    """Micro-batches per step per process that make `trainer.global_batch_tokens`."""
    if trainer.global_batch_tokens <= 0:
        return trainer.grad_accum
    per_micro = trainer.micro_batch_size * seq_len * processes
    ga, rem = divmod(trainer.global_batch_tokens, per_micro)
    if rem or ga == 0:
        raise ConfigError(
            f"trainer.global_batch_tokens={trainer.global_batch_tokens} is not a multiple of "
            f"micro_batch_size ({trainer.micro_batch_size}) x seq_len ({seq_len}) x processes "
            f"({processes}) = {per_micro}; change micro_batch_size or the number of processes"
        )
    return ga
