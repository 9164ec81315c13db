"""Local corpora of numbered documents and helpers to read them back out of packed batches.

Every source is a directory of small jsonl files read through the production path (datasets'
json builder via `open_source`); documents read 'tag 0007: some words ...', so a decoded batch
says which source and which record each document came from.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from pathlib import Path

import torch

from bitnet_train.data.config import MixtureConfig, PretrainDataConfig, SourceConfig
from bitnet_train.data.tokenizer import train_demo_tokenizer

WORDS = ("the value of a list is returned when the function is called with an "
         "argument that names the file").split()


def demo_tokenizer(out: Path):
    """A 1024-token byte-level BPE with the LLaMA-3 specials, trained on pydoc topics."""
    from pydoc_data.topics import topics

    return train_demo_tokenizer((topics[k] for k in sorted(topics)), out, vocab_size=1024)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def numbered_docs(tag: str, n: int, seed: int = 0, words: tuple[int, int] = (5, 40)) -> list[str]:
    """Documents 'tag 0007: some words ...' of `words` (min, max) words."""
    rng = random.Random(seed)
    return [f"{tag} {i:04d}: " + " ".join(rng.choices(WORDS, k=rng.randint(*words)))
            for i in range(n)]


def make_source(tmp_path: Path, tag: str, n: int, files: int = 1,
                words: tuple[int, int] = (5, 40), **kw) -> SourceConfig:
    """Source `tag` of `n` numbered documents dealt round-robin into `files` jsonl files."""
    docs = numbered_docs(tag, n, seed=zlib.crc32(tag.encode()), words=words)
    for f in range(files):
        write_jsonl(tmp_path / tag / f"part-{f}.jsonl",
                    [{"text": t, "meta": i} for i, t in enumerate(docs) if i % files == f])
    return SourceConfig(name=tag, path=str(tmp_path / tag), **kw)


def data_config(*sources: SourceConfig, stage2: list[SourceConfig] | None = None,
                weighting: str = "documents", **kw) -> PretrainDataConfig:
    kw.setdefault("seq_len", 32)
    kw.setdefault("tokenize_batch_size", 5)
    second = None if stage2 is None else MixtureConfig(sources=stage2, weighting=weighting)
    return PretrainDataConfig(stage1=MixtureConfig(sources=list(sources), weighting=weighting),
                              stage2=second, **kw)


def decode_documents(batches: list[dict], tokenizer, mid_stream: bool = False) -> list[str]:
    """Texts of the framed documents in a stream of batches, in order (rows concatenated).
    A document still unfinished at the end is left out; with `mid_stream`, so is the rest of
    a document begun before the first batch."""
    stream = torch.cat([b["input_ids"].flatten() for b in batches]).tolist()
    if mid_stream:
        stream = stream[stream.index(tokenizer.bos_token_id):]
    docs, current = [], []
    for t in stream:
        if t == tokenizer.eos_token_id:
            assert current[0] == tokenizer.bos_token_id, "every document starts with BOS"
            docs.append(tokenizer.decode(current[1:], clean_up_tokenization_spaces=False))
            current = []
        else:
            current.append(t)
    return docs


def doc_numbers(texts: list[str]) -> list[str]:
    """'alpha 0007' of each decoded document."""
    return [re.match(r"(\w+ \d{4}):", t).group(1) for t in texts]


def by_source(numbers: list[str]) -> dict[str, list[str]]:
    """Document numbers grouped by their source tag, in order of appearance."""
    out: dict[str, list[str]] = {}
    for n in numbers:
        out.setdefault(n.split()[0], []).append(n)
    return out
