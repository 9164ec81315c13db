"""Pure-PyTorch definitions of every fused kernel in this package (the references the kernels are
tested against, and the documentation of what each computes).

Shapes: x (M, K) rows of activations; w (K,) an RMSNorm weight; codes (N, K) int8 ternary weight
codes; col_scale (N,) fp32 the per-output-row weight scale (a = mean|W| of the tensor each row
belongs to); q (M, K) int8 activation codes; s_x (M,) fp32 activation scales (127 / max|y|).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bitnet_train.model.bitlinear import int8_activation


def rmsnorm_quant_ref(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """RMSNorm then per-token int8 quantization, exactly as the model's RMSNorm feeds a BitLinear.

    y = weight * cast_x(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps) (fp32; the normalized value
    is rounded to x's dtype before the weight multiplies it, as `RMSNorm.forward` does);
    s_x = 127 / max(max|y|, 1e-5); q = clamp(round(y * s_x), -128, 127).
    Returns q (M, K) int8, s_x (M,) fp32, rstd (M,) fp32.
    """
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)  # (M,)
    y = weight.float() * (xf * rstd[:, None]).to(x.dtype)
    q, s_x = int8_activation(y)
    return q.to(torch.int8), s_x.squeeze(-1), rstd


def rmsnorm_backward_ref(x: Tensor, weight: Tensor, rstd: Tensor, grad_y: Tensor
                         ) -> tuple[Tensor, Tensor]:
    """Gradients of y = weight * n, n = x * rstd, given dL/dy (M, K) (the straight-through
    estimator passes the quantizer's gradient through unchanged). fp32 math.

    dL/dweight = sum_m grad_y * n;  dL/dx = rstd * (g - n * mean(g * n)),  g = grad_y * weight.
    Returns grad_x (M, K) in x's dtype, grad_weight (K,) fp32.
    """
    xf, gy = x.float(), grad_y.float()
    n = xf * rstd[:, None]
    grad_w = (gy * n.to(x.dtype).float()).sum(0)
    g = gy * weight.float()
    grad_x = rstd[:, None] * (g - n * (g * n).mean(-1, keepdim=True))
    return grad_x.to(x.dtype), grad_w


def int8_matmul_ref(q: Tensor, s_x: Tensor, codes: Tensor, col_scale: Tensor,
                    out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """(q @ codes^T) * col_scale / s_x: the W1.58A8 product with both scales applied after an
    exact integer accumulation (fp64 here: |sum| <= 128 K is exact). -> (M, N) out_dtype."""
    acc = q.double() @ codes.double().T  # (M, N), exact integers
    return (acc / s_x.double()[:, None] * col_scale.double()[None, :]).to(out_dtype)


def dequantize_rows_ref(q: Tensor, s_x: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """q / s_x in fp32, cast to dtype: the activation the reference BitLinear multiplies by."""
    return (q.float() / s_x[:, None]).to(dtype)


def ternary_codes_ref(weights: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack per-tensor absmean codes of several (n_i, K) weights: codes (sum n_i, K) int8 and
    col_scale (sum n_i,) fp32, each row carrying its own tensor's scale a_i = mean|W_i|."""
    from bitnet_train.model.bitlinear import ternary_weight

    codes, scales = [], []
    for w in weights:
        c, a = ternary_weight(w)
        codes.append(c)
        scales.append(a.expand(w.shape[0]))
    return torch.cat(codes), torch.cat(scales).float()
