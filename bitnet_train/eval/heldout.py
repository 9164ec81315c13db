"""Held-out evaluation while training: the trainer's `evaluator(model) -> metrics`.

Built by `build_heldout_evaluator` (train/run.py) from the held-out set the data plan carved
before training (bitnet_train.data.heldout, `encode_mixture(heldout=...)`):

- pretraining and SFT (`TokenLossEvaluator`): mean token cross-entropy over the held-out
  labelled tokens (every token of a packed row in pretraining, the assistant tokens in SFT),
  overall (`heldout/loss`) and per source (`heldout/<source>/loss`);
- DPO (`PreferenceEvaluator`): reward accuracy, margin, loss and rewards of the policy against
  the frozen reference (or its precomputed log-probs) on held-out pairs.

Every process evaluates its share of the held-out batches (batch i goes to process
i mod world), each the same number of forwards (a short share repeats a batch with weight 0, so
collectives inside a sharded model's forward stay matched); the sums go through one
all-reduce and one host sync. Evaluation runs the unwrapped model in eval mode under
`torch.no_grad()` and the run's autocast, and touches no RNG, optimizer or data stream: the
training trajectory is the same with or without it (tests/eval/test_heldout.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bitnet_train.train.losses import causal_lm_head_fn, dpo_loss_from_logps, sequence_logps

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "document_ids")
PREFIX = "heldout"

Batch = dict[str, Tensor]


def _inputs(batch: Batch, device: torch.device) -> Batch:
    return {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}


def split_rows(batch: Batch, size: int) -> list[Batch]:
    """A batch of rows -> batches of at most `size` rows."""
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def shard(items: Sequence[Any], rank: int, world: int) -> list[tuple[Any, bool]]:
    """This process's items (i mod world == rank), each paired with whether it counts; padded
    with non-counting repeats to ceil(len / world) so every process runs as many forwards."""
    mine = [(item, True) for item in items[rank::world]]
    want = math.ceil(len(items) / world)
    while len(mine) < want:
        mine.append((items[0], False))
    return mine


class _Evaluator:
    """Shared plumbing: device, autocast, reduction, the unwrapped model in eval mode."""

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def local_sums(self, model: nn.Module) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def finish(self, sums: list[float]) -> dict[str, float]:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, model: nn.Module) -> dict[str, float]:
        module = self.accelerator.unwrap_model(model)
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                local = self.local_sums(module)
        finally:
            module.train(was_training)
        total = self.accelerator.reduce(local, reduction="sum")
        return self.finish(total.double().tolist())  # the one host sync


class TokenLossEvaluator(_Evaluator):
    """Mean held-out token cross-entropy, overall and per source.

    items: (source name, batch) pairs; a batch holds input_ids and unshifted labels (-100: no
    loss) plus the usual attention_mask / position_ids / document_ids.
    """

    def __init__(self, items: Sequence[tuple[str, Batch]], accelerator,
                 loss_impl: str = "auto") -> None:
        super().__init__(accelerator)
        self.sources = list(dict.fromkeys(name for name, _ in items))
        self.items = list(items)
        self.loss_impl = loss_impl

    def local_sums(self, model: nn.Module) -> Tensor:
        """(2 x sources,) float64: loss sums then token counts, of this process's share."""
        n = len(self.sources)
        sums = torch.zeros(2 * n, dtype=torch.float64, device=self.device)
        for (name, batch), counts in shard(self.items, self.accelerator.process_index,
                                           self.accelerator.num_processes):
            head = causal_lm_head_fn(batch["labels"].to(self.device), reduction="sum",
                                     impl=self.loss_impl)
            loss_sum, tokens = model(**_inputs(batch, self.device), head_fn=head)
            if counts:
                i = self.sources.index(name)
                sums[i] += loss_sum.double()
                sums[n + i] += tokens.double()
        return sums

    def finish(self, sums: list[float]) -> dict[str, float]:
        n = len(self.sources)
        losses, tokens = sums[:n], sums[n:]
        out = {f"{PREFIX}/loss": sum(losses) / max(sum(tokens), 1.0),
               f"{PREFIX}/tokens": sum(tokens)}
        for name, loss, count in zip(self.sources, losses, tokens):
            out[f"{PREFIX}/{name}/loss"] = loss / max(count, 1.0)
        return out


PREFERENCE_METRICS = ("loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy",
                      "policy_accuracy")


class PreferenceEvaluator(_Evaluator):
    """DPO metrics of the policy on held-out pairs, against the frozen `reference` model or the
    reference's precomputed summed log-probs `ref_logps` ((pairs, 2): chosen, rejected).

    items: (pair rows, batch) with batches of 2B rows (chosen [0, B), rejected [B, 2B)).
    `policy_accuracy` is the share of pairs where log pi(chosen) > log pi(rejected), meaningful
    before any DPO step too (the policy then equals the reference and every margin is 0).
    """

    def __init__(self, items: Sequence[tuple[np.ndarray, Batch]], accelerator, beta: float,
                 reference: nn.Module | None = None, ref_logps: Tensor | None = None,
                 loss_impl: str = "auto") -> None:
        super().__init__(accelerator)
        if reference is None and ref_logps is None:
            raise ValueError("held-out DPO metrics need the reference model or its log-probs")
        self.items, self.beta = list(items), beta
        self.reference, self.ref_logps, self.loss_impl = reference, ref_logps, loss_impl

    def _reference(self, rows: np.ndarray, batch: Batch) -> tuple[Tensor, Tensor]:
        if self.ref_logps is not None:
            ref = self.ref_logps[torch.as_tensor(rows)].to(self.device)
            return ref[:, 0], ref[:, 1]
        labels = batch["labels"].to(self.device)
        lp = self.reference(**_inputs(batch, self.device),
                            head_fn=lambda h, w: sequence_logps(h, w, labels, self.loss_impl))
        pairs = len(rows)
        return lp[:pairs], lp[pairs:]

    def local_sums(self, model: nn.Module) -> Tensor:
        """(metrics + 1,) float64: each metric summed over pairs, then the pair count."""
        sums = torch.zeros(len(PREFERENCE_METRICS) + 1, dtype=torch.float64, device=self.device)
        for (rows, batch), counts in shard(self.items, self.accelerator.process_index,
                                           self.accelerator.num_processes):
            labels = batch["labels"].to(self.device)
            pol = model(**_inputs(batch, self.device),
                        head_fn=lambda h, w, lab=labels: sequence_logps(h, w, lab, self.loss_impl))
            pairs = len(rows)
            ref_c, ref_r = self._reference(rows, batch)
            loss, metrics = dpo_loss_from_logps(pol[:pairs], pol[pairs:], ref_c, ref_r,
                                                self.beta)
            metrics = dict(metrics, loss=loss,
                           policy_accuracy=(pol[:pairs] > pol[pairs:]).float().mean())
            if counts:
                sums[:-1] += torch.stack([metrics[k].double() for k in PREFERENCE_METRICS]) \
                    * pairs
                sums[-1] += pairs
        return sums

    def finish(self, sums: list[float]) -> dict[str, float]:
        pairs = max(sums[-1], 1.0)
        out = {f"{PREFIX}/{k}": v / pairs for k, v in zip(PREFERENCE_METRICS, sums)}
        out[f"{PREFIX}/pairs"] = sums[-1]
        return out


# -- from a data plan's held-out set ----------------------------------------------------------


def pretrain_items(heldout, batch_size: int) -> list[tuple[str, Batch]]:
    """data.heldout.PretrainHeldOut -> (source, batch of <= batch_size rows) items."""
    return [(name, b) for name, rows in heldout.batches.items()
            for b in split_rows(rows, batch_size)]


def sft_items(dataset, batch_size: int) -> list[tuple[str, Batch]]:
    """A held-out SFTDataset (rows packed per source, `row_sources`) -> items per source."""
    by_source: dict[str, list[int]] = {}
    for r, name in enumerate(dataset.row_sources):
        by_source.setdefault(name, []).append(r)
    return [(name, dataset.collate(rows[i:i + batch_size]))
            for name, rows in by_source.items() for i in range(0, len(rows), batch_size)]


def preference_items(dataset, batch_size: int) -> list[tuple[np.ndarray, Batch]]:
    """A held-out PreferenceDataset -> (pair rows, batch of 2 x <= batch_size rows) items."""
    rows = np.arange(dataset.num_rows)
    return [(rows[i:i + batch_size], dataset.collate(rows[i:i + batch_size].tolist()))
            for i in range(0, len(rows), batch_size)]


def build_heldout_evaluator(objective: str, heldout, accelerator, batch_size: int, *,
                            loss_impl: str = "auto", beta: float = 0.1,
                            reference: nn.Module | None = None,
                            ref_logps: Tensor | None = None,
                            ) -> Callable[[nn.Module], dict[str, float]] | None:
    """The evaluator of a stage's held-out set (None when nothing was held out)."""
    if heldout is None:
        return None
    if objective == "pretrain":
        return TokenLossEvaluator(pretrain_items(heldout, batch_size), accelerator, loss_impl)
    if objective == "sft":
        return TokenLossEvaluator(sft_items(heldout, batch_size), accelerator, loss_impl)
    if objective == "dpo":
        return PreferenceEvaluator(preference_items(heldout, batch_size), accelerator, beta,
                                   reference=reference, ref_logps=ref_logps, loss_impl=loss_impl)
    raise ValueError(f"no held-out evaluator for objective {objective!r}")
