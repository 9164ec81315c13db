"""RMSNorm -> int8 activation codes -> ternary projection(s), as one differentiable op.

    y = int8_matmul(q, s_x, codes, col_scale),   (q, s_x) = rmsnorm_quant(x, norm_weight)

Forward: the fused norm+quantize kernel, then the int8 tensor-core product (several projections
that read the same normalized input -- q/k/v, gate/up -- are one product over their stacked
codes, each row keeping its own tensor's scale). Saved for backward: x and one fp32 scalar per
token; the int8 codes die with the forward (the backward recomputes the quantized activation
from x in one pass, cheaper than keeping M x K bytes alive between the passes).

Backward, with the straight-through estimator on both quantizers (the reference's gradients):
    dxn = dy @ (codes * col_scale)          (bf16 GEMM; the dequantized ternary weight)
    dW  = dy^T @ (q / s_x)                  (bf16 GEMM; the dequantized activation)
    dx, dnorm_weight = rmsnorm_backward(x, norm_weight, rstd, dxn)
`weights` (the fp32 master weights) enter only to receive dW, one gradient each: the forward
uses the cached codes, which `kernels.modules` refreshes once per optimizer step.

Both directions are `torch.library` custom ops: torch.compile treats them as opaque calls with
a registered autograd formula instead of tracing their Python (Dynamo's tracing of custom
`autograd.Function`s is what dropped gradients in torch 2.11), and compiles the elementwise code
around them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bitnet_train.kernels.int8_matmul import int8_matmul
from bitnet_train.kernels.norm_quant import (
    rmsnorm_backward,
    rmsnorm_quant,
    rmsnorm_quant_dequantized,
)
from bitnet_train.kernels.weight_quant import dequantize_codes

OUT_DTYPE = torch.bfloat16
"""The product's dtype: what the reference BitLinear returns under bf16 autocast."""


@torch.library.custom_op("bitnet_train::norm_ternary_linear", mutates_args=())
def _norm_ternary_linear(x: Tensor, norm_weight: Tensor, weights: list[Tensor], codes: Tensor,
                         col_scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x (M, K) -> y (M, N) bf16, plus rstd (M,) for the backward."""
    q, s_x, rstd = rmsnorm_quant(x, norm_weight, eps)
    return int8_matmul(q, s_x, codes, col_scale, OUT_DTYPE), rstd


@_norm_ternary_linear.register_fake
def _(x, norm_weight, weights, codes, col_scale, eps):
    return (x.new_empty((x.shape[0], codes.shape[0]), dtype=OUT_DTYPE),
            x.new_empty((x.shape[0],), dtype=torch.float32))


@torch.library.custom_op("bitnet_train::norm_ternary_linear_backward", mutates_args=())
def _norm_ternary_linear_backward(
    grad_y: Tensor, x: Tensor, norm_weight: Tensor, rstd: Tensor, codes: Tensor,
    col_scale: Tensor, rows: list[int], weight_dtype: torch.dtype, eps: float,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """-> grad_x (M, K) in x's dtype, grad_norm_weight (K,), one (rows[i], K) grad per weight."""
    grad_y = grad_y.to(OUT_DTYPE).contiguous()
    # codes * a in bf16 is exactly the reference's bf16 cast of T * a (T is -1, 0 or 1)
    w_deq = dequantize_codes(codes, col_scale)  # (N, K) bf16
    grad_xn = grad_y @ w_deq  # (M, K)
    x_deq = rmsnorm_quant_dequantized(x, norm_weight, eps)  # (M, K) bf16, recomputed
    grad_w = grad_y.t() @ x_deq  # (N, K) bf16
    del x_deq
    grad_x, grad_nw = rmsnorm_backward(x, norm_weight, rstd, grad_xn)
    # .to() makes each gradient its own contiguous tensor, which AccumulateGrad can keep
    return grad_x, grad_nw.to(norm_weight.dtype), [g.to(weight_dtype)
                                                   for g in grad_w.split(rows)]


@_norm_ternary_linear_backward.register_fake
def _(grad_y, x, norm_weight, rstd, codes, col_scale, rows, weight_dtype, eps):
    return (torch.empty_like(x), torch.empty_like(norm_weight),
            [x.new_empty((n, codes.shape[1]), dtype=weight_dtype) for n in rows])


def _setup_context(ctx, inputs, output) -> None:
    x, norm_weight, weights, codes, col_scale, eps = inputs
    _y, rstd = output
    ctx.save_for_backward(x, norm_weight, rstd, codes, col_scale)
    ctx.rows = [w.shape[0] for w in weights]
    ctx.weight_dtype = weights[0].dtype
    ctx.eps = eps


def _backward(ctx, grad_y, _grad_rstd):
    x, norm_weight, rstd, codes, col_scale = ctx.saved_tensors
    grad_x, grad_nw, grad_ws = _norm_ternary_linear_backward(
        grad_y, x, norm_weight, rstd, codes, col_scale, ctx.rows, ctx.weight_dtype, ctx.eps)
    return grad_x, grad_nw, list(grad_ws), None, None, None


_norm_ternary_linear.register_autograd(_backward, setup_context=_setup_context)


def norm_ternary_linear(x: Tensor, norm_weight: Tensor, weights: list[Tensor], codes: Tensor,
                        col_scale: Tensor, eps: float) -> Tensor:
    """RMSNorm(x) through ternary projections, fused.

    Args:
        x: (..., K) fp32 or bf16 activations (the norm's input).
        norm_weight: (K,) RMSNorm weight.
        weights: master weights (n_i, K) of the projections (gradient sinks only).
        codes: (sum n_i, K) int8 ternary codes of the stacked weights; col_scale: (sum n_i,)
            fp32 scale per row (each weight's absmean).
    Returns:
        (..., sum n_i) bf16: the projections' outputs side by side.
    """
    lead = x.shape[:-1]
    y, _rstd = _norm_ternary_linear(x.reshape(-1, x.shape[-1]), norm_weight, list(weights),
                                    codes, col_scale, eps)
    return y.view(*lead, codes.shape[0])
