"""Losses on the LM head, computed without materialising the (tokens, vocab) logits.

Two quantities, each with a fused path and a PyTorch path beside it (Liger style):

- next-token cross-entropy, `linear_cross_entropy(hidden, weight, targets)`:
  CUDA -> Liger's fused linear cross-entropy (Triton; gradients computed in the forward pass);
  CPU  -> `_ChunkedTokenLogps`, an autograd Function that walks the tokens in chunks in forward
          and again in backward, so the peak is one chunk of logits, never N x V.
- sigmoid DPO, `fused_linear_dpo(policy_hidden, weight, labels, ...)`:
  reference model given -> Liger's `LigerFusedLinearDPOLoss` on CUDA;
  reference log-probs precomputed -> policy log-probs through Liger's fused linear
  cross-entropy (reduction="none", per token) on CUDA, then `dpo_loss_from_logps`;
  CPU -> `sequence_logps` + `dpo_loss_from_logps`.
`linear_cross_entropy_reference` and `sequence_logps_reference` are the naive full-logit
definitions, kept for tests and benchmarks.

Conventions: labels (B, L) are NOT shifted (position t predicts labels[t + 1], as in
transformers); -100 carries no loss. Softmax and log-probs are fp32 whatever the input dtype;
the matmuls run in the inputs' dtype (bf16 under autocast) with fp32 accumulation.
`impl`: "auto" (Liger on CUDA tensors when liger-kernel is installed, else PyTorch), "liger",
"torch".
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from bitnet_train.data.packing import IGNORE_INDEX

log = logging.getLogger(__name__)

IMPLS = ("auto", "liger", "torch")
REDUCTIONS = ("sum", "mean")
LOGITS_BUDGET = 1 << 28
"""Elements of one logits chunk on the PyTorch path (1 GiB in fp32): about 2090 tokens at the
2B4T vocabulary of 128256, the whole batch at toy vocabularies. Large chunks keep the matmuls
efficient: on an H100 (N=8192, H=2560, bf16, fwd+bwd) this default ran in 64 ms at 3.1 GiB peak,
256-token chunks in 141 ms at 2.5 GiB (scripts/bench_losses.py)."""

HeadFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
_warned_no_liger = False


# ----------------------------------------------------------------------------------- helpers


def _liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_impl(impl: str, device: torch.device) -> str:
    """"auto" | "liger" | "torch" -> "liger" | "torch" for tensors on `device`."""
    global _warned_no_liger
    if impl not in IMPLS:
        raise ValueError(f"loss impl={impl!r}; choose one of {IMPLS}")
    if impl == "torch":
        return "torch"
    if device.type != "cuda":
        if impl == "liger":
            raise ValueError(f"loss impl='liger' needs CUDA tensors, got {device}; use 'auto' or "
                             "'torch'")
        return "torch"
    if _liger_installed():
        return "liger"
    if impl == "liger":
        raise ImportError("loss impl='liger' needs liger-kernel: pip install 'liger-kernel>=0.8.5'")
    if not _warned_no_liger:
        log.warning("liger-kernel is not installed: CUDA losses use the chunked PyTorch path")
        _warned_no_liger = True
    return "torch"


def shift_labels(labels: Tensor) -> Tensor:
    """labels (B, L) -> targets (B, L): targets[:, t] = labels[:, t + 1], the last column -100.

    Shifting the labels rather than slicing hidden[:, :-1] keeps hidden (B, L, H) a contiguous
    view: no copy of the activations. The last position predicts nothing.
    """
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def _align_dtypes(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Cast (hidden, weight) to the dtype their matmul would use.

    Under autocast that is the autocast dtype (a custom autograd Function's backward runs
    outside autocast, so we cast explicitly and the casts' own backward returns gradients to
    the fp32 master weight); otherwise the promoted dtype (bf16 hidden with fp32 weight -> fp32).
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(dtype), weight.to(dtype)


def _check_flat(hidden: Tensor, weight: Tensor, targets: Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be (N,) = ({hidden.shape[0]},)")


def _check_batched(hidden: Tensor, labels: Tensor) -> None:
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden (B, L, H) and labels (B, L), got "
                         f"{tuple(hidden.shape)} and {tuple(labels.shape)}")


# ------------------------------------------------------------------ PyTorch path (reference)


def _upcast(x: Tensor) -> Tensor:
    """To fp32 at least: softmax in bf16 loses the small probabilities; fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def linear_cross_entropy_reference(
    hidden: Tensor, weight: Tensor, targets: Tensor, reduction: str = "mean"
) -> Tensor:
    """The definition: full logits (N, V) in fp32 (fp64 for fp64 inputs), F.cross_entropy.
    Memory O(N x V)."""
    logits = _upcast(hidden @ weight.T)  # (N, V)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction)


def sequence_logps_reference(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """The definition: (B,) sums of log p(labels[t+1] | hidden[t]) from full logits in fp32
    (fp64 for fp64 inputs)."""
    targets = shift_labels(labels)
    logps = _upcast(hidden @ weight.T).log_softmax(-1)  # (B, L, V)
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, L)
    return picked.masked_fill(targets == IGNORE_INDEX, 0.0).sum(-1)


class _ChunkedTokenLogps(torch.autograd.Function):
    """Per-token log p(target | hidden) (N,), logits one chunk of tokens at a time.

    forward: for each chunk, z = h @ W^T (c, V), logp_t = z_t - logsumexp(z); only (N,) is kept.
    backward: recomputes z chunk by chunk; d logp_t / dz = onehot(t) - softmax(z), so with the
    upstream gradient g (c,): dz = g * (onehot(t) - p); dh = dz @ W; dW += dz^T @ h.
    Peak memory is a few (c, V) buffers; the price is a second forward matmul (4 matmuls of
    2*N*H*V in all instead of 3), which on the CPU path we accept for simplicity.
    Ignored targets (-100) give log-prob 0 and no gradient.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)  # (N,)
        for s in range(0, hidden.shape[0], chunk_size):
            t = targets[s:s + chunk_size]
            z = (hidden[s:s + chunk_size] @ weight.T).to(acc)  # (c, V)
            picked = z.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
            out[s:s + chunk_size] = (picked - torch.logsumexp(z, dim=1)).masked_fill(
                t == IGNORE_INDEX, 0.0)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, targets = ctx.saved_tensors
        c = ctx.chunk_size
        acc = grad_out.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        # accumulate dW over chunks in fp32: many small bf16 sums would lose the low bits
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], c):
            h, t = hidden[s:s + c], targets[s:s + c]
            g = grad_out[s:s + c].masked_fill(t == IGNORE_INDEX, 0.0).unsqueeze(1)  # (c, 1)
            dz = torch.softmax((h @ weight.T).to(acc), dim=1).mul_(-g)  # (c, V): -g * p
            dz.scatter_add_(1, t.clamp(min=0).unsqueeze(1), g)  # + g * onehot(t)
            dz = dz.to(hidden.dtype)
            if need_h:
                grad_h[s:s + c] = dz @ weight
            if need_w:
                grad_w += (dz.T @ h).to(acc)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None


def _default_chunk(n_tokens: int, vocab: int) -> int:
    return max(1, min(n_tokens, LOGITS_BUDGET // vocab))


def token_logps_torch(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int | None = None
) -> Tensor:
    """hidden (N, H), weight (V, H), targets (N,) -> (N,) fp32 log-probs, 0 where ignored."""
    _check_flat(hidden, weight, targets)
    chunk = chunk_size or _default_chunk(hidden.shape[0], weight.shape[0])
    hidden, weight = _align_dtypes(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedTokenLogps.apply(hidden, weight, targets, chunk)


# ------------------------------------------------------------------------------ Liger path


def _liger_flce(hidden: Tensor, weight: Tensor, targets: Tensor, reduction: str,
                chunk_mem: int = 1) -> Tensor:
    """Liger's fused linear cross-entropy, every option spelled out (defaults move).

    chunk_mem: Liger's `chunk_mem_const`, the transient logits of one chunk bounded by
    chunk_mem x N x H elements. 1 (Liger's default) cuts 16k tokens at the 2B4T vocabulary into
    32 chunks of 512, and each chunk re-reads and re-writes the whole fp32 dW accumulator
    (1.3 GB): larger chunks trade a few GB of transient memory for fewer such passes.
    """
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    hidden, weight = _align_dtypes(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return liger_fused_linear_cross_entropy(
            hidden, weight, targets, bias=None, ce_weight=None, ignore_index=IGNORE_INDEX,
            lse_square_scale=0.0, label_smoothing=0.0, reduction=reduction, softcap=None,
            return_z_loss=False,
            # dW summed over chunks in fp32 (cast back to the weight's dtype at the end)
            accum_dtype=torch.float32,
            use_token_scaling=False, return_token_accuracy=False, return_predicted_tokens=False,
            chunk_mem_const=chunk_mem,
        )


def token_logps_liger(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """(N,) fp32 log-probs through Liger's kernel with reduction="none" (its loss is -logp).

    Liger 0.8.5 defers the gradient of reduction="none" to backward (it recomputes the chunked
    logits there and folds in the per-token upstream gradient), so per-sequence sums are exact.
    """
    _check_flat(hidden, weight, targets)
    return -_liger_flce(hidden, weight, targets, reduction="none")


# ------------------------------------------------------------------------- cross-entropy API


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
    liger_chunk_mem: int = 1,
) -> Tensor:
    """Cross-entropy of softmax(hidden @ weight^T) against targets, logits never all in memory.

    hidden (N, H), weight (V, H), targets (N,) long with -100 ignored -> fp32 scalar:
    "sum" over labelled tokens, or "mean" over them (0 when none is labelled, as Liger).
    `chunk_size` (tokens per chunk) only affects the PyTorch path, `liger_chunk_mem` (see
    `_liger_flce`) only the Liger path.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; choose one of {REDUCTIONS}")
    _check_flat(hidden, weight, targets)
    if resolve_impl(impl, hidden.device) == "liger":
        return _liger_flce(hidden, weight, targets, reduction, liger_chunk_mem)
    loss = -token_logps_torch(hidden, weight, targets, chunk_size).sum()
    if reduction == "mean":
        loss = loss / (targets != IGNORE_INDEX).sum().clamp(min=1)
    return loss


def causal_lm_head_fn(labels: Tensor, reduction: str = "sum", impl: str = "auto",
                      chunk_size: int | None = None, liger_chunk_mem: int = 1) -> HeadFn:
    """A `head_fn` for `BitNetForCausalLM.forward`: (hidden (B, L, H), weight (V, H)) ->
    (loss, n_tokens), the next-token loss ("sum" or "mean" over labelled tokens) and the number
    of tokens that carry loss (0-dim long tensor). labels (B, L) are unshifted."""
    targets = shift_labels(labels)

    def head(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        _check_batched(hidden, labels)
        flat = targets.to(hidden.device).flatten()  # (B*L,)
        loss = linear_cross_entropy(hidden.flatten(0, 1), weight, flat, reduction, impl,
                                    chunk_size, liger_chunk_mem)
        return loss, (flat != IGNORE_INDEX).sum()

    return head


# ----------------------------------------------------------------------------------- DPO API


def sequence_logps(hidden: Tensor, weight: Tensor, labels: Tensor, impl: str = "auto",
                   chunk_size: int | None = None) -> Tensor:
    """hidden (B, L, H), weight (V, H), labels (B, L) unshifted -> (B,) fp32: the sum of
    log p(labels[t+1] | hidden[t]) over labelled positions (the response, in DPO)."""
    _check_batched(hidden, labels)
    targets = shift_labels(labels).to(hidden.device).flatten()  # (B*L,)
    flat = hidden.flatten(0, 1)  # (B*L, H), a view
    if resolve_impl(impl, hidden.device) == "liger":
        tok = token_logps_liger(flat, weight, targets)
    else:
        tok = token_logps_torch(flat, weight, targets, chunk_size)
    return tok.view(labels.shape).sum(-1)


def dpo_loss_from_logps(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sigmoid DPO from summed sequence log-probs, each (P,) for P pairs.

    loss = mean_p -logsigmoid(beta * ((pc - rc) - (pr - rr))); rewards = beta * (policy - ref).
    Metrics (detached means over pairs): rewards_chosen, rewards_rejected, margin
    (chosen - rejected reward), accuracy (share of pairs with chosen reward > rejected; a tie
    counts as wrong, as in TRL). The reference terms are detached: they never get gradients.
    """
    rewards_chosen = beta * (policy_chosen.float() - ref_chosen.detach().float())
    rewards_rejected = beta * (policy_rejected.float() - ref_rejected.detach().float())
    margins = rewards_chosen - rewards_rejected  # (P,)
    loss = -F.logsigmoid(margins).mean()
    return loss, _dpo_metrics(rewards_chosen, rewards_rejected)


def _dpo_metrics(rewards_chosen: Tensor, rewards_rejected: Tensor) -> dict[str, Tensor]:
    rc, rr = rewards_chosen.detach().float(), rewards_rejected.detach().float()
    return {
        "rewards_chosen": rc.mean(),
        "rewards_rejected": rr.mean(),
        "margin": (rc - rr).mean(),
        "accuracy": (rc > rr).float().mean(),
    }


def _liger_dpo_with_reference(
    policy_hidden: Tensor, weight: Tensor, labels: Tensor, ref_hidden: Tensor,
    ref_weight: Tensor, beta: float, chunk_size: int, compiled: bool,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Liger's fused linear DPO (pure PyTorch + torch.func, so it also runs on the CPU).

    Liger does not shift: it scores target[t] with hidden[t]. We pass full hidden (2B, L, H)
    with the shifted labels, whose last column is -100. Every option is explicit because its
    defaults (compute_nll_loss, use_ref_model, average_log_prob) changed between releases.
    """
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(
        ignore_index=IGNORE_INDEX,
        beta=beta,
        alpha=1.0,  # weight of the NLL term, unused with compute_nll_loss=False
        compute_nll_loss=False,  # pure DPO, no SFT term on the chosen responses
        compiled=compiled,
        use_ref_model=True,
        average_log_prob=False,  # DPO sums log-probs over response tokens
        chunk_size=chunk_size,  # pairs per chunk: logits of 2*chunk_size sequences at a time
        loss_type="sigmoid",
        label_smoothing=0.0,
        discopop_tau=0.05,  # unused by "sigmoid"
    )
    policy_hidden, weight = _align_dtypes(policy_hidden, weight)
    ref_hidden, ref_weight = _align_dtypes(ref_hidden, ref_weight)
    targets = shift_labels(labels).to(policy_hidden.device)
    with torch.autocast(policy_hidden.device.type, enabled=False):
        loss, aux = loss_fn(weight, policy_hidden, targets, None, ref_hidden, ref_weight, None)
    # aux: chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
    # chosen_rewards (P,), rejected_rewards (P,)
    return loss, _dpo_metrics(aux[5], aux[6])


def fused_linear_dpo(
    policy_hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_logps: tuple[Tensor, Tensor] | None = None,
    beta: float = 0.1,
    impl: str = "auto",
    chunk_size: int | None = None,
    liger_chunk_size: int = 1,
    liger_compiled: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sigmoid DPO loss (mean over pairs) and metrics, from the policy's last hidden states.

    policy_hidden (2B, L, H): rows [0, B) chosen, [B, 2B) rejected; weight (V, H) the policy's
    lm_head; labels (2B, L) unshifted, -100 outside the responses. The reference is either
    ref_hidden (2B, L, H) with ref_weight (V, H), or ref_logps = (chosen (B,), rejected (B,))
    precomputed. Paths:
      - reference model, impl liger: `LigerFusedLinearDPOLoss` (use_ref_model=True).
      - precomputed ref_logps, impl liger: Liger's fused DPO cannot take precomputed reference
        log-probs, so the policy's come from Liger's fused linear cross-entropy per token
        (reduction="none"; no logits materialised) and the loss from `dpo_loss_from_logps`.
      - impl torch: `sequence_logps` (chunked) + `dpo_loss_from_logps`.
    `liger_compiled`: Liger wraps each chunk in torch.compile by default; off here, since it
    compiles per new shape (seconds to minutes) for a step that is matmul-bound anyway.
    """
    _check_batched(policy_hidden, labels)
    if policy_hidden.shape[0] % 2:
        raise ValueError(f"DPO needs 2B rows (chosen then rejected), got {policy_hidden.shape[0]}")
    has_model = ref_hidden is not None and ref_weight is not None
    if has_model == (ref_logps is not None) or (ref_hidden is None) != (ref_weight is None):
        raise ValueError("pass either ref_hidden with ref_weight, or ref_logps")
    pairs = policy_hidden.shape[0] // 2
    if has_model and resolve_impl(impl, policy_hidden.device) == "liger":
        return _liger_dpo_with_reference(policy_hidden, weight, labels, ref_hidden, ref_weight,
                                         beta, liger_chunk_size, liger_compiled)
    if has_model:
        with torch.no_grad():
            ref = sequence_logps(ref_hidden, ref_weight, labels, impl, chunk_size)
        ref_logps = (ref[:pairs], ref[pairs:])
    policy = sequence_logps(policy_hidden, weight, labels, impl, chunk_size)
    return dpo_loss_from_logps(policy[:pairs], policy[pairs:], ref_logps[0], ref_logps[1], beta)
