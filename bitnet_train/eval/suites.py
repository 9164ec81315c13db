"""Run a benchmark suite (configs/eval/) on a model through lm-evaluation-harness's Python API.

    run_eval(EvalRunConfig)
      resolve the checkpoint (run dir, DIR/final, a checkpoint step, an exported transformers
        dir, a GGUF file, a hub id) -> our model + tokenizer          (bad path: one clear error)
      index lm-eval's tasks (+ include_path) -> check every name      (unknown task: one error)
      load every task, downloading its data set                       (offline: one error)
      for each (shots, chat template) group: lm_eval.simple_evaluate(BitNetLM(model), tasks)
      external benchmarks (HumanEval+, MT-bench): generate answers in their scorer's format;
        MATH-500: generate and score here (math_answers)
      -> output_dir/, written atomically:
           harness/<group>.json      the harness's results JSON, as `lm_eval` writes it
           samples/<task>.jsonl      every example's prompt, response and score
           math500/samples.jsonl     every MATH-500 solution, its boxed answer and whether it
                                     is right
           results.json, results.md  our numbers beside the report's, and the commands that
                                     score the external answers
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bitnet_train.errors import CheckpointError, ConfigError, DataError
from bitnet_train.eval.config import EvalRunConfig, SuiteConfig, TaskSpec
from bitnet_train.eval.results import Row

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class EvalOutput:
    output_dir: Path
    rows: list[Row]
    markdown: str
    harness: dict[str, dict[str, Any]] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)


# -- the model -----------------------------------------------------------------------------------


def resolve_checkpoint(spec: str) -> Path:
    """A local model path for `spec` (see EvalRunConfig.checkpoint); downloads a hub id.

    Raises CheckpointError naming `spec` when it is not a model.
    """
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        if (path / "config.json").is_file() or (path / "metadata.json").is_file():
            return path  # DIR/final, an exported dir, a checkpoint step
        if (path / "final" / "config.json").is_file():
            return path / "final"  # a run directory
        steps = sorted((path / "checkpoints").glob("step_*")) if (path / "checkpoints").is_dir() \
            else []
        hint = (f"; it holds checkpoints ({steps[-1].name}, ...): pass one of them" if steps
                else "")
        raise CheckpointError(
            f"checkpoint={spec}: {path} is not a model (no config.json, no final/){hint}. "
            "Give a run's DIR/final, DIR/checkpoints/step_N, an exported transformers dir, a "
            ".gguf file or a hub id")
    if path.exists():
        raise CheckpointError(f"checkpoint={spec}: {path} is a file, not a model directory or a "
                              ".gguf file")
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _download(spec)
    raise CheckpointError(f"checkpoint={spec}: no such file or directory, and not a hub id "
                          "(org/name)")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.jinja"]))
    except Exception as err:  # noqa: BLE001 - re-raised naming the repo and what to do
        raise CheckpointError(
            f"checkpoint={repo_id}: cannot download it from the Hugging Face Hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Offline "
            f"(HF_HUB_OFFLINE=1) or without network: `hf download {repo_id}` elsewhere and pass "
            "the local directory") from err


def eval_device(cfg: EvalRunConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def load_for_eval(cfg: EvalRunConfig) -> tuple[Any, Any, str, Path]:
    """(model on its device in its eval dtype, tokenizer, model id, resolved path)."""
    from bitnet_train.io import load_model

    path = resolve_checkpoint(cfg.checkpoint)
    device = eval_device(cfg)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        cfg.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        model, tokenizer = load_model(path, dtype=dtype, device=device)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint={cfg.checkpoint}: {err}") from err
    if cfg.tokenizer:
        from bitnet_train.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer is None:
        raise CheckpointError(f"checkpoint={cfg.checkpoint}: {path} holds no tokenizer "
                              "(tokenizer.json); pass tokenizer=DIR_OR_HUB_ID")
    needs_chat = [s.label or s.task for s in cfg.eval.tasks if s.chat_template] + \
        [s.label or s.kind for s in cfg.eval.external]
    if needs_chat and not getattr(tokenizer, "chat_template", None):
        from bitnet_train.data.chat import CHAT_TEMPLATE

        log.warning("the tokenizer of %s has no chat template, which %s need: using the 2B4T "
                    "template (bitnet_train.data.chat.CHAT_TEMPLATE)", cfg.checkpoint,
                    ", ".join(needs_chat))
        tokenizer.chat_template = CHAT_TEMPLATE
    if cfg.kernels == "triton":
        from bitnet_train.kernels.modules import apply_kernels

        apply_kernels(model)
    model_id = cfg.model_id or model_id_of(str(path) if Path(cfg.checkpoint).exists()
                                           else cfg.checkpoint)
    return model, tokenizer, model_id, path


def model_id_of(spec: str) -> str:
    """A file-name-safe id: the hub id, or the last two parts of a path (run-final)."""
    if HUB_ID.match(spec) and not Path(spec).exists():
        return spec.replace("/", "__")
    parts = [p for p in Path(spec).expanduser().resolve().parts if p not in ("/", "")]
    return "-".join(parts[-2:]) or "model"


# -- tasks ---------------------------------------------------------------------------------------


def build_task_manager(suite: SuiteConfig):
    from lm_eval.tasks import TaskManager

    for p in suite.include_path:
        if not Path(p).is_dir():
            raise ConfigError(f"eval.include_path: {p} is not a directory of task YAMLs")
    return TaskManager(include_path=list(suite.include_path) or None,
                       include_defaults=suite.include_defaults)


def check_task_names(task_manager, specs: Sequence[TaskSpec]) -> None:
    """ConfigError naming the first task lm-eval does not know, with the closest names."""
    known = set(task_manager.all_tasks)
    for spec in specs:
        if spec.task not in known:
            close = difflib.get_close_matches(spec.task, known, n=3, cutoff=0.75)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"eval.tasks: lm-evaluation-harness knows no task {spec.task!r}{hint}; "
                "`lm-eval ls tasks` lists them, or add a directory of task YAMLs to "
                "eval.include_path")


def load_task(task_manager, spec: TaskSpec) -> list[Any]:
    """The Task / Group objects of `spec`, data set included (DataError naming the task and
    its data set when that cannot be read, e.g. offline)."""
    try:
        loaded = task_manager.load([spec.task])
    except Exception as err:  # noqa: BLE001 - re-raised naming the task and its data set
        raise DataError(
            f"eval task {spec.task!r}: its data set {_dataset_of(task_manager, spec.task)} "
            f"cannot be loaded ({_first_line(err)}). {_offline_hint(err)}") from err
    groups, tasks = loaded.get("groups", {}), loaded["tasks"]
    if spec.task in groups:
        return [groups[spec.task]]
    if spec.task in tasks:
        return [tasks[spec.task]]
    return list(tasks.values())  # a tag: its tasks


def _dataset_of(task_manager, name: str) -> str:
    try:
        from lm_eval.tasks._yaml_loader import load_yaml

        entry = task_manager._index[name]  # lm-eval's index of task YAMLs
        cfg = entry.cfg or (load_yaml(entry.yaml_path, resolve_func=False)
                            if entry.yaml_path else {})
        path = cfg.get("dataset_path") or "(its custom loader)"
        return f"{path}" + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "")
    except Exception:  # noqa: BLE001 - only decorates an error message
        return "(unknown)"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _offline_hint(err: BaseException) -> str:
    chain, e = [], err
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    offline = any("offline" in str(e).lower() or isinstance(e, ConnectionError) for e in chain)
    if offline:
        return ("It must be downloaded once with network access (HF_HUB_OFFLINE / "
                "HF_DATASETS_OFFLINE unset) into the datasets cache, or left out of eval.tasks")
    return "Check the task's dataset_path / data files"


# -- running -------------------------------------------------------------------------------------


def group_tasks(specs: Sequence[TaskSpec]) -> dict[tuple[int, bool], list[TaskSpec]]:
    """Tasks by (shots, chat template): one `simple_evaluate` call each."""
    groups: dict[tuple[int, bool], list[TaskSpec]] = {}
    for spec in specs:
        groups.setdefault((spec.num_fewshot, spec.chat_template), []).append(spec)
    return groups


def group_name(shots: int, chat: bool) -> str:
    return f"{shots}shot" + ("_chat" if chat else "")


def run_harness(lm, suite: SuiteConfig, task_manager, loaded: dict[str, list[Any]]
                ) -> dict[str, dict[str, Any]]:
    """Group name -> the harness's results dict (with "samples" when suite.log_samples)."""
    from lm_eval import simple_evaluate

    out = {}
    for (shots, chat), specs in group_tasks(suite.tasks).items():
        name = group_name(shots, chat)
        log.info("lm-eval %s: %s", name, ", ".join(s.task for s in specs))
        out[name] = simple_evaluate(
            model=lm, tasks=[obj for s in specs for obj in loaded[s.task]], num_fewshot=shots,
            apply_chat_template=chat, fewshot_as_multiturn=chat, limit=suite.limit,
            bootstrap_iters=suite.bootstrap_iters, log_samples=suite.log_samples,
            task_manager=task_manager, random_seed=suite.seed, numpy_random_seed=suite.seed,
            torch_random_seed=suite.seed, fewshot_random_seed=suite.seed)
    return out


def metric_value(results: dict[str, Any], spec: TaskSpec) -> float:
    """spec.metric of spec.task in the harness's results, x 100 if spec.percent (ConfigError if
    absent)."""
    found = results.get("results", {}).get(spec.task)
    if found is None:
        raise ConfigError(f"eval task {spec.task!r}: the harness returned no result for it")
    if spec.metric not in found:
        have = sorted(k for k in found if "," in k and "stderr" not in k)
        raise ConfigError(f"eval task {spec.task!r}: no metric {spec.metric!r} in the harness's "
                          f"results; it reports {have}. Set the task's `metric`")
    return float(found[spec.metric]) * (100.0 if spec.percent else 1.0)


def result_rows(suite: SuiteConfig, harness: dict[str, dict[str, Any]]) -> list[Row]:
    rows = []
    for spec in suite.tasks:
        results = harness[group_name(spec.num_fewshot, spec.chat_template)]
        rows.append(Row(spec.label or spec.task, spec.task, spec.num_fewshot, spec.chat_template,
                        spec.metric.split(",")[0], spec.report, metric_value(results, spec)))
    return rows


def markdown_table(rows: Sequence[Row], title: str, notes: Sequence[str] = ()) -> str:
    """Our numbers beside the report's, with the averages over the rows both have."""
    def fmt(v: float | None) -> str:
        return "" if v is None else f"{v:.2f}"

    lines = [f"### {title}", "",
             "| Benchmark | lm-eval task | Shots | Chat template | Metric | 2B4T report | Ours |",
             "| --- | --- | --- | --- | --- | ---: | ---: |"]
    for r in rows:
        shots = "" if r.shots is None else str(r.shots)
        ours = fmt(r.ours) if r.ours is not None else r.note
        lines.append(f"| {r.label} | {r.task} | {shots} | {'yes' if r.chat_template else 'no'} | "
                     f"{r.metric} | {fmt(r.report)} | {ours} |")
    both = [r for r in rows if r.ours is not None and r.report is not None]
    if both:
        rep = sum(r.report for r in both) / len(both)
        ours = sum(r.ours for r in both) / len(both)
        lines.append(f"| Average ({len(both)} rows scored here) | | | | | {rep:.2f} | "
                     f"{ours:.2f} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def run_eval(cfg: EvalRunConfig) -> EvalOutput:
    """Evaluate `cfg.checkpoint` on `cfg.eval` (see module doc); returns what it wrote."""
    from lm_eval.utils import handle_non_serializable

    from bitnet_train.atomic import atomic_directory
    from bitnet_train.eval.harness import BitNetLM
    from bitnet_train.eval.samples import load_prompts, write_external

    suite = cfg.eval
    out_dir = Path(cfg.output_dir) if cfg.output_dir else (
        Path("outputs") / "eval" / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}-"
        f"{model_id_of(cfg.checkpoint)}-{suite.name}")
    model, tokenizer, model_id, path = load_for_eval(cfg)
    log.info("evaluating %s (%s) on suite %s", cfg.checkpoint, path, suite.name)
    loaded: dict[str, list[Any]] = {}
    task_manager = None
    if suite.tasks:
        task_manager = build_task_manager(suite)
        check_task_names(task_manager, suite.tasks)
        for spec in suite.tasks:  # every data set up front: fail before hours of compute
            loaded[spec.task] = load_task(task_manager, spec)
    for external in suite.external:  # their prompts too (the datasets cache serves them again)
        load_prompts(external)
    lm = BitNetLM(model, tokenizer, batch_size=suite.batch_size, max_gen_toks=suite.max_gen_toks,
                  name=model_id)
    harness = run_harness(lm, suite, task_manager, loaded) if suite.tasks else {}
    rows = result_rows(suite, harness)
    notes = [f"model: `{cfg.checkpoint}` ({model_id}); suite `{suite.name}`; lm-eval "
             f"{_lm_eval_version()}; {time.strftime('%Y-%m-%d')}"]
    if suite.limit is not None:
        notes.append(f"limit={suite.limit} examples per task: not comparable to the report, "
                     "which scores every example")
    commands: list[str] = []
    with atomic_directory(out_dir, marker="results.json") as tmp:
        for spec in suite.external:
            row, cmds = write_external(spec, model, tokenizer, tmp, out_dir, model_id,
                                       suite.batch_size, suite.seed)
            rows.append(row)
            commands += cmds
            if row.ours is not None and row.note:  # scored here: say how, under the table
                notes.append(f"{row.label}: {row.note}")
        for name, results in harness.items():
            samples = results.pop("samples", None)
            _write_json(tmp / "harness" / f"{name}.json", results, handle_non_serializable)
            for task, records in (samples or {}).items():
                _write_jsonl(tmp / "samples" / f"{task}.jsonl", records, handle_non_serializable)
        if commands:
            notes.append("external benchmarks, scored by their own tools:\n" +
                         "\n".join(f"  - `{c}`" for c in commands))
        table = markdown_table(rows, f"{model_id} on {suite.name}", notes)
        (tmp / "results.md").write_text(table)
        _write_json(tmp / "results.json", {"checkpoint": cfg.checkpoint, "model_id": model_id,
                                           "suite": suite.name, "limit": suite.limit,
                                           "rows": [asdict(r) for r in rows],
                                           "commands": commands}, str)
    log.info("results written to %s", out_dir)
    return EvalOutput(out_dir, rows, table, harness, commands)


def _write_json(path: Path, obj: Any, default) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=default, ensure_ascii=False) + "\n")


def _write_jsonl(path: Path, records: list[Any], default) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r, default=default, ensure_ascii=False) + "\n")


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
