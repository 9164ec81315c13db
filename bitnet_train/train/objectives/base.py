"""The objective plug-in: what one micro-batch contributes to a step.

An objective returns SUMS (of token losses, of pair losses, of metrics) and the number of items
they were summed over. The trainer all-reduces the item count of the whole optimizer step first
and then scales each micro-batch's sum, so that the step's gradient is exactly that of the sum
(`reduction: sum`) or of the mean (`reduction: mean`) over the global batch, whatever the number
of processes and accumulation steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor, nn


@dataclass
class MicroStep:
    """loss_sum: differentiable scalar, the sum of per-item losses of this micro-batch.
    metric_sums: detached scalars summed over the same items (divided by the global count
    for logging)."""

    loss_sum: Tensor
    metric_sums: dict[str, Tensor] = field(default_factory=dict)


class Objective(Protocol):
    """pretrain / sft / dpo. The loop calls `setup` once, then `count` and `micro_step`."""

    reduction: str
    """"sum" or "mean" over the global batch's items."""

    def setup(self, model: nn.Module, accelerator) -> None:
        """Prepare anything besides the policy (DPO: the frozen reference)."""

    def count(self, batch: dict[str, Tensor]) -> int:
        """Items this micro-batch contributes (label tokens, or preference pairs)."""

    def micro_step(self, model: nn.Module, batch: dict[str, Tensor]) -> MicroStep:
        """Forward one micro-batch through `model` (the accelerate-wrapped module)."""
