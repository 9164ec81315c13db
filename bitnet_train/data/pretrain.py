"""The pretraining stream: mixture -> rank shard -> tokenize -> (shuffle) -> pack -> batches.

One `PretrainStream` per data-parallel rank yields, forever, batches of `batch_size` packed
rows (keys of packing.collate_rows, each (batch_size, seq_len)). The trainer is step-based, so
the stream never ends: every source repeats on its own once exhausted.

Pipeline, for stage s of the config:
1. each source of `cfg.mixture(s)` is opened (`sources.open_source`, Hub or local alike),
   reduced to {text, source index} and repeated forever (`IterableDataset.repeat(None)`);
2. `datasets.interleave_datasets(probabilities=normalised weights, seed)` draws each next
   document from source i with probability p_i. Because every source is infinite, the
   stopping strategy never triggers: the draw keeps the configured proportions at every step,
   with no end-of-data skew ("all_exhausted" would oversample the short sources by restarting
   them, then stop; "first_exhausted" would stop at the first end). The seed is the same on
   every rank (derived from data.seed and the stage);
3. `datasets.distributed.split_dataset_by_node(rank, world_size)` keeps this rank's part:
   whole files when their number is a multiple of world_size (then each rank cycles over its
   own files), otherwise every world_size-th document of the common stream (each rank then
   reads, but does not tokenize, every document: give large sources a multiple of the world
   size in files). Within a pass over the data, ranks are disjoint and together read every
   document;
4. documents are tokenized here, `tokenize_batch_size` at a time, after the rank split (a
   `.map` inside the `datasets` pipeline would run before it, since datasets applies the
   split last, and every rank would tokenize every rank's documents); then framed
   [BOS] doc [EOS];
5. optionally a shuffle buffer of tokenized documents (seeded per rank);
6. packing.DocumentPacker cuts rows; `batch_size` rows make a batch.

Resume is exact: `state_dict()` (taken between batches) holds the `datasets` state at the
start of the current tokenization batch and how many of its documents were used, the shuffle
buffer's documents and RNG, and the packer's leftover tokens. A fresh stream given that state
yields exactly the batches the original would have yielded next. The state is per rank: save
each rank's.

Stage 2: build a new stream with `stage=2` at the stage boundary; it reads `cfg.stage2` (or
stage 1's mixture when stage2 is None) under a different seed.

Held-out documents (`exclude`, from data.heldout.carve_pretrain_heldout): each source drops
them by content before it repeats, so no pass over the data ever trains on them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Mapping
from typing import Any

import datasets
import numpy as np
import torch
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from bitnet_train.data.config import MixtureConfig, PretrainDataConfig
from bitnet_train.data.heldout import exclude_documents, excluded_for
from bitnet_train.data.packing import DocumentPacker, collate_rows, frame_document
from bitnet_train.data.sources import normalize_source, open_source
from bitnet_train.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger(__name__)

STATE_FORMAT = 1


def derive_seed(*parts: int) -> int:
    """A 32-bit seed mixed from integers (data seed, stage, rank, ...) by NumPy's SeedSequence."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def build_mixture(
    mixture: MixtureConfig,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    streaming: bool = True,
    exclude: Mapping[str, frozenset[bytes]] | None = None,
) -> IterableDataset:
    """The infinite, rank-sharded stream of {text, source} records of `mixture`, without the
    documents `exclude` names (source name -> text digests, see data.heldout)."""
    parts = []
    for index, (src, keys) in enumerate(zip(mixture.sources,
                                            excluded_for(mixture.sources, exclude))):
        ds = normalize_source(open_source(src, streaming=streaming), src, index)
        parts.append(exclude_documents(ds, keys).repeat(None))
    if len(parts) == 1:
        mixed = parts[0]
    else:
        mixed = datasets.interleave_datasets(
            parts, probabilities=mixture.probabilities(), seed=seed,
            stopping_strategy="first_exhausted",  # never reached: every part repeats forever
        )
    if world_size > 1:
        mixed = split_dataset_by_node(mixed, rank=rank, world_size=world_size)
    if rank == 0:
        log.info("mixture: %s; rank shard %d/%d", ", ".join(
            f"{s.name} p={p:.3f}" for s, p in zip(mixture.sources, mixture.probabilities())),
            rank, world_size)
    return mixed


class _DocumentReader:
    """Tokenized documents of a `datasets` stream, read `batch_size` texts at a time.

    Resumable at any document: the state is the dataset's state at the start of the current
    text batch plus the number of its documents already handed out; resuming re-reads and
    re-tokenizes that batch and skips them (as `datasets` does for batched maps).
    """

    def __init__(self, dataset: IterableDataset, tokenizer: PreTrainedTokenizerBase,
                 batch_size: int, source_names: list[str]) -> None:
        self._dataset = dataset
        self._tokenizer = tokenizer
        self._batch_size = batch_size
        self._source_names = source_names
        self._batches: Iterator[dict[str, list]] | None = None
        self._start_state: dict | None = None  # dataset state where this iteration starts
        self._chunk_state: dict | None = None  # dataset state where the current chunk starts
        self._chunk: list[tuple[list[int], int]] = []
        self._pos = 0
        self._skip = 0

    def next_document(self) -> tuple[list[int], int]:
        """(token ids without specials, source index) of the next document."""
        while self._pos >= len(self._chunk):
            self._read_chunk()
        doc = self._chunk[self._pos]
        self._pos += 1
        return doc

    def _read_chunk(self) -> None:
        if self._batches is None:
            self._batches = self._dataset.iter(batch_size=self._batch_size)
            chunk_state = self._start_state
        else:
            chunk_state = self._dataset.state_dict()
        try:
            batch = next(self._batches)
        except StopIteration:
            raise DataError(f"the mixture of {self._source_names} ended; its sources should "
                            "repeat forever (is one of them empty?)") from None
        texts, sources = batch["text"], batch["source"]
        for text, source in zip(texts, sources):
            if not isinstance(text, str):
                raise DataError(
                    f"data source {self._source_names[source]!r}: a record's text is "
                    f"{text!r} ({type(text).__name__}), not a string; clean the source or "
                    "filter such records out"
                )
        ids = self._tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                              verbose=False)["input_ids"]
        self._chunk = list(zip(ids, sources))
        self._chunk_state = chunk_state
        # After a resume, skip the documents already used; the skip may span chunks when
        # tokenize_batch_size changed in between.
        self._pos = min(self._skip, len(self._chunk))
        self._skip -= self._pos

    def state_dict(self) -> dict[str, Any]:
        if self._batches is None:  # nothing read since start or load
            return {"dataset": self._start_state, "consumed": self._skip}
        return {"dataset": self._chunk_state, "consumed": self._pos + self._skip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["dataset"] is not None:
            self._dataset.load_state_dict(state["dataset"])
        self._start_state = state["dataset"]
        self._skip = int(state["consumed"])
        self._batches, self._chunk, self._pos = None, [], 0


class _ShuffleBuffer:
    """Holds `size` documents; each new one replaces a uniformly drawn one, which comes out."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self._items: list[tuple[list[int], int]] = []
        self._rng = random.Random(seed)

    def swap(self, item: tuple[list[int], int]) -> tuple[list[int], int] | None:
        """Insert `item`; return a random held document, or None while filling."""
        if len(self._items) < self.size:
            self._items.append(item)
            return None
        i = self._rng.randrange(self.size)
        out, self._items[i] = self._items[i], item
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"items": [(list(ids), src) for ids, src in self._items],
                "rng": self._rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._items = [(list(ids), int(src)) for ids, src in state["items"]]
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))


class PretrainStream:
    """Infinite iterator of packed pretraining batches for one rank (see module docstring).

    Each batch: input_ids, labels, attention_mask, position_ids, document_ids, all int64 of
    shape (batch_size, cfg.seq_len). Sources are opened (and checked) at construction.
    """

    def __init__(
        self,
        cfg: PretrainDataConfig,
        tokenizer: PreTrainedTokenizerBase,
        *,
        stage: int = 1,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        exclude: Mapping[str, frozenset[bytes]] | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} must lie in [0, world_size={world_size})")
        if batch_size <= 0:
            raise ConfigError(f"batch_size={batch_size} must be positive")
        if tokenizer.eos_token_id is None:
            raise ConfigError(
                f"tokenizer {tokenizer.name_or_path!r} has no EOS token; pretraining ends every "
                "document with one"
            )
        self.cfg, self.stage, self.rank, self.world_size = cfg, stage, rank, world_size
        self.batch_size = batch_size
        self.mixture = cfg.mixture(stage)
        self.source_names = [s.name for s in self.mixture.sources]
        self._excluded = {name: len(keys) for name, keys in (exclude or {}).items()
                          if keys and name in self.source_names}
        self._bos_id = tokenizer.bos_token_id
        self._eos_id = tokenizer.eos_token_id
        dataset = build_mixture(self.mixture, seed=derive_seed(cfg.seed, stage), rank=rank,
                                world_size=world_size, streaming=cfg.streaming, exclude=exclude)
        self._reader = _DocumentReader(dataset, tokenizer, cfg.tokenize_batch_size,
                                       self.source_names)
        self._shuffle = (_ShuffleBuffer(cfg.shuffle_buffer, derive_seed(cfg.seed, stage, rank))
                         if cfg.shuffle_buffer > 0 else None)
        self._packer = DocumentPacker(cfg.seq_len, cfg.document_masking)
        self._source_tokens = [0] * len(self.source_names)
        self.batches_yielded = 0

    def __iter__(self) -> PretrainStream:
        return self

    def __next__(self) -> dict[str, Tensor]:
        rows = []
        while len(rows) < self.batch_size:
            row = self._packer.pop_row()
            if row is None:
                self._packer.push(self._next_document())
            else:
                rows.append(row)
        self.batches_yielded += 1
        return collate_rows(rows)

    def _next_document(self) -> list[int]:
        while True:
            doc = self._reader.next_document()
            if self._shuffle is not None:
                doc = self._shuffle.swap(doc)
                if doc is None:
                    continue
            ids, source = doc
            if ids:  # an empty text has no token to learn from
                self._source_tokens[source] += len(ids)
                return frame_document(ids, self._bos_id, self._eos_id)

    def source_token_counts(self) -> dict[str, int]:
        """Tokens (without specials) of each source packed so far by this rank, since step 0."""
        return dict(zip(self.source_names, self._source_tokens))

    # -- resume --------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        identity = {"stage": self.stage, "rank": self.rank, "world_size": self.world_size,
                    "seq_len": self.cfg.seq_len, "sources": self.source_names,
                    "shuffle_buffer": self.cfg.shuffle_buffer}
        if self._excluded:  # held-out documents per source (absent: none, as before)
            identity["heldout_documents"] = self._excluded
        return identity

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly after the last batch yielded."""
        return {
            "format": STATE_FORMAT,
            **self._identity(),
            "batches_yielded": self.batches_yielded,
            "reader": self._reader.state_dict(),
            "shuffle": None if self._shuffle is None else self._shuffle.state_dict(),
            "packer": self._packer.state_dict(),
            "source_tokens": list(self._source_tokens),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from `state_dict` of a stream built with the same config)."""
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"data state format {state.get('format')!r} is not "
                                  f"{STATE_FORMAT}; it was written by another version")
        mine = self._identity()
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            diff = {k: (theirs[k], mine[k]) for k in mine if theirs[k] != mine[k]}
            raise CheckpointError(
                f"the checkpoint's data state does not match this stream: {diff} as "
                "(checkpoint, now). Resume with the same data config, stage, ranks and "
                "world size, or start the data from scratch"
            )
        self._reader.load_state_dict(state["reader"])
        if self._shuffle is not None:
            self._shuffle.load_state_dict(state["shuffle"])
        self._packer.load_state_dict(state["packer"])
        self._source_tokens = list(state["source_tokens"])
        self.batches_yielded = int(state["batches_yielded"])


class _WorkerStreams(torch.utils.data.IterableDataset):
    """The dataset handed to DataLoader workers: worker w of W builds, in its own process, the
    PretrainStream of shard `rank * W + w` of `world_size * W` (disjoint from every other
    worker's and rank's). The stream is the iterator, and Stateful, so torchdata's
    StatefulDataLoader snapshots and restores each worker's state with the batches."""

    def __init__(self, cfg: PretrainDataConfig, tokenizer: PreTrainedTokenizerBase,
                 stage: int, rank: int, world_size: int, batch_size: int,
                 exclude: Mapping[str, frozenset[bytes]] | None = None) -> None:
        self.args = (cfg, tokenizer)
        self.kwargs = dict(stage=stage, rank=rank, world_size=world_size, batch_size=batch_size,
                           exclude=exclude)

    def __iter__(self) -> PretrainStream:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        kw = dict(self.kwargs)
        kw["rank"] = kw["rank"] * workers + worker
        kw["world_size"] = kw["world_size"] * workers
        return PretrainStream(*self.args, **kw)


class LoaderStream:
    """PretrainStream batches produced by `num_workers` processes (torchdata's
    StatefulDataLoader), taken round-robin from the workers; same iterator and
    state_dict / load_state_dict interface as PretrainStream."""

    def __init__(self, cfg: PretrainDataConfig, tokenizer: PreTrainedTokenizerBase, *,
                 stage: int, rank: int, world_size: int, batch_size: int,
                 exclude: Mapping[str, frozenset[bytes]] | None = None) -> None:
        try:
            from torchdata.stateful_dataloader import StatefulDataLoader
        except ImportError as err:
            raise ConfigError(
                f"data.num_workers={cfg.num_workers} needs torchdata's StatefulDataLoader "
                "(`pip install torchdata`), or set data.num_workers=0"
            ) from err
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} must lie in [0, world_size={world_size})")
        dataset = _WorkerStreams(cfg, tokenizer, stage, rank, world_size, batch_size, exclude)
        # batch_size=None: every item already is a batch (a dict of tensors).
        self._loader = StatefulDataLoader(dataset, batch_size=None, num_workers=cfg.num_workers)
        self._batches: Iterator[dict[str, Tensor]] | None = None

    def __iter__(self) -> LoaderStream:
        return self

    def __next__(self) -> dict[str, Tensor]:
        if self._batches is None:
            self._batches = iter(self._loader)
        return next(self._batches)

    def state_dict(self) -> dict[str, Any]:
        return self._loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loader.load_state_dict(state)
        self._batches = None


def build_pretrain_stream(
    cfg: PretrainDataConfig,
    tokenizer: PreTrainedTokenizerBase,
    stage: int = 1,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 1,
    exclude: Mapping[str, frozenset[bytes]] | None = None,
) -> PretrainStream | LoaderStream:
    """The infinite batch stream of `stage` (1 or 2) for data-parallel `rank` of `world_size`.

    Each batch: input_ids, labels, attention_mask, position_ids, document_ids, int64 of shape
    (batch_size, cfg.seq_len). num_workers = 0: a PretrainStream in this process; > 0: a
    LoaderStream (needs torchdata). Both are iterators with state_dict / load_state_dict.
    `exclude`: held-out documents per source name, never yielded (data.heldout).
    """
    kw = dict(stage=stage, rank=rank, world_size=world_size, batch_size=batch_size,
              exclude=exclude)
    if cfg.num_workers > 0:
        return LoaderStream(cfg, tokenizer, **kw)
    return PretrainStream(cfg, tokenizer, **kw)
