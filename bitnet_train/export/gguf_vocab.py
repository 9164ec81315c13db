"""The tokenizer inside a GGUF file: byte-level BPE ("gpt2" model) both ways.

llama.cpp and bitnet.cpp read a byte-level BPE vocabulary as ``tokenizer.ggml.model = "gpt2"``
with the token strings, their types, the merges (a non-empty list is required) and a
pre-tokenizer name. The names follow llama.cpp's converter: ``llama-bpe`` for LLaMA-3's
tokenizer (the 2B4T one), ``gpt-2`` for a plain byte-level BPE with GPT-2's split regex
(what `tokenizers`' ``ByteLevel(use_regex=True)`` does), ``default`` otherwise (llama.cpp then
splits text with its default regex; token ids passed directly are unaffected).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from gguf import GGUFWriter, TokenType

from bitnet_train.data.tokenizer import LLAMA3_PATTERN
from bitnet_train.errors import ExportError

logger = logging.getLogger(__name__)

# LLaMA-3's pre-tokenizer split pattern: what llama.cpp's ``llama-bpe`` implements.
LLAMA3_SPLIT = LLAMA3_PATTERN
_PAD_TOKEN = re.compile(r"\[PAD\d+\]")


@dataclass
class GGUFVocab:
    """Everything the engines read about the tokenizer. Lists are indexed by token id."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None


def vocab_from_tokenizer(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """Read a transformers fast tokenizer (byte-level BPE) into a GGUFVocab of `vocab_size` rows.

    Ids the tokenizer does not use (the model's vocab may be padded) become ``[PAD<id>]``
    USER_DEFINED entries, as llama.cpp's converter writes them.
    """
    if tokenizer is None:
        raise ExportError("GGUF export needs the model's tokenizer: the engines read it from "
                          "the file")
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or not model.get("merges"):
        raise ExportError(
            "GGUF export supports byte-level BPE tokenizers with merges (tokenizer.ggml.model "
            f"'gpt2'); this tokenizer's model is {model.get('type')!r} with "
            f"{len(model.get('merges') or [])} merges"
        )
    if (backend.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError("GGUF export needs a byte-level BPE tokenizer (decoder ByteLevel)")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is "
            f"{vocab_size}: the embedding has no row for them"
        )
    by_id = {i: tok for tok, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m)
              for m in model["merges"]]

    def token_id(token: str | None) -> int | None:
        return vocab.get(token) if token is not None else None

    bos_id = token_id(tokenizer.bos_token)
    probe = tokenizer("a")["input_ids"]
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: keep the default one
        template = template.get("default")
    return GGUFVocab(
        tokens=tokens,
        token_types=[int(t) for t in types],
        merges=merges,
        pre=_pre_tokenizer_name(vocab, backend),
        bos_id=bos_id,
        eos_id=token_id(tokenizer.eos_token),
        eot_id=vocab.get("<|eot_id|>"),
        pad_id=token_id(tokenizer.pad_token),
        add_bos=bos_id is not None and probe[:1] == [bos_id],
        chat_template=template,
    )


def _splits_like_llama3(pre: dict[str, Any]) -> bool:
    """A Sequence of LLaMA-3's Split regex then a regex-free ByteLevel (LLaMA-3's own layout)."""
    steps = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or len(steps) != 2:
        return False
    split, byte_level = steps
    pattern = (split.get("pattern") or {}).get("Regex")
    return (split.get("type") == "Split" and pattern == LLAMA3_SPLIT
            and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True))


def _pre_tokenizer_name(vocab: dict[str, int], backend: dict[str, Any]) -> str:
    if len(vocab) == 128256 and "<|begin_of_text|>" in vocab:
        return "llama-bpe"
    pre = backend.get("pre_tokenizer") or {}
    if _splits_like_llama3(pre):  # e.g. a small BPE trained with LLaMA-3's pre-tokenizer
        return "llama-bpe"
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get(
        "add_prefix_space", False
    ):
        return "gpt-2"
    logger.warning(
        "tokenizer pre-tokenizer %s is not LLaMA-3's nor GPT-2's: writing 'default'; llama.cpp "
        "may split raw text differently (token ids passed directly are unaffected)",
        pre.get("type"),
    )
    return "default"


def write_vocab(writer: GGUFWriter, vocab: GGUFVocab) -> None:
    """Add the tokenizer keys (tokenizer.ggml.*, tokenizer.chat_template) to `writer`."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for key, value in (("bos", vocab.bos_id), ("eos", vocab.eos_id), ("eot", vocab.eot_id),
                       ("pad", vocab.pad_id)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def read_vocab(fields: dict[str, Any]) -> GGUFVocab | None:
    """GGUFVocab from a GGUFReader's fields, or None if the file has no gpt2 tokenizer."""

    def get(key: str) -> Any:
        field = fields.get(key)
        return field.contents() if field is not None else None

    if get("tokenizer.ggml.model") != "gpt2" or not get("tokenizer.ggml.merges"):
        return None
    return GGUFVocab(
        tokens=get("tokenizer.ggml.tokens"),
        token_types=[int(t) for t in get("tokenizer.ggml.token_type")],
        merges=get("tokenizer.ggml.merges"),
        pre=get("tokenizer.ggml.pre") or "default",
        bos_id=get("tokenizer.ggml.bos_token_id"),
        eos_id=get("tokenizer.ggml.eos_token_id"),
        eot_id=get("tokenizer.ggml.eot_token_id"),
        pad_id=get("tokenizer.ggml.padding_token_id"),
        add_bos=bool(get("tokenizer.ggml.add_bos_token")),
        chat_template=get("tokenizer.chat_template"),
    )


def tokenizer_from_vocab(vocab: GGUFVocab) -> Any:
    """Rebuild a transformers PreTrainedTokenizerFast from a GGUFVocab (inverse of the export)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AddedToken, PreTrainedTokenizerFast

    ids = {tok: i for i, tok in enumerate(vocab.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    llama3 = vocab.pre == "llama-bpe"
    tok = Tokenizer(models.BPE(vocab=ids, merges=merges, ignore_merges=llama3))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not llama3)
    if llama3:
        split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    pairs = list(zip(vocab.tokens, vocab.token_types))
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in pairs if k == TokenType.CONTROL]
    )
    tok.add_tokens([  # user-defined added tokens, but not the [PAD<id>] fillers of the export
        AddedToken(t, normalized=False) for t, k in pairs
        if k == TokenType.USER_DEFINED and not _PAD_TOKEN.fullmatch(t)
    ])

    def name(i: int | None) -> str | None:
        return vocab.tokens[i] if i is not None else None

    bos = name(vocab.bos_id)
    if vocab.add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab.bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=name(vocab.eos_id),
        pad_token=name(vocab.pad_id),
        chat_template=vocab.chat_template,
    )
