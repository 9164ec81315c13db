"""RMSNorm fused with per-token int8 quantization (forward) and the RMSNorm backward (Triton).

Where an RMSNorm feeds BitLinears (input_layernorm -> q/k/v, attn_sub_norm -> o_proj,
post_attention_layernorm -> gate/up, ffn_sub_norm -> down), the normalized activation is only
ever consumed as int8 codes, so one pass over the row reads x once and writes 1 byte per element
plus two fp32 scalars per row, instead of the reference's normalize / absmax / scale / round /
clamp / dequantize chain over fp32 copies. References: `kernels.reference.rmsnorm_quant_ref` and
`rmsnorm_backward_ref`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from bitnet_train.kernels.rounding import round_half_even, round_to_bf16

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _warp_configs() -> list[triton.Config]:
    """Row kernels: one row per program; the warps that best hide a row's two reductions depend
    on the row length, so they are tuned per K (written outputs only: safe to re-run)."""
    if _INTERPRET:
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w) for w in (4, 8, 16)]


@triton.autotune(configs=_warp_configs(), key=["K", "ROUND_NORMED", "DEQUANT"])
@triton.jit
def _rmsnorm_quant_fwd_kernel(
    X, W, Q, SX, RSTD,
    stride_x, stride_q, K, eps,
    ROUND_NORMED: tl.constexpr, DEQUANT: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One row: rstd = rsqrt(mean(x^2) + eps); y = w * n (n = x * rstd, rounded to x's dtype if
    ROUND_NORMED); s = 127 / max(max|y|, 1e-5); q = clamp(round_half_even(y * s), -128, 127).
    DEQUANT: write q / s in Q's dtype (bf16) instead of q, s and rstd: the backward recomputes
    the quantized activation from x rather than keeping the codes alive between the passes."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / K + eps)
    n = x * rstd
    if ROUND_NORMED:  # bf16 input: the reference RMSNorm rounds x * rstd to bf16
        n = round_to_bf16(n)
    y = w * n
    s = tl.math.div_rn(127.0, tl.maximum(tl.max(tl.abs(y), axis=0), 1e-5))
    q = round_half_even(y * s)
    q = tl.minimum(tl.maximum(q, -128.0), 127.0)
    if DEQUANT:
        tl.store(Q + row * stride_q + cols, round_to_bf16(tl.math.div_rn(q, s)).to(tl.bfloat16),
                 mask=mask)
    else:
        tl.store(Q + row * stride_q + cols, q.to(tl.int8), mask=mask)
        tl.store(SX + row, s)
        tl.store(RSTD + row, rstd)


@triton.autotune(configs=_warp_configs(), key=["K", "ROWS", "ROUND_NORMED"])
@triton.jit
def _rmsnorm_bwd_kernel(
    X, W, RSTD, DY, DX, DW_PART,
    stride_x, stride_dy, stride_dx, M, K,
    ROWS: tl.constexpr, ROUND_NORMED: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Rows [pid * ROWS, (pid + 1) * ROWS): dx = rstd * (g - n * mean(g * n)), g = dy * w;
    the program's share of dw = sum dy * n goes to DW_PART[pid] (summed by the launcher)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_K,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * ROWS
    for i in range(0, ROWS):
        r = row_start + i
        # the last program's range may run past M: those rows are masked and contribute 0
        live = mask & ((r + cols * 0) < M)
        x = tl.load(X + r * stride_x + cols, mask=live, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * stride_dy + cols, mask=live, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + tl.minimum(r, M - 1))
        n = x * rstd
        if ROUND_NORMED:
            dw += dy * round_to_bf16(n)
            dx = round_to_bf16(rstd * (dy * w - n * (tl.sum(dy * w * n, axis=0) / K)))
        else:
            dw += dy * n
            dx = rstd * (dy * w - n * (tl.sum(dy * w * n, axis=0) / K))
        tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=live)
    tl.store(DW_PART + pid * K + cols, dw, mask=mask)


def _check_dtype(x: Tensor) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"fused RMSNorm kernels take fp32 or bf16 activations, got {x.dtype}")


def rmsnorm_quant(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """x (M, K) fp32/bf16 (last dim contiguous), weight (K,) -> q (M, K) int8, s_x (M,) fp32,
    rstd (M,) fp32. See `rmsnorm_quant_ref`."""
    m, k = x.shape
    _check_dtype(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s_x = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _rmsnorm_quant_fwd_kernel[(m,)](
        x, weight, q, s_x, rstd, x.stride(0), q.stride(0), k, eps,
        ROUND_NORMED=x.dtype != torch.float32, DEQUANT=False, BLOCK_K=block,
    )
    return q, s_x, rstd


def rmsnorm_quant_dequantized(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x (M, K), weight (K,) -> (M, K) bf16 q / s_x: the quantized activation the reference
    BitLinear multiplies by, recomputed from x by the same kernel as `rmsnorm_quant` (so equal
    to `dequantize_rows(*rmsnorm_quant(x, weight, eps)[:2])`)."""
    m, k = x.shape
    _check_dtype(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((m, k), dtype=torch.bfloat16, device=x.device)
    block = triton.next_power_of_2(k)
    _rmsnorm_quant_fwd_kernel[(m,)](
        x, weight, out, out, out, x.stride(0), out.stride(0), k, eps,
        ROUND_NORMED=x.dtype != torch.float32, DEQUANT=True, BLOCK_K=block,
    )
    return out


def rmsnorm_backward(x: Tensor, weight: Tensor, rstd: Tensor, grad_y: Tensor
                     ) -> tuple[Tensor, Tensor]:
    """x (M, K), weight (K,), rstd (M,), grad_y (M, K) -> grad_x (M, K) in x's dtype,
    grad_weight (K,) fp32. See `rmsnorm_backward_ref`."""
    m, k = x.shape
    _check_dtype(x)
    x = x if x.stride(-1) == 1 else x.contiguous()
    grad_y = grad_y if grad_y.stride(-1) == 1 else grad_y.contiguous()
    grad_x = torch.empty_like(x)
    if x.device.type == "cuda":
        programs = min(m, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    else:
        programs = min(m, 4)
    rows = triton.cdiv(m, programs)
    programs = triton.cdiv(m, rows)
    dw_part = torch.empty((programs, k), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _rmsnorm_bwd_kernel[(programs,)](
        x, weight, rstd, grad_y, grad_x, dw_part,
        x.stride(0), grad_y.stride(0), grad_x.stride(0), m, k,
        ROWS=rows, ROUND_NORMED=x.dtype != torch.float32, BLOCK_K=block,
    )
    return grad_x, dw_part.sum(0)
