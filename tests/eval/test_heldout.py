"""trainer.eval_every: held-out sets carved before training and never trained on, a held-out
loss that falls as a tiny run learns, evaluation that leaves the training trajectory (and
exact resume) unchanged, sharded sums equal to one process, SFT and DPO held-out metrics."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bitnet_train.data.config import MixtureConfig, PretrainDataConfig, SourceConfig
from bitnet_train.data.heldout import carve_pretrain_heldout, document_key
from bitnet_train.data.pretrain import build_pretrain_stream
from bitnet_train.data.sft import build_sft_dataset
from bitnet_train.data.tokenizer import load_tokenizer
from bitnet_train.errors import DataError
from bitnet_train.train.config import compose, to_train_config
from bitnet_train.train.run import run
from tests.train.helpers import (
    TINY_MODEL,
    make_tokenizer,
    pretrain_config,
    write_chat_pairs_and_tokenizer,
)

NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank"]
THINGS = ["apples", "books", "coins", "pens"]


def record(i: int, rng: random.Random) -> str:
    a, t, k = rng.choice(NAMES), rng.choice(THINGS), rng.randint(2, 9)
    return f"Record {i}: {a} has {k} {t}. {a} gives one away and keeps {k - 1} {t}."


def write_records(path: Path, n: int, start: int = 0, files: int = 1, seed: int = 0) -> Path:
    """`files` jsonl shards of n unique, learnable documents (numbered from `start`)."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    handles = [(path / f"part-{j}.jsonl").open("w") for j in range(files)]
    for i in range(start, start + n):
        handles[i % files].write(json.dumps({"text": record(i, rng)}) + "\n")
    for h in handles:
        h.close()
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    write_records(root / "corpus", 400)
    texts = [record(i, random.Random(i)) for i in range(200)]
    make_tokenizer(root, texts=texts)
    return root


def _run(root: Path, out: Path, *overrides: str):
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer").exists():
        shutil.copytree(root / "tokenizer", out / "tokenizer")
    return run(pretrain_config(out, root / "corpus", "trainer.eval_size=4",
                               "schedule.lr_peak=5e-3", *overrides))


def test_eval_every_logs_a_heldout_loss_that_falls(workdir, tmp_path):
    result = _run(workdir, tmp_path, "trainer.max_steps=30", "trainer.eval_every=10")
    evals = result.trainer.eval_history
    assert [e.step for e in evals] == [0, 10, 20, 30]  # start, every 10, end
    losses = [e.metrics["heldout/loss"] for e in evals]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.6 * losses[0], losses
    # per source (one here) and overall agree; 4 rows x 32 tokens minus each piece's first
    source = result.trainer.eval_history[-1].metrics["heldout/python-docs/loss"]
    assert source == pytest.approx(losses[-1])
    assert 100 < evals[0].metrics["heldout/tokens"] <= 4 * 31


def _data_cfg(corpus: Path, name: str) -> PretrainDataConfig:
    return PretrainDataConfig(seq_len=32, stage1=MixtureConfig(
        sources=[SourceConfig(name=name, path=str(corpus))]))


def test_heldout_documents_never_reach_training(workdir, tmp_path):
    """Across 2 ranks, 3 files (not a multiple of the ranks: every rank reads every document)
    and several passes over the source, no held-out document is ever yielded for training."""
    corpus = write_records(tmp_path / "c", 60, files=3)
    texts = [json.loads(line)["text"] for f in sorted(corpus.glob("*.jsonl"))
             for line in f.read_text().splitlines()]
    number = {t: int(re.match(r"Record (\d+):", t).group(1)) for t in texts}
    tok = load_tokenizer(str(workdir / "tokenizer"))
    cfg = _data_cfg(corpus, "c")
    carved = carve_pretrain_heldout(cfg, tok, rows=3)
    excluded = {number[t] for t in texts if document_key(t) in carved.exclude["c"]}
    held_text = tok.decode(carved.batches["c"]["input_ids"].flatten().tolist())
    in_rows = {int(n) for n in re.findall(r"Record (\d+):", held_text)}
    assert carved.batches["c"]["input_ids"].shape == (3, 32)
    assert 3 <= len(in_rows) and in_rows <= excluded and len(excluded) <= len(in_rows) + 1
    seen: set[int] = set()
    for rank in (0, 1):
        stream = build_pretrain_stream(cfg, tok, rank=rank, world_size=2, batch_size=8,
                                       exclude=carved.exclude)
        for _ in range(12):  # > 2 passes over this rank's documents
            text = tok.decode(next(stream)["input_ids"].flatten().tolist())
            seen |= {int(n) for n in re.findall(r"Record (\d+):", text)}
    assert seen == set(range(60)) - excluded


def test_heldout_too_large_for_the_source_names_it(workdir, tmp_path):
    corpus = write_records(tmp_path / "small", 3)
    tok = load_tokenizer(str(workdir / "tokenizer"))
    cfg = _data_cfg(corpus, "tiny")
    with pytest.raises(DataError, match="'tiny'.*trainer.eval_size"):
        carve_pretrain_heldout(cfg, tok, rows=50)


def test_evaluation_does_not_change_the_training_trajectory(workdir, tmp_path):
    a = _run(workdir, tmp_path / "a", "trainer.max_steps=10", "trainer.eval_every=2")
    b = _run(workdir, tmp_path / "b", "trainer.max_steps=10", "trainer.eval_every=5")
    assert [h.metrics["loss"] for h in a.history] == [h.metrics["loss"] for h in b.history]
    wa = a.trainer.accelerator.unwrap_model(a.trainer.model).state_dict()
    wb = b.trainer.accelerator.unwrap_model(b.trainer.model).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ea = {e.step: e.metrics for e in a.trainer.eval_history}
    eb = {e.step: e.metrics for e in b.trainer.eval_history}
    assert len(ea) == 6 and sorted(eb) == [0, 5, 10]
    assert ea[0] == eb[0] and ea[10] == eb[10]


def test_resume_is_exact_with_evaluation_on(workdir, tmp_path):
    common = ["trainer.max_steps=12", "trainer.checkpoint_every=6", "trainer.keep_last=5",
              "trainer.eval_every=3", "data.shuffle_buffer=16"]
    straight = _run(workdir, tmp_path / "a", *common)
    ckpt = tmp_path / "a" / "run" / "checkpoints" / "step_00000006"
    (tmp_path / "b" / "run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, tmp_path / "b" / "run" / "checkpoints" / ckpt.name)
    resumed = _run(workdir, tmp_path / "b", *common)
    assert [h.step for h in resumed.history] == list(range(6, 12))
    assert [h.metrics["loss"] for h in resumed.history] == \
        [h.metrics["loss"] for h in straight.history[6:]]
    wa = straight.trainer.accelerator.unwrap_model(straight.trainer.model).state_dict()
    wb = resumed.trainer.accelerator.unwrap_model(resumed.trainer.model).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ea = {e.step: e.metrics for e in straight.trainer.eval_history}
    eb = {e.step: e.metrics for e in resumed.trainer.eval_history}
    assert sorted(eb) == [6, 9, 12]
    assert all(eb[s] == ea[s] for s in eb)
    # a checkpoint carries config.json: it loads as a model directory
    from bitnet_train.io import load_model

    model, tok = load_model(ckpt)
    assert tok is not None and model.config.hidden_size == 64


@pytest.mark.slow
def test_two_processes_sum_to_the_single_process_heldout_loss(tmp_path):
    """2 processes (gloo), 5 held-out batches (one process repeats a batch with weight 0):
    the all-reduced metrics equal one process's."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "metrics.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(root / "tests/eval/heldout_worker.py"), str(out)],  # standalone: a free port
        cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from tests.eval.heldout_worker import evaluate_once

    single = evaluate_once()
    two = json.loads(out.read_text())
    assert set(two) == set(single)
    for k, v in single.items():
        assert two[k] == pytest.approx(v, rel=1e-12), k


# -- SFT and DPO --------------------------------------------------------------------------------

QA = [("What is the capital of France?", "Paris is the capital of France."),
      ("Name a primary colour.", "Red is a primary colour."),
      ("How many legs does a spider have?", "A spider has eight legs."),
      ("What do bees make?", "Bees make honey and wax.")]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    with (root / "chat.jsonl").open("w") as f:
        for i in range(32):
            q, a = QA[i % len(QA)]
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{q} ({i})"},
                                             {"role": "assistant", "content": a}]}) + "\n")
    write_chat_pairs_and_tokenizer(root, QA, pair_lines=300)
    return root


def _chat_cfg(recipe: str, root: Path, out: Path, *overrides: str):
    return to_train_config(compose([
        f"+recipe={recipe}", f"tokenizer={root / 'tokenizer'}", f"output_dir={out}",
        "model.init=null", "trainer.progress_bar=false", "trainer.log_every=1000", *TINY_MODEL,
        *overrides]))


def test_sft_heldout_conversations_are_set_aside_and_scored(chat_dir, tmp_path):
    cfg = _chat_cfg("demo_sft", chat_dir, tmp_path / "sft",
                    f"data.sources.0.path={chat_dir}/chat.jsonl", "data.max_len=64",
                    "trainer.epochs=6", "trainer.micro_batch_size=4", "schedule.lr_peak=3e-3",
                    "trainer.eval_every=8", "trainer.eval_size=4")
    tok = load_tokenizer(str(chat_dir / "tokenizer"))
    data = build_sft_dataset(cfg.data, tok, heldout=4)
    held = {tuple(e) for e in data.heldout.examples.tolist()}
    train = {tuple(e) for e in data.examples.tolist()}
    assert len(held) == 4 and not held & train and len(train) == 28
    plain = build_sft_dataset(cfg.data, tok)  # eval off: every conversation trains, as before
    assert len(plain.examples) == 32 and plain.heldout is None
    result = run(cfg)
    evals = result.trainer.eval_history
    assert evals[0].step == 0 and evals[-1].step == len(result.history)
    losses = [e.metrics["heldout/loss"] for e in evals]
    assert losses[-1] < 0.7 * losses[0], losses
    # the loss covers assistant tokens only: each held-out reply (after "Assistant:", with the
    # space BPE merges into its first token) and its closing <|eot_id|>
    lines = (chat_dir / "chat.jsonl").read_text().splitlines()
    replies = [json.loads(lines[i])["messages"][1]["content"] for _, i in held]
    expected = sum(len(tok(" " + a, add_special_tokens=False)["input_ids"]) + 1 for a in replies)
    assert evals[0].metrics["heldout/tokens"] == expected


def test_dpo_heldout_reward_accuracy_and_margin(chat_dir, tmp_path):
    cfg = _chat_cfg("demo_dpo", chat_dir, tmp_path / "dpo",
                    f"data.sources.0.path={chat_dir}/pairs.jsonl", "data.max_len=96",
                    "trainer.epochs=1", "trainer.micro_batch_size=16", "schedule.lr_peak=3e-3",
                    "objective.precompute_reference=false", "trainer.max_steps=12",
                    "trainer.eval_every=6", "trainer.eval_size=24")
    result = run(cfg)
    evals = {e.step: e.metrics for e in result.trainer.eval_history}
    assert sorted(evals) == [0, 6, 12]
    assert evals[0]["heldout/margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    assert evals[0]["heldout/accuracy"] == 0.0  # a tie is not a win
    assert evals[0]["heldout/pairs"] == 24
    assert evals[12]["heldout/margin"] > evals[6]["heldout/margin"] > 0.02
    assert evals[12]["heldout/accuracy"] > 0.7


def test_dpo_heldout_metrics_from_precomputed_reference_equal_the_live_reference(chat_dir):
    """objective.precompute_reference frees the reference: the held-out evaluator then reads
    the reference's log-probs computed before training, and must report the same metrics."""
    from accelerate import Accelerator

    from bitnet_train.data.preference import build_preference_dataset
    from bitnet_train.eval.heldout import PreferenceEvaluator, preference_items
    from bitnet_train.model import build_model
    from bitnet_train.train.data_plan import reference_logps_table
    from tests.conftest import tiny_config

    cfg = _chat_cfg("demo_dpo", chat_dir, chat_dir / "unused",
                    f"data.sources.0.path={chat_dir}/pairs.jsonl", "data.max_len=96").data
    tok = load_tokenizer(str(chat_dir / "tokenizer"))
    held = build_preference_dataset(cfg, tok, heldout=12).heldout
    reference = build_model(tiny_config(), seed=0).eval()
    policy = build_model(tiny_config(), seed=0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    acc = Accelerator(cpu=True)
    items = preference_items(held, 5)  # 12 pairs in batches of 5, 5 and 2
    live = PreferenceEvaluator(items, acc, 0.1, reference=reference, loss_impl="torch")(policy)
    table = reference_logps_table(held, np.arange(held.num_rows), reference, "cpu", 4, "torch")
    stored = PreferenceEvaluator(items, acc, 0.1, ref_logps=table, loss_impl="torch")(policy)
    assert live["heldout/pairs"] == 12 and abs(live["heldout/margin"]) > 1e-3
    assert stored == pytest.approx(live, rel=1e-6, abs=1e-9)


def test_heldout_larger_than_a_chat_source_names_it(chat_dir):
    cfg = _chat_cfg("demo_sft", chat_dir, chat_dir / "unused",
                    f"data.sources.0.path={chat_dir}/chat.jsonl", "data.max_len=128").data
    tok = load_tokenizer(str(chat_dir / "tokenizer"))
    with pytest.raises(DataError, match="'python-chat' has 32 usable examples.*trainer.eval_size"):
        build_sft_dataset(cfg, tok, heldout=32)
    assert np.all(build_sft_dataset(cfg, tok, heldout=31).heldout.examples[:, 0] == 0)
