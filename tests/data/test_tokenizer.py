"""Tokenizers and the offline demo corpus."""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import pytest
from transformers import AutoTokenizer

from bitnet_train.data.corpus import write_python_docs_corpus
from bitnet_train.data.tokenizer import (
    find_llama3_tiktoken_model,
    llama3_special_tokens,
    llama3_tokenizer_from_tiktoken,
    load_tokenizer,
    train_demo_tokenizer,
)
from bitnet_train.errors import ConfigError

SAMPLES = [
    "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it?",
    "def greet(name: str) -> str:\n    return f\"Hello, {name}!\"  # comment\n\n\n",
    "naïve café, Ünïcödé, 日本語のテキスト, Привет мир, 🤖🚀 emoji, tabs\tand  spaces   ",
    "12345678901234567890 1e-10 0x1F ---=== ((()))",
    "\r\nWindows line endings\r\n and trailing newline\n",
]
# About 50 of the most frequent English words (function words), for an "is this English?" check.
COMMON_ENGLISH = set(
    "the of and to a in is that for it as with was on be by this are or not from at an "
    "which have but if can will all has its one they their there when more no so been do "
    "any other into than may".split()
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    start = time.perf_counter()
    paths = write_python_docs_corpus(out, num_shards=4)
    return paths, time.perf_counter() - start


@pytest.fixture(scope="module")
def corpus_texts(corpus):
    return [json.loads(line)["text"] for p in corpus[0] for line in p.open()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, corpus_texts):
    out = tmp_path_factory.mktemp("demo_tok")
    start = time.perf_counter()
    tok = train_demo_tokenizer(corpus_texts, out, vocab_size=4096)
    return tok, out, time.perf_counter() - start


# -- corpus -----------------------------------------------------------------------------------


def test_corpus_is_large_quick_and_english(corpus, corpus_texts):
    paths, seconds = corpus
    assert len(paths) == 4 and all(p.stat().st_size > 0 for p in paths)
    assert seconds < 30  # parses ~500 stdlib sources; a few seconds on a laptop core
    total = sum(len(t) for t in corpus_texts)
    assert total > 1_000_000
    records = [json.loads(line) for p in paths for line in p.open()]
    assert len({r["id"] for r in records}) == len(records)  # one document per topic/module/class
    words = re.findall(r"[a-z]+", " ".join(corpus_texts).lower())
    share = sum(c for w, c in Counter(words).items() if w in COMMON_ENGLISH) / len(words)
    assert share > 0.25, share  # English prose: ~40%; code or random text: far less


def test_corpus_is_deterministic(corpus, tmp_path):
    again = write_python_docs_corpus(tmp_path, num_shards=4)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in corpus[0]]


# -- demo tokenizer ---------------------------------------------------------------------------


def test_demo_tokenizer_trains_fast_and_round_trips(demo, corpus_texts):
    tok, _, seconds = demo
    assert seconds < 20  # about a second on 1.7 MB
    assert len(tok) == 4096
    for text in SAMPLES + corpus_texts[:50]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids, clean_up_tokenization_spaces=False) == text
    # BPE learnt something: far fewer tokens than bytes on English
    english = corpus_texts[0]
    assert len(tok(english)["input_ids"]) < len(english.encode()) / 3


def test_demo_tokenizer_special_tokens(demo):
    tok, _, _ = demo
    assert (tok.bos_token, tok.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.pad_token is not None and tok.pad_token_id not in (None, tok.bos_token_id)
    for special in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    ids = tok("Hello<|eot_id|>")["input_ids"]  # BOS prepended; specials not split
    assert ids[0] == 0 and ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>")


def test_demo_tokenizer_reloads_with_auto_tokenizer(demo):
    tok, out, _ = demo
    for again in (AutoTokenizer.from_pretrained(str(out)), load_tokenizer(str(out))):
        assert again.is_fast
        for text in SAMPLES:
            assert again(text)["input_ids"] == tok(text)["input_ids"]
        assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (
            tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def test_load_tokenizer_errors_name_the_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match="no-such-org/no-such-tokenizer.*local directory"):
        load_tokenizer("no-such-org/no-such-tokenizer")  # offline (tests/conftest.py)
    with pytest.raises(ConfigError, match="no such directory"):
        load_tokenizer(str(tmp_path / "missing"))


# -- LLaMA-3 (integration: Meta's tokenizer.model from the llama-models package) ---------------


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    meta = pytest.importorskip("llama_models.llama3.tokenizer")
    out = tmp_path_factory.mktemp("llama3")
    hf = llama3_tokenizer_from_tiktoken(find_llama3_tiktoken_model(), out)
    return hf, meta.Tokenizer.get_instance(), out


def test_llama3_conversion_matches_tiktoken(llama3):
    hf, meta, _ = llama3
    texts = SAMPLES + ["Special <|eot_id|> inside and <|begin_of_text|> too", " " * 40, "a" * 500]
    for text in texts:
        want = meta.encode(text, bos=False, eos=False, allowed_special="all")
        assert hf(text, add_special_tokens=False)["input_ids"] == want, text
        assert hf.decode(want) == text
    assert hf(SAMPLES[0])["input_ids"] == meta.encode(SAMPLES[0], bos=True, eos=False)


def test_llama3_special_tokens_sit_at_their_ids(llama3):
    hf, meta, out = llama3
    assert len(hf) == meta.n_words == 128256
    assert (hf.bos_token_id, hf.eos_token_id) == (meta.bos_id, meta.eos_id) == (128000, 128001)
    assert hf.convert_tokens_to_ids("<|eot_id|>") == meta.eot_id == 128009
    assert hf.pad_token_id == meta.pad_id
    names = llama3_special_tokens()
    assert [hf.convert_tokens_to_ids(n) for n in names] == [meta.special_tokens[n] for n in names]
    reloaded = AutoTokenizer.from_pretrained(str(out))
    assert reloaded(SAMPLES[1])["input_ids"] == hf(SAMPLES[1])["input_ids"]
    assert reloaded.eos_token_id == 128001
