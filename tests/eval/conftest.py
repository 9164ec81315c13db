"""A tiny model trained (on the CPU, about a minute) to answer the tiny lm-eval tasks of
tests/eval/tasks, shared by the harness and suite tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitnet_train.data.chat import CHAT_TEMPLATE
from bitnet_train.data.tokenizer import load_tokenizer
from bitnet_train.integrity import write_manifest
from bitnet_train.train.run import run
from tests.train.helpers import make_tokenizer, pretrain_config

TASKS = Path(__file__).resolve().parent / "tasks"
DATA = Path(__file__).resolve().parent / "data"


def qa_documents() -> list[str]:
    """The tiny tasks' questions and answers as `Q: ...\\nA: answer.` documents."""
    records = [json.loads(line) for line in (TASKS / "tiny_gen.jsonl").read_text().splitlines()]
    return [f"Q: {r['question']}\nA: {r['answer']}." for r in records]


@pytest.fixture(scope="session")
def qa_model(tmp_path_factory) -> Path:
    """DIR/final of a 2-layer model pretrained for 100 steps on the tiny tasks' answers, its
    tokenizer carrying the 2B4T chat template."""
    root = tmp_path_factory.mktemp("qa_model")
    docs = qa_documents()
    (root / "corpus").mkdir()
    with (root / "corpus" / "qa.jsonl").open("w") as f:
        for _ in range(10):
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    make_tokenizer(root, texts=docs * 20)
    result = run(pretrain_config(
        root, root / "corpus", "trainer.max_steps=100", "schedule.lr_peak=1e-2",
        "schedule.lr_stage1_end=8e-3", "schedule.lr_stage2_peak=4e-3", "schedule.lr_floor=1e-4",
        "data.shuffle_buffer=16"))
    # the 2B4T chat template, as SFT runs and exports carry it, for chat-template evaluation
    tokenizer = load_tokenizer(str(result.final_dir))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(result.final_dir))
    write_manifest(result.final_dir)  # the directory changed on purpose: describe it again
    return result.final_dir
