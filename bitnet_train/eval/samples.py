"""Answers for the benchmarks the 2B4T report scored outside lm-eval, in their scorers' formats.

- HumanEval+ (evalplus): each problem's prompt is put to the model in a chat turn with evalplus's
  own instruction for chat models, and the reply is started with evalplus's response prefix and
  an opened ```python block, so the generation (stopped at the closing fence) is the solution.
  Written as `humaneval_plus/samples.jsonl` ({task_id, solution}); evalplus sanitizes the code
  and runs the tests in its sandbox.
- MT-bench (FastChat llm_judge): both turns of each question, the second after the model's own
  first answer, at FastChat's temperature for the question's category (0: greedy). Written in
  FastChat's `model_answer/<model_id>.jsonl` layout; GPT-4 judges them (`gen_judgment.py`, an
  OpenAI key), hence not run here.
- MATH-500 (the report used its own scorer, as we do): each problem in a chat turn with the
  usual instruction to reason step by step and box the final answer, greedy. Scored here by
  `math_answers` (the last `\\boxed{}` against the reference answer, in the MATH benchmark's
  normalization) and written as `math500/samples.jsonl` ({unique_id, problem, generation,
  extracted, answer, correct, ...}); its accuracy is a row of the table like lm-eval's.

Prompts come from the hub (evalplus/humanevalplus, HuggingFaceH4/mt_bench_prompts,
HuggingFaceH4/MATH-500) or from a local .jsonl with the same fields, both through
`datasets.load_dataset`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bitnet_train.errors import DataError
from bitnet_train.eval.config import ExternalSpec
from bitnet_train.eval.generation import GenerationConfig, generate_text
from bitnet_train.eval.math_answers import is_equivalent, last_boxed

EVALPLUS_INSTRUCTION = ("Please provide a self-contained Python script that solves the "
                        "following problem in a markdown code block:")
EVALPLUS_RESPONSE = ("Below is a Python script with a self-contained function that solves the "
                     "problem and passes corresponding tests:")
MT_BENCH_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0,
                        "coding": 0.0, "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
"""FastChat llm_judge's sampling temperature per MT-bench category."""
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""Appended to every MATH-500 problem (the Qwen / DeepSeek chat prompt for MATH)."""
DEFAULTS = {"humaneval_plus": ("evalplus/humanevalplus", "test", "HumanEval+"),
            "mt_bench": ("HuggingFaceH4/mt_bench_prompts", "train", "MT-bench"),
            "math500": ("HuggingFaceH4/MATH-500", "test", "MATH-500")}


def load_prompts(spec: ExternalSpec):
    """The benchmark's records (a local .jsonl or a hub data set), DataError if unreadable."""
    import datasets

    dataset, split, label = DEFAULTS[spec.kind]
    dataset, split = spec.dataset or dataset, spec.split or split
    try:
        if Path(dataset).expanduser().is_file():
            return datasets.load_dataset("json", data_files=str(Path(dataset).expanduser()),
                                         split="train")
        return datasets.load_dataset(dataset, split=split)
    except Exception as err:  # noqa: BLE001 - re-raised naming the benchmark and data set
        first = (str(err).strip().splitlines() or [""])[0]
        raise DataError(
            f"{spec.label or label}: its prompts {dataset!r} (split {split!r}) cannot be loaded "
            f"({type(err).__name__}: {first}). Offline, download them once with network access "
            "or point `dataset` at a local .jsonl with the same fields") from err


def _chat(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def humaneval_plus(spec: ExternalSpec, model, tokenizer, batch_size: int) -> list[dict]:
    """[{task_id, solution}] for every problem (see module doc)."""
    records = load_prompts(spec)
    prompts = [_chat(tokenizer, [{"role": "user", "content":
                                  f"{EVALPLUS_INSTRUCTION}\n```\n{r['prompt'].strip()}\n```\n"}])
               + f"{EVALPLUS_RESPONSE}\n```python\n" for r in records]
    config = GenerationConfig(max_new_tokens=spec.max_new_tokens, stop_strings=["\n```"])
    replies = generate_text(model, tokenizer, prompts, config, batch_size=batch_size)
    return [{"task_id": r["task_id"], "solution": code} for r, code in zip(records, replies)]


def mt_bench(spec: ExternalSpec, model, tokenizer, batch_size: int, model_id: str,
             seed: int) -> list[dict]:
    """FastChat model-answer records for every question (see module doc)."""
    records = list(load_prompts(spec))
    turns = [list(r.get("turns") or r.get("prompt")) for r in records]
    answers: list[list[str]] = [[] for _ in records]
    by_temperature: dict[float, list[int]] = {}
    for i, r in enumerate(records):
        by_temperature.setdefault(MT_BENCH_TEMPERATURE.get(r.get("category", ""), 0.7),
                                  []).append(i)
    for temperature, rows in sorted(by_temperature.items()):
        config = GenerationConfig(max_new_tokens=spec.max_new_tokens, seed=seed,
                                  do_sample=temperature > 1e-4,
                                  temperature=temperature if temperature > 1e-4 else 1.0)
        for turn in range(max(len(turns[i]) for i in rows)):
            active = [i for i in rows if turn < len(turns[i])]
            prompts = []
            for i in active:
                history = []
                for t in range(turn):
                    history += [{"role": "user", "content": turns[i][t]},
                                {"role": "assistant", "content": answers[i][t]}]
                prompts.append(_chat(tokenizer, history +
                                     [{"role": "user", "content": turns[i][turn]}]))
            for i, reply in zip(active, generate_text(model, tokenizer, prompts, config,
                                                      batch_size=batch_size)):
                answers[i].append(reply.strip())
    return [{"question_id": r.get("question_id", r.get("prompt_id")),
             "answer_id": uuid.uuid4().hex, "model_id": model_id,
             "choices": [{"index": 0, "turns": a}], "tstamp": time.time()}
            for r, a in zip(records, answers)]


def math500_reference(record: dict, index: int, source: str) -> str:
    """The record's reference answer: its `answer`, else the last box of its `solution`
    (DataError naming the record when it has neither)."""
    if record.get("answer") not in (None, ""):
        return str(record["answer"])
    boxed = last_boxed(record.get("solution") or "")
    if boxed is None:
        raise DataError(f"MATH-500 {source}: record {index} "
                        f"({record.get('unique_id') or 'no unique_id'}) has no `answer` and no "
                        "\\boxed{} in its `solution`; give every record an `answer`")
    return boxed


def score_math500(records: Sequence[dict], generations: Sequence[str],
                  source: str = "prompts") -> list[dict]:
    """One sample per problem, scored: {unique_id, problem, generation, extracted (the last
    `\\boxed{}` or None), answer, correct, subject, level}. `source` names the data in errors."""
    samples = []
    for i, (record, generation) in enumerate(zip(records, generations, strict=True)):
        answer = math500_reference(record, i, source)
        extracted = last_boxed(generation)
        samples.append({"unique_id": record.get("unique_id") or str(i),
                        "problem": record["problem"], "generation": generation,
                        "extracted": extracted, "answer": answer,
                        "correct": is_equivalent(extracted, answer),
                        "subject": record.get("subject"), "level": record.get("level")})
    return samples


def math500(spec: ExternalSpec, model, tokenizer, batch_size: int) -> list[dict]:
    """Greedy solutions of every MATH-500 problem, scored (see module doc)."""
    records = list(load_prompts(spec))
    source = spec.dataset or DEFAULTS["math500"][0]
    if not records:
        raise DataError(f"MATH-500 {source}: no problems")
    for i, r in enumerate(records):
        if not isinstance(r.get("problem"), str) or not r["problem"].strip():
            raise DataError(f"MATH-500 {source}: record {i} has no `problem` text (each record "
                            "needs problem, and answer or a solution with a \\boxed{} answer)")
    prompts = [_chat(tokenizer, [{"role": "user",
                                  "content": f"{r['problem'].strip()}\n{MATH_INSTRUCTION}"}])
               for r in records]
    replies = generate_text(model, tokenizer, prompts,
                            GenerationConfig(max_new_tokens=spec.max_new_tokens),
                            batch_size=batch_size)
    return score_math500(records, replies, source)


def write_external(spec: ExternalSpec, model, tokenizer, tmp: Path, final: Path, model_id: str,
                   batch_size: int, seed: int) -> tuple[Any, list[str]]:
    """Generate `spec`'s answers into `tmp` (published later as `final`); returns the results
    table's row and the commands that score them."""
    from bitnet_train.eval.results import Row

    label = spec.label or DEFAULTS[spec.kind][2]
    if spec.kind == "humaneval_plus":
        samples = humaneval_plus(spec, model, tokenizer, batch_size)
        rel = Path("humaneval_plus") / "samples.jsonl"
        where = final / rel
        commands = [f"evalplus.sanitize --samples {where}",
                    f"evalplus.evaluate --dataset humaneval --samples "
                    f"{where.with_name('samples-sanitized.jsonl')}"]
        row = Row(label, "evalplus", 0, True, "pass@1", spec.report,
                  note=f"{len(samples)} samples, scored by evalplus (below)")
    elif spec.kind == "math500":
        samples = math500(spec, model, tokenizer, batch_size)
        rel, commands = Path("math500") / "samples.jsonl", []
        accuracy = 100.0 * sum(s["correct"] for s in samples) / len(samples)
        row = Row(label, "own scorer", 0, True, "accuracy", spec.report, accuracy,
                  note=f"{len(samples)} problems, greedy, the last \\boxed{{}} against the "
                       "answer in the MATH normalization (bitnet_train.eval.math_answers)")
    else:
        samples = mt_bench(spec, model, tokenizer, batch_size, model_id, seed)
        rel = Path("mt_bench") / "model_answer" / f"{model_id}.jsonl"
        commands = [f"cp {final / rel} FastChat/fastchat/llm_judge/data/mt_bench/model_answer/ "
                    f"&& cd FastChat/fastchat/llm_judge && python gen_judgment.py --model-list "
                    f"{model_id} --parallel 2 && python show_result.py --model-list {model_id}"]
        row = Row(label, "FastChat llm_judge", None, True, "score (1-10)", spec.report,
                  note=f"{len(samples)} answers, judged by GPT-4 (below)")
    out = tmp / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    return row, commands
