"""BitLinear: absmean ternary weights, per-token absmax int8 activations, STE on both.

The numerical contract (DESIGN.md section 3), shared with transformers' BitNet integration and the
2B4T release:

    weights      s_w = 1 / mean(|W|).clamp(min=1e-5)   (one scalar per tensor)
                 T   = round(W * s_w).clamp(-1, 1)      forward uses T / s_w
    activations  s_x = 127 / max(|x|, dim=-1).clamp(min=1e-5)   (one scalar per token)
                 x_q = round(x * s_x).clamp(-128, 127)  forward uses x_q / s_x

Both quantizers run in fp32 whatever the autocast dtype and return the input's dtype. The pure
functions below (`ternary_weight`, `int8_activation`) are also what export packs, so there is one
definition of the ternary weights in the whole project.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHT_EPS = 1e-5
ACT_EPS = 1e-5
ACT_QMAX = 127
ACT_QMIN = -128


def ternary_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Absmean-quantize a weight matrix.

    Args:
        weight: (out, in) latent weights, any float dtype.
    Returns:
        T: (out, in) int8 codes in {-1, 0, 1}.
        scale: fp32 scalar tensor ``a = mean(|W|).clamp(min=1e-5)``, so that the forward uses
            ``W_q = a * T``. Note ``a = 1 / s_w``.
    """
    w = weight.detach().float()
    a = w.abs().mean().clamp(min=WEIGHT_EPS)
    codes = (w * (1.0 / a)).round().clamp(-1, 1)  # same ops as the training forward
    return codes.to(torch.int8), a


def int8_activation(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token absmax int8 quantization.

    Args:
        x: (..., features) activations, any float dtype.
    Returns:
        x_q: (..., features) fp32 integer codes in [-128, 127].
        s_x: (..., 1) fp32 scales; the dequantized activation is ``x_q / s_x``.
    """
    xf = x.float()
    s_x = ACT_QMAX / xf.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_EPS)
    return (xf * s_x).round().clamp(ACT_QMIN, ACT_QMAX), s_x


def fake_quant_weight_ref(weight: Tensor) -> Tensor:
    """Dequantized ternary weight ``T / s_w`` in the weight's dtype (no gradient logic)."""
    w = weight.float()
    s_w = 1.0 / w.abs().mean().clamp(min=WEIGHT_EPS)
    return ((w * s_w).round().clamp(-1, 1) / s_w).to(weight.dtype)


def fake_quant_activation_ref(x: Tensor) -> Tensor:
    """Dequantized int8 activation ``x_q / s_x`` in x's dtype (no gradient logic)."""
    x_q, s_x = int8_activation(x)
    return (x_q / s_x).to(x.dtype)


def _straight_through(quantized: Tensor, x: Tensor) -> Tensor:
    """``quantized`` in the forward, the identity gradient to ``x`` in the backward.

    ``quantized + (x - x.detach())`` is bit-exact: ``x - x.detach()`` is exactly zero for finite
    x, and adding zero changes no value (``x + (q - x).detach()``, the usual form, rounds).
    It is plain autograd on ATen ops rather than a custom ``autograd.Function``: torch 2.11's
    Dynamo mis-routes the gradient of a Function whose forward ends in a no-op dtype cast
    (``.to(same dtype)`` returns its input), and every decoder weight of a compiled block got a
    gradient of exactly 0 (tests/model/test_bitlinear.py holds compiled gradients equal to eager).
    """
    return quantized.detach() + (x - x.detach())


def quantize_weight_ste(weight: Tensor) -> Tensor:
    """Ternary fake-quantized weight ``T * a`` (weight's dtype) with a straight-through gradient."""
    with torch.no_grad():
        quantized = fake_quant_weight_ref(weight)
    return _straight_through(quantized, weight)


def quantize_activation_ste(x: Tensor) -> Tensor:
    """Int8 fake-quantized activation ``x_q / s_x`` (x's dtype) with a straight-through gradient."""
    with torch.no_grad():
        quantized = fake_quant_activation_ref(x)
    return _straight_through(quantized, x)


class BitLinear(nn.Module):
    """A bias-free linear layer computing ``quant_a(x) @ quant_w(W).T`` (W1.58A8), the reference.

    The latent ``weight`` (out, in) stays in full precision and receives straight-through
    gradients. This is the eager definition every fast path (bitnet_train.kernels) is tested
    against; the model never changes its own forward for speed.

    `frozen_weight` is set only inside `frozen_ternary_weights` (inference): the dequantized
    ternary weight computed once on entry, used instead of re-quantizing at every call.
    """

    frozen_weight: Tensor | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=dtype)
        )
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in) -> (..., out)."""
        x_q = quantize_activation_ste(x)
        w_q = self.frozen_weight
        if w_q is None:
            w_q = quantize_weight_ste(self.weight)
        elif torch.is_grad_enabled() and self.weight.requires_grad:
            raise RuntimeError("BitLinear: frozen ternary weights (frozen_ternary_weights) carry "
                               "no gradient; use them under torch.no_grad / inference_mode")
        return F.linear(x_q, w_q.to(x_q.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


@contextmanager
def frozen_ternary_weights(model: nn.Module) -> Iterator[int]:
    """Quantize every BitLinear's weight once, for inference; restore on exit.

    Inside the block each BitLinear multiplies by `fake_quant_weight_ref(weight)` (bit-identical
    to what `quantize_weight_ste` computes per call) cached on entry, so decoding a token costs
    no weight quantization (one pass over every weight per token otherwise). Yields the number
    of BitLinear modules frozen. Entering again while frozen re-quantizes (weights may have
    changed) and the outer exit restores the unfrozen forward. Gradients cannot flow through a
    frozen weight: the forward refuses to run with grad enabled.
    """
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    previous = [m.frozen_weight for m in layers]
    with torch.no_grad():
        for m in layers:
            m.frozen_weight = fake_quant_weight_ref(m.weight)
    try:
        yield len(layers)
    finally:
        for m, old in zip(layers, previous):
            m.frozen_weight = old
