"""Quantizer maths against hand-computed cases, STE gradients, fp32 under autocast."""

from __future__ import annotations

import torch

from bitnet_train.model.bitlinear import (
    BitLinear,
    int8_activation,
    quantize_activation_ste,
    quantize_weight_ste,
    ternary_weight,
)


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


def test_bitlinear_forward_and_grads_match_dequantized_matmul():
    torch.manual_seed(0)
    layer = BitLinear(16, 8)
    x = torch.randn(2, 4, 16, requires_grad=True)
    y = layer(x)
    codes, a = ternary_weight(layer.weight)
    x_q, s_x = int8_activation(x)
    expected = (x_q / s_x) @ (codes.float() * a).T
    assert torch.allclose(y, expected, atol=1e-5)
    # integer-code GEMM then rescale equals the dequantize-first path within rounding
    exact = (x_q @ codes.float().T) * (a / s_x)
    assert torch.allclose(y, exact, atol=1e-5)
    y.sum().backward()
    # STE: dL/dx = ones @ W_q, dL/dW = ones^T @ x_q
    w_q = codes.float() * a
    assert torch.allclose(x.grad, torch.ones(2, 4, 8) @ w_q, atol=1e-5)
    x_sum = (x_q / s_x).reshape(-1, 16).sum(0)  # every output row sees the same summed input
    assert torch.allclose(layer.weight.grad, x_sum[None].expand(8, 16), atol=1e-4)


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


def test_freeze_keeps_forward():
    torch.manual_seed(0)
    layer = BitLinear(16, 8)
    x = torch.randn(3, 16)
    y = layer(x)
    layer.freeze()
    assert torch.equal(layer(x), y)
    layer.unfreeze()
    assert layer._frozen is None
