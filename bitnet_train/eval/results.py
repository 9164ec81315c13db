"""The results table's row, shared by the harness suites and the external samples."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    """One line of the results table."""

    label: str
    task: str
    shots: int | None
    chat_template: bool
    metric: str
    report: float | None
    ours: float | None = None
    note: str = ""
