"""Find the file and line that a `datasets` builder could not read, to name them in the error.

pyarrow's JSON reader reports "JSON parse error ... in row 2" of a block, not of the file, and
its text reader a bare UnicodeDecodeError: neither says which of a source's files is bad. When a
read fails, these functions scan the source's local files (in order, stopping at the first bad
record) with Python's own decoders. They run only on that error path, so their speed does not
matter; compressed files (.gz, .bz2, .xz, .zst when zstandard is installed) are read through
fsspec as `datasets` reads them.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass

import fsspec

_CHUNK = 1 << 20


@dataclass(frozen=True)
class BadRecord:
    """Where a file stops being readable: 1-based line (0 when unknown) and why."""

    file: str
    line: int
    reason: str

    def where(self) -> str:
        return f"line {self.line} of {self.file}" if self.line else self.file


def _open(path: str):
    return fsspec.open(path, "rb", compression="infer")


def _utf8_error(path: str) -> BadRecord | None:
    """The first byte of `path` that is not UTF-8, as a BadRecord, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with _open(path) as f:
        while chunk := f.read(_CHUNK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                line += chunk.count(b"\n", 0, err.start)
                return BadRecord(path, line, f"byte 0x{chunk[err.start]:02x} at offset "
                                 f"{offset + err.start} is not UTF-8 (a binary file?)")
            line += chunk.count(b"\n")
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return BadRecord(path, line, "the file ends inside a UTF-8 character")
    return None


def _json_error(path: str) -> BadRecord | None:
    """The first line of a JSON-lines file that is not one JSON object (or None). A file that
    is one JSON document (an array or an object over several lines) is checked as a whole."""
    with _open(path) as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                return BadRecord(path, number, f"byte 0x{raw[err.start]:02x} is not UTF-8")
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                if number == 1 and _whole_document_parses(path):
                    return None
                return BadRecord(path, number, f"not valid JSON ({err.msg} at column "
                                 f"{err.colno})")
            if not isinstance(record, dict):
                if number == 1 and isinstance(record, list):
                    return None  # a one-line JSON array of records
                return BadRecord(path, number, f"a JSON {type(record).__name__}, not an "
                                 "object ({\"text\": ...})")
    return None


def _whole_document_parses(path: str) -> bool:
    with _open(path) as f:
        try:
            json.loads(f.read().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
    return True


def _parquet_error(path: str) -> BadRecord | None:
    import pyarrow.parquet as pq

    try:
        with _open(path) as f:
            pq.ParquetFile(f).schema_arrow  # noqa: B018 - reads and checks the footer
    except Exception as err:  # noqa: BLE001 - any failure is the answer
        return BadRecord(path, 0, f"not a readable Parquet file ({type(err).__name__}: {err})")
    return None


CHECKS = {"json": _json_error, "text": _utf8_error, "parquet": _parquet_error}


def find_bad_record(builder: str, files: list[str]) -> BadRecord | None:
    """The first unreadable record of `files` for `builder` (json, text, parquet), or None."""
    check = CHECKS.get(builder)
    if check is None:
        return None
    for path in files:
        try:
            bad = check(path)
        except OSError as err:
            bad = BadRecord(path, 0, f"cannot be read ({err})")
        if bad is not None:
            return bad
    return None
