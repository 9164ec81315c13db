"""MATH-500 as an external benchmark scored here: prompts, scoring of known solutions, the
samples file and the table row, on a local jsonl with MATH-500's fields."""

from __future__ import annotations

import json

import pytest

from bitnet_train.data.tokenizer import load_tokenizer
from bitnet_train.errors import DataError
from bitnet_train.eval import samples as samples_module
from bitnet_train.eval.config import (
    EvalRunConfig,
    ExternalSpec,
    SuiteConfig,
    compose_eval,
    to_eval_config,
)
from bitnet_train.eval.samples import load_prompts, score_math500
from bitnet_train.eval.suites import run_eval
from tests.eval.conftest import DATA

TINY = DATA / "math500_tiny.jsonl"
RECORDS = [json.loads(line) for line in TINY.read_text().splitlines()]
SOLUTIONS = [  # hand-written: right (other spelling), wrong, right but never boxed
    "r = 3 and the point is on the y-axis, so $\\boxed{(3, \\dfrac{\\pi}{2})}$.",
    "Regrouping by n = j + k, the sum is \\boxed{q - p}.",
    "f(-2) + f(-1) + f(0) = 2 + 5/3 + 1 = 14/3.",
]


def _run(checkpoint, out, max_new_tokens=8) -> tuple[list[dict], dict, str]:
    spec = ExternalSpec(kind="math500", label="MATH-500", dataset=str(TINY),
                        max_new_tokens=max_new_tokens, report=43.4)
    cfg = EvalRunConfig(checkpoint=str(checkpoint), output_dir=str(out),
                        eval=SuiteConfig(name="t", external=[spec], batch_size=2))
    result = run_eval(cfg)
    samples = [json.loads(x) for x in (out / "math500" / "samples.jsonl").read_text().split("\n")
               if x]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["MATH-500"]
    assert (out / "results.md").read_text() == result.markdown
    return samples, rows[0], result.markdown


def test_scoring_known_solutions():
    samples = score_math500(RECORDS, SOLUTIONS)
    assert [s["unique_id"] for s in samples] == [r["unique_id"] for r in RECORDS]
    assert [s["extracted"] for s in samples] == ["(3, \\dfrac{\\pi}{2})", "q - p", None]
    assert [s["correct"] for s in samples] == [True, False, False]
    assert samples[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    # a record without `answer` is scored against the last box of its solution
    (no_answer,) = score_math500([{**RECORDS[2], "answer": None}], ["\\boxed{14/3}"])
    assert no_answer["answer"] == "\\frac{14}{3}" and no_answer["correct"]
    with pytest.raises(DataError, match=r"record 0 \(test/algebra/2584.json\) has no `answer`"):
        score_math500([{**RECORDS[2], "answer": "", "solution": "14/3"}], ["14/3"])


def test_suite_row_is_the_accuracy_of_the_samples(qa_model, tmp_path, monkeypatch):
    """Known solutions through run_eval (generation replaced by them, our own function): the
    prompts, the samples file and the row (1 of 3 right: 33.33) beside the report's 43.40."""
    prompts_seen = []

    def known_solutions(model, tokenizer, prompts, config, batch_size):
        prompts_seen.extend(prompts)
        assert not config.do_sample and config.max_new_tokens == 8  # greedy, the spec's budget
        return SOLUTIONS

    monkeypatch.setattr(samples_module, "generate_text", known_solutions)
    samples, row, table = _run(qa_model, tmp_path / "o")
    tokenizer = load_tokenizer(str(qa_model))
    assert prompts_seen == [tokenizer.apply_chat_template(
        [{"role": "user", "content": r["problem"] + "\nPlease reason step by step, and put your "
          "final answer within \\boxed{}."}], tokenize=False, add_generation_prompt=True)
        for r in RECORDS]
    assert [s["generation"] for s in samples] == SOLUTIONS
    assert [s["correct"] for s in samples] == [True, False, False]
    assert {"unique_id", "problem", "generation", "extracted", "answer", "correct"} <= set(
        samples[0])
    assert row["ours"] == pytest.approx(100 / 3) and row["report"] == 43.4
    assert "| MATH-500 | own scorer | 0 | yes | accuracy | 43.40 | 33.33 |" in table
    assert "| Average (1 rows scored here) | | | | | 43.40 | 33.33 |" in table
    assert "MATH-500: 3 problems, greedy" in table


def test_suite_generates_and_scores_math500(qa_model, tmp_path):
    """Our generation end to end: the tiny model's solutions are written, scored, and the row
    is the share of `correct` samples."""
    samples, row, table = _run(qa_model, tmp_path / "o", max_new_tokens=6)
    assert [s["unique_id"] for s in samples] == [r["unique_id"] for r in RECORDS]
    assert all(isinstance(s["generation"], str) and s["generation"] for s in samples)
    assert row["ours"] == pytest.approx(100 * sum(s["correct"] for s in samples) / 3)
    assert f"| MATH-500 | own scorer | 0 | yes | accuracy | 43.40 | {row['ours']:.2f} |" in table


def test_math500_prompts_offline_or_malformed_name_the_benchmark(tmp_path):
    with pytest.raises(DataError, match=r"MATH-500.*'HuggingFaceH4/MATH-500'.*local \.jsonl"):
        load_prompts(ExternalSpec(kind="math500"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: record 0 has no `problem`"):
        samples_module.math500(ExternalSpec(kind="math500", dataset=str(bad)), None, None, 1)


def test_2b4t_suite_runs_math500_with_the_report_number():
    cfg = to_eval_config(compose_eval(["checkpoint=x", "eval=2b4t_suite"]))
    (math,) = [e for e in cfg.eval.external if e.kind == "math500"]
    assert (math.label, math.dataset, math.split, math.report) == (
        "MATH-500", "HuggingFaceH4/MATH-500", "test", 43.4)
