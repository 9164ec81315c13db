"""Pretraining data: sources, mixture weights, packing, rank sharding, exact resume, errors.

Every source is a small local jsonl file read through the production path (datasets' json
builder via `open_source`); the tokenizer is a demo BPE trained on Python's pydoc topics.
"""

from __future__ import annotations

import io
import json
import random
import zlib
from collections import Counter

import pytest
import torch

from bitnet_train.data.config import MixtureConfig, PretrainDataConfig, SourceConfig
from bitnet_train.data.packing import DocumentPacker, collate_rows, frame_document
from bitnet_train.data.pretrain import build_pretrain_stream
from bitnet_train.errors import CheckpointError, ConfigError, DataError
from bitnet_train.model import BitNetForCausalLM
from tests.conftest import tiny_config
from tests.data.pretrain_fixtures import (
    data_config,
    decode_documents,
    demo_tokenizer,
    doc_numbers,
    make_source,
    numbered_docs,
    write_jsonl,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return demo_tokenizer(tmp_path_factory.mktemp("tok"))


# -- config -----------------------------------------------------------------------------------


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="weight"):
        SourceConfig(name="web", path="x.jsonl", weight=0.0)
    with pytest.raises(ConfigError, match="stage1.sources"):
        PretrainDataConfig()
    with pytest.raises(ConfigError, match="builder"):
        SourceConfig(path="x.jsonl", builder="csv")
    with pytest.raises(ConfigError, match="several sources named"):
        MixtureConfig(sources=[SourceConfig(path="a.jsonl"), SourceConfig(path="a.jsonl")])
    assert SourceConfig(path="data/web.jsonl").name == "data/web.jsonl"


# -- mixture ----------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(3.0, 1.0), (1.0, 1.0, 2.0)])
def test_mixture_weights_are_honoured(tmp_path, tokenizer, weights):
    # Sources of very different sizes: the small ones repeat, proportions must not drift.
    sizes = (200, 30, 70)[: len(weights)]
    tags = ("alpha", "beta", "gamma")[: len(weights)]
    sources = [make_source(tmp_path, t, n, weight=w) for t, n, w in zip(tags, sizes, weights)]
    stream = build_pretrain_stream(data_config(*sources, seed=1, seq_len=256,
                                               tokenize_batch_size=64), tokenizer)
    stream.documents = []
    n = 3000
    while len(stream.documents) < n:
        stream.next_rows(1)
    counts = Counter(name for name, _ in stream.documents[:n])
    for tag, w in zip(tags, weights):
        p = w / sum(weights)
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(counts[tag] / n - p) < 4 * sigma, (tag, counts[tag] / n, p)


# -- packing (pure) ---------------------------------------------------------------------------


def test_frame_document():
    assert frame_document([5, 6], bos_id=0, eos_id=1) == [0, 5, 6, 1]
    assert frame_document([5, 6], bos_id=None, eos_id=1) == [5, 6, 1]
    assert frame_document([], bos_id=0, eos_id=1) == []


def test_packing_small_case_by_hand():
    # Documents (already framed) of 3, 6 and 1 tokens into rows of 4.
    packer = DocumentPacker(seq_len=4)
    for doc in ([10, 11, 12], [20, 21, 22, 23, 24, 25], [30]):
        packer.push(doc)
    rows = [packer.pop_row(), packer.pop_row()]
    assert packer.pop_row() is None and packer.buffered == 2  # [25] and [30] wait
    assert rows[0].input_ids.tolist() == [10, 11, 12, 20]
    assert rows[0].position_ids.tolist() == [0, 1, 2, 0]
    assert rows[0].document_ids.tolist() == [0, 0, 0, 1]
    assert rows[0].labels.tolist() == [-100, 11, 12, -100]
    # the second document continues in row 1 as a new piece, positions from 0 again
    assert rows[1].input_ids.tolist() == [21, 22, 23, 24]
    assert rows[1].position_ids.tolist() == [0, 1, 2, 3]
    assert rows[1].document_ids.tolist() == [0, 0, 0, 0]
    assert rows[1].labels.tolist() == [-100, 22, 23, 24]
    packer.push([40, 41])
    assert packer.pop_row().input_ids.tolist() == [25, 30, 40, 41]


def test_packing_without_document_masking_is_plain_causal():
    packer = DocumentPacker(seq_len=4, document_masking=False)
    for doc in ([10, 11, 12], [20, 21, 22, 23, 24]):
        packer.push(doc)
    row = packer.pop_row()
    assert row.input_ids.tolist() == [10, 11, 12, 20]
    assert row.position_ids.tolist() == [0, 1, 2, 3]
    assert row.document_ids.tolist() == [0, 0, 0, 0]
    assert row.labels.tolist() == [10, 11, 12, 20]


@pytest.mark.parametrize("seq_len", [7, 64])
def test_packing_loses_and_repeats_no_token(seq_len):
    rng = random.Random(seq_len)
    bos, eos = 1, 2
    docs = [frame_document([rng.randrange(3, 500) for _ in range(rng.randint(1, 3 * seq_len))],
                           bos, eos) for _ in range(200)]
    packer = DocumentPacker(seq_len)
    rows = []
    for doc in docs:
        packer.push(doc)
        while (row := packer.pop_row()) is not None:
            rows.append(row)
    leftover = [t for piece in packer.state_dict()["pieces"] for t in piece]
    assert len(leftover) < seq_len
    emitted = [t for r in rows for t in r.input_ids.tolist()]
    assert emitted + leftover == [t for d in docs for t in d]
    for r in rows:
        ids, pos, doc, lab = (r.input_ids.tolist(), r.position_ids.tolist(),
                              r.document_ids.tolist(), r.labels.tolist())
        assert len(ids) == seq_len and doc[0] == 0
        for t in range(seq_len):
            new_piece = t == 0 or doc[t] != doc[t - 1]
            if new_piece:  # ids count up by one per piece; positions restart; no target
                assert t == 0 or doc[t] == doc[t - 1] + 1
                assert pos[t] == 0 and lab[t] == -100
            else:
                assert pos[t] == pos[t - 1] + 1 and lab[t] == ids[t]
            # an EOS is always the last token of its piece; a BOS always the first
            if ids[t] == eos and t + 1 < seq_len:
                assert doc[t + 1] == doc[t] + 1
            if ids[t] == bos:
                assert pos[t] == 0


def test_packer_state_round_trip():
    docs = [[1] + list(range(10 * i, 10 * i + i + 3)) + [2] for i in range(30)]
    a = DocumentPacker(16)
    for d in docs[:13]:
        a.push(d)
    a.pop_row()
    b = DocumentPacker(16)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # plain JSON-able state
    for d in docs[13:]:
        a.push(d)
        b.push(d)
    while (ra := a.pop_row()) is not None:
        rb = b.pop_row()
        assert ra.input_ids.tolist() == rb.input_ids.tolist()
        assert ra.position_ids.tolist() == rb.position_ids.tolist()


def test_document_masking_isolates_documents_in_the_model():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = BitNetForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    doc_a = torch.randint(3, cfg.vocab_size, (9,), generator=gen).tolist()
    doc_b = torch.randint(3, cfg.vocab_size, (13,), generator=gen).tolist()
    packer = DocumentPacker(seq_len=len(doc_a) + len(doc_b))
    packer.push(doc_a)
    packer.push(doc_b)
    batch = collate_rows([packer.pop_row()])

    def alone(doc):
        ids = torch.tensor([doc])
        return model(ids, labels=ids)

    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"],
                       document_ids=batch["document_ids"], labels=batch["labels"])
        a, b = alone(doc_a), alone(doc_b)
        leaky = model(batch["input_ids"]).logits  # no document masking: B sees A
    na = len(doc_a)
    torch.testing.assert_close(packed.logits[0, :na], a.logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.logits[0, na:], b.logits[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(leaky[0, na:], b.logits[0], atol=1e-3)
    # the packed loss sums exactly the documents' own losses (mean over their targets)
    n_a, n_b = len(doc_a) - 1, len(doc_b) - 1
    torch.testing.assert_close(packed.loss * (n_a + n_b), a.loss * n_a + b.loss * n_b)


# -- the stream -------------------------------------------------------------------------------


def test_stream_batches_follow_the_conventions(tmp_path, tokenizer):
    cfg = data_config(make_source(tmp_path, "alpha", 40))
    stream = build_pretrain_stream(cfg, tokenizer, batch_size=3)
    batches = [next(stream) for _ in range(6)]
    for b in batches:
        assert set(b) == {"input_ids", "labels", "attention_mask", "position_ids",
                          "document_ids"}
        for v in b.values():
            assert v.shape == (3, 32) and v.dtype == torch.long
        assert bool((b["attention_mask"] == 1).all())
    texts = decode_documents(batches, tokenizer)
    expected = numbered_docs("alpha", 40, seed=zlib.crc32(b"alpha"))
    assert texts == expected[: len(texts)] and len(texts) > 10


def test_prepared_arrow_copy_reads_the_same_documents(tmp_path, tokenizer, monkeypatch):
    # The Arrow copy has other shards (row groups, not files), hence another shard order, but
    # the same documents in each epoch.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    src = make_source(tmp_path, "alpha", 40, files=2)
    epochs = []
    for streaming in (True, False):
        stream = build_pretrain_stream(data_config(src, streaming=streaming), tokenizer,
                                       batch_size=2)
        numbers = doc_numbers(decode_documents([next(stream) for _ in range(30)], tokenizer))
        epochs.append(numbers[:40])
    assert len(set(epochs[0])) == 40 and set(epochs[0]) == set(epochs[1])
    assert any((tmp_path / "cache").iterdir())  # the copy went to the cache, not the home dir


@pytest.mark.parametrize("files", [1, 4])
def test_ranks_read_disjoint_shards_that_cover_the_data(tmp_path, tokenizer, files):
    # 1 file: every other document of the common stream; 4 files: 2 whole files per rank,
    # other files in the next epoch (the shard order is reshuffled, the same on both ranks).
    n = 60
    src = make_source(tmp_path, "alpha", n, files=files)
    cfg = data_config(src)
    passes: list[list[set]] = []
    for rank in (0, 1):
        stream = build_pretrain_stream(cfg, tokenizer, rank=rank, world_size=2, batch_size=4)
        batches = [next(stream) for _ in range(40)]  # > 2 passes over the rank's share
        ids = doc_numbers(decode_documents(batches, tokenizer))
        first, second = ids[: n // 2], ids[n // 2: n]
        assert len(set(first)) == n // 2 and len(set(second)) == n // 2  # no repeat in a pass
        passes.append([set(first), set(second)])
    everything = {f"alpha {i:04d}" for i in range(n)}
    for epoch in (0, 1):
        mine, theirs = passes[0][epoch], passes[1][epoch]
        assert not mine & theirs and mine | theirs == everything


@pytest.mark.parametrize("shuffle_buffer,rank,world_size", [(0, 0, 1), (8, 1, 2)])
def test_resume_yields_exactly_the_next_batches(tmp_path, tokenizer, shuffle_buffer, rank,
                                                world_size):
    cfg = data_config(make_source(tmp_path, "alpha", 50, weight=2.0),
                      make_source(tmp_path, "beta", 17), shuffle_buffer=shuffle_buffer, seed=3)

    def stream():
        return build_pretrain_stream(cfg, tokenizer, rank=rank, world_size=world_size,
                                     batch_size=2)

    original = stream()
    for _ in range(7):
        next(original)
    buf = io.BytesIO()
    torch.save(original.state_dict(), buf)  # as the trainer's checkpoint does
    expected = [next(original) for _ in range(6)]

    resumed = stream()
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    got = [next(resumed) for _ in range(6)]
    for e, g in zip(expected, got):
        for k in e:
            assert torch.equal(e[k], g[k]), k
    # without the state a fresh stream starts over, so the check above is not vacuous
    assert not torch.equal(next(iter(stream()))["input_ids"], expected[0]["input_ids"])


def test_resume_survives_a_new_tokenize_batch_size(tmp_path, tokenizer):
    # Tokenization batches are an implementation detail: the document sequence stays.
    src = make_source(tmp_path, "alpha", 50)
    original = build_pretrain_stream(data_config(src, tokenize_batch_size=7), tokenizer)
    for _ in range(7):
        next(original)
    state = original.state_dict()
    assert state["sources"]["alpha"]["consumed"] > 2  # the skip spans several new batches
    resumed = build_pretrain_stream(data_config(src, tokenize_batch_size=2), tokenizer)
    resumed.load_state_dict(state)
    for _ in range(10):
        assert torch.equal(next(original)["input_ids"], next(resumed)["input_ids"])


def test_resume_refuses_a_state_of_another_layout(tmp_path, tokenizer):
    cfg = data_config(make_source(tmp_path, "alpha", 20))
    a = build_pretrain_stream(cfg, tokenizer, rank=0, world_size=2)
    next(a)
    b = build_pretrain_stream(cfg, tokenizer, rank=0, world_size=4)
    with pytest.raises(CheckpointError, match="world_size"):
        b.load_state_dict(a.state_dict())


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")  # inside torchdata
def test_resume_with_dataloader_workers(tmp_path, tokenizer):
    pytest.importorskip("torchdata.stateful_dataloader")
    cfg = data_config(make_source(tmp_path, "alpha", 40), make_source(tmp_path, "beta", 30),
                      num_workers=2)
    original = build_pretrain_stream(cfg, tokenizer, batch_size=2)
    first = [next(original) for _ in range(5)]
    state = original.state_dict()
    expected = [next(original) for _ in range(5)]
    resumed = build_pretrain_stream(cfg, tokenizer, batch_size=2)
    resumed.load_state_dict(state)
    for e, g in zip(expected, [next(resumed) for _ in range(5)]):
        assert torch.equal(e["input_ids"], g["input_ids"])
    # batches come round-robin from two workers that read disjoint shares
    batches = first + expected
    per_worker = [doc_numbers(decode_documents(batches[w::2], tokenizer)) for w in (0, 1)]
    assert not set(per_worker[0]) & set(per_worker[1])


def test_stage_two_reads_its_own_mixture(tmp_path, tokenizer):
    alpha, beta = make_source(tmp_path, "alpha", 20), make_source(tmp_path, "beta", 20)
    cfg = data_config(alpha, stage2=[beta])
    for stage, tag in ((1, "alpha"), (2, "beta")):
        stream = build_pretrain_stream(cfg, tokenizer, stage=stage, batch_size=2)
        texts = decode_documents([next(stream) for _ in range(4)], tokenizer)
        assert texts and all(t.startswith(tag) for t in texts)
    same = data_config(alpha)  # stage2=None keeps stage 1's mixture
    stream = build_pretrain_stream(same, tokenizer, stage=2, batch_size=2)
    assert all(t.startswith("alpha")
               for t in decode_documents([next(stream) for _ in range(4)], tokenizer))


# -- bad data ---------------------------------------------------------------------------------


def test_missing_text_field_names_the_source_and_its_fields(tmp_path, tokenizer):
    write_jsonl(tmp_path / "web.jsonl", [{"content": "hello", "url": "x"}])
    cfg = data_config(SourceConfig(name="web", path=str(tmp_path / "web.jsonl")))
    with pytest.raises(DataError, match=r"'web'.*'text'.*\['content', 'url'\]"):
        build_pretrain_stream(cfg, tokenizer)


def test_empty_source_is_named(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("")
    cfg = data_config(SourceConfig(name="books", path=str(tmp_path / "empty.jsonl")))
    with pytest.raises(DataError, match="'books'.*empty"):
        build_pretrain_stream(cfg, tokenizer)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    cfg = data_config(SourceConfig(name="blank", path=str(tmp_path / "blank.jsonl")))
    with pytest.raises(DataError, match="'blank'.*no records"):
        build_pretrain_stream(cfg, tokenizer)


def test_missing_files_and_unreachable_hub_ids_say_what_to_do(tmp_path, tokenizer):
    cfg = data_config(SourceConfig(name="web", path=str(tmp_path / "nothing-*.jsonl")))
    with pytest.raises(DataError, match="'web'.*no file matches"):
        build_pretrain_stream(cfg, tokenizer)
    # the test session is offline (tests/conftest.py): a Hub id cannot be reached
    cfg = data_config(SourceConfig(name="edu", path="no-such-org/no-such-dataset"))
    with pytest.raises(DataError, match="'edu'.*could not reach.*local files"):
        build_pretrain_stream(cfg, tokenizer)


def test_a_null_text_later_in_the_source_names_it(tmp_path, tokenizer):
    write_jsonl(tmp_path / "web.jsonl", [{"text": "fine"}, {"text": None}])
    cfg = data_config(SourceConfig(name="web", path=str(tmp_path / "web.jsonl")))
    stream = build_pretrain_stream(cfg, tokenizer)
    with pytest.raises(DataError, match="'web'.*None"):
        next(stream)
