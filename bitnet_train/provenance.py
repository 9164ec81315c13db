"""Which code produced a run or a checkpoint: the git revision of a checkout, or the installed
package's version."""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


@functools.cache
def git_revision() -> str | None:
    """HEAD of the checkout this package runs from; None for an installed wheel or a checkout
    without git. Cached: one subprocess per process.

    Only a checkout whose root holds `.git` counts: a wheel in a venv that itself sits inside
    some other repository (a project's .venv) must not report that repository's HEAD.
    """
    if not (CHECKOUT / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CHECKOUT, capture_output=True,
                             text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def code_version() -> str:
    """`git <sha>` in a checkout, else `bitnet-train <version>` of the installed distribution."""
    revision = git_revision()
    if revision:
        return f"git {revision[:12]}"
    try:
        return f"bitnet-train {metadata.version('bitnet-train')}"
    except metadata.PackageNotFoundError:
        return "bitnet-train (version unknown)"
