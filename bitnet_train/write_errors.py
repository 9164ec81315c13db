"""Telling a full disk from other write failures, whatever library raised the error.

A full disk reaches us in many costumes: `OSError(ENOSPC)` from Python's own writes,
`SafetensorError("... No space left on device (os error 28)")` from safetensors, and from
`torch.save` a bare `RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos
...")` that mentions no errno at all. `is_disk_full` therefore looks at the exception chain, at
the message, and finally at the free space left on the filesystem when the write failed.
"""

from __future__ import annotations

import errno
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("no space left on device", "os error 28", "storagefull", "disk quota exceeded",
              "os error 122", "quotaexceeded")
NEARLY_FULL_BYTES = 16 << 20
"""Below this much free space a filesystem counts as full whatever the write still needed."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def free_bytes(path: str | Path) -> int | None:
    """Free bytes (for an unprivileged user) on the filesystem holding `path` or its nearest
    existing parent; None if that cannot be read."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def is_disk_full(exc: BaseException, free: int | None = None,
                 still_needed: int | None = None) -> bool:
    """True when `exc` (or an exception it chains to) says the disk or quota is full, or when
    `free` bytes are fewer than the `still_needed` ones (or NEARLY_FULL_BYTES)."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(t in str(e).lower() for t in _FULL_TEXT):
            return True
    if free is None:
        return False
    return free < max(still_needed or 0, NEARLY_FULL_BYTES)


def tree_bytes(root: str | Path) -> int:
    """Bytes of the files under `root` (0 if it is gone)."""
    root = Path(root)
    if not root.exists():
        return 0
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def describe_bytes(n: int | float | None) -> str:
    """1234567 -> '1.23 MB' (decimal units); None -> 'an unknown amount'."""
    if n is None or not math.isfinite(n):
        return "an unknown amount"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def describe_failure(exc: BaseException, needed: int | None, free: int | None,
                     staged: int = 0) -> tuple[bool, str]:
    """(disk full?, "(Error: message); it needs about N; M is free there")."""
    still = None if needed is None else max(needed - staged, 0)
    full = is_disk_full(exc, free, still)
    what = f"{type(exc).__name__}: {exc}".strip()
    return full, (f"({what}); it needs about {describe_bytes(needed)}, "
                  f"{describe_bytes(free)} is free there")
