"""Publish files and directories atomically: fill a temporary sibling, then rename it.

A reader sees the old complete artifact, the new complete one, or (for the instant between the
two renames that replace an existing directory) none, never a half-written one. On error the
temporary is removed and the destination is left as it was.

Files published here get the mode a plain `open()` gives under the process umask (0644 with
the usual 022): libraries that write through `tempfile.mkstemp` (safetensors does) would
otherwise leave them 0600, unreadable to the group that serves the model.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bitnet_train.errors import BitNetTrainError, CheckpointError, WriteError


def current_umask() -> int:
    """The process umask, read from /proc where possible (reading it elsewhere means setting it
    for an instant, which another thread creating a file could observe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give `root` (a file) or every file under it (a directory) the mode `open()` would:
    0o666 & ~umask."""
    mode = 0o666 & ~current_umask()
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    for file in files:
        os.chmod(file, mode)


def replace_directory(tmp: Path, final: Path, aside: Path) -> None:
    """Rename directory `tmp` to `final`. An existing `final` is first renamed to `aside`
    (rename cannot replace a non-empty directory), restored if the second rename fails, and
    deleted once the new directory is in place."""
    if not final.exists():
        os.rename(tmp, final)
        return
    os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(aside, final)  # put the previous complete directory back before reporting
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _temporary_sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def atomic_directory(path: str | Path, marker: str,
                     expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to fill; on success it replaces `path` by a rename.

    An existing non-empty `path` is replaced only if it holds `marker` (e.g. `config.json`), i.e.
    it is an artifact of the same kind: `--out .` or a typo must never delete a directory of
    other files. A write error, whichever library raises it, becomes a WriteError naming the
    directory, the bytes it needs (`expected_bytes`, if known) and the bytes free.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory; choose another output path")
    if path.is_dir() and any(path.iterdir()) and not (path / marker).is_file():
        raise CheckpointError(
            f"{path} is a non-empty directory without {marker}, so it is not an earlier output "
            "of this kind; writing there would replace it and its files. Choose a new or empty "
            "directory"
        )
    tmp = _temporary_sibling(path, "tmp")
    tmp.mkdir()  # unlike tempfile.mkdtemp (mode 0700), honours the umask like the final dir
    try:
        yield tmp
    except BaseException as exc:
        if isinstance(exc, BitNetTrainError) or not isinstance(exc, Exception):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        raise _write_error(path, tmp, exc, expected_bytes) from exc
    try:
        apply_umask(tmp)
        replace_directory(tmp, path, aside=_temporary_sibling(path, "old"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_error(path: Path, tmp: Path, exc: Exception, needed: int | None) -> WriteError:
    """Remove the partial `tmp` and say why `path` could not be written, whichever library
    raised `exc` (torch, safetensors, tokenizers, gguf...)."""
    from bitnet_train.write_errors import describe_failure, free_bytes, tree_bytes

    free, staged = free_bytes(tmp), tree_bytes(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    full, details = describe_failure(exc, needed, free, staged)
    kept = "the previous version is intact" if path.exists() else "nothing was written"
    return WriteError(f"{'disk full' if full else 'write failed'} while writing {path} "
                      f"{details}; the partial copy was removed and {kept}")


def recover_atomic_directory(path: str | Path) -> list[Path]:
    """Clean up after `atomic_directory(path)` calls that were killed; returns what was removed.

    Killed while filling, they leave `.NAME.tmp-*`; killed between their two renames, `path`
    is missing and `.NAME.old-*` holds the previous complete directory, which is put back.
    Call it only where no other process writes `path` at the same time (e.g. at a run's start).
    """
    path = Path(path)
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not path.exists():
        os.replace(olds.pop(), path)
    removed = [*path.parent.glob(f".{path.name}.tmp-*"), *olds]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of file `path` to write; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give a file path")
    tmp = _temporary_sibling(path, "tmp")
    try:
        yield tmp
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
