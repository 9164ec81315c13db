"""Tokenizers: load any transformers fast tokenizer, train a small demo one, build LLaMA-3's.

BitNet b1.58 2B4T uses LLaMA-3's byte-level BPE (vocabulary 128,256: 128,000 BPE ranks, then
256 special tokens from id 128000). Every tokenizer here is a transformers fast tokenizer saved
as `tokenizer.json` + `tokenizer_config.json`, so `AutoTokenizer.from_pretrained(dir)` loads it
like one from the Hub, and a checkpoint carries its tokenizer.

- `load_tokenizer`: a local directory or a Hub id (errors say what to do when offline).
- `train_demo_tokenizer`: a byte-level BPE with LLaMA-3's pre-tokenizer and chat specials,
  trained in about a second, for CPU demos and tests.
- `llama3_tokenizer_from_tiktoken`: LLaMA-3's real tokenizer from Meta's tiktoken ranks file
  (shipped in the `llama-models` package), ids equal to tiktoken's.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bitnet_train.errors import ConfigError, DataError

log = logging.getLogger(__name__)

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""LLaMA-3's pre-tokenizer split (tiktoken `pat_str`): contractions, letter runs with one
leading non-letter, numbers of at most 3 digits, punctuation runs, newlines, spaces."""

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
CHAT_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

LLAMA3_NUM_BASE_TOKENS = 128000
LLAMA3_NUM_SPECIAL_TOKENS = 256
LLAMA3_NAMED_SPECIALS = (
    BOS, EOS, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>", PAD,
    "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
    "<|python_tag|>", "<|image|>",
)
"""The named specials at ids 128000.. (llama_models.llama3.tokenizer, LLaMA 3.1+ names);
the remaining ids up to 128255 are `<|reserved_special_token_{2..}|>`."""


def llama3_special_tokens() -> list[str]:
    """The 256 LLaMA-3 special tokens in id order (index i has id 128000 + i)."""
    named = list(LLAMA3_NAMED_SPECIALS)
    reserved = [f"<|reserved_special_token_{2 + i}|>"
                for i in range(LLAMA3_NUM_SPECIAL_TOKENS - len(named))]
    return named + reserved


# -- loading ---------------------------------------------------------------------------------


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists()


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a local directory (save_pretrained layout) or a Hub id.

    A tokenizer without a pad token gets `<|finetune_right_pad_id|>` when it has one, else its
    EOS (batch padding only; pad positions carry no loss).
    """
    name = str(name_or_path)
    if _looks_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ConfigError(
                f"tokenizer {name!r}: no such directory; give a directory written by "
                "save_pretrained (tokenizer.json, tokenizer_config.json) or a Hub id"
            )
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as err:
            raise DataError(f"tokenizer directory {str(path)!r} cannot be loaded: {err}") from err
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except Exception as err:
            raise ConfigError(
                f"tokenizer {name!r} could not be loaded from the Hugging Face Hub "
                f"({type(err).__name__}: {err}). Offline, download it elsewhere "
                f"(`hf download {name}`) and set `tokenizer` to the local directory; for a CPU "
                "demo use a directory written by train_demo_tokenizer"
            ) from err
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"tokenizer {name!r} is not a fast (Rust) tokenizer; convert it first")
    if tok.pad_token is None:
        tok.pad_token = PAD if PAD in tok.get_vocab() else tok.eos_token
        log.info("tokenizer %s has no pad token; padding with %s", name, tok.pad_token)
    return tok


# -- saving ----------------------------------------------------------------------------------

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
"""The class name every transformers release resolves to a generic fast tokenizer over
tokenizer.json (the released 2B4T names it too). transformers 5 writes `TokenizersBackend`,
its new name for that class, which 4.x cannot resolve ("Tokenizer class TokenizersBackend does
not exist"); 5.x loads `PreTrainedTokenizerFast` as a TokenizersBackend."""
VERSION_SPECIFIC_CLASSES = ("TokenizersBackend",)


def save_tokenizer(tokenizer: Any, directory: str | Path) -> None:
    """`tokenizer.save_pretrained(directory)`, with a `tokenizer_config.json` that transformers
    4.x and 5.x both load: a version-specific generic class name becomes
    `PreTrainedTokenizerFast`. Model-specific names (`LlamaTokenizer`, ...) are left alone: each
    version resolves them to its fast class."""
    tokenizer.save_pretrained(str(directory))
    file = Path(directory) / TOKENIZER_CONFIG_FILE
    if not file.is_file():
        return
    config = json.loads(file.read_text())
    if config.get("tokenizer_class") in VERSION_SPECIFIC_CLASSES:
        config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
        file.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _wrap(tok: Tokenizer, specials: dict[str, str]) -> PreTrainedTokenizerFast:
    """Prepend BOS on `add_special_tokens=True` (LLaMA-3's TemplateProcessing), wrap for HF."""
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
            special_tokens=[(BOS, bos_id)],
        ),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def _byte_level_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


# -- demo tokenizer --------------------------------------------------------------------------


def train_demo_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 4096
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`, save it to `out_dir`, and return it.

    LLaMA-3's pre-tokenizer and byte-level alphabet (any text encodes, nothing is unknown),
    and the specials BOS=<|begin_of_text|> (id 0), EOS=<|end_of_text|> (1), the chat headers,
    <|eot_id|> and a pad token <|finetune_right_pad_id|>, all at the lowest ids. About a second
    on 2 MB of text.
    """
    specials = [BOS, EOS, *CHAT_SPECIALS, PAD]
    if vocab_size < 256 + len(specials):
        raise ConfigError(f"vocab_size={vocab_size} must cover the 256 bytes and the specials")
    tok = Tokenizer(models.BPE(fuse_unk=False))
    tok.pre_tokenizer = _byte_level_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    hf = _wrap(tok, {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD})
    save_tokenizer(hf, out_dir)
    return hf


# -- LLaMA-3 from tiktoken -------------------------------------------------------------------


def find_llama3_tiktoken_model() -> Path:
    """Path of `llama_models/llama3/tokenizer.model` in the installed `llama-models` package."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the llama-models package is not installed; `pip install --no-deps llama-models` "
            "ships LLaMA-3's tokenizer.model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed llama-models package")
    return path


def read_tiktoken_ranks(model_path: str | Path) -> dict[bytes, int]:
    """A tiktoken ranks file ("<base64 token> <rank>" per line) as {token bytes: rank}."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(Path(model_path).read_text().splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as err:
            raise DataError(f"{model_path}:{lineno}: not a tiktoken rank line: {line!r}") from err
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError(f"{model_path}: ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


def llama3_tokenizer_from_tiktoken(
    model_path: str | Path, out_dir: str | Path
) -> PreTrainedTokenizerFast:
    """Convert Meta's LLaMA-3 tiktoken file into a transformers tokenizer saved in `out_dir`.

    BPE ranks become ids 0..127999 (merges ordered by rank, `ignore_merges` as tiktoken:
    a pre-token that is itself a vocabulary entry is one token), then the 256 specials at
    128000..128255 (<|begin_of_text|> 128000, <|end_of_text|> 128001, <|eot_id|> 128009);
    vocabulary 128,256. BOS is prepended when `add_special_tokens=True`, as in Meta's release.
    """
    # Imported here: the converter module pulls in sentencepiece/protobuf helpers.
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = read_tiktoken_ranks(model_path)
    if len(ranks) != LLAMA3_NUM_BASE_TOKENS:
        raise DataError(
            f"{model_path} has {len(ranks)} BPE ranks; LLaMA-3's has {LLAMA3_NUM_BASE_TOKENS}"
        )
    specials = llama3_special_tokens()
    class RanksConverter(TikTokenConverter):
        # Hand over the ranks read above: tiktoken's own loader would copy the file into a
        # cache under /tmp (data-gym-cache) as a side effect.
        def load_tiktoken_bpe(self, tiktoken_url: str) -> dict[bytes, int]:
            return ranks

    tok = RanksConverter(vocab_file=str(model_path), pattern=LLAMA3_PATTERN).converted()
    # Added one by one in id order, so the k-th special gets id 128000 + k.
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    for i, s in enumerate(specials):
        if tok.token_to_id(s) != LLAMA3_NUM_BASE_TOKENS + i:
            raise DataError(f"special token {s} landed at id {tok.token_to_id(s)}, "
                            f"expected {LLAMA3_NUM_BASE_TOKENS + i}")
    hf = _wrap(tok, {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD})
    save_tokenizer(hf, out_dir)
    return hf
