"""Rounding helpers shared by the Triton kernels, written in plain integer / IEEE arithmetic so
the GPU and Triton's CPU interpreter (which truncates on float casts and lacks libdevice.rint)
round identically, and identically to PyTorch: round half to even in both."""

from __future__ import annotations

import triton
import triton.language as tl

# Adding and subtracting 1.5 * 2^23 rounds an fp32 |v| < 2^22 to the nearest integer, ties to
# even (the spacing of fp32 at that magnitude is 1).
ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def round_half_even(v):
    """fp32 -> fp32 nearest integer, ties to even (torch.round), for |v| < 2^22."""
    return (v + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def round_to_bf16(v):
    """fp32 -> fp32 holding the nearest bfloat16 value, ties to even (torch's .to(bfloat16)),
    so the cast that follows is exact on every backend. NaN stays NaN."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, rounded)
