"""Next-token cross-entropy: the `pretrain` and `sft` objectives.

Both are the same quantity, the sum of token cross-entropies over labelled positions; they differ
in their data (SFT labels only assistant tokens) and in the default reduction (pretraining: mean
per token; SFT: sum, as the 2B4T report prescribes). The loss is computed inside the model's
forward through `head_fn`, with Liger's fused linear cross-entropy on CUDA (no logits
materialised) and a chunked PyTorch path elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bitnet_train.data.packing import IGNORE_INDEX
from bitnet_train.train.losses import causal_lm_head_fn
from bitnet_train.train.objectives.base import MicroStep

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "document_ids")


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The subset of a batch the model's forward takes."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


class LanguageModelObjective:
    """Token cross-entropy; `count` = label tokens that carry loss (after the shift)."""

    def __init__(self, reduction: str = "mean", loss_impl: str = "auto",
                 liger_chunk_mem: int = 8) -> None:
        self.reduction = reduction
        self.loss_impl = loss_impl
        self.liger_chunk_mem = liger_chunk_mem

    def setup(self, model: nn.Module, accelerator) -> None:
        return None

    def count(self, batch: dict[str, Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def micro_step(self, model: nn.Module, batch: dict[str, Tensor]) -> MicroStep:
        head = causal_lm_head_fn(batch["labels"], reduction="sum", impl=self.loss_impl,
                                 liger_chunk_mem=self.liger_chunk_mem)
        loss_sum, _ = model(**model_inputs(batch), head_fn=head)
        return MicroStep(loss_sum=loss_sum, metric_sums={"loss": loss_sum.detach().float()})


@torch.no_grad()
def evaluate_token_loss(
    model: nn.Module, batches: list[dict[str, Tensor]], loss_impl: str = "auto"
) -> float:
    """Mean token cross-entropy of `model` over `batches` (no gradient)."""
    total, n = 0.0, 0
    for batch in batches:
        head = causal_lm_head_fn(batch["labels"], reduction="sum", impl=loss_impl)
        loss_sum, count = model(**model_inputs(batch), head_fn=head)
        total += float(loss_sum)
        n += int(count)
    return total / max(n, 1)
