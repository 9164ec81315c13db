"""The pretraining stream: sources -> mixture draw -> (shuffle) -> pack -> batches.

One `PretrainStream` per data-parallel rank (or per DataLoader worker) yields, forever,
batches of `batch_size` packed rows (keys of packing.collate_rows, each (batch_size, seq_len)).
The trainer is step-based, so the stream never ends: every source starts a new epoch, with a
new shard order, once this reader's part of it is read (source_reader.py).

Pipeline:
1. one `SourceReader` per source of the current stage's mixture reads this reader's disjoint
   part of the source (whole shards where the shard count allows), tokenizing
   `tokenize_batch_size` documents at a time;
2. a seeded draw (mixing.py) picks the source of each next document: with probability
   proportional to its weight (`weighting: documents`), or to weight / mean document length
   (`weighting: tokens`, the weights are then token shares);
3. optionally a shuffle buffer of tokenized documents (seeded per reader);
4. documents are framed [BOS] doc [EOS] and packing.DocumentPacker cuts rows; `batch_size`
   rows make a batch.

Stage 2. Built with `stage2_after=N`, the stream switches to `cfg.stage2`'s mixture after its
N-th batch: the readers of the sources stage 2 keeps continue where they are (no document is
read twice before its source's epoch ends), new sources start at their beginning, dropped ones
are closed; the draw, the shuffle buffer and the packer's leftovers carry on. The switch lives
in the stream, not in the trainer, so DataLoader workers switch at their own exact batch.

Held-out documents (`exclude`, from data.heldout.carve_pretrain_heldout): each source's reader
drops them by content as it reads, so no epoch ever trains on them.

Resume is exact: `state_dict()` (taken between batches) holds every reader's position, the
draw's RNG, the shuffle buffer's documents and RNG, the packer's leftover tokens, the stage and
the counts. A fresh stream given that state yields exactly the batches the original would have
yielded next, in stage 1 or 2. The state is per reader: save each rank's.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from bitnet_train.data.config import MixtureConfig, PretrainDataConfig, SourceConfig
from bitnet_train.data.mixing import SourceSampler, draw_probabilities
from bitnet_train.data.packing import DocumentPacker, PackedRow, collate_rows, frame_array
from bitnet_train.data.source_reader import SourceReader, derive_seed
from bitnet_train.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

STATE_FORMAT = 2
_DRAW, _SHUFFLE = 1, 2  # seed tags: the draw among sources, the shuffle buffer

__all__ = ["LoaderStream", "PretrainStream", "build_pretrain_stream", "derive_seed"]


class _ShuffleBuffer:
    """Holds `size` documents; each new one replaces a uniformly drawn one, which comes out.

    Documents are int32 arrays with their source's name; the state stores them as one flat
    tensor and their lengths (10k documents of 1k tokens: 40 MB, not 10M Python ints)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self._items: list[tuple[np.ndarray, str]] = []
        self._rng = random.Random(seed)

    def swap(self, item: tuple[np.ndarray, str]) -> tuple[np.ndarray, str] | None:
        """Insert `item`; return a random held document, or None while filling."""
        if len(self._items) < self.size:
            self._items.append(item)
            return None
        i = self._rng.randrange(self.size)
        out, self._items[i] = self._items[i], item
        return out

    def state_dict(self) -> dict[str, Any]:
        lengths = [len(ids) for ids, _ in self._items]
        flat = (np.concatenate([ids for ids, _ in self._items]) if self._items
                else np.empty(0, dtype=np.int32))
        return {"tokens": torch.from_numpy(flat.astype(np.int32)),
                "lengths": torch.tensor(lengths, dtype=torch.int64),
                "sources": [name for _, name in self._items], "rng": self._rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        flat = state["tokens"].numpy()
        bounds = np.cumsum([0, *state["lengths"].tolist()])
        self._items = [(flat[a:b].copy(), name)
                       for a, b, name in zip(bounds[:-1], bounds[1:], state["sources"])]
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))


class PretrainStream:
    """Infinite iterator of packed pretraining batches for one reader (see module docstring).

    Each batch: input_ids, labels, attention_mask, position_ids, document_ids, all int64 of
    shape (batch_size, cfg.seq_len). Sources are opened (and checked) at construction.
    `documents`: set it to a list to record (source, framed tokens) of every packed document.
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
        stage2_after: int | None = None,
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
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.batch_size = batch_size
        self.stage2_after = stage2_after if cfg.stage2 is not None else None
        self._tokenizer = tokenizer
        self._exclude = dict(exclude or {})
        self._bos_id, self._eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self._framing = 1 + (self._bos_id is not None)  # specials added to each document
        self._sampler = SourceSampler(derive_seed(cfg.seed, rank, _DRAW))
        self._shuffle = (_ShuffleBuffer(cfg.shuffle_buffer, derive_seed(cfg.seed, rank, _SHUFFLE))
                         if cfg.shuffle_buffer > 0 else None)
        self._packer = DocumentPacker(cfg.seq_len, cfg.document_masking)
        self.packed_tokens: dict[str, int] = {}  # framed tokens packed per source, since step 0
        self.stage_tokens: dict[str, int] = {}  # the same, since the current stage began
        self.batches_yielded = 0
        self.documents: list[tuple[str, int]] | None = None
        self._readers: dict[str, SourceReader] = {}
        self._opened: dict[str, SourceReader] = {}  # stage-2 sources, checked, not read yet
        self.stage = 0
        self._enter_stage(stage)
        if self.stage == 1 and self.stage2_after is not None:
            # a stage-2 source that cannot be read fails now, not at the boundary days later
            self._opened = {src.name: self._new_reader(src) for src in cfg.stage2.sources
                            if src.name not in self._readers}

    def _new_reader(self, src: SourceConfig) -> SourceReader:
        return SourceReader(src, self._tokenizer, seed=self.cfg.seed, reader=self.rank,
                            readers=self.world_size, batch_size=self.cfg.tokenize_batch_size,
                            streaming=self.cfg.streaming,
                            exclude=self._exclude.get(src.name, frozenset()))

    # -- stages ---------------------------------------------------------------------------
    def _enter_stage(self, stage: int) -> None:
        """Read `stage`'s mixture from now on, keeping the readers of sources it shares."""
        mixture = self.cfg.mixture(stage)
        kept = {s.name for s in mixture.sources} & set(self._readers)
        readers = {}
        for src in mixture.sources:
            readers[src.name] = (self._readers.get(src.name) or self._opened.pop(src.name, None)
                                 or self._new_reader(src))
        if self.stage and self.rank == 0:
            log.info("data: stage %d mixture from batch %d: %s; continuing %s, new %s, dropped %s",
                     stage, self.batches_yielded, self._describe(mixture), sorted(kept),
                     sorted(set(readers) - kept), sorted(set(self._readers) - kept))
        elif self.rank == 0:
            log.info("data: stage %d mixture: %s", stage, self._describe(mixture))
        self._readers = readers
        self.mixture = mixture
        self.source_names = [s.name for s in mixture.sources]
        self._weights = [s.weight for s in mixture.sources]
        self._doc_probabilities = draw_probabilities(self._weights, "documents")
        self.stage = stage
        self.stage_tokens = {name: 0 for name in self.source_names}

    @staticmethod
    def _describe(mixture: MixtureConfig) -> str:
        shares = zip(mixture.sources, mixture.probabilities())
        return ", ".join(f"{s.name} {p:.3f}" for s, p in shares) + f" of {mixture.weighting}"

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> PretrainStream:
        return self

    def __next__(self) -> dict[str, Tensor]:
        return collate_rows(self.next_rows(self.batch_size))

    def next_rows(self, n: int) -> list[PackedRow]:
        """The next batch as `n` PackedRows (with their pieces' source names as tags)."""
        if self.stage == 1 and self.stage2_after is not None \
                and self.batches_yielded >= self.stage2_after:
            self._enter_stage(2)
        rows = []
        while len(rows) < n:
            row = self._packer.pop_row()
            if row is None:
                self._packer.push(*self._next_document())
            else:
                rows.append(row)
        self.batches_yielded += 1
        return rows

    def _draw_probabilities(self) -> list[float]:
        if self.mixture.weighting == "documents":
            return self._doc_probabilities
        lengths = [self._readers[n].mean_tokens() + self._framing for n in self.source_names]
        return draw_probabilities(self._weights, "tokens", lengths)

    def _next_document(self) -> tuple[np.ndarray, str]:
        while True:
            name = self.source_names[self._sampler.draw(self._draw_probabilities())]
            item = (self._readers[name].next_document(), name)
            if self._shuffle is not None:
                item = self._shuffle.swap(item)
                if item is None:
                    continue
            ids, name = item
            if len(ids):  # an empty text has no token to learn from
                framed = frame_array(ids, self._bos_id, self._eos_id)
                self.packed_tokens[name] = self.packed_tokens.get(name, 0) + len(framed)
                self.stage_tokens[name] = self.stage_tokens.get(name, 0) + len(framed)
                if self.documents is not None:
                    self.documents.append((name, len(framed)))
                return framed, name

    def stats(self) -> dict[str, Any]:
        """Counts for logging: stage, tokens packed per source (this stage, whole run), and
        the epoch each source's reader is in."""
        return {"stage": self.stage, "stage_tokens": dict(self.stage_tokens),
                "packed_tokens": dict(self.packed_tokens),
                "epochs": {n: r.epoch for n, r in self._readers.items()}}

    # -- resume --------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        identity = {"rank": self.rank, "world_size": self.world_size,
                    "seq_len": self.cfg.seq_len, "shuffle_buffer": self.cfg.shuffle_buffer,
                    "document_masking": self.cfg.document_masking}
        held = {name: len(keys) for name, keys in self._exclude.items() if keys}
        if held:  # held-out documents per source (absent: none, as before evaluation existed)
            identity["heldout_documents"] = held
        return identity

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly after the last batch yielded."""
        return {
            "format": STATE_FORMAT,
            **self._identity(),
            "stage": self.stage,
            "batches_yielded": self.batches_yielded,
            "sources": {name: r.state_dict() for name, r in self._readers.items()},
            "sampler": self._sampler.state_dict(),
            "shuffle": None if self._shuffle is None else self._shuffle.state_dict(),
            "packer": self._packer.state_dict(),
            "packed_tokens": dict(self.packed_tokens),
            "stage_tokens": dict(self.stage_tokens),
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
                "(checkpoint, now). Resume with the same data config, ranks, world size and "
                "data.num_workers, or start the data from scratch"
            )
        if state["stage"] != self.stage:
            self._enter_stage(int(state["stage"]))
        if set(state["sources"]) != set(self.source_names):
            raise CheckpointError(
                f"the checkpoint read the stage-{self.stage} sources {sorted(state['sources'])} "
                f"but the config lists {sorted(self.source_names)}; resume with the same "
                "mixture, or start the data from scratch"
            )
        for name, reader_state in state["sources"].items():
            self._readers[name].load_state_dict(reader_state)
        self._sampler.load_state_dict(state["sampler"])
        if self._shuffle is not None:
            self._shuffle.load_state_dict(state["shuffle"])
        self._packer.load_state_dict(state["packer"])
        self.packed_tokens = dict(state["packed_tokens"])
        self.stage_tokens = dict(state["stage_tokens"])
        self.batches_yielded = int(state["batches_yielded"])


# -- DataLoader workers ---------------------------------------------------------------------


def worker_stage2_after(batches: int | None, worker: int, workers: int) -> int | None:
    """Batches worker `worker` of `workers` yields before the loader's `batches`-th batch,
    the loader taking batches round-robin (batch j from worker j % workers)."""
    if batches is None:
        return None
    return max(0, (batches - worker + workers - 1) // workers)


class _WorkerStream(PretrainStream):
    """A worker's stream: each batch carries its counts under STATS_KEY (LoaderStream pops
    them), since the worker's own object lives in another process."""

    worker = 0

    def __next__(self) -> dict[str, Any]:
        batch: dict[str, Any] = super().__next__()
        batch[STATS_KEY] = {"worker": self.worker, **self.stats()}
        return batch


STATS_KEY = "data_stats"


class _WorkerStreams(torch.utils.data.IterableDataset):
    """The dataset handed to DataLoader workers: worker w of W builds, in its own process, the
    stream of reader `rank * W + w` of `world_size * W` (disjoint from every other worker's
    and rank's). The stream is the iterator, and Stateful, so torchdata's
    StatefulDataLoader snapshots and restores each worker's state with the batches."""

    def __init__(self, cfg: PretrainDataConfig, tokenizer: PreTrainedTokenizerBase,
                 stage: int, rank: int, world_size: int, batch_size: int,
                 stage2_after: int | None,
                 exclude: Mapping[str, frozenset[bytes]] | None = None) -> None:
        self.args = (cfg, tokenizer)
        self.kwargs = dict(stage=stage, rank=rank, world_size=world_size, batch_size=batch_size,
                           exclude=exclude)
        self.stage2_after = stage2_after

    def __iter__(self) -> PretrainStream:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        kw = dict(self.kwargs)
        kw["rank"] = kw["rank"] * workers + worker
        kw["world_size"] = kw["world_size"] * workers
        kw["stage2_after"] = worker_stage2_after(self.stage2_after, worker, workers)
        stream = _WorkerStream(*self.args, **kw)
        stream.worker = worker
        return stream


SNAPSHOT_EVERY = 16
"""Batches between two snapshots of a worker's state. A snapshot serialises the stream state
(the shuffle buffer: tens of MB at the 2B4T settings) and sends it to the main process, so
not every batch; torchdata replays the batches since the last snapshot on resume."""


class LoaderStream:
    """PretrainStream batches produced by `num_workers` processes (torchdata's
    StatefulDataLoader), taken round-robin from the workers; same iterator and
    state_dict / load_state_dict interface as PretrainStream."""

    def __init__(self, cfg: PretrainDataConfig, tokenizer: PreTrainedTokenizerBase, *,
                 stage: int, rank: int, world_size: int, batch_size: int,
                 stage2_after: int | None = None,
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
        dataset = _WorkerStreams(cfg, tokenizer, stage, rank, world_size, batch_size,
                                 stage2_after, exclude)
        # batch_size=None: every item already is a batch (a dict of tensors).
        self._loader = StatefulDataLoader(dataset, batch_size=None, num_workers=cfg.num_workers,
                                          snapshot_every_n_steps=SNAPSHOT_EVERY)
        self._batches: Iterator[dict[str, Tensor]] | None = None
        self._worker_stats: dict[int, dict[str, Any]] = {}
        self.stage = stage

    def __iter__(self) -> LoaderStream:
        return self

    def __next__(self) -> dict[str, Tensor]:
        if self._batches is None:
            self._batches = iter(self._loader)
        batch = next(self._batches)
        stats = batch.pop(STATS_KEY)
        self._worker_stats[stats["worker"]] = stats
        self.stage = stats["stage"]
        return batch

    def stats(self) -> dict[str, Any]:
        """PretrainStream.stats summed over the workers (as of their latest batch)."""
        out: dict[str, Any] = {"stage": self.stage, "stage_tokens": {}, "packed_tokens": {},
                               "epochs": {}}
        for st in self._worker_stats.values():
            for key in ("stage_tokens", "packed_tokens"):
                for name, n in st[key].items():
                    out[key][name] = out[key].get(name, 0) + n
            for name, e in st["epochs"].items():
                out["epochs"][name] = max(e, out["epochs"].get(name, 0))
        return out

    def state_dict(self) -> dict[str, Any]:
        return self._loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loader.load_state_dict(state)
        self._batches = None
        self._worker_stats = {}


def build_pretrain_stream(
    cfg: PretrainDataConfig,
    tokenizer: PreTrainedTokenizerBase,
    stage: int = 1,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 1,
    stage2_after: int | None = None,
    exclude: Mapping[str, frozenset[bytes]] | None = None,
) -> PretrainStream | LoaderStream:
    """The infinite batch stream for data-parallel `rank` of `world_size`, starting in `stage`
    and switching to stage 2 after `stage2_after` batches (None: never).

    Each batch: input_ids, labels, attention_mask, position_ids, document_ids, int64 of shape
    (batch_size, cfg.seq_len). num_workers = 0: a PretrainStream in this process; > 0: a
    LoaderStream (needs torchdata). Both are iterators with state_dict / load_state_dict and
    stats(). `exclude`: held-out documents per source name, never yielded (data.heldout).
    """
    kw = dict(stage=stage, rank=rank, world_size=world_size, batch_size=batch_size,
              stage2_after=stage2_after, exclude=exclude)
    if cfg.num_workers > 0:
        return LoaderStream(cfg, tokenizer, **kw)
    return PretrainStream(cfg, tokenizer, **kw)
