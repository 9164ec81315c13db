"""Direct preference optimisation (sigmoid DPO) against a frozen reference.

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

Log-probabilities are summed over response tokens (labels != -100, the chat template and prompt
masked exactly as in SFT). The reference is the starting checkpoint, frozen, computing the same
ternary forward. With `precompute_reference`, its log-probs are computed for the whole dataset in
one pass and the reference is dropped from memory; batches then carry `ref_logps`.
Batches hold 2B rows: chosen [0, B), rejected [B, 2B).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from bitnet_train.train.losses import fused_linear_dpo, sequence_logps
from bitnet_train.train.objectives.base import MicroStep
from bitnet_train.train.objectives.language_model import model_inputs

METRICS = ("rewards_chosen", "rewards_rejected", "margin", "accuracy")


def make_reference(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` (eval mode, no gradients), same ternary forward."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


@torch.no_grad()
def reference_logps(ref: nn.Module, batch: dict[str, Tensor], loss_impl: str = "auto") -> Tensor:
    """(2B,) summed response log-probs of the reference."""
    labels = batch["labels"]
    return ref(**model_inputs(batch),
               head_fn=lambda h, w: sequence_logps(h, w, labels, impl=loss_impl))


class DPOObjective:
    """`count` = preference pairs; reduction is the mean over pairs of the global batch."""

    reduction = "mean"

    def __init__(self, beta: float = 0.1, loss_impl: str = "auto",
                 reference: nn.Module | None = None) -> None:
        self.beta = beta
        self.loss_impl = loss_impl
        self.reference = reference

    def setup(self, model: nn.Module, accelerator) -> None:
        if self.reference is not None:
            self.reference.to(accelerator.device)

    def count(self, batch: dict[str, Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def micro_step(self, model: nn.Module, batch: dict[str, Tensor]) -> MicroStep:
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
        elif self.reference is not None:
            ref = reference_logps(self.reference, batch, self.loss_impl)
        else:
            raise RuntimeError("DPO needs a reference model or precomputed ref_logps")
        pairs = batch["input_ids"].shape[0] // 2
        labels = batch["labels"]
        loss, metrics = model(
            **model_inputs(batch),
            head_fn=lambda h, w: fused_linear_dpo(
                h, w, labels, ref_logps=(ref[:pairs], ref[pairs:]), beta=self.beta,
                impl=self.loss_impl,
            ),
        )
        # losses return means over this micro-batch's pairs; the trainer wants sums
        sums = {k: metrics[k].detach().float() * pairs for k in METRICS if k in metrics}
        sums["loss"] = loss.detach().float() * pairs
        return MicroStep(loss_sum=loss * pairs, metric_sums=sums)
