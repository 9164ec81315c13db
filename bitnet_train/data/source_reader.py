"""One source of a pretraining mixture, as read by one reader, epoch after epoch.

A reader is a data-parallel rank, or one DataLoader worker of a rank (reader `rank * W + w`
of `world_size * W`). Epoch e of a source:

1. its shards (files, or the row groups of an Arrow copy) are put in an order shuffled by
   `datasets`' `IterableDataset.shuffle` with a seed derived from the data seed, the source's
   name and e: the same order on every reader, a new order every epoch. Only the shard order
   is taken from it (buffer_size=1): `datasets` refills its example buffer empty on resume, so
   the stream's own shuffle buffer, whose content is saved, mixes the documents;
2. this reader keeps its part: every readers-th shard of that order when there are at least
   as many shards as readers (`IterableDataset.shard`; readers then read disjoint files, some
   one file more than others when the count does not divide), else every readers-th record
   (`split_dataset_by_node`: every reader then reads, but does not tokenize, every record; a
   warning names the source). Either way the readers of an epoch are disjoint and together
   read every record once;
3. records are tokenized `batch_size` at a time; at the end of its part the reader logs the
   wrap, naming the source, and begins epoch e + 1.

The position (epoch, the dataset state at the start of the current tokenization batch, the
documents of that batch already handed out) and the counts are the reader's state; it outlives
the stage boundary, so stage 2 continues where stage 1 left each source.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import numpy as np
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node
from transformers import PreTrainedTokenizerBase

from bitnet_train.data.config import SourceConfig, source_identity
from bitnet_train.data.heldout import document_key
from bitnet_train.data.sources import READ_ERRORS, open_source, read_error
from bitnet_train.errors import CheckpointError, DataError

log = logging.getLogger(__name__)


def derive_seed(*parts: int) -> int:
    """A 32-bit seed mixed from integers (data seed, rank, epoch, ...) by NumPy's SeedSequence."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def name_key(name: str) -> int:
    """A stable integer for a source name (seeds must not depend on Python's str hash)."""
    return zlib.crc32(name.encode())


class SourceReader:
    """Token ids (int32 arrays, no specials) of one source's documents for one reader."""

    def __init__(self, src: SourceConfig, tokenizer: PreTrainedTokenizerBase, *, seed: int,
                 reader: int = 0, readers: int = 1, batch_size: int = 256,
                 streaming: bool = True, exclude: frozenset[bytes] = frozenset()) -> None:
        self.src, self.name = src, src.name
        self._exclude = exclude  # digests of held-out documents (data.heldout), never read
        self._raw = open_source(src, streaming=streaming)
        self.num_shards = self._raw.num_shards
        self._tokenizer = tokenizer
        self._seed, self._reader, self._readers = seed, reader, readers
        self._batch_size = batch_size
        if readers > 1 and self.num_shards < readers and reader == 0:
            log.warning(
                "data source %r has %d shards (files), fewer than the %d readers (ranks x data "
                "workers): every reader reads all its records and keeps 1 in %d. Split it into "
                "at least %d files to give each reader its own", self.name, self.num_shards,
                readers, readers, readers)
        elif readers > 1 and self.num_shards % readers and reader == 0:
            log.info("data source %r: %d shards over %d readers, some read one shard more per "
                     "epoch", self.name, self.num_shards, readers)
        self.epoch = 0
        self.docs = 0  # documents handed out by this reader since step 0
        self.tokens = 0  # their tokens
        self._epoch_docs = 0
        self._dataset: IterableDataset | None = None
        self._batches = None  # iterator over text batches of the current epoch
        self._start_state: dict | None = None  # dataset state where reading resumes
        self._chunk_state: dict | None = None  # dataset state where the current chunk starts
        self._chunk: list[np.ndarray] = []
        self._pending_tokens = 0  # tokens of the current chunk not handed out yet
        self._pos = 0
        self._skip = 0

    # -- reading --------------------------------------------------------------------------
    def _epoch_dataset(self) -> IterableDataset:
        ds = self._raw.shuffle(seed=derive_seed(self._seed, name_key(self.name), self.epoch),
                               buffer_size=1, max_buffer_input_shards=1)
        if ds.column_names is not None:
            ds = ds.select_columns([self.src.text_field])
        if self._readers > 1 and self.num_shards >= self._readers:
            ds = ds.shard(num_shards=self._readers, index=self._reader, contiguous=False)
        elif self._readers > 1:
            ds = split_dataset_by_node(ds, rank=self._reader, world_size=self._readers)
        return ds

    def _next_text_batch(self) -> list:
        """The next batch of texts, moving to the next epoch at the end of this one."""
        while True:
            if self._batches is None:
                self._dataset = self._epoch_dataset()
                if self._start_state is not None:
                    self._dataset.load_state_dict(self._start_state)
                self._batches = self._dataset.iter(batch_size=self._batch_size)
                self._chunk_state = self._start_state
            else:
                self._chunk_state = self._dataset.state_dict()
            try:
                return next(self._batches)[self.src.text_field]
            except StopIteration:
                self._end_epoch()
            except READ_ERRORS as err:
                raise read_error(self.src, err) from err

    def _end_epoch(self) -> None:
        if self._epoch_docs == 0:
            raise DataError(
                f"data source {self.name!r}: reader {self._reader} of {self._readers} got no "
                f"record in epoch {self.epoch} ({self.num_shards} shards); give the source more "
                "records, or more files than readers (ranks x data workers)"
            )
        log.info("data source %r: epoch %d done on reader %d/%d after %d documents; epoch %d "
                 "begins (shard order reshuffled)", self.name, self.epoch, self._reader,
                 self._readers, self._epoch_docs, self.epoch + 1)
        self.epoch += 1
        self._epoch_docs = 0
        self._batches, self._start_state = None, None

    def _read_chunk(self) -> None:
        texts = self._next_text_batch()
        for text in texts:
            if not isinstance(text, str):
                raise DataError(
                    f"data source {self.name!r}: a record's {self.src.text_field!r} is "
                    f"{text!r} ({type(text).__name__}), not a string; clean the source or "
                    "filter such records out"
                )
        if self._exclude:
            texts = [t for t in texts if document_key(t) not in self._exclude]
        ids = self._tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                              verbose=False)["input_ids"] if texts else []
        self._chunk = [np.asarray(x, dtype=np.int32) for x in ids]
        # After a resume, skip the documents already used; the skip may span chunks when
        # tokenize_batch_size changed in between.
        self._pos = min(self._skip, len(self._chunk))
        self._skip -= self._pos
        self._pending_tokens = sum(len(x) for x in self._chunk[self._pos:])

    def next_document(self) -> np.ndarray:
        """Token ids of the next document of this reader's part (may be empty)."""
        while self._pos >= len(self._chunk):
            self._read_chunk()
        ids = self._chunk[self._pos]
        self._pos += 1
        self._pending_tokens -= len(ids)
        self.docs += 1
        self.tokens += len(ids)
        self._epoch_docs += 1
        return ids

    def mean_tokens(self) -> float:
        """Mean tokens per document over those handed out and those of the current chunk.

        A function of the position only (after a resume the chunk is read again first), so a
        draw weighted by it is the same whether or not the run was interrupted.
        """
        if self._batches is None:
            self._read_chunk()
        n = self.docs + len(self._chunk) - self._pos
        return (self.tokens + self._pending_tokens) / n if n else 1.0

    # -- resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._batches is None:  # nothing read since start, load or an epoch's end
            dataset, consumed = self._start_state, self._skip
        else:
            dataset, consumed = self._chunk_state, self._pos + self._skip
        return {"identity": source_identity(self.src), "num_shards": self.num_shards,
                "epoch": self.epoch, "dataset": dataset, "consumed": consumed,
                "docs": self.docs, "tokens": self.tokens, "epoch_docs": self._epoch_docs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {"identity": source_identity(self.src), "num_shards": self.num_shards}
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            raise CheckpointError(
                f"data source {self.name!r} is not the one the checkpoint read: {theirs} (then) "
                f"vs {mine} (now). Resume with the same files, or rename the source to start it "
                "from its beginning"
            )
        self.epoch = int(state["epoch"])
        self._start_state = state["dataset"]
        self._skip = int(state["consumed"])
        self.docs, self.tokens = int(state["docs"]), int(state["tokens"])
        self._epoch_docs = int(state["epoch_docs"])
        self._batches, self._chunk, self._pos, self._pending_tokens = None, [], 0, 0
