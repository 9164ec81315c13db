"""Direct preference optimisation (sigmoid DPO) against a frozen reference.

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x))
                                - (log pi(y_l|x) - log ref(y_l|x))))

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

from bitnet_train.train.losses import (
    dpo_loss_from_logps,
    fused_linear_dpo,
    resolve_impl,
    sequence_logps,
)
from bitnet_train.train.objectives.base import MicroStep
from bitnet_train.train.objectives.language_model import model_inputs

METRICS = ("rewards_chosen", "rewards_rejected", "margin", "accuracy")


def make_reference(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` (eval mode, no gradients), same ternary forward."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def release(ref: nn.Module | None) -> None:
    """Free the gathered weights of an FSDP2-sharded reference (its root keeps them gathered
    after forward, which a frozen model never needs); a no-op for a whole model."""
    if ref is not None and hasattr(ref, "reshard"):
        ref.reshard()


@torch.no_grad()
def reference_logps(ref: nn.Module, batch: dict[str, Tensor], loss_impl: str = "auto") -> Tensor:
    """(2B,) summed response log-probs of the reference."""
    labels = batch["labels"]
    out = ref(**model_inputs(batch),
              head_fn=lambda h, w: sequence_logps(h, w, labels, impl=loss_impl))
    release(ref)
    return out


class DPOObjective:
    """`count` = preference pairs; reduction is the mean over pairs of the global batch."""

    reduction = "mean"

    def __init__(self, beta: float = 0.1, loss_impl: str = "auto",
                 reference: nn.Module | None = None) -> None:
        self.beta = beta
        self.loss_impl = loss_impl
        self.reference = reference

    def setup(self, model: nn.Module, accelerator) -> None:
        if self.reference is not None and not hasattr(self.reference, "reshard"):
            self.reference.to(accelerator.device)  # a sharded (FSDP2) reference is placed

    def count(self, batch: dict[str, Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def micro_step(self, model: nn.Module, batch: dict[str, Tensor]) -> MicroStep:
        pairs = batch["input_ids"].shape[0] // 2
        labels = batch["labels"]
        inputs = model_inputs(batch)
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
            ref_kw = {"ref_logps": (ref[:pairs], ref[pairs:])}
        elif self.reference is None:
            raise RuntimeError("DPO needs a reference model or precomputed ref_logps")
        elif resolve_impl(self.loss_impl, batch["input_ids"].device) == "liger":
            # Liger's fused linear DPO takes the reference's last hidden states and lm_head:
            # neither model materialises logits.
            with torch.no_grad():
                ref_hidden, ref_weight = self.reference(**inputs, head_fn=lambda h, w: (h, w))
            ref_kw = {"ref_hidden": ref_hidden, "ref_weight": ref_weight}
        else:
            ref = reference_logps(self.reference, batch, self.loss_impl)
            ref_kw = {"ref_logps": (ref[:pairs], ref[pairs:])}
        loss, metrics = model(
            **inputs,
            head_fn=lambda h, w: fused_linear_dpo(h, w, labels, beta=self.beta,
                                                  impl=self.loss_impl, **ref_kw),
        )
        release(self.reference)  # the Liger path read the reference's gathered lm_head
        # losses return means over this micro-batch's pairs; the trainer wants sums
        sums = {k: metrics[k].detach().float() * pairs for k in METRICS if k in metrics}
        sums["loss"] = loss.detach().float() * pairs
        return MicroStep(loss_sum=loss * pairs, metric_sums=sums)


@torch.no_grad()
def evaluate_preferences(policy: nn.Module, reference: nn.Module, data_cfg, tokenizer,
                         beta: float = 0.1, batch_pairs: int = 16,
                         loss_impl: str = "auto") -> dict[str, float]:
    """DPO metrics of `policy` against `reference` on the pairs of `data_cfg` (held out).

    Returns the means over pairs of loss, rewards, margin, reward accuracy (margin > 0), and
    `policy_accuracy`: the share of pairs where log pi(chosen) > log pi(rejected), which is
    meaningful before DPO too (when policy == reference every margin is 0).
    """
    from bitnet_train.data.preference import build_preference_dataset

    data = build_preference_dataset(data_cfg, tokenizer)
    rows = data.rank_rows(0)
    totals: dict[str, float] = {}
    n = 0
    policy.eval()
    for start in range(0, len(rows), batch_pairs):
        batch = data.collate(rows[start:start + batch_pairs].tolist())
        pairs = batch["input_ids"].shape[0] // 2
        pol = reference_logps(policy, batch, loss_impl)
        ref = reference_logps(reference, batch, loss_impl)
        loss, metrics = dpo_loss_from_logps(pol[:pairs], pol[pairs:], ref[:pairs], ref[pairs:],
                                            beta)
        metrics = dict(metrics, loss=loss,
                       policy_accuracy=(pol[:pairs] > pol[pairs:]).float().mean())
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) * pairs
        n += pairs
    return {k: v / max(n, 1) for k, v in totals.items()}
