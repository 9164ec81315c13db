"""Pretraining data configuration: sources, mixtures per stage, packing.

Hydra structured configs (the `data` group when `objective.name=pretrain`). A source is opened
by the same code whether it names a Hub dataset or local files, so a test or a demo on local
jsonl exercises the production path. Validation runs in `__post_init__` (OmegaConf's
`to_object` calls it), so a bad value fails at start-up with the offending key named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bitnet_train.errors import ConfigError

BUILDERS = ("json", "parquet", "text")
"""`datasets` packaged builders accepted for local files."""
WEIGHTINGS = ("documents", "tokens")
"""What a mixture's weights are shares of."""


@dataclass
class SourceConfig:
    """One corpus of a mixture: a Hub dataset or local files, and its sampling weight."""

    name: str = ""
    """Label used in logs, metrics and error messages. Empty: the path (or first data file)."""
    path: str = ""
    """Hub dataset id (`HuggingFaceFW/fineweb-edu`), or a local file, directory or glob
    (`data/*.jsonl`). Empty when `data_files` lists local files."""
    config_name: str | None = None
    """Hub dataset configuration (`load_dataset(path, name=...)`), e.g. `sample-10BT`."""
    split: str = "train"
    text_field: str = "text"
    """Column holding the document text."""
    weight: float = 1.0
    """Relative weight, normalised over the mixture: the share of documents drawn from this
    source, or of tokens when the mixture's `weighting` is `tokens`."""
    data_files: list[str] | None = None
    """Files (or globs) to read: local ones when `path` is empty or a local directory (they are
    then relative to it), or files inside the Hub repository `path`."""
    builder: str | None = None
    """json | parquet | text, for local files. None: from the file extension (.json/.jsonl[.gz],
    .parquet, .txt). The text builder yields one document per paragraph."""

    def __post_init__(self) -> None:
        if not self.path and not self.data_files:
            raise ConfigError(
                f"data source {self.name!r}: set `path` (Hub id, local file, dir or glob) or "
                "`data_files`"
            )
        if not self.name:
            self.name = self.path or self.data_files[0]
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight)
                and self.weight > 0):
            raise ConfigError(
                f"data source {self.name!r}: weight={self.weight} must be a finite number > 0 "
                "(remove the source to leave it out)"
            )
        if self.builder is not None and self.builder not in BUILDERS:
            raise ConfigError(
                f"data source {self.name!r}: builder={self.builder!r}; choose one of {BUILDERS} "
                "or leave it empty to infer it from the file extension"
            )
        if not self.text_field:
            raise ConfigError(f"data source {self.name!r}: text_field must not be empty")


def source_identity(src: SourceConfig) -> dict:
    """What makes two source entries read the same documents (the weight does not)."""
    return {"path": src.path, "config_name": src.config_name, "split": src.split,
            "data_files": list(src.data_files or []), "text_field": src.text_field,
            "builder": src.builder}


@dataclass
class MixtureConfig:
    """Sources sampled together. Each next document comes from source i with probability
    p_i: weight_i / sum(weights) (`weighting: documents`), or (weight_i / L_i) / sum_j
    (weight_j / L_j) with L_i the running mean document length of source i in tokens
    (`weighting: tokens`), so that source i supplies a share weight_i / sum(weights) of the
    tokens however long its documents are.

    A source keeps its position across the stage boundary when stage 2 lists it under the same
    name (it must then read the same data); a name new in stage 2 starts at its beginning."""

    sources: list[SourceConfig] = field(default_factory=list)
    weighting: str = "documents"
    """documents | tokens: what the weights are shares of. Documents of different sets differ
    up to tenfold in length, so document weights of 1:1 can mean token shares of 1:10."""

    def __post_init__(self) -> None:
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"mixture has several sources named {dup}; give each a unique name")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"mixture weighting={self.weighting!r}; choose one of {WEIGHTINGS}")

    def probabilities(self) -> list[float]:
        """Normalised weights, in source order (shares of documents or of tokens)."""
        total = sum(s.weight for s in self.sources)
        return [s.weight / total for s in self.sources]


@dataclass
class PretrainDataConfig:
    """The `data` section of a pretraining run."""

    seq_len: int = 2048
    """Tokens per packed row."""
    stage1: MixtureConfig = field(default_factory=MixtureConfig)
    """Mixture of stage 1 (the high-LR stage)."""
    stage2: MixtureConfig | None = None
    """Mixture of stage 2 (the cooldown), e.g. more curated data. None: keep stage 1's."""
    seed: int = 0
    """Seeds the shard order of every source in every epoch (identical on every rank, which
    the rank split relies on), each rank's draw among the sources and its shuffle buffer."""
    tokenize_batch_size: int = 256
    """Documents tokenized per call (the Rust tokenizer parallelises over a batch)."""
    shuffle_buffer: int = 0
    """Documents held in a shuffle buffer after tokenization and mixing (0: off). Its content
    is part of the stream state, so resuming stays exact (datasets' own streaming buffer is
    refilled on resume, so we only take its shard shuffling)."""
    document_masking: bool = True
    """Attention stays inside each packed document (document_ids), positions restart at each
    one, and no token is trained to predict the first token of the next document."""
    num_workers: int = 0
    """DataLoader worker processes producing batches (needs torchdata's StatefulDataLoader);
    each worker reads its own shard, so the data order depends on this number, and resume
    needs the same number. 0: read and tokenize in the training process."""
    streaming: bool = True
    """Stream the sources (no local copy). False: `datasets` prepares an Arrow copy in its
    cache first (faster random access on small local corpora)."""

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len} must be >= 2")
        if not self.stage1.sources:
            raise ConfigError(
                "data.stage1.sources is empty: list at least one source (Hub id or local files)"
            )
        if self.stage2 is not None:
            self._check_same_data_under_one_name()
        if self.stage2 is not None and not self.stage2.sources:
            raise ConfigError(
                "data.stage2.sources is empty: list its sources, or set data.stage2 to null to "
                "keep stage 1's mixture"
            )
        if self.tokenize_batch_size <= 0:
            raise ConfigError(f"data.tokenize_batch_size={self.tokenize_batch_size} must be > 0")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer={self.shuffle_buffer} must be >= 0 (0: off)")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0")

    def _check_same_data_under_one_name(self) -> None:
        """A stage-2 source continues the stage-1 source of its name: it must read the same
        data, or positions would be carried into another dataset."""
        first = {s.name: source_identity(s) for s in self.stage1.sources}
        for src in self.stage2.sources:
            then, now = first.get(src.name), source_identity(src)
            if then is not None and then != now:
                diff = {k: (then[k], now[k]) for k in now if then[k] != now[k]}
                raise ConfigError(
                    f"data source {src.name!r} reads other data in stage 2 than in stage 1 "
                    f"({diff} as (stage 1, stage 2)); a source continues across the boundary "
                    "under its name, so give the stage-2 source another name"
                )

    def mixture(self, stage: int) -> MixtureConfig:
        """The mixture of training stage 1 or 2."""
        if stage not in (1, 2):
            raise ConfigError(f"pretraining stage must be 1 or 2, got {stage}")
        if stage == 2 and self.stage2 is not None:
            return self.stage2
        return self.stage1
