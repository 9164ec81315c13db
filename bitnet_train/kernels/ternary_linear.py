"""RMSNorm -> int8 activation codes -> ternary projection(s), as one differentiable op.

    y = int8_matmul(q, s_x, codes, col_scale),   (q, s_x) = rmsnorm_quant(x, norm_weight)

Forward: the fused norm+quantize kernel, then the int8 tensor-core product (several projections
that read the same normalized input -- q/k/v, gate/up -- are one product over their stacked
codes, each row keeping its own tensor's scale). Saved for backward: x, the int8 codes q and
two fp32 scalars per token (not a bf16 or fp32 copy of the normalized activation).

Backward, with the straight-through estimator on both quantizers (the reference's gradients):
    dxn = dy @ (codes * col_scale)          (bf16 GEMM; the dequantized ternary weight)
    dW  = dy^T @ (q / s_x)                  (bf16 GEMM; the dequantized activation)
    dx, dnorm_weight = rmsnorm_backward(x, norm_weight, rstd, dxn)
`weight` (the fp32 master weight, stacked) enters only to receive dW: the forward uses the
cached codes, which `kernels.modules` refreshes once per optimizer step.

Both directions are `torch.library` custom ops: torch.compile treats them as opaque calls with
a registered autograd formula instead of tracing their Python (Dynamo's tracing of custom
`autograd.Function`s is what dropped gradients in torch 2.11), and compiles the elementwise code
around them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bitnet_train.kernels.int8_matmul import dequantize_rows, int8_matmul
from bitnet_train.kernels.norm_quant import rmsnorm_backward, rmsnorm_quant

OUT_DTYPE = torch.bfloat16
"""The product's dtype: what the reference BitLinear returns under bf16 autocast."""


@torch.library.custom_op("bitnet_train::norm_ternary_linear", mutates_args=())
def _norm_ternary_linear(x: Tensor, norm_weight: Tensor, weight: Tensor, codes: Tensor,
                         col_scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (M, K) -> y (M, N) bf16, plus q (M, K) int8, s_x (M,), rstd (M,) for the backward."""
    q, s_x, rstd = rmsnorm_quant(x, norm_weight, eps)
    return int8_matmul(q, s_x, codes, col_scale, OUT_DTYPE), q, s_x, rstd


@_norm_ternary_linear.register_fake
def _(x, norm_weight, weight, codes, col_scale, eps):
    m, k = x.shape
    return (x.new_empty((m, codes.shape[0]), dtype=OUT_DTYPE),
            x.new_empty((m, k), dtype=torch.int8),
            x.new_empty((m,), dtype=torch.float32), x.new_empty((m,), dtype=torch.float32))


@torch.library.custom_op("bitnet_train::norm_ternary_linear_backward", mutates_args=())
def _norm_ternary_linear_backward(
    grad_y: Tensor, x: Tensor, norm_weight: Tensor, q: Tensor, s_x: Tensor, rstd: Tensor,
    codes: Tensor, col_scale: Tensor, weight_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> grad_x (M, K) in x's dtype, grad_norm_weight (K,), grad_weight (N, K) weight_dtype."""
    grad_y = grad_y.to(OUT_DTYPE).contiguous()
    # codes * a in bf16 is exactly the reference's bf16 cast of T * a (T is -1, 0 or 1)
    w_deq = codes.to(OUT_DTYPE) * col_scale.to(OUT_DTYPE)[:, None]  # (N, K)
    grad_xn = grad_y @ w_deq  # (M, K)
    grad_w = (grad_y.t() @ dequantize_rows(q, s_x, OUT_DTYPE)).to(weight_dtype)  # (N, K)
    grad_x, grad_nw = rmsnorm_backward(x, norm_weight, rstd, grad_xn)
    return grad_x, grad_nw.to(norm_weight.dtype), grad_w


@_norm_ternary_linear_backward.register_fake
def _(grad_y, x, norm_weight, q, s_x, rstd, codes, col_scale, weight_dtype):
    return (torch.empty_like(x), torch.empty_like(norm_weight),
            x.new_empty((codes.shape[0], codes.shape[1]), dtype=weight_dtype))


def _setup_context(ctx, inputs, output) -> None:
    x, norm_weight, weight, codes, col_scale, _eps = inputs
    _y, q, s_x, rstd = output
    ctx.save_for_backward(x, norm_weight, q, s_x, rstd, codes, col_scale)
    ctx.weight_dtype = weight.dtype


def _backward(ctx, grad_y, _grad_q, _grad_sx, _grad_rstd):
    x, norm_weight, q, s_x, rstd, codes, col_scale = ctx.saved_tensors
    grad_x, grad_nw, grad_w = _norm_ternary_linear_backward(
        grad_y, x, norm_weight, q, s_x, rstd, codes, col_scale, ctx.weight_dtype)
    return grad_x, grad_nw, grad_w, None, None, None


_norm_ternary_linear.register_autograd(_backward, setup_context=_setup_context)


def norm_ternary_linear(x: Tensor, norm_weight: Tensor, weight: Tensor, codes: Tensor,
                        col_scale: Tensor, eps: float) -> Tensor:
    """RMSNorm(x) through ternary projections, fused.

    Args:
        x: (..., K) fp32 or bf16 activations (the norm's input).
        norm_weight: (K,) RMSNorm weight.
        weight: (N, K) master weights of the projections, stacked (gradient sink only).
        codes: (N, K) int8 ternary codes of `weight`; col_scale: (N,) fp32 scale per row.
    Returns:
        (..., N) bf16.
    """
    lead = x.shape[:-1]
    y, _q, _s, _r = _norm_ternary_linear(x.reshape(-1, x.shape[-1]), norm_weight, weight, codes,
                                         col_scale, eps)
    return y.view(*lead, codes.shape[0])
