"""Divergence: a non-finite or spiking loss or gradient norm, caught before the update.

A step is anomalous when its loss (per-token mean over the global batch) or its global gradient
norm is non-finite, or exceeds the mean of the last `window` accepted steps by more than `sigma`
standard deviations (once the history holds window // 2 steps; sigma 0 turns the spike test
off). Only accepted steps enter the history, so a spike does not widen the band it is judged
by. This is the rule of OLMo-core's SkipStepOptimizer (window 128, sigma 6), judged on the host
from the two numbers the step already syncs, so it adds no device synchronisation.

What an anomaly says about checkpoints. The checkpoint written after step c (`step_c`, steps
counted from 1 as the log counts them) holds the weights that step c + 1 computes its loss
with. A loss anomaly at step s therefore puts the weights of `step_{s-1}` in doubt (the update
of step s - 1 may be what blew up; the batch may be the culprit instead, which we cannot tell),
so the newest trustworthy checkpoint is `step_{s-2}` or older. A gradient-norm anomaly with a
normal loss leaves `step_{s-1}` trusted. While updates are skipped the weights do not change,
so the judgement made at the first step of a run of anomalies holds for the whole run.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

ACTIONS = ("stop", "skip")
Verdict = Literal["ok", "skip", "stop"]


@dataclass
class Anomaly:
    """What made step `step` (0-based, as the trainer counts) anomalous."""

    step: int
    metric: str
    """"loss" or "grad_norm"."""
    value: float
    mean: float | None = None
    std: float | None = None
    window: int = 0

    def describe(self) -> str:
        name = "loss" if self.metric == "loss" else "gradient norm"
        if not math.isfinite(self.value):
            return f"non-finite {name} ({self.value})"
        z = (self.value - self.mean) / self.std
        return (f"{name} {self.value:.6g} is {z:.1f} standard deviations above the mean "
                f"{self.mean:.6g} of the last {self.window} accepted steps")


class DivergenceGuard:
    """Judges each step before its update: "ok", "skip" (action skip, within `max_skips`
    consecutive skips) or "stop". Its state is part of every checkpoint, so a resumed run judges
    exactly as the uninterrupted one would."""

    def __init__(self, action: str = "stop", sigma: float = 6.0, window: int = 128,
                 max_skips: int = 10) -> None:
        if action not in ACTIONS:
            raise ValueError(f"action={action!r}; choose one of {ACTIONS}")
        self.action, self.sigma, self.window, self.max_skips = action, sigma, window, max_skips
        self.losses: deque[float] = deque(maxlen=window)
        self.grad_norms: deque[float] = deque(maxlen=window)
        self.skipped = 0
        """Updates skipped in the whole run."""
        self.consecutive = 0
        """Updates skipped in a row up to now."""
        self.began: int | None = None
        """First step (0-based) of the current run of anomalies; None when the last step was ok."""
        self.suspect = False
        """Whether the weights in use since `began` produced an anomalous loss."""
        self.last: Anomaly | None = None

    @property
    def min_history(self) -> int:
        return max(2, self.window // 2)

    def _spike(self, step: int, metric: str, value: float, history: deque[float]) -> Anomaly | None:
        if not math.isfinite(value):
            return Anomaly(step, metric, value)
        if self.sigma <= 0 or len(history) < self.min_history:
            return None
        n = len(history)
        mean = sum(history) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in history) / (n - 1))
        # a floor keeps a flat history (identical values) from flagging any increase at all
        std = max(std, 1e-2 * abs(mean), 1e-12)
        if value > mean + self.sigma * std:
            return Anomaly(step, metric, value, mean, std, n)
        return None

    def observe(self, step: int, loss: float, grad_norm: float) -> Verdict:
        """Judge step `step` from its loss and gradient norm (before its update)."""
        anomaly = (self._spike(step, "loss", loss, self.losses)
                   or self._spike(step, "grad_norm", grad_norm, self.grad_norms))
        if anomaly is None:
            self.losses.append(loss)
            self.grad_norms.append(grad_norm)
            self.consecutive, self.began, self.suspect = 0, None, False
            return "ok"
        self.last = anomaly
        if self.began is None:
            self.began, self.suspect = step, anomaly.metric == "loss"
        if self.action == "skip" and self.consecutive < self.max_skips:
            self.consecutive += 1
            self.skipped += 1
            return "skip"
        return "stop"

    def trusted_up_to(self, step: int) -> int:
        """Highest checkpoint step whose weights predate the divergence, when the guard stops
        at 0-based step `step` (checkpoint `step_k` is saved after k steps)."""
        began = self.began if self.began is not None else step
        return began - 1 if self.suspect else began

    def reset_history(self) -> None:
        """Forget the statistics (e.g. at the schedule's stage boundary, where the data and
        learning rate change and the old band no longer describes normal steps)."""
        self.losses.clear()
        self.grad_norms.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms),
                "skipped": self.skipped, "consecutive": self.consecutive,
                "began": self.began, "suspect": self.suspect}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = deque(state["losses"], maxlen=self.window)
        self.grad_norms = deque(state["grad_norms"], maxlen=self.window)
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])
        self.began, self.suspect = state["began"], bool(state["suspect"])
