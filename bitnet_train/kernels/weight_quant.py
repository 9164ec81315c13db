"""Absmean ternary codes of master weights, written straight into a stacked codes buffer (Triton).

Once per optimizer step, for each weight W_i of a group (q|k|v, gate|up, ...):
    a_i = max(mean|W_i|, 1e-5);  codes_i = clamp(round_half_even(W_i * (1 / a_i)), -1, 1)
the same operations as `bitnet_train.model.bitlinear.ternary_weight` (the reference,
`kernels.reference.ternary_codes_ref`). One reduction and one quantizing pass per weight, int8
written in place of the group's rows: no fp32 temporaries, no concatenation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from bitnet_train.kernels.rounding import round_half_even, round_to_bf16
from bitnet_train.model.bitlinear import WEIGHT_EPS


@triton.jit
def _ternary_codes_kernel(W, INV_SCALE, CODES, numel, BLOCK: tl.constexpr):
    """CODES[i] = clamp(round(W[i] * INV_SCALE), -1, 1) as int8, over a flat tensor."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    inv = tl.load(INV_SCALE)
    c = tl.minimum(tl.maximum(round_half_even(w * inv), -1.0), 1.0)
    tl.store(CODES + offs, c.to(tl.int8), mask=mask)


@torch.no_grad()
def ternary_codes_into(weights: list[Tensor], codes: Tensor, col_scale: Tensor) -> None:
    """Quantize each (n_i, K) weight into its rows of `codes` (sum n_i, K) int8, and its scale
    a_i into its rows of `col_scale` (sum n_i,) fp32."""
    row = 0
    for w in weights:
        n = w.shape[0]
        wf = w.detach()
        if not wf.is_contiguous():
            wf = wf.contiguous()
        a = wf.float().abs().mean().clamp(min=WEIGHT_EPS)
        inv = (1.0 / a).reshape(1)
        out = codes[row:row + n]
        block = 4096
        _ternary_codes_kernel[(triton.cdiv(wf.numel(), block),)](wf, inv, out, wf.numel(),
                                                                 BLOCK=block)
        col_scale[row:row + n] = a
        row += n


@triton.jit
def _dequantize_codes_kernel(CODES, SCALE, OUT, K, BLOCK_K: tl.constexpr):
    """OUT[n, :] = CODES[n, :] * bf16(SCALE[n]) in bf16 (exact: codes are -1, 0 or 1)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = cols < K
    c = tl.load(CODES + row * K + cols, mask=mask, other=0).to(tl.float32)
    a = round_to_bf16(tl.load(SCALE + row))
    tl.store(OUT + row * K + cols, (c * a).to(tl.bfloat16), mask=mask)


def dequantize_codes(codes: Tensor, col_scale: Tensor) -> Tensor:
    """codes (N, K) int8, col_scale (N,) -> (N, K) bf16 codes * bf16(a): the reference's bf16
    cast of T * a, in one pass (the weight the backward's input-gradient product needs)."""
    n, k = codes.shape
    codes = codes.contiguous()
    out = torch.empty((n, k), dtype=torch.bfloat16, device=codes.device)
    block = min(4096, triton.next_power_of_2(k))
    _dequantize_codes_kernel[(n, triton.cdiv(k, block))](codes, col_scale, out, k, BLOCK_K=block)
    return out
