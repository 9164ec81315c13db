"""SFT data: sources -> messages -> (input_ids, labels) -> a weighted mixture -> packed rows.

    build_sft_dataset(cfg, tokenizer, rank, world_size) -> SFTDataset
      load each source (datasets.load_dataset, non-streaming: epochs need an exact length)
      -> adapter (record -> messages) -> encode_chat (assistant-only labels, truncation rule)
      -> mixture by weight (upsampling factor, see ChatSourceConfig.weight)
      -> pack: first-fit decreasing into rows of at most max_len tokens (or one per row)
      -> each epoch: a seeded permutation of the rows, split over ranks, served as batches

Packing and the mixture are computed once (same seed -> same rows on every rank), so every
epoch has the same, exact number of batches; only the row order changes between epochs.
Batches follow the project conventions: input_ids, labels (not shifted, -100 = no loss),
attention_mask, position_ids (restarting at 0 for each packed conversation) and document_ids
(1, 2, ... per conversation in a row, 0 on padding) so attention stays inside a conversation.

Encoding runs through `Dataset.map` (optionally `num_proc` processes) and is cached by datasets
next to the source; on several processes build under `accelerator.main_process_first()` so that
one process encodes and the others read its cache.

Held-out conversations (`heldout=N`, for trainer.eval_every): N encoded examples of every
source, drawn by a generator of their own (seed, source), are set aside before the mixture
draws the training examples from the rest; `dataset.heldout` serves them, packed per source
(a row never mixes sources, so each source's loss can be reported). N = 0 changes nothing.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bitnet_train.data.adapters import ChatSourceConfig, adapt, load_source, resolve_adapter
from bitnet_train.data.chat import IGNORE_INDEX, ChatEncoder, EncodeStats
from bitnet_train.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ENCODING_VERSION = 1
"""Part of the datasets cache fingerprint: bump it when the encoding of records changes."""
BAD_RECORD_MODES = ("error", "skip")


@dataclass
class ChatDataConfig:
    """Fields shared by the SFT and preference `data` sections (epochs are the trainer's)."""

    sources: list[ChatSourceConfig] = field(default_factory=list)
    """The mixture: each a hub id or local file with its format and weight."""
    max_len: int = 4096
    """Tokens per row."""
    on_bad_record: str = "error"
    """error: stop at the first record an adapter cannot read (naming source and row) | skip:
    skip and count such records."""
    seed: int = 0
    """Mixture subsets, packing order and the per-epoch shuffles."""
    num_proc: int | None = None
    """Processes for encoding (datasets.map); None: this process."""
    cache_dir: str | None = None
    """datasets cache directory; None: datasets' default (HF_DATASETS_CACHE)."""

    def __post_init__(self) -> None:
        if self.max_len < 2:
            raise ConfigError(f"data.max_len={self.max_len} must be >= 2")
        if self.num_proc is not None and self.num_proc < 1:
            raise ConfigError(f"data.num_proc={self.num_proc} must be >= 1 (or null: this process)")
        if self.on_bad_record not in BAD_RECORD_MODES:
            raise ConfigError(f"data.on_bad_record={self.on_bad_record!r}; choose error or skip")


@dataclass
class SFTDataConfig(ChatDataConfig):
    """The `data` section of an SFT run."""

    max_len: int = 4096
    """Tokens per row (packed) or per conversation; longer conversations are truncated by the
    rule of `ChatEncoder.encode` (drop whole trailing turns first) and counted."""
    pack: bool = True
    """Pack several conversations per row (attention kept inside each); else one per row."""


# -- the epoch machinery shared by SFT and preference data -----------------------------------

class EpochDataset:
    """Rows served as batches, reshuffled each epoch, split over ranks, resumable exactly.

    Epoch e visits a permutation of all rows seeded by (seed, e); the first
    `num_rows - num_rows % world_size` of it are dealt round-robin, so every rank sees the same
    number of rows, disjoint from the others' (the few left over are skipped that epoch only).
    A rank's batches are consecutive slices of its rows; the last may be smaller than
    `batch_size` (equally on every rank). The position within the epoch is counted in rows, so
    `state_dict` / `load_state_dict` resume exactly where a checkpoint was taken.
    """

    def __init__(self, num_rows: int, seed: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
        if num_rows < world_size:
            raise DataError(f"{num_rows} rows cannot feed {world_size} processes; add data or "
                            f"use fewer processes")
        self.num_rows, self.seed, self.rank, self.world_size = num_rows, seed, rank, world_size
        self.epoch = 0
        self.rows_done = 0

    def collate(self, rows: list[int]) -> dict[str, Tensor]:
        raise NotImplementedError

    def for_rank(self, rank: int, world_size: int) -> EpochDataset:
        """The same rows, split for `rank` of `world_size` instead, at the start of epoch 0
        (a shallow copy: the encoded rows are shared). Logical data shards use it."""
        if not 0 <= rank < world_size or self.num_rows < world_size:
            raise ConfigError(f"cannot split {self.num_rows} rows as rank {rank} of {world_size}")
        view = copy.copy(self)
        view.rank, view.world_size, view.epoch, view.rows_done = rank, world_size, 0, 0
        return view

    def __len__(self) -> int:
        """Rows this rank sees per epoch."""
        return self.num_rows // self.world_size

    def rank_rows(self, epoch: int) -> np.ndarray:
        """This rank's rows of `epoch`, in order."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        return perm[: len(self) * self.world_size][self.rank:: self.world_size]

    def num_batches(self, batch_size: int) -> int:
        """Exact number of batches per epoch on this rank."""
        return math.ceil(len(self) / batch_size)

    def batch(self, epoch: int, index: int, batch_size: int) -> dict[str, Tensor]:
        """Batch `index` of `epoch` on this rank (random access; does not move the position)."""
        rows = self.rank_rows(epoch)[index * batch_size: (index + 1) * batch_size]
        if len(rows) == 0:
            raise IndexError(f"epoch {epoch} has {self.num_batches(batch_size)} batches of "
                             f"{batch_size}; asked for {index}")
        return self.collate(rows.tolist())

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` (from its beginning, unless it is the epoch a resumed state is in)."""
        if epoch != self.epoch:
            self.epoch, self.rows_done = epoch, 0

    def batches(self, batch_size: int) -> EpochBatches:
        """The current epoch's batches, from the current position (len = the whole epoch's)."""
        return EpochBatches(self, batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "rows_done": self.rows_done, "num_rows": self.num_rows,
                "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_rows", "seed", "world_size"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"data state from the checkpoint has {key}={state[key]}, this run has "
                    f"{getattr(self, key)}: the data, its config or the number of processes "
                    f"changed since; resume with the same ones or start a new run"
                )
        self.epoch, self.rows_done = state["epoch"], state["rows_done"]


class EpochBatches:
    """Iterable over the rest of the current epoch's batches; advances the dataset position."""

    def __init__(self, data: EpochDataset, batch_size: int) -> None:
        if batch_size <= 0:
            raise ConfigError(f"batch_size={batch_size} must be positive")
        self.data, self.batch_size = data, batch_size

    def __len__(self) -> int:
        return self.data.num_batches(self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        data = self.data
        rows = data.rank_rows(data.epoch)
        while data.rows_done < len(rows):
            chunk = rows[data.rows_done: data.rows_done + self.batch_size].tolist()
            data.rows_done += len(chunk)  # before yielding: a checkpoint taken now includes it
            yield data.collate(chunk)


# -- packing and mixing (pure) ---------------------------------------------------------------

def pack_first_fit(lengths: list[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Greedy first-fit decreasing: item indices grouped in rows of total length <= capacity.

    Items are taken longest first (ties in input order) and each goes to the first row with
    room, found in O(log n) with a max-segment-tree over the rows' free space.
    """
    lengths = [int(x) for x in lengths]
    if any(x > capacity or x <= 0 for x in lengths):
        raise ValueError(f"item lengths must be in [1, {capacity}]")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [capacity] * (2 * size)  # free[size + r] = room left in row r; parents hold maxima
    rows: list[list[int]] = []
    for i in order:
        need, node = lengths[i], 1
        while node < size:  # descend to the leftmost row with room
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        r = node - size
        if r == len(rows):
            rows.append([])
        rows[r].append(i)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def mixture_counts(n: int, weight: float) -> int:
    """Examples a source of `n` contributes per epoch at upsampling factor `weight`."""
    return int(round(n * weight))


def mixture_indices(n: int, weight: float, rng: np.random.Generator) -> np.ndarray:
    """Indices into a source of `n` examples: floor(weight) full copies + a seeded subset."""
    total = mixture_counts(n, weight)
    copies, extra = divmod(total, n) if n else (0, 0)
    parts = [np.arange(n)] * copies + [np.sort(rng.permutation(n)[:extra])]
    return np.concatenate(parts).astype(np.int64)


# -- encoding sources ------------------------------------------------------------------------

STAT_FIELDS = [f.name for f in fields(EncodeStats)]


def encode_source(
    source: ChatSourceConfig,
    kind: str,
    encode_one: Callable[[Any, EncodeStats], dict[str, list[int]] | None],
    columns: list[str],
    on_bad_record: str,
    num_proc: int | None = None,
    cache_dir: str | None = None,
    fingerprint_extra: Any = None,
):
    """(encoded datasets.Dataset with `columns` + "length", EncodeStats) of one source.

    `encode_one(adapted_record, stats)` returns the example's columns, or None if dropped.
    """
    raw = load_source(source, cache_dir)
    if len(raw) == 0:
        raise DataError(f"data source {source.name!r} ({source.path}, split {source.split}) "
                        f"is empty")
    adapter = resolve_adapter(source, kind, raw[0])

    def encode_batch(batch: dict[str, list], indices: list[int], version: int, extra: Any):
        out: dict[str, list] = {c: [] for c in [*columns, "length", *STAT_FIELDS]}
        keys = list(batch)
        for j, index in enumerate(indices):
            stats = EncodeStats()
            record = {k: batch[k][j] for k in keys}
            try:
                example = adapt(adapter, record, source.name, index)
            except DataError:
                if on_bad_record == "error":
                    raise
                example = None
                stats.seen, stats.skipped_bad_records = 1, 1
            encoded = None if example is None else encode_one(example, stats)  # counts `seen`
            for c in columns:
                out[c].append(encoded[c] if encoded else [])
            out["length"].append(len(encoded[columns[0]]) if encoded else 0)
            for f in STAT_FIELDS:
                out[f].append(getattr(stats, f))
        return out

    enc = raw.map(
        encode_batch, batched=True, with_indices=True, remove_columns=raw.column_names,
        num_proc=num_proc, desc=f"encoding {source.name}",
        fn_kwargs={"version": ENCODING_VERSION, "extra": fingerprint_extra},
    )
    stats = EncodeStats(**{f: int(np.asarray(enc[f]).sum()) for f in STAT_FIELDS})
    enc = enc.filter(lambda n: n > 0, input_columns="length").remove_columns(STAT_FIELDS)
    log.info("data source %s: %s", source.name, stats.as_dict())
    if len(enc) == 0:
        raise DataError(f"data source {source.name!r}: no usable example out of {stats.seen} "
                        f"records ({stats.as_dict()}); check its format and max_len")
    return enc, stats


def pad_rows(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad per-row lists (input_ids, labels, position_ids, document_ids) into tensors.

    Padding: input_ids = pad_id, labels = -100, attention_mask = 0, position_ids = 0,
    document_ids = 0 (real documents are numbered from 1).
    """
    width = max(len(r["input_ids"]) for r in rows)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "position_ids": 0, "document_ids": 0}
    out = {k: torch.full((len(rows), width), v, dtype=torch.long) for k, v in fill.items()}
    out["attention_mask"] = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        for k in fill:
            out[k][i, :n] = torch.tensor(r[k], dtype=torch.long)
        out["attention_mask"][i, :n] = 1
    return out


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (pads carry no label nor attention)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


# -- SFT -------------------------------------------------------------------------------------

class SFTDataset(EpochDataset):
    """Packed (or single) conversations, batched per the project conventions.

    `stats` holds, per source name, what encoding did (kept, truncated, dropped, skipped).
    """

    def __init__(self, parts: list, examples: np.ndarray, rows: list[list[int]], pad_id: int,
                 seed: int, rank: int, world_size: int, stats: dict[str, EncodeStats]) -> None:
        super().__init__(len(rows), seed, rank, world_size)
        self.parts = parts          # encoded datasets.Dataset per source
        self.examples = examples    # (n, 2): (source, index in its encoded dataset)
        self.rows = rows            # example indices per row
        self.pad_id = pad_id
        self.stats = stats
        self.heldout: SFTDataset | None = None  # built with heldout > 0
        self.row_sources: list[str] | None = None  # a held-out set's source of each row

    def collate(self, rows: list[int]) -> dict[str, Tensor]:
        out = []
        for r in rows:
            row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [],
                                         "document_ids": []}
            for doc, e in enumerate(self.rows[r], start=1):
                part, idx = self.examples[e]
                ex = self.parts[part][int(idx)]
                n = len(ex["input_ids"])
                row["input_ids"] += ex["input_ids"]
                row["labels"] += ex["labels"]
                row["position_ids"] += range(n)
                row["document_ids"] += [doc] * n
            out.append(row)
        return pad_rows(out, self.pad_id)

    def log_dict(self) -> dict[str, int]:
        """Encoding counts, `data/<source>/<field>`, plus totals and the packing."""
        total = EncodeStats()
        out: dict[str, int] = {}
        for name, st in self.stats.items():
            out.update(st.as_dict(f"data/{name}/"))
            total.update(st)
        out.update(total.as_dict("data/total/"))
        out["data/rows"] = self.num_rows
        out["data/examples_per_epoch"] = len(self.examples)
        return out


def encode_mixture(cfg: SFTDataConfig | Any, kind: str, encode_one: Callable, columns: list[str],
                   rng: np.random.Generator, heldout: int = 0,
                   ) -> tuple[list, np.ndarray, dict[str, EncodeStats], np.ndarray]:
    """Encode every source of `cfg.sources` and draw its examples by weight.

    Returns the encoded datasets (one per source), the examples of one epoch as (n, 2) rows of
    [source index, row in that source] grouped by source, the encoding counts per source, and
    the held-out examples ((heldout x sources, 2), same layout; see module doc), which the
    epoch never contains. Shared by the SFT and preference builders (`kind`: "sft" |
    "preference").
    """
    parts, examples, stats, held = [], [], {}, []
    for s, source in enumerate(cfg.sources):
        if source.name in stats:
            raise ConfigError(f"two data sources are named {source.name!r}; give them names")
        enc, stats[source.name] = encode_source(
            source, kind, encode_one, columns, cfg.on_bad_record, cfg.num_proc, cfg.cache_dir,
            fingerprint_extra=cfg.max_len)
        pool = np.arange(len(enc), dtype=np.int64)
        if heldout:
            if heldout >= len(enc):
                raise DataError(
                    f"data source {source.name!r} has {len(enc)} usable examples; holding out "
                    f"{heldout} (trainer.eval_size) would leave nothing to train on. Lower "
                    "trainer.eval_size or add data"
                )
            chosen = np.random.default_rng([cfg.seed, s, 7]).permutation(len(enc))[:heldout]
            held.append(np.stack([np.full(heldout, s), np.sort(chosen)], axis=1))
            pool = np.setdiff1d(pool, chosen)
        idx = pool[mixture_indices(len(pool), source.weight, rng)]
        parts.append(enc)
        examples.append(np.stack([np.full_like(idx, s), idx], axis=1))
    held_arr = np.concatenate(held) if held else np.zeros((0, 2), dtype=np.int64)
    return parts, np.concatenate(examples), stats, held_arr


def build_sft_dataset(cfg: SFTDataConfig, tokenizer, rank: int = 0,
                      world_size: int = 1, heldout: int = 0) -> SFTDataset:
    """Load, encode, mix and pack `cfg.sources` for this rank (see module doc); with
    `heldout`, `dataset.heldout` holds that many conversations per source, never trained on."""
    if not cfg.sources:
        raise ConfigError("data.sources is empty: list at least one {path, format, weight}")
    encoder = ChatEncoder(tokenizer)

    def encode_one(messages, stats: EncodeStats):
        encoded = encoder.encode(messages, cfg.max_len, stats)
        return None if encoded is None else {"input_ids": encoded[0], "labels": encoded[1]}

    rng = np.random.default_rng(cfg.seed)
    parts, examples_arr, stats, held = encode_mixture(cfg, "sft", encode_one,
                                                      ["input_ids", "labels"], rng, heldout)
    part_lengths = [np.asarray(part["length"]) for part in parts]
    lengths = [part_lengths[s][examples_arr[examples_arr[:, 0] == s, 1]]
               for s in range(len(parts))]
    # a seeded shuffle first, so that equal lengths from different sources interleave
    order = rng.permutation(len(examples_arr))
    examples_arr, lens = examples_arr[order], np.concatenate(lengths)[order]
    rows = (pack_first_fit(lens, cfg.max_len) if cfg.pack
            else [[i] for i in range(len(examples_arr))])
    log.info("SFT data: %d examples in %d rows of <= %d tokens (%.1f%% filled)",
             len(examples_arr), len(rows), cfg.max_len,
             100.0 * lens.sum() / (len(rows) * cfg.max_len))
    dataset = SFTDataset(parts, examples_arr, rows, pad_token_id(tokenizer), cfg.seed, rank,
                         world_size, stats)
    if len(held):
        dataset.heldout = _heldout_sft(parts, held, cfg, pad_token_id(tokenizer), stats)
    return dataset


def _heldout_sft(parts: list, held: np.ndarray, cfg: SFTDataConfig, pad_id: int,
                 stats: dict[str, EncodeStats]) -> SFTDataset:
    """The held-out conversations packed like training, but per source (rank 0 of 1: the
    evaluator shards the rows itself). `row_sources[r]` names row r's source."""
    rows, row_sources = [], []
    for s, name in enumerate(stats):
        members = np.flatnonzero(held[:, 0] == s)
        lengths = np.asarray(parts[s]["length"])[held[members, 1]]
        packed = (pack_first_fit(lengths, cfg.max_len) if cfg.pack
                  else [[i] for i in range(len(members))])
        rows += [[int(members[i]) for i in row] for row in packed]
        row_sources += [name] * len(packed)
    out = SFTDataset(parts, held, rows, pad_id, cfg.seed, 0, 1, stats)
    out.row_sources = row_sources
    return out
