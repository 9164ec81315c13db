"""`bitnet-train data-preview`: what a pretraining stage feeds the model, without training.

Streams the first N packed rows of a stage through the same PretrainStream the trainer uses
(local files offline, hub ids where a network exists) and reports the realised token share
per source, the document-length distribution per source, padding and splitting counts, the
pipeline's tokens/s in this process, and a few decoded rows with document boundaries marked.

    bitnet-train data-preview +recipe=pretrain_2b4t --rows 256 --stage 2
    python scripts/data_preview.py +recipe=demo_pretrain data.seq_len=64 --show 3
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from transformers import PreTrainedTokenizerBase

from bitnet_train.data.config import MixtureConfig, PretrainDataConfig
from bitnet_train.data.packing import PackedRow
from bitnet_train.data.pretrain import PretrainStream
from bitnet_train.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Preview:
    """What `preview_stage` measured over `rows` packed rows of `seq_len` tokens."""

    stage: int
    seq_len: int
    rows: list[PackedRow]
    seconds: float
    row_tokens: dict[str, int] = field(default_factory=dict)
    """Tokens of each source in the rows (pieces counted by their source)."""
    doc_lengths: dict[str, list[int]] = field(default_factory=dict)
    """Framed length (tokens, BOS and EOS included) of every document packed, per source."""
    continued_pieces: int = 0
    """Row pieces that continue a document begun in an earlier row (no BOS in view)."""
    long_documents: int = 0
    """Documents longer than a row: split over several rows."""

    @property
    def tokens(self) -> int:
        return len(self.rows) * self.seq_len

    def token_share(self) -> dict[str, float]:
        total = sum(self.row_tokens.values()) or 1
        return {name: n / total for name, n in self.row_tokens.items()}


def preview_stage(cfg: PretrainDataConfig, tokenizer: PreTrainedTokenizerBase, *, stage: int,
                  rows: int, rank: int = 0, world_size: int = 1) -> Preview:
    """Stream the first `rows` packed rows of `stage` (its mixture from the sources' start)."""
    if rows <= 0:
        raise ConfigError(f"--rows={rows} must be positive")
    stream = PretrainStream(dataclasses.replace(cfg, num_workers=0), tokenizer, stage=stage,
                            rank=rank, world_size=world_size)
    stream.documents = []
    start = time.perf_counter()
    packed = stream.next_rows(rows)
    seconds = time.perf_counter() - start
    out = Preview(stage=stage, seq_len=cfg.seq_len, rows=packed, seconds=seconds)
    for name, length in stream.documents:
        out.doc_lengths.setdefault(name, []).append(length)
        out.long_documents += length > cfg.seq_len
    counts: dict[str, int] = defaultdict(int)
    for row in packed:
        bounds = np.flatnonzero(np.diff(row.document_ids)) + 1
        for piece, tag in zip(np.split(row.input_ids, bounds), row.tags):
            counts[tag] += len(piece)
            out.continued_pieces += piece[0] != tokenizer.bos_token_id
    out.row_tokens = dict(counts)
    return out


def _percentiles(lengths: list[int]) -> str:
    a = np.asarray(lengths)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return (f"{len(a):>7} docs  mean {a.mean():>8.1f}  p50 {p50:>7.0f}  p90 {p90:>7.0f}  "
            f"p99 {p99:>7.0f}  max {a.max():>7}")


def decode_row(row: PackedRow, tokenizer: PreTrainedTokenizerBase, max_chars: int = 300) -> str:
    """A row as text, each piece between markers naming its source: `[doc SOURCE]` opens a
    document (BOS), `[.. SOURCE]` continues one from the previous row, `[/doc]` closes one
    (EOS), `[..]` means it goes on in the next row. Long pieces are elided in the middle."""
    bounds = np.flatnonzero(np.diff(row.document_ids)) + 1
    parts = []
    for piece, tag in zip(np.split(row.input_ids, bounds), row.tags):
        opens = piece[0] == tokenizer.bos_token_id
        closes = piece[-1] == tokenizer.eos_token_id
        body = piece[int(opens): len(piece) - int(closes)]
        text = tokenizer.decode(body.tolist(), clean_up_tokenization_spaces=False)
        if len(text) > max_chars:
            half = max_chars // 2
            text = f"{text[:half]} [... {len(body)} tokens ...] {text[-half:]}"
        parts.append(f"[{'doc' if opens else '..'} {tag}]{text}{'[/doc]' if closes else '[..]'}")
    return " ".join(parts)


def format_preview(p: Preview, tokenizer: PreTrainedTokenizerBase, mixture: MixtureConfig,
                   show: int) -> str:
    """The report `data-preview` prints."""
    weights = {s.name: w for s, w in zip(mixture.sources, mixture.probabilities())}
    lines = [f"stage {p.stage}: {len(p.rows)} rows x {p.seq_len} tokens = {p.tokens} tokens in "
             f"{p.seconds:.2f} s ({p.tokens / max(p.seconds, 1e-9):,.0f} tokens/s in this process)",
             f"weights are shares of {mixture.weighting}",
             "", f"{'source':<20} {'weight':>7} {'token share':>12}"]
    share = p.token_share()
    for name in weights:
        lines.append(f"{name:<20} {weights[name]:>7.3f} {share.get(name, 0.0):>12.3f}")
    lines += ["", "document length (tokens, BOS/EOS included), per source:"]
    for name, lengths in p.doc_lengths.items():
        lines.append(f"  {name:<18} {_percentiles(lengths)}")
    lines += ["", "padding tokens: 0 (rows are packed full, attention_mask all ones)",
              f"documents longer than a row (split over rows, no truncation): {p.long_documents}",
              f"row pieces continuing a document from the previous row: {p.continued_pieces}"]
    for i, row in enumerate(p.rows[:show]):
        lines += ["", f"-- row {i} --", decode_row(row, tokenizer)]
    return "\n".join(lines)
