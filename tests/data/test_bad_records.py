"""Unreadable data names its file and line: a JSON line that does not parse, a text file that
is not UTF-8, a corrupt Parquet file; at start-up or deep in the stream, pretraining or SFT."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from bitnet_train.data.adapters import ChatSourceConfig, load_source
from bitnet_train.data.bad_records import find_bad_record
from bitnet_train.data.config import SourceConfig
from bitnet_train.data.pretrain import build_pretrain_stream
from bitnet_train.errors import DataError
from tests.data.pretrain_fixtures import data_config, demo_tokenizer, numbered_docs


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return demo_tokenizer(tmp_path_factory.mktemp("tok"))


def jsonl_lines(texts: list[str]) -> list[str]:
    return [json.dumps({"text": t}) for t in texts]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def read_until_error(stream, batches: int = 200) -> None:
    for _ in range(batches):
        next(stream)


def test_find_bad_record_by_hand(tmp_path):
    good = write_lines(tmp_path / "a.jsonl", ['{"text": "x"}', "", '{"text": "y"}'])
    bad = write_lines(tmp_path / "b.jsonl", ['{"text": "x"}', '{"text": "y"}', '{"text": "z"',
                                              '{"text": "w"}'])
    assert find_bad_record("json", [str(good)]) is None
    found = find_bad_record("json", [str(good), str(bad)])
    assert (found.file, found.line) == (str(bad), 3) and "not valid JSON" in found.reason
    # a JSON document (an array over several lines) is not a JSON-lines file, and is fine
    doc = tmp_path / "c.json"
    doc.write_text(json.dumps([{"text": "x"}, {"text": "y"}], indent=2))
    assert find_bad_record("json", [str(doc)]) is None
    # a JSON value that is not an object
    write_lines(tmp_path / "d.jsonl", ['{"text": "x"}', '"just a string"'])
    found = find_bad_record("json", [str(tmp_path / "d.jsonl")])
    assert found.line == 2 and "not an object" in found.reason
    # compressed files are read as datasets reads them
    gz = tmp_path / "e.jsonl.gz"
    gz.write_bytes(gzip.compress(bad.read_bytes()))
    assert find_bad_record("json", [str(gz)]).line == 3
    # text: the first byte that is not UTF-8, with its line
    txt = tmp_path / "f.txt"
    txt.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    found = find_bad_record("text", [str(txt)])
    assert found.line == 3 and "0xff" in found.reason and "offset 19" in found.reason
    (tmp_path / "g.parquet").write_bytes(b"not parquet")
    assert "Parquet" in find_bad_record("parquet", [str(tmp_path / "g.parquet")]).reason


def test_bad_json_line_deep_in_the_stream_names_file_and_line(tmp_path, tokenizer):
    # file 0 is fine; file 1 breaks at its 5th line, read only after many batches
    docs = numbered_docs("web", 80)
    write_lines(tmp_path / "web" / "part-0.jsonl", jsonl_lines(docs[:40]))
    lines = jsonl_lines(docs[40:])
    lines[4] = lines[4][:-1]  # drop the closing brace
    write_lines(tmp_path / "web" / "part-1.jsonl", lines)
    cfg = data_config(SourceConfig(name="web", path=str(tmp_path / "web")))
    stream = build_pretrain_stream(cfg, tokenizer, batch_size=2)
    with pytest.raises(DataError, match=r"'web': line 5 of \S*part-1\.jsonl: not valid JSON"):
        read_until_error(stream)


def test_bad_first_line_fails_at_start_up(tmp_path, tokenizer):
    write_lines(tmp_path / "web.jsonl", ["{not json}", *jsonl_lines(["a", "b"])])
    cfg = data_config(SourceConfig(name="web", path=str(tmp_path / "web.jsonl")))
    with pytest.raises(DataError, match=r"'web': line 1 of \S*web\.jsonl: not valid JSON"):
        build_pretrain_stream(cfg, tokenizer)


def test_non_utf8_file_in_a_text_source_is_named(tmp_path, tokenizer):
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text("\n\n".join(numbered_docs("book", 30)))
    (books / "b.txt").write_bytes(bytes(range(256)) * 8)  # a binary file
    cfg = data_config(SourceConfig(name="books", path=str(books), builder="text"))
    # bytes 0..255: the newline (byte 10) ends line 1; 0x80 is the first non-UTF-8 byte
    with pytest.raises(DataError, match=r"'books': line 2 of \S*b\.txt: byte 0x80 at offset 128"):
        stream = build_pretrain_stream(cfg, tokenizer, batch_size=2)
        read_until_error(stream)


def test_sft_json_line_error_names_file_and_line(tmp_path):
    lines = [json.dumps({"messages": [{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "hello"}]})] * 3
    lines[1] = lines[1].replace('"content": "hi"', '"content": hi')
    path = write_lines(tmp_path / "chat.jsonl", lines)
    with pytest.raises(DataError, match=r"'chat': line 2 of \S*chat\.jsonl: not valid JSON"):
        load_source(ChatSourceConfig(name="chat", path=str(path)), cache_dir=str(tmp_path / "c"))
