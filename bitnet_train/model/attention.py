"""Attention backends: how a decoder computes softmax(q k^T / sqrt(d)) v under its mask.

Two implementations of one contract, chosen at run time (the model holds one; the trainer's
`apply_attention` picks it), equal to each other within rounding:

- `SDPAAttention` (the reference, and the CPU path): a dense boolean mask (B, 1, L, L) built
  from document ids and padding, `F.scaled_dot_product_attention`, KV heads repeated for GQA.
  With a dense mask SDPA cannot use its flash kernel and never skips a masked block.
- `FlexAttention` (CUDA): the same mask as a block-sparse `BlockMask` (128 x 128 tiles), so
  packed documents and causality skip whole tiles, GQA without repeating K/V, one compiled
  Triton kernel forward and backward.

Mask semantics (both): query t sees key s iff s <= t, s is in t's document, and s is a real
token (attention_mask = 1); every query also sees itself, so a row with no visible key (left
padding) stays finite. Such rows carry no loss.

Decoding with a KV cache (`build_cached_mask`): the new queries sit at positions
[past, past + n) and see the cached keys too; the mask is rectangular (B, 1, n, past + n) and
dense in both backends (flex falls back to SDPA: a handful of query rows gains nothing from
block sparsity, and a block mask per decoding step would cost more than the attention).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

ATTENTION_BACKENDS = ("sdpa", "flex")


class AttentionBackend(Protocol):
    """build_mask once per forward, then __call__ in every layer."""

    name: str

    def build_mask(self, batch: int, seq: int, device: torch.device,
                   attention_mask: Tensor | None, document_ids: Tensor | None) -> Any:
        """A mask object for `__call__` (None: plain causal)."""

    def build_cached_mask(self, batch: int, seq: int, past: int, device: torch.device,
                          attention_mask: Tensor | None) -> Any:
        """The mask of `seq` new queries after `past` cached positions (see module doc)."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Any) -> Tensor:
        """q (B, H, L, D), k/v (B, KV, S, D) -> (B, H, L, D); S = L without a cache."""


def build_attention_mask(
    batch: int,
    seq: int,
    device: torch.device,
    attention_mask: Tensor | None = None,
    document_ids: Tensor | None = None,
) -> Tensor | None:
    """Boolean SDPA mask (B, 1, L, L), True = may attend; None means plain causal.

    attention_mask (B, L): 1 for real tokens, 0 for padding. document_ids (B, L): tokens attend
    only to earlier tokens of the same document (packed sequences).
    """
    if attention_mask is None and document_ids is None:
        return None
    idx = torch.arange(seq, device=device)
    mask = (idx[None, :] <= idx[:, None])[None]  # (1, L, L) causal
    if document_ids is not None:
        mask = mask & (document_ids[:, :, None] == document_ids[:, None, :])
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, :]
    mask = mask | torch.eye(seq, dtype=torch.bool, device=device)[None]
    return mask.expand(batch, seq, seq)[:, None]


def build_cached_attention_mask(batch: int, seq: int, past: int, device: torch.device,
                                attention_mask: Tensor | None = None) -> Tensor:
    """Boolean SDPA mask (B, 1, seq, past + seq) for `seq` queries at positions
    [past, past + seq) over every key so far, True = may attend.

    attention_mask (B, past + seq): 1 for real tokens, 0 for (left) padding, as transformers'
    `generate` passes it. Same rules as `build_attention_mask`: causal, real keys only, and
    every query sees itself.
    """
    total = past + seq
    q_pos = torch.arange(past, total, device=device)[:, None]  # (seq, 1)
    k_pos = torch.arange(total, device=device)[None, :]  # (1, total)
    mask = (k_pos <= q_pos)[None]  # (1, seq, total)
    if attention_mask is not None:
        if attention_mask.shape[-1] != total:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions; with "
                             f"{past} cached and {seq} new it must cover {total}")
        mask = mask & attention_mask.bool()[:, None, :]
    mask = mask | (k_pos == q_pos)[None]
    return mask.expand(batch, seq, total)[:, None]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """`scaled_dot_product_attention` with KV heads repeated for GQA; mask None: causal."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # enable_gqa is not supported by every SDPA backend
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


class SDPAAttention:
    """The reference: dense mask, `scaled_dot_product_attention`, repeated KV heads."""

    name = "sdpa"

    def build_mask(self, batch, seq, device, attention_mask, document_ids):
        return build_attention_mask(batch, seq, device, attention_mask, document_ids)

    def build_cached_mask(self, batch, seq, past, device, attention_mask):
        return build_cached_attention_mask(batch, seq, past, device, attention_mask)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return sdpa_attention(q, k, v, mask)


def document_causal_mask_mod(document_ids: Tensor | None, attention_mask: Tensor | None):
    """FlexAttention mask_mod with the semantics of `build_attention_mask`."""
    docs = document_ids
    valid = attention_mask.bool() if attention_mask is not None else None

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = q_idx >= kv_idx
        if docs is not None:
            allowed = allowed & (docs[b, q_idx] == docs[b, kv_idx])
        if valid is not None:
            allowed = (allowed & valid[b, kv_idx]) | (q_idx == kv_idx)
        return allowed

    return mask_mod


class FlexAttention:
    """Block-sparse attention through `torch.nn.attention.flex_attention` (needs CUDA to be
    fast; runs, slowly, on the CPU, which the equality tests use)."""

    name = "flex"
    _compiled: Any = None  # one compiled flex_attention per process, shared by every layer

    def build_mask(self, batch, seq, device, attention_mask, document_ids):
        from torch.nn.attention.flex_attention import create_block_mask

        mask_mod = document_causal_mask_mod(document_ids, attention_mask)
        batch_dim = batch if (document_ids is not None or attention_mask is not None) else None
        # Compiled mask construction visits (B, L/128, L/128) tiles instead of B x L x L pairs;
        # on the CPU the eager path is cheaper than compiling for test-sized inputs.
        return create_block_mask(mask_mod, batch_dim, None, seq, seq, device=device,
                                 _compile=device.type == "cuda")

    def build_cached_mask(self, batch, seq, past, device, attention_mask):
        # decoding: a dense mask, which __call__ hands to SDPA (see the module doc)
        return build_cached_attention_mask(batch, seq, past, device, attention_mask)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Any) -> Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        if isinstance(mask, Tensor):  # a dense mask from build_cached_mask
            return sdpa_attention(q, k, v, mask)

        fn = flex_attention
        if q.device.type == "cuda" and not torch.compiler.is_compiling():
            # outside a compiled block, flex_attention must be compiled itself to be fast
            if FlexAttention._compiled is None:
                # default dynamic: SFT/DPO batches are padded to their longest row, so lengths
                # vary; after a second length the compiled kernel takes any length
                FlexAttention._compiled = torch.compile(flex_attention)
            fn = FlexAttention._compiled
        return fn(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def make_attention(name: str) -> AttentionBackend:
    """"sdpa" | "flex" -> a backend instance."""
    if name == "sdpa":
        return SDPAAttention()
    if name == "flex":
        return FlexAttention()
    raise ValueError(f"attention backend {name!r}; choose one of {ATTENTION_BACKENDS}")
