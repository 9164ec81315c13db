"""Preference pairs: shared prompt, chosen/rejected layout, masking, length rule, epochs."""

from __future__ import annotations

import pytest
import torch

from bitnet_train.data.adapters import ChatSourceConfig
from bitnet_train.data.preference import PreferenceDataConfig, build_preference_dataset
from bitnet_train.errors import DataError
from tests.data.chat_fixtures import bpe_tokenizer, write_jsonl

X = -100
PAIRS = [
    {"prompt": "Hello there!", "chosen": "Hello, how can I help?", "rejected": "No."},
    {"prompt": [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What does json.dumps do?"}],
     "chosen": "It converts Python objects to text.", "rejected": "1234"},
    {"prompt": "The quick brown fox?", "chosen": "jumps over the lazy dog",
     "rejected": "I don't know."},
]
LONG_PROMPT = {"prompt": "numbers " * 80, "chosen": "a", "rejected": "b"}
LONG_REPLY = {"prompt": "Hi", "chosen": "the lazy dog " * 30, "rejected": "ok"}


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


def build(tok, records, tmp_path, max_len=64, **kw):
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    cfg = PreferenceDataConfig(sources=[ChatSourceConfig(name="p", path=path, format="pairs")],
                               max_len=max_len, cache_dir=str(tmp_path / "cache"), **kw)
    return build_preference_dataset(cfg, tok, **{k: v for k, v in kw.items() if k == "rank"})


def prompt_messages(p):
    return [{"role": "user", "content": p}] if isinstance(p, str) else p


def test_batch_layout_shared_prompt_and_response_labels(tok, tmp_path):
    ds = build(tok, PAIRS, tmp_path, max_len=128)
    batch = ds.batch(0, 0, batch_size=3)
    B = 3
    assert batch["input_ids"].shape[0] == 2 * B
    assert set(batch) >= {"input_ids", "labels", "attention_mask", "position_ids",
                          "document_ids", "pair_index"}
    for i, pair_row in enumerate(batch["pair_index"].tolist()):
        rec = PAIRS[pair_row]
        msgs = prompt_messages(rec["prompt"])
        for row, key in ((i, "chosen"), (B + i, "rejected")):
            real = batch["attention_mask"][row].bool()
            ids, labels = batch["input_ids"][row][real], batch["labels"][row][real]
            conv = msgs + [{"role": "assistant", "content": rec[key]}]
            whole = [tok.bos_token_id] + tok.apply_chat_template(conv)["input_ids"]
            assert ids.tolist() == whole  # prompt + response = the rendered conversation
            trained = labels != X
            assert tok.decode(ids[trained]) == f" {rec[key]}<|eot_id|>"
            assert not trained[: int(trained.float().argmax())].any()  # one trailing span
            assert (labels[trained] == ids[trained]).all()
            assert batch["position_ids"][row][real].tolist() == list(range(int(real.sum())))
            assert (batch["labels"][row][~real] == X).all()
            assert (batch["document_ids"][row][~real] == 0).all()
        # the same prompt tokens in both rows: everything before the first label
        c_lab, r_lab = batch["labels"][i], batch["labels"][B + i]
        n_c, n_r = int((c_lab != X).float().argmax()), int((r_lab != X).float().argmax())
        assert n_c == n_r
        assert torch.equal(batch["input_ids"][i, :n_c], batch["input_ids"][B + i, :n_r])
    # right padding to the longest row of the batch
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max())
    for row in range(2 * B):
        n = int(lengths[row])
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()


def test_too_long_prompt_dropped_and_counted(tok, tmp_path):
    ds = build(tok, [*PAIRS, LONG_PROMPT], tmp_path, max_len=48)
    st = ds.stats["p"]
    assert st.dropped_too_long == 1 and st.kept == 3 and st.seen == 4
    assert ds.num_rows == 3
    assert ds.log_dict()["data/p/dropped_too_long"] == 1


def test_long_response_cut_at_the_end(tok, tmp_path):
    ds = build(tok, [LONG_REPLY], tmp_path, max_len=32)
    assert ds.stats["p"].truncated_response == 1
    b = ds.batch(0, 0, 1)
    chosen = b["input_ids"][0][b["attention_mask"][0].bool()]
    assert len(chosen) == 32
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert chosen.tolist().count(eot) == 1  # the user turn's; the reply's eot was cut
    full = tok.apply_chat_template(prompt_messages("Hi") + [
        {"role": "assistant", "content": LONG_REPLY["chosen"]}])["input_ids"]
    assert chosen.tolist() == [tok.bos_token_id] + full[:31]


def test_epochs_ranks_and_state(tok, tmp_path):
    records = [{"prompt": f"q {i}", "chosen": "yes", "rejected": "no"} for i in range(11)]
    path = write_jsonl(tmp_path / "many.jsonl", records)

    def make(rank, world):
        cfg = PreferenceDataConfig(sources=[ChatSourceConfig(path=path, format="pairs")],
                                   cache_dir=str(tmp_path / "cache"))
        return build_preference_dataset(cfg, tok, rank=rank, world_size=world)

    shards = [make(r, 2) for r in range(2)]
    seen = [set(s.rank_rows(0).tolist()) for s in shards]
    assert len(seen[0]) == len(seen[1]) == 5 and not seen[0] & seen[1]
    loader = shards[0].batches(2)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert sorted(i for b in batches for i in b["pair_index"].tolist()) == sorted(seen[0])
    state = shards[0].state_dict()
    assert state["rows_done"] == 5
    with pytest.raises(DataError, match="world_size"):
        make(0, 1).load_state_dict(state)


def test_demo_pairs_are_read_by_the_preference_loader(tmp_path):
    import json

    from bitnet_train.data.demo_data import HELDOUT_PAIRS_FILE, REFUSALS, write_demo_pairs

    path = write_demo_pairs(tmp_path)
    train = [json.loads(x) for x in path.read_text().splitlines()]
    heldout = [json.loads(x) for x in (tmp_path / HELDOUT_PAIRS_FILE).read_text().splitlines()]
    assert len(train) > 1000 and len(heldout) > 100
    assert not {r["chosen"] for r in train} & {r["chosen"] for r in heldout}  # unseen names
    summaries = {r["chosen"] for r in train + heldout}
    kinds = {"refusal": 0, "shuffled": 0, "wrong": 0}
    for r in train + heldout:
        assert r["rejected"] != r["chosen"]
        if r["rejected"] in REFUSALS:
            kinds["refusal"] += 1
        elif sorted(r["rejected"].split()) == sorted(r["chosen"].split()):
            kinds["shuffled"] += 1
        else:
            assert r["rejected"] in summaries  # another name's correct summary
            kinds["wrong"] += 1
    n = len(train) + len(heldout)
    assert all(abs(v / n - 1 / 3) < 0.02 for v in kinds.values()), kinds  # equal shares
    text = [r["prompt"] + " " + r["chosen"] for r in train[:300]]
    tok = bpe_tokenizer(extra_text=text, vocab_size=800)
    for name, p in (("train", path), ("heldout", tmp_path / HELDOUT_PAIRS_FILE)):
        cfg = PreferenceDataConfig(sources=[ChatSourceConfig(name=name, path=str(p))],
                                   max_len=128, cache_dir=str(tmp_path / "cache"))
        ds = build_preference_dataset(cfg, tok)
        assert ds.stats[name].kept == ds.stats[name].seen == len(train if name == "train"
                                                                  else heldout)
