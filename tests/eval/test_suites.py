"""`bitnet-train eval` (scripts/eval.py) end to end on the tiny tasks, what it writes, the
checkpoints it accepts, and the one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitnet_train.errors import CheckpointError, ConfigError, DataError
from bitnet_train.eval.config import EvalRunConfig, ExternalSpec, SuiteConfig, TaskSpec
from bitnet_train.eval.samples import load_prompts
from bitnet_train.eval.suites import (
    Row,
    load_for_eval,
    markdown_table,
    resolve_checkpoint,
    run_eval,
)
from bitnet_train.io import load_model
from tests.eval.conftest import DATA, TASKS

ROOT = Path(__file__).resolve().parents[2]
TINY_TASKS = ('eval.tasks=[{task: tiny_mc, label: Tiny MC, metric: "acc,none", report: 50.0}, '
              '{task: tiny_gen, label: Tiny gen, metric: "exact_match,none", report: 40.0}]')


def _cli(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/eval.py"), "eval.include_defaults=false",
         f"eval.include_path=[{TASKS}]", "eval.batch_size=4", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


def test_cli_writes_harness_json_samples_table_and_external_answers(qa_model, tmp_path):
    out = tmp_path / "eval"
    proc = _cli(f"checkpoint={qa_model}", f"output_dir={out}", "eval.limit=null", TINY_TASKS,
                f"eval.external=[{{kind: humaneval_plus, dataset: {DATA}/humaneval_tiny.jsonl, "
                f"max_new_tokens: 8, report: 38.4}}, {{kind: mt_bench, dataset: "
                f"{DATA}/mt_bench_tiny.jsonl, max_new_tokens: 6, report: 5.85}}]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    harness = json.loads((out / "harness" / "0shot.json").read_text())
    assert {"results", "configs", "versions", "n-shot"} <= set(harness)
    mc = 100 * harness["results"]["tiny_mc"]["acc,none"]
    gen = 100 * harness["results"]["tiny_gen"]["exact_match,none"]
    assert mc >= 75 and gen >= 75  # the model learned these answers
    rows = {r["task"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["tiny_mc"]["ours"] == mc and rows["tiny_mc"]["report"] == 50.0
    table = (out / "results.md").read_text()
    assert f"| Tiny MC | tiny_mc | 0 | no | acc | 50.00 | {mc:.2f} |" in table
    assert f"| Average (2 rows scored here) | | | | | 45.00 | {(mc + gen) / 2:.2f} |" in table
    assert table in proc.stdout
    assert len((out / "samples" / "tiny_mc.jsonl").read_text().splitlines()) == 8
    # HumanEval+: evalplus's samples format, and the commands that score them
    samples = [json.loads(x) for x in (out / "humaneval_plus/samples.jsonl").read_text().split("\n")
               if x]
    assert [s["task_id"] for s in samples] == ["HumanEval/0", "HumanEval/1"]
    assert all(isinstance(s["solution"], str) for s in samples)
    assert f"evalplus.evaluate --dataset humaneval --samples {out}/humaneval_plus/" in table
    # MT-bench: FastChat's model-answer records, both turns answered
    model_id = "run-final"
    answers = [json.loads(x) for x in
               (out / "mt_bench/model_answer" / f"{model_id}.jsonl").read_text().split("\n") if x]
    assert [a["question_id"] for a in answers] == [81, 111]
    assert all(a["model_id"] == model_id and len(a["choices"][0]["turns"]) == 2 for a in answers)
    assert f"gen_judgment.py --model-list {model_id}" in table


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_unknown_task_is_one_line_naming_it(qa_model, tmp_path):
    line = _one_error_line(_cli(f"checkpoint={qa_model}", f"output_dir={tmp_path / 'e'}",
                                "eval.tasks=[{task: tiny_mcq}]"))
    assert "'tiny_mcq'" in line and "did you mean tiny_mc" in line


def test_checkpoint_that_is_not_a_model_is_one_line_naming_it(tmp_path):
    (tmp_path / "notes").mkdir()
    line = _one_error_line(_cli(f"checkpoint={tmp_path / 'notes'}",
                                f"output_dir={tmp_path / 'e'}", TINY_TASKS))
    assert f"checkpoint={tmp_path / 'notes'}" in line and "is not a model" in line


def _config(checkpoint, tmp_path, tasks=(), external=(), include=TASKS) -> EvalRunConfig:
    suite = SuiteConfig(name="t", tasks=list(tasks), external=list(external),
                        include_path=[str(include)], include_defaults=False, batch_size=4)
    return EvalRunConfig(checkpoint=str(checkpoint), eval=suite, output_dir=str(tmp_path / "o"))


def test_task_whose_data_set_cannot_be_downloaded_names_task_and_data_set(qa_model, tmp_path):
    cfg = _config(qa_model, tmp_path, [TaskSpec(task="needs_hub")], include=TASKS.parent /
                  "tasks_offline")
    with pytest.raises(DataError, match=r"'needs_hub'.*bitnet-train-tests/no-such-dataset.*"
                                        r"network access"):
        run_eval(cfg)
    assert not (tmp_path / "o" / "results.md").exists()  # nothing that looks complete


def test_external_prompts_that_cannot_be_downloaded_name_the_benchmark():
    with pytest.raises(DataError, match=r"HumanEval\+.*'evalplus/humanevalplus'.*local \.jsonl"):
        load_prompts(ExternalSpec(kind="humaneval_plus"))


def test_hub_checkpoint_offline_names_it():
    with pytest.raises(CheckpointError, match=r"microsoft/bitnet-b1\.58-2B-4T.*hf download"):
        resolve_checkpoint("microsoft/bitnet-b1.58-2B-4T")


def test_run_dirs_and_checkpoint_steps_are_models(qa_model, tmp_path):
    """A run directory means its final/; a checkpoint step (which carries config.json since
    this change, or only metadata.json before it) loads with the run's weights."""
    run_dir = qa_model.parent
    assert resolve_checkpoint(str(run_dir)) == qa_model
    step = run_dir / "checkpoints" / "step_00000100"
    assert resolve_checkpoint(str(step)) == step
    final, _ = load_model(qa_model)
    model, tokenizer, model_id, _ = load_for_eval(_config(step, tmp_path, [TaskSpec(task="x")]))
    assert model_id == "checkpoints-step_00000100" and tokenizer is not None
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, final(ids).logits)
    old = tmp_path / "old_step"  # a checkpoint written before config.json was stored with it
    old.mkdir()
    for f in ("model.safetensors", "metadata.json", "COMPLETE"):
        (old / f).write_bytes((step / f).read_bytes())
    legacy, _ = load_model(old)
    with torch.no_grad():
        assert torch.equal(legacy(ids).logits, final(ids).logits)
    with pytest.raises(ConfigError, match="lists no tasks"):
        from bitnet_train.eval.config import compose_eval, to_eval_config

        to_eval_config(compose_eval([f"checkpoint={qa_model}", "eval.tasks=[]"]))


def test_markdown_table_averages_the_rows_both_sides_have():
    rows = [Row("A", "a", 0, False, "acc", 50.0, 40.0), Row("B", "b", 5, True, "em", 30.0, 20.0),
            Row("C", "c", None, True, "pass@1", 38.4, None, note="see below"),
            Row("D", "d", 0, False, "acc", None, 90.0)]
    table = markdown_table(rows, "t")
    assert "| B | b | 5 | yes | em | 30.00 | 20.00 |" in table
    assert "| C | c |  | yes | pass@1 | 38.40 | see below |" in table
    assert "| Average (2 rows scored here) | | | | | 40.00 | 30.00 |" in table
