"""Tiny tokenizers with LLaMA-3's special tokens, built here (no hub), for the data tests."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from bitnet_train.data.chat import CHAT_TEMPLATE

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
# LLaMA-3's pre-tokenizer split (tiktoken pat_str), written out here independently.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# ids 0, 1, 2 are the specials; 3 is [UNK]; the words follow in this order (ids 4, 5, ...).
WORDS = ["System", "User", "Assistant", ":", "be", "brief", "hi", "hello", "what", "is", "two",
         "four", "."]


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0],
                                   eos_token=SPECIALS[1])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def word_tokenizer() -> PreTrainedTokenizerFast:
    """WordLevel over WORDS (split on `\\w+|[^\\w\\s]+`): ids are easy to write by hand."""
    vocab = {t: i for i, t in enumerate([*SPECIALS, "[UNK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return _wrap(tok)


CORPUS = [
    "System: You are a helpful assistant. User: Hello there! Assistant: Hello, how can I help?",
    "The quick brown fox jumps over the lazy dog; 1234 numbers and 56.7 percent.",
    "Return the square root of x. Serialize obj to a JSON formatted str.",
    "What does json.dumps do? It converts Python objects to text, e.g. lists and dicts.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u4e2d\u6587 emoji \U0001f600 tabs\tand\nnewlines\n\n",
]


def bpe_tokenizer(extra_text: list[str] | None = None, vocab_size: int = 600
                  ) -> PreTrainedTokenizerFast:
    """Byte-level BPE with LLaMA-3's split regex, trained on a few sentences."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20 + (extra_text or []), trainer)
    return _wrap(tok)


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)
