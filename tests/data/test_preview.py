"""`bitnet-train data-preview`: token shares, document lengths, splitting counts and decoded
rows of a stage's first packed rows, from local files through the training stream."""

from __future__ import annotations

import re
import sys
import zlib

import pytest

from bitnet_train.data.preview import decode_row, preview_stage
from tests.data.pretrain_fixtures import data_config, demo_tokenizer, make_source, numbered_docs


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return demo_tokenizer(tmp_path_factory.mktemp("tok"))


def test_preview_counts_match_the_rows(tmp_path, tokenizer):
    short = make_source(tmp_path, "short", 200, words=(3, 6), weight=1.0)
    long = make_source(tmp_path, "long", 40, words=(60, 90), weight=1.0)
    cfg = data_config(short, long, stage2=[long], seq_len=48, seed=2)
    p = preview_stage(cfg, tokenizer, stage=1, rows=40)
    assert len(p.rows) == 40 and p.tokens == 40 * 48
    # token share from the rows, decoded here: each document from its BOS to the next
    ids = [t for row in p.rows for t in row.input_ids.tolist()]
    starts = [i for i, t in enumerate(ids) if t == tokenizer.bos_token_id] + [len(ids)]
    counted = {"short": 0, "long": 0}
    for a, b in zip(starts[:-1], starts[1:]):
        tag = re.match(r"(short|long) ", tokenizer.decode(ids[a + 1:b])).group(1)
        counted[tag] += b - a
    assert p.row_tokens == counted and sum(p.token_share().values()) == pytest.approx(1.0)
    # document lengths: the framed token counts of the documents' own texts
    long_texts = numbered_docs("long", 40, seed=zlib.crc32(b"long"), words=(60, 90))
    long_lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 2
                    for t in long_texts]
    assert set(p.doc_lengths["long"]) <= set(long_lengths)
    assert p.long_documents == sum(n > 48 for n in p.doc_lengths["long"]) > 0
    assert p.continued_pieces >= p.long_documents - 1  # each long document continues a row
    # stage 2 previews its own mixture
    assert set(preview_stage(cfg, tokenizer, stage=2, rows=5).row_tokens) == {"long"}


def test_decode_row_marks_document_boundaries_and_sources(tmp_path, tokenizer):
    src = make_source(tmp_path, "alpha", 30, words=(3, 30))
    p = preview_stage(data_config(src, seq_len=40), tokenizer, stage=1, rows=6)
    shown = [decode_row(row, tokenizer) for row in p.rows]
    assert shown[0].startswith("[doc alpha]alpha 0000:")
    joined = " ".join(shown)
    assert joined.count("[doc alpha]") == sum(row.input_ids.tolist().count(
        tokenizer.bos_token_id) for row in p.rows)
    assert joined.count("[/doc]") == sum(row.input_ids.tolist().count(tokenizer.eos_token_id)
                                         for row in p.rows)
    # a row that starts inside a document says so
    continued = [s for s in shown if s.startswith("[.. alpha]")]
    assert len(continued) == sum(row.input_ids[0] != tokenizer.bos_token_id for row in p.rows)


def test_data_preview_command(tmp_path, tokenizer, capsys, monkeypatch):
    from bitnet_train.cli import train_main

    src = make_source(tmp_path, "alpha", 30)
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    monkeypatch.setattr(sys, "argv", [
        "bitnet-train", "data-preview", "+recipe=demo_pretrain", f"tokenizer={tmp_path / 'tok'}",
        f"data.stage1.sources.0.path={src.path}", "data.stage1.sources.0.name=alpha",
        "data.seq_len=64", "data.shuffle_buffer=0", "--rows", "12", "--show", "1"])
    with pytest.raises(SystemExit) as done:
        train_main()
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "stage 1: 12 rows x 64 tokens = 768 tokens" in out
    assert re.search(r"alpha\s+1\.000\s+1\.000", out)  # weight and realised share
    assert "padding tokens: 0" in out and "-- row 0 --\n[doc alpha]alpha 0000:" in out
