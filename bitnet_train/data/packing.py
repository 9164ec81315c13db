"""Pack token documents into fixed-length rows for causal-LM pretraining. Pure logic, no I/O.

Conventions (the project's batch keys; labels are NOT shifted, position t predicts t + 1):

- Framing: each document is ``[BOS] + tokens + [EOS]`` (`frame_document`; no BOS when the
  tokenizer has none). LLaMA-3 pretraining frames documents the same way, and the EOS teaches
  the model to stop. Documents with no token are dropped, never framed into ``[BOS, EOS]``.
- Rows: documents are laid end to end; every row holds exactly `seq_len` tokens, no padding
  (attention_mask is all ones). A document that does not fit in the rest of a row continues
  at the start of the next row: no token is dropped or repeated.
- document_ids: 0, 1, 2, ... for the successive document pieces of a row; a continued
  document is a new piece (a new id) in its new row.
- With document masking (the default):
    * position_ids restart at 0 for every piece, the continuation of a long document included,
      so positions always lie in [0, seq_len), the range used at inference; attention is kept
      inside each piece by document_ids;
    * labels = input_ids except -100 at position 0 of every piece: that token would otherwise
      be the target of the previous document's last token (EOS -> next BOS), a prediction
      across a boundary the mask forbids. A packed row's loss then equals the sum of the losses
      of its pieces trained alone. (Position 0 of a row is never a target anyway.)
- Without document masking (classic GPT packing): position_ids = 0..seq_len-1 per row,
  document_ids all 0, labels = input_ids; tokens attend across documents.

`DocumentPacker` is stateful and resumable: `state_dict()` holds the tokens buffered for the
next rows (less than one row plus one document). A document may carry a tag (its source's
name); each row lists the tags of its pieces, for previews and per-source counts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = -100
"""Label of a position that carries no loss (transformers' and PyTorch's convention); the one
definition, shared by the chat encoders, the losses and the objectives."""


def frame_document(ids: Sequence[int], bos_id: int | None, eos_id: int) -> list[int]:
    """``[bos] + ids + [eos]`` (no bos when `bos_id` is None); [] for an empty document."""
    if len(ids) == 0:
        return []
    head = [] if bos_id is None else [bos_id]
    return head + list(ids) + [eos_id]


def frame_array(ids: np.ndarray, bos_id: int | None, eos_id: int) -> np.ndarray:
    """`frame_document` for an integer array, as int64 (empty in, empty out)."""
    if len(ids) == 0:
        return np.empty(0, dtype=np.int64)
    head = [] if bos_id is None else [bos_id]
    return np.concatenate([np.asarray(head, dtype=np.int64), ids.astype(np.int64),
                           np.asarray([eos_id], dtype=np.int64)])


@dataclass
class PackedRow:
    """One packed row; each array has shape (seq_len,), dtype int64."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    document_ids: np.ndarray
    tags: tuple = ()
    """The tag of each piece (document_ids 0, 1, ...), as given to `DocumentPacker.push`."""


class DocumentPacker:
    """Buffers framed documents and cuts them into rows of `seq_len` tokens (see module doc)."""

    def __init__(self, seq_len: int, document_masking: bool = True) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be positive")
        self.seq_len = seq_len
        self.document_masking = document_masking
        self._pieces: deque[np.ndarray] = deque()  # documents (or their rests), in order
        self._tags: deque[Hashable] = deque()  # one per piece
        self._buffered = 0

    @property
    def buffered(self) -> int:
        """Tokens waiting for a row."""
        return self._buffered

    def push(self, document: Sequence[int] | np.ndarray, tag: Hashable = None) -> None:
        """Queue one framed document (empty ones are ignored), with an optional tag."""
        if len(document):
            piece = np.asarray(document, dtype=np.int64)
            self._pieces.append(piece)
            self._tags.append(tag)
            self._buffered += len(piece)

    def pop_row(self) -> PackedRow | None:
        """The next row, or None while fewer than `seq_len` tokens are buffered."""
        length = self.seq_len
        if self._buffered < length:
            return None
        input_ids = np.empty(length, dtype=np.int64)
        position_ids = np.empty(length, dtype=np.int64)
        document_ids = np.empty(length, dtype=np.int64)
        starts = []
        tags = []
        filled = 0
        doc = 0
        while filled < length:
            piece = self._pieces[0]
            take = min(len(piece), length - filled)
            input_ids[filled:filled + take] = piece[:take]
            position_ids[filled:filled + take] = np.arange(take)
            document_ids[filled:filled + take] = doc
            starts.append(filled)
            tags.append(self._tags[0])
            if take == len(piece):
                self._pieces.popleft()
                self._tags.popleft()
            else:  # the rest continues the next row, as a new piece
                self._pieces[0] = piece[take:]
            filled += take
            doc += 1
        self._buffered -= length
        labels = input_ids.copy()
        if self.document_masking:
            labels[starts] = IGNORE_INDEX
        else:
            position_ids = np.arange(length, dtype=np.int64)
            document_ids = np.zeros(length, dtype=np.int64)
        return PackedRow(input_ids, labels, position_ids, document_ids, tuple(tags))

    def state_dict(self) -> dict[str, Any]:
        return {"pieces": [p.tolist() for p in self._pieces], "tags": list(self._tags)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pieces = deque(np.asarray(p, dtype=np.int64) for p in state["pieces"])
        self._tags = deque(state.get("tags") or [None] * len(self._pieces))
        self._buffered = sum(len(p) for p in self._pieces)


def collate_rows(rows: Sequence[PackedRow]) -> dict[str, Tensor]:
    """Stack rows into the batch dict: input_ids, labels, attention_mask, position_ids,
    document_ids, each (B, seq_len) int64."""
    def stack(name: str) -> Tensor:
        return torch.from_numpy(np.stack([getattr(r, name) for r in rows]))

    batch = {name: stack(name)
             for name in ("input_ids", "labels", "position_ids", "document_ids")}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return batch
