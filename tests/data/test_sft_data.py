"""SFT data: loading through datasets, mixture weights, packing, epochs, ranks, resume."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from bitnet_train.data.adapters import ChatSourceConfig
from bitnet_train.data.chat import encode_chat
from bitnet_train.data.sft import SFTDataConfig, build_sft_dataset, pack_first_fit
from bitnet_train.errors import ConfigError, DataError
from tests.data.chat_fixtures import bpe_tokenizer, write_jsonl

X = -100
WORDS = "the quick brown fox jumps over lazy dog hello there how can I help you".split()


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    say = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
    out = []
    for i in range(n):
        conv = [{"role": "system", "content": say()}] if i % 4 == 0 else []
        for _ in range(rng.randint(1, 3)):
            conv += [{"role": "user", "content": f"q{i} " + say()},
                     {"role": "assistant", "content": say()}]
        out.append(conv)
    return out


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    return write_jsonl(d / "chat.jsonl", [{"messages": c} for c in conversations(40)])


def build(tok, path, tmp_path, rank=0, world_size=1, **kw):
    sources = kw.pop("sources", None) or [ChatSourceConfig(name="chat", path=path)]
    cfg = SFTDataConfig(sources=sources, cache_dir=str(tmp_path / "cache"), **kw)
    return build_sft_dataset(cfg, tok, rank=rank, world_size=world_size)


def documents(batch):
    """Per packed document: (input_ids, labels) tuples, checking positions and attention."""
    docs = []
    for b in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][b].bool()
        ids, labels = batch["input_ids"][b][real], batch["labels"][b][real]
        pos, doc = batch["position_ids"][b][real], batch["document_ids"][b][real]
        assert (batch["labels"][b][~real] == X).all()
        assert (batch["document_ids"][b][~real] == 0).all()
        for d in doc.unique_consecutive().tolist():
            m = doc == d
            assert (doc == d).sum() == m.nonzero().numel()  # one contiguous segment per doc
            assert pos[m].tolist() == list(range(int(m.sum())))
            docs.append((tuple(ids[m].tolist()), tuple(labels[m].tolist())))
        assert len(set(doc.tolist())) == len(doc.unique_consecutive())  # ids distinct per row
    return docs


def expected_docs(tok, convs, max_len):
    out = []
    for c in convs:
        enc = encode_chat(tok, c, max_len)
        if enc is not None:
            out.append((tuple(enc[0]), tuple(enc[1])))
    return Counter(out)


def test_packed_epoch_holds_each_conversation_once_and_separate(tok, chat_file, tmp_path):
    ds = build(tok, chat_file, tmp_path, max_len=128, pack=True)
    loader = ds.batches(3)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-ds.num_rows // 3)
    seen = Counter()
    for b in batches:
        assert b["input_ids"].shape[1] <= 128
        for ids, labels in documents(b):
            assert ids[0] == tok.bos_token_id and labels[0] == X
            seen[(ids, labels)] += 1
    assert seen == expected_docs(tok, conversations(40), 128)
    assert ds.num_rows < 40  # several conversations share a row
    assert ds.stats["chat"].kept == 40 and ds.stats["chat"].seen == 40


def test_no_label_on_prompt_tokens(tok, chat_file, tmp_path):
    ds = build(tok, chat_file, tmp_path, max_len=256, pack=True)
    assert ds.stats["chat"].truncated_turns == 0
    replies = Counter(f" {m['content']}<|eot_id|>" for c in conversations(40) for m in c
                      if m["role"] == "assistant")
    got = Counter()
    for b in ds.batches(4):
        for row_ids, row_labels in zip(b["input_ids"], b["labels"]):
            run = []
            for i, lab in zip(row_ids.tolist() + [0], row_labels.tolist() + [X]):
                if lab != X:
                    assert lab == i
                    run.append(i)
                elif run:
                    got[tok.decode(run)] += 1
                    run = []
    assert got == replies  # labelled spans are exactly the assistant replies (+ eot)


def test_unpacked_rows_and_truncation_counted(tok, chat_file, tmp_path):
    ds = build(tok, chat_file, tmp_path, max_len=40, pack=False)
    assert ds.num_rows == ds.stats["chat"].kept
    st = ds.stats["chat"]
    assert st.truncated_turns > 0 and st.seen == 40
    assert st.kept + st.dropped_too_long == 40
    assert ds.log_dict()["data/chat/truncated_turns"] == st.truncated_turns
    for b in ds.batches(5):
        assert (b["document_ids"][b["attention_mask"].bool()] == 1).all()
        assert b["input_ids"].shape[1] <= 40


def test_exact_len_and_rank_sharding_disjoint(tok, chat_file, tmp_path):
    full = build(tok, chat_file, tmp_path, max_len=64, pack=False)
    n = full.num_rows
    shards = [build(tok, chat_file, tmp_path, rank=r, world_size=3, max_len=64, pack=False)
              for r in range(3)]
    rows = [set(s.rank_rows(0).tolist()) for s in shards]
    assert all(len(r) == n // 3 == len(s) for r, s in zip(rows, shards))
    assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])
    for s in shards:
        loader = s.batches(4)
        assert len(loader) == sum(1 for _ in loader) == -(-(n // 3) // 4)


def test_epochs_reshuffle_deterministically(tok, chat_file, tmp_path):
    a = build(tok, chat_file, tmp_path, max_len=64, pack=False, seed=3)
    b = build(tok, chat_file, tmp_path, max_len=64, pack=False, seed=3)
    assert a.rank_rows(0).tolist() == b.rank_rows(0).tolist()
    assert a.rank_rows(0).tolist() != a.rank_rows(1).tolist()
    assert sorted(a.rank_rows(0).tolist()) == sorted(a.rank_rows(1).tolist())
    a.set_epoch(1)
    first = next(iter(a.batches(2)))
    assert torch.equal(first["input_ids"], b.batch(1, 0, 2)["input_ids"])


def test_resume_mid_epoch_is_exact(tok, chat_file, tmp_path):
    ref = build(tok, chat_file, tmp_path, max_len=64, pack=True)
    ref.set_epoch(1)
    expected = [b["input_ids"] for b in ref.batches(2)]
    run = build(tok, chat_file, tmp_path, max_len=64, pack=True)
    run.set_epoch(1)
    it = iter(run.batches(2))
    got = [next(it)["input_ids"] for _ in range(3)]
    state = run.state_dict()
    resumed = build(tok, chat_file, tmp_path, max_len=64, pack=True)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the trainer calls this again after resuming: keeps the position
    got += [b["input_ids"] for b in resumed.batches(2)]
    assert len(got) == len(expected)
    assert all(torch.equal(x, y) for x, y in zip(got, expected))
    resumed.set_epoch(2)
    assert resumed.rows_done == 0
    other = build(tok, chat_file, tmp_path, max_len=64, pack=False)
    with pytest.raises(DataError, match="num_rows"):
        other.load_state_dict(state)


def test_mixture_weights_upsample(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": c} for c in conversations(10, seed=1)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": c} for c in conversations(8, seed=2)])
    ds = build(tok, None, tmp_path, max_len=256, pack=False, sources=[
        ChatSourceConfig(name="a", path=a, weight=2.0),
        ChatSourceConfig(name="b", path=b, weight=0.5)])
    per_source = Counter(int(s) for s, _ in ds.examples)
    assert per_source == {0: 20, 1: 4}
    count_a = Counter(int(i) for s, i in ds.examples if s == 0)
    assert set(count_a.values()) == {2} and len(count_a) == 10
    assert len(set(int(i) for s, i in ds.examples if s == 1)) == 4  # 4 distinct of 8


def test_bad_records_error_or_skip(tok, tmp_path):
    records = [{"messages": c} for c in conversations(5)]
    records.insert(3, {"messages": [{"role": "narrator", "content": "x"}]})
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError, match=r"'bad', row 3"):
        build(tok, None, tmp_path, max_len=128,
              sources=[ChatSourceConfig(name="bad", path=path)])
    ds = build(tok, None, tmp_path, max_len=128, on_bad_record="skip",
               sources=[ChatSourceConfig(name="bad", path=path)])
    assert ds.stats["bad"].skipped_bad_records == 1 and ds.stats["bad"].kept == 5


def test_config_validation():
    with pytest.raises(ConfigError, match="on_bad_record"):
        SFTDataConfig(on_bad_record="ignore")
    with pytest.raises(ConfigError, match="sources"):
        build_sft_dataset(SFTDataConfig(), bpe_tokenizer())


def test_first_fit_decreasing_by_hand():
    # FFD: 5 -> row0 (3 left); 4 -> row1 (4 left); 3 -> row0 (0 left); 3 -> row1 (1 left);
    # 2 -> row2 (6 left); 1 -> row1 (0 left)
    assert pack_first_fit([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]


def test_first_fit_matches_naive_reference():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(300)]
    naive_rows, free = [], []
    for i in sorted(range(300), key=lambda i: -lengths[i]):  # stable: ties in input order
        r = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if r is None:
            naive_rows.append([])
            free.append(100)
            r = len(free) - 1
        naive_rows[r].append(i)
        free[r] -= lengths[i]
    assert pack_first_fit(lengths, 100) == naive_rows


def test_demo_chat_is_read_by_the_sft_loader(tmp_path):
    import json

    from bitnet_train.data.demo_data import write_demo_chat

    path = write_demo_chat(tmp_path / "demo")
    assert path.read_bytes() == write_demo_chat(tmp_path / "again").read_bytes()  # deterministic
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert 2000 <= len(records) <= 5000
    roles = [[m["role"] for m in r["messages"]] for r in records]
    assert any(r[0] == "system" for r in roles)
    assert any(r.count("assistant") == 2 for r in roles)
    assert all(r[-1] == "assistant" for r in roles)
    text = [m["content"] for r in records[:300] for m in r["messages"]]
    tok = bpe_tokenizer(extra_text=text, vocab_size=800)
    ds = build(tok, None, tmp_path, max_len=256, pack=True,
               sources=[ChatSourceConfig(name="demo", path=str(path), format="auto")])
    st = ds.stats["demo"]
    assert st.seen == st.kept == len(records) and st.skipped_bad_records == 0
    batch = ds.batch(0, 0, 4)
    assert (batch["labels"] != X).any()
