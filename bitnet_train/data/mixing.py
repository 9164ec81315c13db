"""Which source the next document comes from: the mixture's draw, pure and resumable.

With `weighting: documents` source i is drawn with probability w_i / sum_j w_j. With
`weighting: tokens` the weights are token shares: drawing source i with probability
proportional to w_i / L_i (L_i its mean document length in tokens) makes the expected tokens
per draw from source i proportional to p_i * L_i = w_i. L_i is not known in advance for a
streamed corpus; the stream passes the running mean over the documents read so far, which is a
function of the stream's position, so resuming stays exact.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence
from typing import Any

from bitnet_train.data.config import WEIGHTINGS


def draw_probabilities(weights: Sequence[float], weighting: str,
                       mean_tokens: Sequence[float] | None = None) -> list[float]:
    """Per-document draw probabilities of sources with `weights` (see module docstring).

    mean_tokens: mean tokens per document of each source (needed for `tokens`); a source with
    no token read yet counts as length 1.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}; choose one of {WEIGHTINGS}")
    if weighting == "tokens":
        if mean_tokens is None or len(mean_tokens) != len(weights):
            raise ValueError("token weighting needs one mean document length per source")
        raw = [w / max(length, 1.0) for w, length in zip(weights, mean_tokens)]
    else:
        raw = list(weights)
    total = sum(raw)
    return [r / total for r in raw]


class SourceSampler:
    """Draws source indices with given probabilities from a seeded RNG whose state is saved."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def draw(self, probabilities: Sequence[float]) -> int:
        """Index i with probability probabilities[i] (they sum to 1)."""
        if len(probabilities) == 1:
            return 0  # no RNG draw: a one-source mixture is plain reading
        cumulative = list(itertools.accumulate(probabilities))
        i = bisect.bisect_right(cumulative, self._rng.random() * cumulative[-1])
        return min(i, len(probabilities) - 1)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
