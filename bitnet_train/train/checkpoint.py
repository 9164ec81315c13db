"""Atomic checkpoint directories: a torn write is never taken for a checkpoint.

Layout under `root`::

    step_00000100/            a whole checkpoint: what write_fn wrote, metadata.json, COMPLETE
    step_00000200/
    .tmp-step_00000300/       a save in progress (or the leftover of a crashed one)
    step_00000400.damaged/    a checkpoint that failed verification, moved aside on resume

`Checkpointer.save` writes into a hidden temporary directory, fsyncs every file, writes the
`COMPLETE` marker last, then renames the directory to `step_XXXXXXXX` (a rename within one
filesystem is atomic). A checkpoint is whole iff its name is `step_<digits>` and it holds
`COMPLETE`; everything else is ignored by `latest()` / `all()`. What goes inside (accelerate's
`save_state`, data position, tokenizer) is the trainer's business: it passes `write_fn`.
COMPLETE holds the integrity manifest of every other file (size and SHA-256,
`bitnet_train.integrity`); `verify` checks it and `newest_intact` finds the newest checkpoint
that passes. `commit_async` does the fsyncs, the hashing and the publication on a background
thread, so training continues meanwhile.
One run saves into a root at a time (the main process publishes; see `Checkpointer.save` for
payloads that several ranks write).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bitnet_train.atomic import replace_directory
from bitnet_train.errors import CheckpointError, ConfigError, IntegrityError, TrainingError
from bitnet_train.integrity import build_manifest, manifest_text, parse_manifest, verify_manifest
from bitnet_train.provenance import git_revision
from bitnet_train.write_errors import describe_failure, free_bytes, tree_bytes

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
METADATA = "metadata.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
DAMAGED_SUFFIX = ".damaged"
# Keys of a transformers config dict that do not change the model's function or shapes.
_IGNORED_CONFIG_KEYS = frozenset(
    {"initializer_range", "use_cache", "torch_dtype", "dtype", "transformers_version"}
)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class Checkpointer:
    """Saves, lists and prunes whole checkpoints under `root`, keeping the newest `keep_last`
    (0 keeps all)."""

    def __init__(self, root: str | Path, keep_last: int) -> None:
        if keep_last < 0:
            raise ConfigError(f"trainer.keep_last must be >= 0 (0 keeps all), got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    # -- writing ------------------------------------------------------------------------------
    def save(self, step: int, write_fn: Callable[[Path], None], metadata: dict[str, Any]) -> Path:
        """Write checkpoint `step` atomically and return its directory.

        `write_fn(tmp_dir)` writes the payload; then `commit` adds metadata.json and COMPLETE
        and renames. On any error the temporary directory is removed and a TrainingError says
        what happened; earlier checkpoints are untouched. For a payload written by several
        processes (accelerate's `save_state` writes one RNG file per rank), use the three steps
        yourself: main `begin(step)`; barrier; every rank writes into `staging_dir(step)`;
        barrier; main `commit(step, metadata)` (or `abort(step)`).
        """
        tmp = self.begin(step)
        with self._cleanup_on_error(step):
            write_fn(tmp)
        return self.commit(step, metadata)

    def staging_dir(self, step: int) -> Path:
        """Where checkpoint `step` is written before it is published (a hidden .tmp dir)."""
        return self.root / f"{_TMP_PREFIX}{step_dir_name(step)}"

    def begin(self, step: int) -> Path:
        """Create an empty staging directory for `step` (removing leftovers of crashed saves).
        Waits for a commit still running in the background (and raises its failure)."""
        self.wait()
        with self._cleanup_on_error(step):
            self.root.mkdir(parents=True, exist_ok=True)
            self.cleanup_torn()  # we are the only writer: any .tmp dir is a crash's leftover
            tmp = self.staging_dir(step)
            tmp.mkdir()
        return tmp

    def commit(self, step: int, metadata: dict[str, Any], prune: bool = True) -> Path:
        """Finish `step`'s staging dir: metadata.json (`metadata` plus `step`, `time` in UTC ISO
        8601, `git_revision`), fsync of every file, COMPLETE last holding the manifest of every
        file, rename to step_XXXXXXXX (replacing an older dir of that name only once the new one
        is whole), then prune (unless `prune` is False)."""
        tmp, final = self.staging_dir(step), self.root / step_dir_name(step)
        with self._cleanup_on_error(step):
            if not tmp.is_dir():
                raise FileNotFoundError(f"staging directory {tmp} is missing; call begin() first")
            meta = {**metadata, "step": step, "time": _utc_now(), "git_revision": git_revision()}
            (tmp / METADATA).write_text(json.dumps(meta, indent=2, default=str))
            _fsync_tree(tmp)
            manifest = build_manifest(tmp, exclude=(COMPLETE,))  # hashes what is on disk now
            # last: its presence vouches for the rest, its content says for which bytes
            _write_synced(tmp / COMPLETE, manifest_text(manifest))
            _fsync_dir(tmp)
            self._publish(tmp, final)
        if prune:
            self.prune()
        return final

    def commit_async(self, step: int, metadata: dict[str, Any], prune: bool = True) -> None:
        """`commit` on a background thread: fsync, hashing and publication overlap the next
        training steps. `wait()` (called by the next `begin`) joins it and raises its failure;
        a kill meanwhile leaves a .tmp dir, which is never taken for a checkpoint."""
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-commit")
        self._pending = self._executor.submit(self.commit, step, metadata, prune)

    def wait(self) -> Path | None:
        """Join the background commit, if any: its checkpoint path, or its TrainingError."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def abort(self, step: int) -> None:
        """Drop `step`'s staging directory (a failed multi-process write)."""
        shutil.rmtree(self.staging_dir(step), ignore_errors=True)

    @contextlib.contextmanager
    def _cleanup_on_error(self, step: int) -> Iterator[None]:
        """Remove the staging dir on any error; re-raise it as a TrainingError saying what is
        left (KeyboardInterrupt and SystemExit are re-raised unchanged)."""
        try:
            yield
        except BaseException as exc:
            if not isinstance(exc, Exception):
                self.abort(step)
                raise
            raise self.write_failure(step, exc) from exc

    def write_failure(self, step: int, exc: BaseException,
                      needed_bytes: int | None = None) -> TrainingError:
        """Remove `step`'s staging dir and return the TrainingError to raise for `exc`, any
        write error from any library: it says whether the disk is full, names the directory,
        the bytes a checkpoint needs (the previous checkpoint's size, else `needed_bytes`) and
        the free space when the write failed, and that the previous checkpoint is intact."""
        staging = self.staging_dir(step)
        free, staged = free_bytes(self.root), tree_bytes(staging)  # before the cleanup frees it
        self.abort(step)
        previous = self.latest()
        kept = (f"the previous checkpoint {previous} is intact" if previous
                else "no earlier checkpoint exists")
        needed = self.expected_bytes() or needed_bytes
        full, details = describe_failure(exc, needed, free, staged)
        if full:
            return TrainingError(
                f"disk full while writing checkpoint step {step} to {self.root} {details}. The "
                f"partial checkpoint {staging.name} was removed; {kept}. Free space or lower "
                "trainer.keep_last, then resume with trainer.resume=auto."
            )
        return TrainingError(
            f"writing checkpoint step {step} to {self.root} failed {details}. The partial "
            f"checkpoint {staging.name} was removed and nothing was kept for this step; {kept}."
        )

    def expected_bytes(self) -> int | None:
        """Bytes of the newest whole checkpoint, from its manifest (None if unknown)."""
        latest = self.latest()
        try:
            manifest = read_manifest(latest) if latest else None
        except (IntegrityError, OSError):
            return None
        return manifest["total_bytes"] if manifest else None

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename `tmp` to `final`, replacing an older directory of the same name if any (moved
        aside as a .tmp dir first, so a crash between the renames leaves no torn step dir)."""
        replace_directory(tmp, final, aside=final.with_name(f"{_TMP_PREFIX}replaced-{final.name}"))
        _fsync_dir(self.root)

    def prune(self) -> list[Path]:
        """Delete all but the newest `keep_last` whole checkpoints; returns the deleted ones."""
        whole = self.all()
        if self.keep_last == 0 or len(whole) <= self.keep_last:
            return []
        doomed = whole[: -self.keep_last]
        for path in doomed:
            # Rename first: a prune killed midway then leaves a .tmp dir (removed by the next
            # begin), never a "whole" checkpoint with missing files.
            trash = self.root / f"{_TMP_PREFIX}pruned-{path.name}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        return doomed

    def cleanup_torn(self) -> list[Path]:
        """Remove temporary directories left by interrupted saves; returns them."""
        if not self.root.is_dir():
            return []
        torn = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(_TMP_PREFIX)]
        for path in torn:
            shutil.rmtree(path, ignore_errors=True)
        return torn

    # -- reading ------------------------------------------------------------------------------
    def all(self) -> list[Path]:
        """Whole checkpoints (name `step_<digits>` and a COMPLETE marker), oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            m = _STEP_DIR.match(path.name)
            if m and (path / COMPLETE).is_file():
                found.append((int(m.group(1)), path))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The whole checkpoint with the highest step, or None."""
        whole = self.all()
        return whole[-1] if whole else None

    def newest_intact(self) -> tuple[Path | None, list[tuple[Path, IntegrityError]]]:
        """(the newest whole checkpoint that passes `verify`, or None; the newer ones that
        failed, newest first, each with the error naming its damaged file)."""
        damaged: list[tuple[Path, IntegrityError]] = []
        for path in reversed(self.all()):
            try:
                verify(path)
            except IntegrityError as err:
                damaged.append((path, err))
                continue
            return path, damaged
        return None, damaged

    def quarantine(self, path: str | Path) -> Path:
        """Rename a damaged checkpoint to `step_XXXXXXXX.damaged` (ignored, never pruned)."""
        path = Path(path)
        target = path.with_name(path.name + DAMAGED_SUFFIX)
        if target.exists():
            shutil.rmtree(target)
        os.rename(path, target)
        return target

    @staticmethod
    def step_of(path: str | Path) -> int:
        """The step of a checkpoint directory named step_XXXXXXXX."""
        m = _STEP_DIR.match(Path(path).name)
        if not m:
            raise CheckpointError(f"{path} is not named step_<digits>")
        return int(m.group(1))

    @staticmethod
    def load_metadata(path: str | Path) -> dict[str, Any]:
        return load_metadata(path)

    @staticmethod
    def check_compatible(path: str | Path, model_config: dict[str, Any]) -> None:
        check_compatible(path, model_config)


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The integrity manifest in checkpoint `path`'s COMPLETE marker; None for a checkpoint
    written before markers carried one (its marker holds just the step)."""
    marker = Path(path) / COMPLETE
    text = marker.read_text(errors="replace")
    if text.strip().isdigit():
        return None
    return parse_manifest(text, marker)


def verify(path: str | Path) -> None:
    """Raise IntegrityError naming the first file of checkpoint `path` that is missing,
    truncated or altered since it was written (sizes are all checked before any hash)."""
    manifest = read_manifest(path)
    if manifest is None:
        log.warning("%s predates integrity manifests: it is used unverified", path)
        return
    verify_manifest(path, manifest)


def load_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata.json of checkpoint directory `path`; CheckpointError if absent or torn."""
    path = Path(path)
    file = path / METADATA
    if not (path / COMPLETE).is_file():
        raise CheckpointError(
            f"{path} is not a whole checkpoint (no {COMPLETE} marker): it was torn or is not a "
            "checkpoint directory; pick another one (Checkpointer.latest() finds the newest whole)"
        )
    try:
        return json.loads(file.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"{path} has no {METADATA}; it was not written by Checkpointer"
        ) from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{file} is not valid JSON ({exc}); the checkpoint is damaged"
        ) from exc


def check_compatible(
    path: str | Path, model_config: dict[str, Any], ignore: Iterable[str] = _IGNORED_CONFIG_KEYS
) -> None:
    """Raise CheckpointError naming the first key of `model_config` (a transformers config dict,
    as `BitNetConfig.to_hf_dict()` gives) whose value differs from the checkpoint's
    `model_config` metadata. Keys in `ignore` (init-only or runtime switches) are skipped."""
    saved = load_metadata(path).get("model_config")
    if not isinstance(saved, dict):
        raise CheckpointError(
            f"{path}/{METADATA} has no model_config, so its model shape cannot be checked; "
            "resume from a checkpoint written by this trainer"
        )
    ignored = set(ignore)
    for key, want in model_config.items():
        if key in ignored:
            continue
        have = saved.get(key, "<absent>")
        # Compare through JSON so that tuples/lists and ints/floats read back equal.
        if json.loads(json.dumps(want, default=str)) != have:
            raise CheckpointError(
                f"checkpoint {path} was saved for another model: {key}={have!r} there, "
                f"{key}={want!r} in this run's model config. Resume from a checkpoint of this "
                "model shape, choose the matching model=... group, or use a fresh output_dir."
            )


# -- durability helpers ---------------------------------------------------------------------------
def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, so the data is on disk before COMPLETE."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    """Persist a directory's entries (new names, renames). Not supported everywhere: best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. some network filesystems refuse fsync on a directory
    finally:
        os.close(fd)


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
