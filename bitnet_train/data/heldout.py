"""Held-out data carved from a stage's own sources before training, never trained on.

Pretraining (`carve_pretrain_heldout`): for each source of the run (stage 1 and stage 2,
by name), its first documents, framed and packed exactly as training packs them, until
`rows` rows of `seq_len` tokens are full. Those documents are then excluded from the training
stream by content (a set of 128-bit BLAKE2b digests of their text, which each source's
SourceReader checks as it reads), which holds whatever the sharding over ranks and workers, the
repetition of a source and a resume do to document positions; an identical copy of a held-out
document elsewhere in a source is excluded too, so nothing leaks. The leftover of the last
held-out document (beyond the last full row) is dropped, not trained on.

SFT and DPO carve their held-out conversations and pairs inside `encode_mixture` (sft.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from datasets import IterableDataset
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from bitnet_train.data.config import PretrainDataConfig, SourceConfig
from bitnet_train.data.packing import DocumentPacker, collate_rows, frame_document
from bitnet_train.data.sources import READ_ERRORS, open_source, read_error
from bitnet_train.errors import DataError


def document_key(text: str) -> bytes:
    """A 128-bit digest of a document's text (what exclusion compares)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


@dataclass
class PretrainHeldOut:
    """batches: source name -> one batch of its held-out rows (the keys of collate_rows, each
    (rows, seq_len)). exclude: source name -> digests of the documents those rows hold."""

    batches: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    exclude: dict[str, frozenset[bytes]] = field(default_factory=dict)

    def documents(self) -> dict[str, int]:
        return {name: len(keys) for name, keys in self.exclude.items()}


def run_sources(cfg: PretrainDataConfig) -> list[SourceConfig]:
    """Every source of the run, stage 1 then those stage 2 adds, once per name."""
    seen: dict[str, SourceConfig] = {}
    for mixture in (cfg.stage1, cfg.stage2):
        for src in mixture.sources if mixture is not None else []:
            seen.setdefault(src.name, src)
    return list(seen.values())


def carve_pretrain_heldout(cfg: PretrainDataConfig, tokenizer: PreTrainedTokenizerBase,
                           rows: int, tokenize_batch_size: int = 64) -> PretrainHeldOut:
    """The first `rows` packed rows of every source, and the documents to keep out of training
    (see module doc). Raises DataError when a source cannot fill them."""
    out = PretrainHeldOut()
    if rows <= 0:
        return out
    for src in run_sources(cfg):
        ds = open_source(src, streaming=cfg.streaming)
        packer = DocumentPacker(cfg.seq_len, cfg.document_masking)
        keys: set[bytes] = set()
        packed = []
        for batch in _text_batches(ds, src, tokenize_batch_size):
            texts = batch
            ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                            verbose=False)["input_ids"]
            for text, doc in zip(texts, ids):
                if not isinstance(text, str) or not doc:
                    continue  # training skips these too
                keys.add(document_key(text))
                packer.push(frame_document(doc, tokenizer.bos_token_id, tokenizer.eos_token_id))
                while len(packed) < rows and (row := packer.pop_row()) is not None:
                    packed.append(row)
                if len(packed) == rows:
                    break
            if len(packed) == rows:
                break
        if len(packed) < rows:
            raise DataError(
                f"data source {src.name!r} holds {len(keys)} documents, which fill only "
                f"{len(packed)} of the {rows} held-out rows of {cfg.seq_len} tokens "
                "(trainer.eval_size) and would leave nothing to train on; lower "
                "trainer.eval_size or add data"
            )
        out.batches[src.name] = collate_rows(packed)
        out.exclude[src.name] = frozenset(keys)
    return out


def _text_batches(ds: IterableDataset, src: SourceConfig, size: int):
    """The source's texts in file order, `size` at a time (read errors named as training names
    them)."""
    batches = ds.iter(batch_size=size)
    while True:
        try:
            yield next(batches)[src.text_field]
        except StopIteration:
            return
        except READ_ERRORS as err:
            raise read_error(src, err) from err
