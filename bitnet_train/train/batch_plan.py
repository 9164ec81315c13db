"""The protocol between the trainer and its data: which micro-batches each step trains on."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from torch import Tensor


class BatchPlan:
    """Where a run's micro-batches come from, step by step (see data_plan.py)."""

    total_steps: int

    def batches_for_step(self, step: int, grad_accum: int) -> list[dict[str, Tensor]]:
        """The micro-batches of optimizer step `step` ([] when the data is exhausted)."""
        raise NotImplementedError  # pragma: no cover - protocol

    def state_dict(self) -> dict[str, Any]:  # pragma: no cover - protocol
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:  # pragma: no cover - protocol
        raise NotImplementedError

    def log_metrics(self, accelerator: Accelerator) -> dict[str, float]:
        """Data metrics to log with the step's (e.g. realised token share per source); called
        on every process, so it may all-reduce."""
        return {}
