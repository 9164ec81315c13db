"""Quantizer maths against hand-computed cases, STE gradients, fp32 under autocast."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bitnet_train.model import build_model
from bitnet_train.model.bitlinear import (
    BitLinear,
    int8_activation,
    quantize_activation_ste,
    quantize_weight_ste,
    ternary_weight,
)
from tests.conftest import tiny_config


def test_ternary_weight_hand_case():
    w = torch.tensor([[0.5, -1.5, 0.1], [2.0, 0.0, -0.2]])
    # mean |w| = (0.5 + 1.5 + 0.1 + 2.0 + 0.0 + 0.2) / 6 = 4.3 / 6
    a = 4.3 / 6
    codes, scale = ternary_weight(w)
    # w / a = [0.698, -2.093, 0.140, 2.791, 0, -0.279] -> round, clamp
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[1, -1, 0], [1, 0, 0]]
    assert abs(scale.item() - a) < 1e-6


def test_ternary_weight_all_zero_no_nan():
    codes, scale = ternary_weight(torch.zeros(4, 8))
    assert abs(scale.item() - 1e-5) < 1e-12  # clamped, not zero: no division by zero downstream
    assert codes.abs().sum() == 0
    out = quantize_weight_ste(torch.zeros(4, 8))
    assert torch.isfinite(out).all() and out.abs().sum() == 0


def test_int8_activation_hand_case():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.004]])
    # s_x = 127 / 1.0; codes = round([127, -63.5, 31.75, 0.508]) = [127, -64, 32, 1]
    # (torch rounds half to even: -63.5 -> -64)
    x_q, s_x = int8_activation(x)
    assert x_q.tolist() == [[127.0, -64.0, 32.0, 1.0]]
    assert s_x.item() == 127.0


def test_int8_activation_zero_row_no_nan():
    x = torch.zeros(2, 3, 16)
    x[0, 0] = torch.linspace(-1, 1, 16)
    out = quantize_activation_ste(x)
    assert torch.isfinite(out).all()
    assert out[1].abs().sum() == 0
    # a per-token scale: rows do not influence each other
    assert torch.allclose(out[0, 0], torch.round(x[0, 0] * 127) / 127)


def test_ste_gradients_are_identity():
    w = torch.randn(5, 7, requires_grad=True)
    x = torch.randn(3, 7, requires_grad=True)
    g = torch.randn(5, 7)
    quantize_weight_ste(w).backward(g)
    assert torch.equal(w.grad, g)
    gx = torch.randn(3, 7)
    quantize_activation_ste(x).backward(gx)
    assert torch.equal(x.grad, gx)


def reference_bitlinear(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """DESIGN.md section 3 written out in float64 numpy, independently of the code under test:
    per-tensor absmean ternary weights, per-token absmax int8 activations (round half to even,
    as torch.round). Returns (y, dequantized x, dequantized W)."""
    s_w = 1.0 / max(np.abs(w).mean(), 1e-5)
    w_dq = np.clip(np.rint(w * s_w), -1, 1) / s_w
    s_x = 127.0 / np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-5)
    x_dq = np.clip(np.rint(x * s_x), -128, 127) / s_x
    return x_dq @ w_dq.T, x_dq, w_dq


@pytest.mark.parametrize("batch, in_features, out_features", [
    ((5, 7), 123, 37), ((3,), 64, 256), ((2, 1), 17, 3), ((4, 9), 256, 96),
])
def test_bitlinear_forward_and_ste_grads_against_a_float64_reference(batch, in_features,
                                                                     out_features):
    gen = torch.Generator().manual_seed(in_features * 1000 + out_features)
    layer = BitLinear(in_features, out_features)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=gen) * 0.02)
    x = (torch.randn(*batch, in_features, generator=gen) * 3.0).requires_grad_()
    g = torch.randn(*batch, out_features, generator=gen)
    y = layer(x)
    (y * g).sum().backward()
    ref_y, x_dq, w_dq = reference_bitlinear(x.detach().double().numpy(),
                                            layer.weight.detach().double().numpy())
    gd = g.double().numpy()
    assert y.shape == (*batch, out_features) and y.dtype == torch.float32
    np.testing.assert_allclose(y.detach().double().numpy(), ref_y, rtol=1e-5, atol=1e-6)
    # straight-through estimator on both quantizers: dL/dx = g @ W_q, dL/dW = g^T @ x_q
    np.testing.assert_allclose(x.grad.double().numpy(), gd @ w_dq, rtol=1e-5, atol=1e-7)
    flat_g, flat_x = gd.reshape(-1, out_features), x_dq.reshape(-1, in_features)
    np.testing.assert_allclose(layer.weight.grad.double().numpy(), flat_g.T @ flat_x,
                               rtol=1e-5, atol=1e-5)


def test_bitlinear_under_bf16_autocast_stays_near_the_reference():
    """bf16 GEMM of the quantized operands: output bf16, within bf16 rounding of the exact
    result (measured 0.24% relative; a per-row weight scale gives 16%, skipping the activation
    quantizer 0.8%)."""
    gen = torch.Generator().manual_seed(7)
    layer = BitLinear(123, 45)
    x = torch.randn(6, 123, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref_y, _, _ = reference_bitlinear(x.double().numpy(), layer.weight.detach().double().numpy())
    err = np.linalg.norm(y.detach().double().numpy() - ref_y) / np.linalg.norm(ref_y)
    assert err < 6e-3, err


def _tiny_batch(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_blocks_give_eager_gradients(backend):
    """torch.compile must not change a single gradient (torch 2.11 zeroed every decoder weight's
    gradient when the STEs were custom autograd.Functions; Dynamo alone reproduced it, so the
    cheap backends here catch that class of bug on the CPU)."""
    torch._dynamo.reset()
    model = build_model(tiny_config(), seed=0)
    compiled = copy.deepcopy(model)
    for block in compiled.model.layers:
        block.compile(backend=backend)
    ids = _tiny_batch(model.config.vocab_size)
    for m in (model, compiled):
        m(ids, labels=ids).loss.backward()
    loss_eager = model(ids, labels=ids).loss.item()
    assert compiled(ids, labels=ids).loss.item() == pytest.approx(loss_eager, rel=1e-6)
    eager_grads = dict(model.named_parameters())
    for name, p in compiled.named_parameters():
        ref = eager_grads[name].grad
        assert p.grad is not None and ref.norm() > 0, name
        err = ((p.grad - ref).norm() / ref.norm()).item()
        assert err < 1e-5, f"{name}: relative gradient error {err:.2e}"


def test_quantizers_run_in_fp32_under_autocast():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wq = quantize_weight_ste(w.bfloat16())
        xq = quantize_activation_ste(x.bfloat16())
    assert wq.dtype == torch.bfloat16 and xq.dtype == torch.bfloat16
    # the codes come out exactly as an fp32 computation on the bf16 inputs gives them
    codes, a = ternary_weight(w.bfloat16())
    assert torch.equal(wq, (codes.float() * a).bfloat16())
    x_q, s_x = int8_activation(x.bfloat16())
    assert torch.equal(xq, (x_q / s_x).bfloat16())
