"""Quantizer maths against hand-computed cases, STE gradients, fp32 under autocast."""

from __future__ import annotations

import copy

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


def _absmean_ternary_fp64(w: torch.Tensor) -> torch.Tensor:
    """Independent definition (fp64, written out): a * clip(round(w / a), -1, 1), a = mean|w|."""
    w = w.double()
    a = max(w.abs().mean().item(), 1e-5)
    return torch.clamp(torch.round(w / a), -1, 1) * a


def _absmax_int8_fp64(x: torch.Tensor) -> torch.Tensor:
    """Independent definition (fp64): per row, round(127 x / max|x|) * max|x| / 127."""
    x = x.double()
    m = x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    return torch.clamp(torch.round(x * 127 / m), -128, 127) * m / 127


@pytest.mark.parametrize("shape", [(1, 5, 123), (2, 7, 64), (3, 1, 33)])
def test_bitlinear_forward_and_grads_match_fp64_definition(shape):
    torch.manual_seed(sum(shape))
    b, t, k = shape
    layer = BitLinear(k, 19)
    x = torch.randn(b, t, k, requires_grad=True)
    y = layer(x)
    w_q = _absmean_ternary_fp64(layer.weight.detach())  # (19, k)
    x_q = _absmax_int8_fp64(x.detach())  # (b, t, k)
    expected = x_q @ w_q.T
    assert (y.double() - expected).abs().max() < 1e-5 * expected.abs().max()
    g = torch.randn(b, t, 19)
    y.backward(g)
    # STE: dL/dx = g @ W_q and dL/dW = g^T x_q, with the quantized operands
    assert torch.allclose(x.grad.double(), g.double() @ w_q, atol=1e-5)
    grad_w = g.double().reshape(-1, 19).T @ x_q.reshape(-1, k)
    assert torch.allclose(layer.weight.grad.double(), grad_w, atol=1e-4)


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
