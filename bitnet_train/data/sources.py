"""Open one configured source as a `datasets.IterableDataset`, Hub id or local files alike.

Everything goes through `datasets.load_dataset`: a Hub id as `load_dataset(path, name, split,
data_files)`, local files through the packaged json / parquet / text builders. Tests and demos
on local jsonl therefore run the production code path. Each opened source is checked on its
first record (present, has the text field), so a misnamed column or an empty file fails at
start-up with the source named, not as a KeyError deep in a training step. A record that cannot
be read later (a JSON line that does not parse, a file that is not UTF-8) fails naming the file
and line (`read_error`).
"""

from __future__ import annotations

import glob
from pathlib import Path

import datasets
from datasets import IterableDataset

from bitnet_train.data.bad_records import find_bad_record
from bitnet_train.data.config import SourceConfig
from bitnet_train.errors import ConfigError, DataError

EXTENSION_BUILDERS = {
    ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text",
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
NUM_SHARDS_NOT_STREAMING = 64
"""Shards of an Arrow-prepared source (streaming=False): divisible by any power-of-two world
size up to 64, so split_dataset_by_node assigns whole shards."""


def _builder_for(path: str) -> str | None:
    name = path.lower()
    for ext in COMPRESSIONS:
        name = name.removesuffix(ext)
    return EXTENSION_BUILDERS.get(Path(name).suffix)


def _expand(pattern: str) -> list[str]:
    """Files of a local file, directory (recursively, known extensions) or glob, sorted."""
    path = Path(pattern).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file() and _builder_for(p.name))
    return sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_file())


def _is_local(src: SourceConfig) -> bool:
    if not src.path:
        return True
    path = src.path
    return (path.startswith(("/", "./", "../", "~")) or Path(path).expanduser().exists()
            or any(c in path for c in "*?[") or _builder_for(path) is not None)


def local_files(src: SourceConfig) -> tuple[str, list[str]]:
    """(builder, files) of a local source; DataError if nothing matches."""
    if src.data_files:
        base = Path(src.path).expanduser() if src.path else None
        patterns = [str(base / f) if base and not Path(f).is_absolute() else f
                    for f in src.data_files]
    else:
        patterns = [src.path]
    files = [f for p in patterns for f in _expand(p)]
    if not files:
        raise DataError(
            f"data source {src.name!r}: no file matches {patterns}; check the path (a file, a "
            "directory of .jsonl/.json/.parquet/.txt files, or a glob)"
        )
    builders = {src.builder} if src.builder else {_builder_for(f) for f in files}
    if None in builders or len(builders) != 1:
        shown = files[:5] + (["..."] if len(files) > 5 else [])
        raise ConfigError(
            f"data source {src.name!r}: cannot infer one builder from the files {shown} "
            f"(builders: {sorted(map(str, builders))}); set `builder` to one of json, parquet, "
            "text, or split the source"
        )
    return builders.pop(), files


def _load(src: SourceConfig, streaming: bool) -> datasets.IterableDataset | datasets.Dataset:
    if _is_local(src):
        builder, files = local_files(src)
        for f in files:
            if Path(f).stat().st_size == 0:
                raise DataError(f"data source {src.name!r}: file {f} is empty; remove it")
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            return datasets.load_dataset(builder, data_files=files, split="train",
                                         streaming=streaming, **kwargs)
        except StopIteration:  # what the json builder raises on files without a record
            raise DataError(f"data source {src.name!r}: {files[:3]} hold no records") from None
        except Exception as err:
            raise DataError(
                f"data source {src.name!r}: cannot read {files[:3]} with the {builder} builder "
                f"({type(err).__name__}: {err})"
            ) from err
    try:
        return datasets.load_dataset(src.path, name=src.config_name, split=src.split,
                                     data_files=src.data_files, streaming=streaming)
    except Exception as err:
        from bitnet_train.data.adapters import gated_error

        gated = gated_error(src.path, err)
        if gated is not None:
            raise DataError(f"data source {src.name!r}: {gated}") from err
        raise DataError(
            f"data source {src.name!r}: could not reach the dataset {src.path!r} "
            f"(config {src.config_name!r}, split {src.split!r}) on the Hugging Face Hub "
            f"({type(err).__name__}: {err}). Offline, download it elsewhere and point the "
            "source's `path` at the local files (a .jsonl/.parquet/.txt file, a directory or "
            "a glob), or list them in `data_files`"
        ) from err


def first_record(ds: IterableDataset) -> dict | None:
    """The first record, or None. Read through `.iter()`, which (unlike `iter(ds)`) does not
    split the data among DataLoader workers when called inside one."""
    batch = next(ds.iter(batch_size=1), None)
    return None if batch is None else {k: v[0] for k, v in batch.items()}


def open_source(src: SourceConfig, streaming: bool = True) -> IterableDataset:
    """The source as an IterableDataset of its raw records, checked on its first record.

    streaming=False prepares an Arrow copy in the `datasets` cache first, then iterates it in
    NUM_SHARDS_NOT_STREAMING shards (fewer for tiny sets).
    """
    try:
        ds = _load(src, streaming)
    except DataError as err:
        if not (_is_local(src) and isinstance(err.__cause__, READ_ERRORS)):
            raise
        raise read_error(src, err.__cause__) from err.__cause__
    if isinstance(ds, datasets.Dataset):
        if len(ds) == 0:
            raise DataError(f"data source {src.name!r} has no records")
        ds = ds.to_iterable_dataset(num_shards=min(NUM_SHARDS_NOT_STREAMING, len(ds)))
    try:
        first = first_record(ds)
    except READ_ERRORS as err:
        raise read_error(src, err) from err
    if first is None:
        raise DataError(
            f"data source {src.name!r} has no records; check its path, split and data_files"
        )
    if src.text_field not in first:
        raise DataError(
            f"data source {src.name!r}: its first record has no field {src.text_field!r}; its "
            f"fields are {sorted(first)}. Set the source's `text_field` to one of them"
        )
    if not isinstance(first[src.text_field], str):
        raise DataError(
            f"data source {src.name!r}: field {src.text_field!r} of the first record is a "
            f"{type(first[src.text_field]).__name__}, not text"
        )
    return ds


READ_ERRORS: tuple[type[BaseException], ...] = (ValueError, UnicodeError, OSError)
"""What `datasets` raises on unreadable data: pyarrow's ArrowInvalid (a ValueError) for JSON,
UnicodeDecodeError for text, OSError for a corrupt or unreachable file."""


def read_error(src: SourceConfig, err: BaseException) -> DataError:
    """A DataError naming the file (and line) of `src` that `datasets` failed to read with
    `err`. Local files are scanned for the first bad record; a Hub source is named as a whole."""
    if isinstance(err, DataError):
        return err
    cause = f"{type(err).__name__}: {err}"
    if _is_local(src):
        builder, files = local_files(src)
        bad = find_bad_record(builder, files)
        if bad is not None:
            return DataError(
                f"data source {src.name!r}: {bad.where()}: {bad.reason}. Fix or remove that "
                f"record (or the file), then rerun [{cause}]"
            )
        return DataError(f"data source {src.name!r}: cannot read {files[:3]} with the {builder} "
                         f"builder ({cause})")
    if isinstance(err, OSError):  # ConnectionError, timeouts: the network, not the data
        return DataError(
            f"data source {src.name!r}: streaming the Hub dataset {src.path!r} failed "
            f"({cause}); check network access, or download it and point the source's `path` "
            "at the local files"
        )
    return DataError(
        f"data source {src.name!r}: a record of the Hub dataset {src.path!r} (config "
        f"{src.config_name!r}) cannot be read ({cause}). Download its files and point the "
        "source's `path` at them: `bitnet-train data-preview` then names the file and line"
    )
