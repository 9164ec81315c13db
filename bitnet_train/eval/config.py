"""Typed configuration of `bitnet-train eval`: Hydra structured configs, like training's.

The root config is `configs/evaluate.yaml`; the `eval` group (`configs/eval/*.yaml`) picks a
suite: `eval=2b4t_suite` (the 2B4T report's benchmarks, shots and chat-template setting) or
`eval=quick` (a small set for checkpoints during training). An unknown key or a wrong type
fails at composition; the checks below run before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from bitnet_train.errors import ConfigError

EXTERNAL_KINDS = ("humaneval_plus", "mt_bench", "math500")


@dataclass
class TaskSpec:
    """One lm-evaluation-harness task (or group) of a suite, and how to read its result."""

    task: str = MISSING
    """lm-eval task or group name (`lm-eval ls tasks`), or one from `include_path`."""
    label: str = ""
    """Row label in the markdown table (default: the task name)."""
    num_fewshot: int = 0
    chat_template: bool = False
    """Render the prompt (and few-shot examples, as turns) with the tokenizer's chat template."""
    metric: str = "acc,none"
    """Key of the harness's result to report, `metric,filter` (e.g. `acc_norm,none`,
    `exact_match,flexible-extract`)."""
    percent: bool = True
    """Report the metric x 100 (accuracies, exact match); false for perplexities and bits."""
    report: float | None = None
    """The BitNet b1.58 2B4T report's number for this benchmark (Table 1), for the table."""

    def __post_init__(self) -> None:
        if self.num_fewshot < 0:
            raise ConfigError(f"eval task {self.task!r}: num_fewshot={self.num_fewshot} < 0")
        if "," not in self.metric:
            raise ConfigError(f"eval task {self.task!r}: metric={self.metric!r} must read "
                              "`name,filter` as in the harness's results (e.g. acc,none)")


@dataclass
class ExternalSpec:
    """A benchmark scored outside lm-eval: we write the model's answers in the format of its
    scorer and state the command that scores them, or (MATH-500) score them ourselves."""

    kind: str = MISSING
    """humaneval_plus (evalplus) | mt_bench (FastChat's llm_judge, GPT-4 as judge) | math500
    (scored here: bitnet_train.eval.math_answers)."""
    label: str = ""
    dataset: str = ""
    """Hub id or local .jsonl of the prompts (default: the benchmark's hub set)."""
    split: str = ""
    max_new_tokens: int = 512
    report: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in EXTERNAL_KINDS:
            raise ConfigError(f"eval.external: kind={self.kind!r}; choose one of "
                              f"{EXTERNAL_KINDS}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"eval.external {self.kind}: max_new_tokens must be >= 1")


@dataclass
class SuiteConfig:
    """The `eval` group: which benchmarks, and how to run them."""

    name: str = "quick"
    tasks: list[TaskSpec] = field(default_factory=list)
    external: list[ExternalSpec] = field(default_factory=list)
    include_path: list[str] = field(default_factory=list)
    """Extra directories of lm-eval task YAMLs (our own tasks, tests' tiny tasks)."""
    include_defaults: bool = True
    """Also index lm-eval's bundled tasks (about 15k; indexing them takes seconds)."""
    limit: float | None = None
    """Examples per task (< 1: a fraction); None: all. Only for quick looks: numbers with a
    limit are not comparable to the report's."""
    batch_size: int = 16
    max_gen_toks: int = 256
    """Generation budget of generative tasks that set none."""
    bootstrap_iters: int = 1000
    """Bootstrap samples for standard errors (0: none)."""
    log_samples: bool = True
    """Write every example's prompt, response and score (samples_<task>.jsonl)."""
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_gen_toks < 1:
            raise ConfigError("eval.batch_size and eval.max_gen_toks must be >= 1")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"eval.limit={self.limit} must be > 0 (or null: all examples)")


@dataclass
class EvalRunConfig:
    """`bitnet-train eval checkpoint=PATH eval=SUITE`."""

    checkpoint: str = MISSING
    """What to evaluate: a run directory (its final/), DIR/final, a checkpoint
    (DIR/checkpoints/step_N), an exported transformers directory (hf or hf-bf16), a GGUF file
    written by our exporter, or a hub id (microsoft/bitnet-b1.58-2B-4T, -bf16)."""
    eval: SuiteConfig = field(default_factory=SuiteConfig)
    tokenizer: str | None = None
    """Tokenizer directory or hub id; None: the one stored with the model."""
    output_dir: str | None = None
    """Where results go; None: outputs/eval/<time>-<model>-<suite>."""
    device: str = "auto"
    """auto (cuda if available) | cpu | cuda."""
    dtype: str = "auto"
    """auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16."""
    kernels: str = "reference"
    """reference | triton: decoder layers on the fused Triton kernels (CUDA)."""
    model_id: str = ""
    """Name of the model in results and answer files (default: from the model path)."""

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r}: auto|cpu|cuda")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"dtype={self.dtype!r}: auto|float32|bfloat16")
        if self.kernels not in ("reference", "triton"):
            raise ConfigError(f"kernels={self.kernels!r}: reference|triton")


def register_eval_configs() -> None:
    """Store the eval schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="eval_run_schema", node=EvalRunConfig)
    cs.store(group="eval", name="eval_suite_schema", node=SuiteConfig)


def to_eval_config(cfg: DictConfig) -> EvalRunConfig:
    """Validate the composed config and return plain dataclasses."""
    if "checkpoint" not in cfg or OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("checkpoint is not set: `bitnet-train eval checkpoint=PATH` (a run dir, "
                          "DIR/final, DIR/checkpoints/step_N, an exported transformers dir, a "
                          "GGUF file or a hub id)")
    merged = OmegaConf.merge(OmegaConf.structured(EvalRunConfig),
                             {k: cfg[k] for k in cfg if k != "hydra"})
    out: EvalRunConfig = OmegaConf.to_object(merged)
    if not out.eval.tasks and not out.eval.external:
        raise ConfigError(f"eval suite {out.eval.name!r} lists no tasks and no external "
                          "benchmarks; set eval.tasks")
    return out


def compose_eval(overrides: list[str] | None = None) -> DictConfig:
    """Compose `configs/evaluate.yaml` as `bitnet-train eval` would (for scripts and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from bitnet_train.train.config import config_dir

    register_eval_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="evaluate", overrides=overrides or [])
