"""Pretraining streams over two stages: sources continue across the boundary, shard order is
reshuffled per epoch, token-share weights, exact resume mid-stage-2, logged token shares.

Corpora are local jsonl files of numbered documents ('alpha 0007: ...') read through the
production path; a decoded batch says which source and record each document came from.
"""

from __future__ import annotations

import io
import logging
import re

import pytest
import torch
from accelerate import Accelerator

from bitnet_train.data.config import SourceConfig
from bitnet_train.data.mixing import SourceSampler, draw_probabilities
from bitnet_train.data.pretrain import build_pretrain_stream, worker_stage2_after
from bitnet_train.errors import ConfigError, DataError, TrainingError
from bitnet_train.train.data_plan import PretrainPlan
from bitnet_train.train.schedules import ScheduleConfig
from tests.conftest import free_port
from tests.data.pretrain_fixtures import (
    by_source,
    data_config,
    decode_documents,
    demo_tokenizer,
    doc_numbers,
    make_source,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return demo_tokenizer(tmp_path_factory.mktemp("tok"))


def assert_same_batches(expected: list[dict], got: list[dict]) -> None:
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        for k in e:
            assert torch.equal(e[k], g[k]), k


def round_trip(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as a checkpoint stores it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# -- the draw (pure) --------------------------------------------------------------------------


def test_draw_probabilities_by_hand():
    assert draw_probabilities([1.0, 3.0], "documents") == [0.25, 0.75]
    # token shares 1:3 with documents of 10 and 30 tokens: draw documents 1:1
    assert draw_probabilities([1.0, 3.0], "tokens", [10.0, 30.0]) == [0.5, 0.5]
    # token shares 2:1, documents 100 vs 10 tokens: w / L = 0.02 vs 0.1 -> 1/6, 5/6
    p = draw_probabilities([2.0, 1.0], "tokens", [100.0, 10.0])
    assert p == pytest.approx([1 / 6, 5 / 6])
    with pytest.raises(ValueError, match="weighting"):
        draw_probabilities([1.0], "bytes")


def test_sampler_state_round_trip():
    a, b = SourceSampler(7), SourceSampler(0)
    for _ in range(13):
        a.draw([0.2, 0.3, 0.5])
    b.load_state_dict(round_trip(a.state_dict()))
    assert [a.draw([0.2, 0.3, 0.5]) for _ in range(50)] == [b.draw([0.2, 0.3, 0.5])
                                                             for _ in range(50)]


def test_worker_stage2_after_counts_round_robin_batches():
    # batches 0..6 before the boundary (7): workers 0, 1, 2 made 3, 2, 2 of them
    assert [worker_stage2_after(7, w, 3) for w in range(3)] == [3, 2, 2]
    assert [worker_stage2_after(1, w, 2) for w in range(2)] == [1, 0]
    assert worker_stage2_after(None, 0, 2) is None


# -- config -----------------------------------------------------------------------------------


def test_a_source_keeps_its_data_under_its_name(tmp_path):
    alpha = make_source(tmp_path, "alpha", 10)
    other = make_source(tmp_path, "beta", 10)
    other.name = "alpha"  # same name, other files
    with pytest.raises(ConfigError, match="'alpha' reads other data in stage 2.*path"):
        data_config(alpha, stage2=[other])
    with pytest.raises(ConfigError, match="weighting='bytes'"):
        data_config(alpha, weighting="bytes")


# -- stage 2 continues the streams ------------------------------------------------------------


def two_stage_config(tmp_path, files: int = 1, **kw):
    """alpha (60 docs) + beta (30) in stage 1; stage 2 keeps alpha (up-weighted), drops beta,
    adds gamma (40)."""
    alpha = make_source(tmp_path, "alpha", 60, files=files, weight=1.0)
    beta = make_source(tmp_path, "beta", 30, files=files, weight=1.0)
    gamma = make_source(tmp_path, "gamma", 40, files=files, weight=1.0)
    alpha2 = make_source(tmp_path, "alpha", 60, files=files, weight=3.0)
    return data_config(alpha, beta, stage2=[alpha2, gamma], seed=5, **kw)


def read_across_boundary(cfg, tokenizer, rank, world_size, boundary, batches):
    stream = build_pretrain_stream(cfg, tokenizer, rank=rank, world_size=world_size,
                                   batch_size=4, stage2_after=boundary)
    out = [next(stream) for _ in range(batches)]
    return stream, out


@pytest.mark.parametrize("world_size,files", [(1, 1), (2, 2), (2, 1)])
def test_stage_two_continues_each_source_without_rereading(tmp_path, tokenizer, caplog,
                                                             world_size, files):
    # files=2 on 2 ranks: one whole file each; files=1: every other record of the one file.
    cfg = two_stage_config(tmp_path, files=files)
    boundary, batches = 12, 80
    seen: dict[int, dict[str, list[str]]] = {}
    with caplog.at_level(logging.INFO, logger="bitnet_train"):
        for rank in range(world_size):
            stream, out = read_across_boundary(cfg, tokenizer, rank, world_size, boundary,
                                               batches)
            assert stream.stage == 2
            before = set(doc_numbers(decode_documents(out[:boundary], tokenizer)))
            after_docs = decode_documents(out[boundary + 1:], tokenizer, mid_stream=True)
            assert {n.split()[0] for n in doc_numbers(after_docs)} <= {"alpha", "gamma"}
            assert any(n.startswith("beta") for n in before)
            seen[rank] = by_source(doc_numbers(decode_documents(out, tokenizer)))
            # alpha reads on where stage 1 left it, it does not start over
            alpha_after = [n for n in doc_numbers(after_docs) if n.startswith("alpha")]
            assert alpha_after[0] not in before
    share = {"alpha": 60 // world_size, "gamma": 40 // world_size}
    for name, n in share.items():
        epochs = []
        for rank in range(world_size):
            docs = seen[rank][name]
            assert len(docs) > n, (name, rank, len(docs))  # the source wrapped on this rank
            first = docs[:n]
            assert len(set(first)) == n, (name, rank)  # no document twice within its epoch
            epochs.append(set(first))
        assert set().union(*epochs) == {f"{name} {i:04d}" for i in range(share[name] *
                                                                           world_size)}
        if world_size == 2:
            assert not epochs[0] & epochs[1]
    wraps = [r.getMessage() for r in caplog.records if "epoch 0 done" in r.getMessage()]
    assert any("'alpha'" in m for m in wraps) and any("'gamma'" in m for m in wraps)
    switches = [r.getMessage() for r in caplog.records if "stage 2 mixture" in r.getMessage()]
    assert switches and "continuing ['alpha'], new ['gamma'], dropped ['beta']" in switches[0]
    if files == 1 and world_size == 2:
        assert any("'alpha' has 1 shards (files), fewer than the 2 readers" in r.getMessage()
                   and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize("files,world_size", [(3, 2), (5, 4)])
def test_ranks_read_whole_disjoint_files_when_they_do_not_divide(tmp_path, tokenizer, files,
                                                                 world_size):
    # 3 files over 2 ranks: one rank reads 2 files, the other 1; no rank reads another's
    # documents within an epoch, and together they read every document once.
    n = 12 * files
    src = make_source(tmp_path, "alpha", n, files=files)
    parts = []
    for rank in range(world_size):
        stream = build_pretrain_stream(data_config(src, seed=3), tokenizer, rank=rank,
                                       world_size=world_size)
        reader = stream._readers["alpha"]
        numbers = []
        while reader.epoch == 0:
            numbers.append(reader.next_document())
        numbers = numbers[:-1]  # the first of epoch 1
        texts = [tokenizer.decode(ids.tolist()) for ids in numbers]
        parts.append(doc_numbers(texts))
        assert len(parts[-1]) % 12 == 0  # whole files of 12 documents
        assert len(set(int(x.split()[1]) % files for x in parts[-1])) == len(parts[-1]) // 12
    assert sorted(x for part in parts for x in part) == [f"alpha {i:04d}" for i in range(n)]


def test_a_stage_two_source_is_checked_at_start_up(tmp_path, tokenizer):
    alpha = make_source(tmp_path, "alpha", 10)
    missing = SourceConfig(name="math", path=str(tmp_path / "no-such-dir" / "*.jsonl"))
    cfg = data_config(alpha, stage2=[alpha, missing])
    with pytest.raises(DataError, match="'math': no file matches"):
        build_pretrain_stream(cfg, tokenizer, stage2_after=1000)


def test_shard_order_is_reshuffled_per_epoch_with_the_seed(tmp_path, tokenizer):
    # 8 files of 5 documents each (file f holds documents f, f + 8, ...): an epoch reads
    # whole files in a shuffled order, a new order in every epoch, fixed by the seed.
    src = make_source(tmp_path, "alpha", 40, files=8)

    def file_order(seed, epochs=3):
        stream = build_pretrain_stream(data_config(src, seed=seed), tokenizer, batch_size=4)
        batches = [next(stream) for _ in range(60)]
        while len(numbers := doc_numbers(decode_documents(batches, tokenizer))) < 40 * epochs:
            batches.append(next(stream))
        orders = []
        for e in range(epochs):
            files = [int(n.split()[1]) % 8 for n in numbers[40 * e: 40 * e + 40]]
            # each file is read whole before the next: collapse runs
            orders.append([f for i, f in enumerate(files) if i == 0 or files[i - 1] != f])
        return orders

    order = file_order(seed=0)
    for epoch in order:
        assert sorted(epoch) == list(range(8))  # every file once per epoch, read whole
    assert order[0] != order[1] and order[1] != order[2]
    assert order[0] != list(range(8))  # shuffled, not the sorted file list
    assert file_order(seed=0) == order
    assert file_order(seed=1) != order


# -- token-share weights ----------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["tokens", "documents"])
def test_token_weighting_realises_token_shares(tmp_path, tokenizer, weighting):
    # short documents (4-8 words) and long ones (60-100 words): 1:1 in tokens means drawing
    # about 10 short documents per long one.
    short = make_source(tmp_path, "short", 400, words=(4, 8))
    long = make_source(tmp_path, "long", 100, words=(60, 100))
    cfg = data_config(short, long, weighting=weighting, seq_len=256, tokenize_batch_size=32)
    stream = build_pretrain_stream(cfg, tokenizer, batch_size=4)
    batches = [next(stream) for _ in range(60)]
    # the realised share, counted on the decoded batches (independent of the stream's counts)
    tokens = {"short": 0, "long": 0}
    for text in decode_documents(batches, tokenizer):
        tag = re.match(r"(\w+) \d{4}:", text).group(1)
        tokens[tag] += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 2
    share = tokens["long"] / sum(tokens.values())
    if weighting == "tokens":
        assert 0.42 < share < 0.58, share
    else:  # one document in two is long: most tokens are
        assert share > 0.8, share
    counted = stream.stats()["stage_tokens"]
    assert abs(counted["long"] / sum(counted.values()) - share) < 0.02


# -- exact resume across and after the boundary ------------------------------------------------


@pytest.mark.parametrize("save_at", [4, 9])  # in stage 1 (then crossing it), mid stage 2
@pytest.mark.parametrize("shuffle_buffer,weighting", [(0, "documents"), (6, "tokens")])
def test_resume_is_exact_across_the_boundary(tmp_path, tokenizer, save_at, shuffle_buffer,
                                             weighting):
    cfg = two_stage_config(tmp_path, shuffle_buffer=shuffle_buffer)
    cfg.stage1.weighting = cfg.stage2.weighting = weighting

    def stream():
        return build_pretrain_stream(cfg, tokenizer, rank=1, world_size=2, batch_size=2,
                                     stage2_after=6)

    original = stream()
    for _ in range(save_at):
        next(original)
    state = round_trip(original.state_dict())
    expected = [next(original) for _ in range(8)]
    resumed = stream()
    resumed.load_state_dict(state)
    assert_same_batches(expected, [next(resumed) for _ in range(8)])
    assert resumed.stats() == original.stats()


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")  # inside torchdata
def test_dataloader_workers_switch_at_their_batch_and_resume_exactly(tmp_path, tokenizer):
    pytest.importorskip("torchdata.stateful_dataloader")
    cfg = two_stage_config(tmp_path, files=2, num_workers=2)
    stream = build_pretrain_stream(cfg, tokenizer, batch_size=2, stage2_after=5)
    first = [next(stream) for _ in range(7)]
    state = stream.state_dict()
    expected = [next(stream) for _ in range(5)]
    texts = [decode_documents([b], tokenizer, mid_stream=True) for b in first + expected]
    # batches 0-4 (from both workers) are stage 1, then stage 2: beta only before
    assert any(t.startswith("beta") for b in texts[:5] for t in b)
    assert not any(t.startswith("beta") for b in texts[6:] for t in b)
    assert any(t.startswith("gamma") for b in texts[5:] for t in b)
    # the workers' counts reach the main process with their batches: all tokens of the 12
    # batches, plus what each worker's packer holds (less than a row and a document each)
    stats = stream.stats()
    assert stats["stage"] == 2 and set(stats["stage_tokens"]) == {"alpha", "gamma"}
    waiting = sum(stats["packed_tokens"].values()) - 12 * 2 * 32
    assert 0 <= waiting < 2 * (32 + 64)
    resumed = build_pretrain_stream(cfg, tokenizer, batch_size=2, stage2_after=5)
    resumed.load_state_dict(state)
    assert_same_batches(expected, [next(resumed) for _ in range(5)])


# -- the plan: boundary from the schedule, logged token shares ---------------------------------


def test_plan_switches_at_the_schedule_boundary_and_logs_token_shares(tmp_path, tokenizer):
    cfg = two_stage_config(tmp_path)
    schedule = ScheduleConfig(warmup_steps=1, stage_boundary=0.5)
    plan = PretrainPlan(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=2,
                        total_steps=8, schedule=schedule, grad_accum=3)
    acc = Accelerator(cpu=True)
    steps = [plan.batches_for_step(s, 3) for s in range(8)]
    assert plan.stream.stage == 2 and plan.stream.batches_yielded == 24
    stage1 = decode_documents([b for step in steps[:4] for b in step], tokenizer)
    assert any(t.startswith("beta") for t in stage1)
    metrics = plan.log_metrics(acc)
    assert metrics["data/stage"] == 2.0
    assert set(k for k in metrics if k.startswith("data/token_share/")) == {
        "data/token_share/alpha", "data/token_share/gamma"}
    assert sum(v for k, v in metrics.items() if "token_share" in k) == pytest.approx(1.0)
    # the run's token counts are those of the batches, decoded here (rows concatenated, a
    # document from its BOS to the next), plus the tokens still waiting in the packer
    ids = torch.cat([b["input_ids"].flatten() for step in steps for b in step])
    starts = (ids == tokenizer.bos_token_id).nonzero().flatten().tolist() + [len(ids)]
    assert starts[0] == 0
    tokens = {"alpha": 0, "beta": 0, "gamma": 0}
    for a, b in zip(starts[:-1], starts[1:]):
        text = tokenizer.decode(ids[a + 1:b])
        tokens[re.match(r"(alpha|beta|gamma)", text).group(1)] += b - a
    waiting = {name: metrics[f"data/tokens/{name}"] - n for name, n in tokens.items()}
    assert all(w >= 0 for w in waiting.values())
    assert sum(waiting.values()) == plan.stream._packer.buffered
    # a plan resumed with another accumulation would train stage-1 data in stage 2: refused
    other = PretrainPlan(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=2,
                         total_steps=8, schedule=schedule, grad_accum=1)
    other.load_state_dict(plan.state_dict())
    with pytest.raises(TrainingError, match="grad_accum"):
        other.batches_for_step(3, 1)


def test_2b4t_mixture_has_code_and_math_in_stage_1_and_token_weights():
    from bitnet_train.train.config import compose, to_train_config

    data = to_train_config(compose(["+recipe=pretrain_2b4t"])).data
    one = {s.name: s for s in data.stage1.sources}
    two = {s.name: s for s in data.stage2.sources}
    assert data.stage1.weighting == data.stage2.weighting == "tokens"
    assert one["starcoder"].path == "bigcode/starcoderdata"
    assert one["starcoder"].text_field == "content"
    assert one["finemath"].path == "HuggingFaceTB/finemath"
    assert sum(s.weight for s in one.values()) == pytest.approx(1.0)
    assert sum(s.weight for s in two.values()) == pytest.approx(1.0)
    # stage 2 up-weights the curated sets and continues every stage-1 source
    for name in ("fineweb-edu", "starcoder", "finemath"):
        assert two[name].weight > one[name].weight
    assert two["dclm"].weight < one["dclm"].weight and set(one) == set(two)


@pytest.mark.slow
def test_two_processes_continue_the_streams_and_resume_mid_stage_two(tmp_path, tokenizer):
    """torchrun, 2 processes: each reads its own files of each source across the boundary, no
    document twice before its epoch ends, token metrics all-reduced; a restart from the state
    saved mid-stage-2 yields exactly the same batches on both ranks."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.data.stage_worker import SAVE_AT

    root = Path(__file__).resolve().parents[2]
    corpus = tmp_path / "corpus"
    for name, n in (("alpha", 40), ("beta", 40), ("gamma", 12)):
        make_source(corpus, name, n, files=2)
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), str(root / "tests/data/stage_worker.py"), str(corpus),
         str(tmp_path / "tok"), str(tmp_path)],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for f in full:  # exact resume mid-stage-2 on each rank
        for a, b in zip(f["batches"][SAVE_AT:], f["resumed"], strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    epochs = {}
    for r in (0, 1):
        ids = [{"input_ids": x} for step in full[r]["batches"] for x in step]
        seen = by_source(doc_numbers(decode_documents(ids, tokenizer)))
        for name, share in (("alpha", 20), ("gamma", 6)):
            assert len(seen[name]) > share and len(set(seen[name][:share])) == share
            epochs.setdefault(name, []).append(set(seen[name][:share]))
    for name, n in (("alpha", 40), ("gamma", 12)):
        assert not epochs[name][0] & epochs[name][1]
        assert epochs[name][0] | epochs[name][1] == {f"{name} {i:04d}" for i in range(n)}
    assert "data source 'alpha': epoch 0 done" in proc.stderr
    # the logged totals are the sum of both ranks' own counts
    for name in ("alpha", "beta", "gamma"):
        local = sum(f["local"]["packed_tokens"][name] for f in full)
        assert full[0]["metrics"][f"data/tokens/{name}"] == local
