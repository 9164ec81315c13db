"""Integrity manifests: the size and SHA-256 of every file of a checkpoint or an export.

A manifest is JSON::

    {"format": "bitnet-train-manifest", "version": 1, "algorithm": "sha256",
     "total_bytes": 1310720,
     "files": {"model.safetensors": {"bytes": 431288, "sha256": "9f2c..."}, ...},
     "manifest_sha256": "..."}   # over the canonical JSON of everything else

Where it lives:
- a training checkpoint: inside its `COMPLETE` marker (`train/checkpoint.py`), written after every
  file is fsynced, so the marker that vouches for the checkpoint also says what it vouched for;
- an exported or saved model directory (`save_model`, `--format hf | hf-bf16 | gpu`):
  `manifest.json` beside the files, written last;
- a GGUF file: the sidecar `NAME.gguf.manifest.json`.

`verify_manifest` compares sizes first (a truncated file fails without a byte being read), then
hashes, and raises `IntegrityError` naming the damaged file. `manifest_sha256` tells a damaged
manifest from a damaged file. SHA-256 runs at about 1.8 GB/s per core on CPUs with SHA
extensions (x86 SHA-NI, ARMv8 SHA2); `hashlib` and file reads release the GIL, so a background
thread hashes a checkpoint while training goes on (see `scripts/bench_integrity.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from torch import Tensor

from bitnet_train.errors import CheckpointError, IntegrityError

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
SIDECAR_SUFFIX = ".manifest.json"
FORMAT = "bitnet-train-manifest"
VERSION = 1
ALGORITHM = "sha256"
CHUNK_BYTES = 8 << 20
"""Read size while hashing: large enough that the GIL is taken rarely, small enough to stay in
cache."""
HASH_THREADS = 4
"""Files hashed at once (a checkpoint's model and optimizer files hash in parallel)."""
_DAMAGED_ADVICE = (
    "the file was changed or damaged after it was written (disk, copy or transfer error)"
)


# -- hashing ----------------------------------------------------------------------------------
def hash_file(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex SHA-256 of a file, read in `chunk_bytes` pieces (the GIL is released while hashing)."""
    digest = hashlib.sha256()
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _list_files(root: Path, exclude: Iterable[str]) -> list[str]:
    skip = set(exclude)
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel not in skip:
                out.append(Path(rel).as_posix())
    return sorted(out)


def _hash_many(root: Path, files: list[str]) -> dict[str, str]:
    """Hash `files` (relative to root), largest first, on up to HASH_THREADS threads."""
    order = sorted(files, key=lambda f: -(root / f).stat().st_size)
    if len(order) <= 1:
        return {f: hash_file(root / f) for f in order}
    with ThreadPoolExecutor(min(HASH_THREADS, len(order)), thread_name_prefix="hash") as pool:
        return dict(zip(order, pool.map(lambda f: hash_file(root / f), order)))


def _self_hash(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def build_manifest(
    root: str | Path, files: Iterable[str] | None = None, exclude: Iterable[str] = ()
) -> dict[str, Any]:
    """Manifest of `files` (paths relative to `root`; default: every file under it but
    `exclude`). Sizes come from one stat before hashing, so the two describe the same bytes as
    long as nobody writes meanwhile."""
    root = Path(root)
    names = sorted(files) if files is not None else _list_files(root, exclude)
    sizes = {f: (root / f).stat().st_size for f in names}
    digests = _hash_many(root, names)
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "algorithm": ALGORITHM,
        "total_bytes": sum(sizes.values()),
        "files": {f: {"bytes": sizes[f], ALGORITHM: digests[f]} for f in names},
    }
    manifest["manifest_sha256"] = _self_hash(manifest)
    return manifest


def manifest_text(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def parse_manifest(text: str, source: str | Path) -> dict[str, Any]:
    """The manifest in `text` (read from `source`); IntegrityError if it is not one or is
    damaged."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IntegrityError(f"{source}: the integrity manifest is not valid JSON ({exc}); "
                             f"it is damaged", file=str(source)) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IntegrityError(f"{source}: not a {FORMAT} file", file=str(source))
    if manifest.get("algorithm") != ALGORITHM or not isinstance(manifest.get("files"), dict):
        raise IntegrityError(f"{source}: unsupported manifest (algorithm "
                             f"{manifest.get('algorithm')!r})", file=str(source))
    if manifest.get("manifest_sha256") != _self_hash(manifest):
        raise IntegrityError(f"{source}: the integrity manifest's own checksum does not match: "
                             "the manifest itself is damaged", file=str(source))
    return manifest


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- directories (exports, saved models) ------------------------------------------------------
def write_manifest(root: str | Path, files: Iterable[str] | None = None) -> dict[str, Any]:
    """Hash the files of directory `root` (default: all) and write `root/manifest.json` last."""
    root = Path(root)
    manifest = build_manifest(root, files, exclude=(MANIFEST_FILE,))
    _write_atomic(root / MANIFEST_FILE, manifest_text(manifest))
    return manifest


def invalidate_manifest(root: str | Path) -> None:
    """Remove `root/manifest.json` before rewriting files in place, so that a write killed
    midway leaves no manifest describing files that changed."""
    (Path(root) / MANIFEST_FILE).unlink(missing_ok=True)


def verify_directory(root: str | Path) -> bool:
    """Verify `root` against its manifest.json; False (nothing checked) when there is none."""
    file = Path(root) / MANIFEST_FILE
    if not file.is_file():
        return False
    verify_manifest(root, parse_manifest(file.read_text(), file),
                    advice="re-export or re-download it; if you edited a file on purpose, "
                           f"delete {file} (it then loads unverified)")
    return True


def verify_manifest(root: str | Path, manifest: dict[str, Any], advice: str = "") -> None:
    """Raise IntegrityError naming the first file of `manifest` (relative to `root`) that is
    missing, of another size, or of another SHA-256. Sizes are all checked before any hash."""
    root = Path(root)
    entries: dict[str, dict[str, Any]] = manifest["files"]
    tail = f"; {advice}" if advice else ""
    for name, entry in entries.items():
        path = root / name
        if not path.is_file():
            raise IntegrityError(f"{path} is missing (the manifest lists it){tail}", file=name)
        size = path.stat().st_size
        if size != entry["bytes"]:
            kind = "truncated" if size < entry["bytes"] else "longer than written"
            raise IntegrityError(
                f"{path} is damaged: {size} bytes, {entry['bytes']} when written ({kind}){tail}",
                file=name)
    digests = _hash_many(root, list(entries))
    for name, entry in entries.items():
        if digests[name] != entry[ALGORITHM]:
            raise IntegrityError(
                f"{root / name} is damaged: its SHA-256 differs from the one recorded when it "
                f"was written; {_DAMAGED_ADVICE}{tail}", file=name)


# -- single files (GGUF) ----------------------------------------------------------------------
def sidecar_path(file: str | Path) -> Path:
    file = Path(file)
    return file.with_name(file.name + SIDECAR_SUFFIX)


def publish_file(tmp: str | Path, final: str | Path) -> Path:
    """Hash the finished `tmp`, then rename it to `final` and write `final`'s sidecar manifest.

    A stale sidecar is removed before the rename, so a kill at any point leaves either the old
    file, or the new file without a sidecar, or the new file with its own: never a manifest
    that describes other bytes.
    """
    tmp, final = Path(tmp), Path(final)
    manifest = build_manifest(tmp.parent, [tmp.name])
    entry = manifest["files"].pop(tmp.name)
    manifest["files"][final.name] = entry
    manifest["manifest_sha256"] = _self_hash(manifest)
    sidecar = sidecar_path(final)
    sidecar.unlink(missing_ok=True)
    os.replace(tmp, final)
    _write_atomic(sidecar, manifest_text(manifest))
    return final


def write_sidecar(file: str | Path) -> Path:
    """Hash the published `file` and write its sidecar manifest (`NAME.manifest.json`).

    Callers remove the old sidecar before they replace the file (`discard_sidecar`), so a kill at
    any point leaves no manifest that describes other bytes."""
    file = Path(file)
    sidecar = sidecar_path(file)
    _write_atomic(sidecar, manifest_text(build_manifest(file.parent, [file.name])))
    return sidecar


def discard_sidecar(file: str | Path) -> None:
    """Remove `file`'s sidecar manifest, before `file` is replaced."""
    sidecar_path(file).unlink(missing_ok=True)


def verify_file(file: str | Path) -> bool:
    """Verify `file` against its sidecar manifest; False when it has none."""
    file = Path(file)
    sidecar = sidecar_path(file)
    if not sidecar.is_file():
        return False
    manifest = parse_manifest(sidecar.read_text(), sidecar)
    if list(manifest["files"]) != [file.name]:
        raise IntegrityError(f"{sidecar} describes {list(manifest['files'])}, not {file.name}: "
                             "the file was renamed; rename it back or delete the sidecar",
                             file=sidecar.name)
    verify_manifest(file.parent, manifest,
                    advice=f"re-export it; if you changed it on purpose, delete {sidecar}")
    return True


# -- loaded values ----------------------------------------------------------------------------
def refuse_non_finite(named: Iterable[tuple[str, Tensor]], source: str | Path) -> None:
    """CheckpointError naming the first floating tensor holding NaN or infinity."""
    for name, t in named:
        if t.is_floating_point() and not bool(t.isfinite().all()):
            bad = int((~t.isfinite()).sum())
            raise CheckpointError(
                f"{source}: tensor {name} holds {bad} non-finite value(s) (NaN or infinity) of "
                f"{t.numel()}; the weights are damaged or come from a diverged run. Load another "
                "checkpoint."
            )

