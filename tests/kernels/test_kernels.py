"""The Triton kernels against their PyTorch references, and the fused decoder layer against the
reference model (loss and every gradient).

On the CPU these run through Triton's interpreter (TRITON_INTERPRET=1, set by conftest), which
executes the very kernels the GPU compiles, so CI catches a broken kernel without a GPU; on a GPU
the same tests run compiled. Shapes are small and odd (partial tiles, K not a power of two).
"""

from __future__ import annotations

import copy

import pytest
import torch

from bitnet_train.kernels.int8_matmul import dequantize_rows, int8_matmul
from bitnet_train.kernels.modules import (
    FusedBitNetDecoderLayer,
    apply_kernels,
    refresh_ternary_codes,
    watch_optimizer,
)
from bitnet_train.kernels.norm_quant import (
    rmsnorm_backward,
    rmsnorm_quant,
    rmsnorm_quant_dequantized,
)
from bitnet_train.kernels.reference import (
    dequantize_rows_ref,
    int8_matmul_ref,
    rmsnorm_backward_ref,
    rmsnorm_quant_ref,
    ternary_codes_ref,
)
from bitnet_train.kernels.ternary_linear import _norm_ternary_linear, norm_ternary_linear
from bitnet_train.model import build_model
from bitnet_train.model.bitlinear import BitLinear
from bitnet_train.model.modeling import RMSNorm
from tests.conftest import tiny_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 64), (37, 123), (5, 257)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _inputs(m: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = _gen(seed)
    x = (torch.randn(m, k, device=DEVICE, generator=g) * 3).to(dtype)
    w = torch.rand(k, device=DEVICE, generator=g) + 0.5
    return x, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_quant_matches_reference(shape, dtype):
    x, w = _inputs(*shape, DTYPES[dtype])
    q, s_x, rstd = rmsnorm_quant(x, w, 1e-5)
    q_ref, s_ref, rstd_ref = rmsnorm_quant_ref(x, w, 1e-5)
    assert q.dtype == torch.int8 and q.shape == shape
    # the same codes; on a GPU the sum of squares may round differently (reduction order),
    # which can move a value across a rounding boundary: at most by one, rarely
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 1e-3
    assert rel(s_x, s_ref) < 1e-5 and rel(rstd, rstd_ref) < 1e-5
    assert q.abs().max() == 127  # the largest value of every row maps to +-127


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_backward_matches_reference(shape, dtype):
    x, w = _inputs(*shape, DTYPES[dtype], seed=1)
    _, _, rstd = rmsnorm_quant_ref(x, w, 1e-5)
    grad_y = torch.randn(shape, device=DEVICE, generator=_gen(2)).to(torch.bfloat16)
    gx, gw = rmsnorm_backward(x, w, rstd, grad_y)
    gx_ref, gw_ref = rmsnorm_backward_ref(x, w, rstd, grad_y)
    tol = 1e-5 if dtype == "fp32" else 8e-3  # bf16: one rounding of dx
    assert gx.dtype == x.dtype and rel(gx, gx_ref) < tol and rel(gw, gw_ref) < 1e-5


def test_rmsnorm_backward_matches_autograd_of_the_model_norm():
    """The hand-derived backward against autograd through the model's own RMSNorm (fp32)."""
    x, w = _inputs(9, 70, torch.float32, seed=3)
    norm = RMSNorm(70, 1e-5).to(DEVICE)
    norm.weight.data.copy_(w)
    xr = x.clone().requires_grad_()
    g = torch.randn(9, 70, device=DEVICE, generator=_gen(4))
    norm(xr).backward(g)
    _, _, rstd = rmsnorm_quant_ref(x, w, 1e-5)
    gx, gw = rmsnorm_backward(x, w, rstd, g)
    assert rel(gx, xr.grad) < 1e-5 and rel(gw, norm.weight.grad) < 1e-5


@pytest.mark.parametrize("out", ["fp32", "bf16"])
@pytest.mark.parametrize("mnk", [(1, 8, 64), (37, 29, 123), (70, 130, 257)])
def test_int8_matmul_matches_exact_product(mnk, out):
    m, n, k = mnk
    g = _gen(5)
    q = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=DEVICE, generator=g)
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, device=DEVICE, generator=g)
    s_x = torch.rand(m, device=DEVICE, generator=g) * 50 + 1
    scale = torch.rand(n, device=DEVICE, generator=g) * 0.05 + 1e-3
    y = int8_matmul(q, s_x, codes, scale, DTYPES[out])
    ref = int8_matmul_ref(q, s_x, codes, scale, torch.float64)
    assert y.dtype == DTYPES[out] and y.shape == (m, n)
    # fp32: the exact integer sum times two fp32 roundings; bf16: within one bf16 rounding
    bound = 1e-6 if out == "fp32" else 2.0**-8
    assert ((y.double() - ref).abs() <= bound * ref.abs() + 1e-12).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_recompute_equals_forward_codes(shape, dtype):
    """The backward's recomputed activation is exactly the forward's codes over their scale."""
    x, w = _inputs(*shape, DTYPES[dtype], seed=9)
    q, s_x, _ = rmsnorm_quant(x, w, 1e-5)
    assert torch.equal(rmsnorm_quant_dequantized(x, w, 1e-5), dequantize_rows_ref(q, s_x))


@pytest.mark.parametrize("n_rows", [[64], [40, 8, 8], [129, 7]])
def test_weight_codes_kernel_matches_reference(n_rows):
    from bitnet_train.kernels.weight_quant import ternary_codes_into

    g = _gen(10)
    weights = [torch.randn(n, 70, device=DEVICE, generator=g) * (0.01 * (i + 1))
               for i, n in enumerate(n_rows)]
    weights[0][0, :5] = 0.0
    codes = torch.full((sum(n_rows), 70), 7, dtype=torch.int8, device=DEVICE)  # poisoned
    scale = torch.full((sum(n_rows),), float("nan"), device=DEVICE)
    ternary_codes_into(weights, codes, scale)
    ref_codes, ref_scale = ternary_codes_ref(weights)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


def test_dequantize_codes_matches_reference():
    from bitnet_train.kernels.weight_quant import dequantize_codes

    g = _gen(11)
    codes = torch.randint(-1, 2, (37, 5000), dtype=torch.int8, device=DEVICE, generator=g)
    scale = torch.rand(37, device=DEVICE, generator=g) * 0.03
    expected = codes.to(torch.bfloat16) * scale.to(torch.bfloat16)[:, None]
    assert torch.equal(dequantize_codes(codes, scale), expected)


@pytest.mark.parametrize("k", [64, 123, 5000])
def test_dequantize_rows_matches_reference(k):
    g = _gen(6)
    q = torch.randint(-128, 128, (7, k), dtype=torch.int8, device=DEVICE, generator=g)
    s_x = torch.rand(7, device=DEVICE, generator=g) * 100 + 0.5
    assert torch.equal(dequantize_rows(q, s_x), dequantize_rows_ref(q, s_x))


def _reference_norm_projections(x, norm_w, weights, eps):
    """The model's own modules: RMSNorm then BitLinears, under bf16 autocast."""
    norm = RMSNorm(x.shape[-1], eps).to(DEVICE)
    norm.weight.data.copy_(norm_w)
    projs = []
    for w in weights:
        p = BitLinear(w.shape[1], w.shape[0]).to(DEVICE)
        p.weight.data.copy_(w)
        projs.append(p)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        h = norm(x)
        y = torch.cat([p(h) for p in projs], dim=-1)
    return y, norm, projs


@pytest.mark.parametrize("x_dtype", DTYPES)
def test_norm_ternary_linear_matches_model_modules(x_dtype):
    """One fused op (norm + three ternary projections) against RMSNorm + 3 BitLinears: output
    and the gradients of x, the norm weight and each projection weight."""
    torch.manual_seed(0)
    k, sizes = 96, [64, 32, 32]
    x0 = (torch.randn(2, 11, k, device=DEVICE) * 2).to(DTYPES[x_dtype])
    norm_w = torch.rand(k, device=DEVICE) + 0.5
    weights = [torch.randn(n, k, device=DEVICE) * 0.02 for n in sizes]
    g = torch.randn(2, 11, sum(sizes), device=DEVICE)

    x_ref = x0.clone().requires_grad_()
    y_ref, norm, projs = _reference_norm_projections(x_ref, norm_w, weights, 1e-5)
    (y_ref.float() * g).sum().backward()

    x = x0.clone().requires_grad_()
    nw = norm_w.clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in weights]
    codes, scale = ternary_codes_ref(ws)
    y = norm_ternary_linear(x, nw, ws, codes, scale, 1e-5)
    (y.float() * g).sum().backward()

    assert y.dtype == torch.bfloat16 and y.shape == y_ref.shape
    # the fused product accumulates exact integers; the reference rounds both operands to bf16
    assert rel(y, y_ref) < 1e-2
    assert rel(x.grad, x_ref.grad) < 2e-2
    assert rel(nw.grad, norm.weight.grad) < 2e-2
    for w, p in zip(ws, projs):
        assert rel(w.grad, p.weight.grad) < 2e-2
    # a gradient scaled or dropped would be far off
    assert rel(2 * ws[1].grad, projs[1].weight.grad) > 0.5


def test_custom_op_registration_passes_opcheck():
    """torch.library's own checks: schema, fake (meta) implementation, autograd registration."""
    x, w = _inputs(6, 64, torch.float32, seed=7)
    weight = torch.randn(40, 64, device=DEVICE) * 0.02
    codes, scale = ternary_codes_ref([weight])
    torch.library.opcheck(_norm_ternary_linear,
                          (x.requires_grad_(), w.requires_grad_(), [weight.requires_grad_()],
                           codes, scale, 1e-5),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _loss_and_grads(model, ids, docs, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, document_ids=docs, labels=ids).loss
    loss.backward()
    return loss.item(), _grads(model)


def test_fused_model_matches_reference_model_loss_and_every_gradient():
    """The whole model with fused layers against the reference model: each error must stay
    within twice the reference's own bf16-vs-fp32 error (bf16 noise), for the loss and for every
    parameter's gradient, and a dropped or doubled gradient fails."""
    torch.manual_seed(0)
    ref = build_model(tiny_config(), seed=0).to(DEVICE)
    fused = copy.deepcopy(ref)
    assert apply_kernels(fused)
    assert all(isinstance(layer, FusedBitNetDecoderLayer) for layer in fused.model.layers)
    ids = torch.randint(0, 512, (2, 40), device=DEVICE, generator=_gen(8))
    docs = torch.cat([torch.zeros(2, 15), torch.ones(2, 25)], dim=1).long().to(DEVICE)
    loss32, g32 = _loss_and_grads(ref, ids, docs, autocast=False)
    loss16, g16 = _loss_and_grads(ref, ids, docs, autocast=True)
    loss_f, gf = _loss_and_grads(fused, ids, docs, autocast=True)
    assert abs(loss_f - loss32) <= 2 * abs(loss16 - loss32) + 2e-3 * abs(loss32)
    for name, g in g32.items():
        noise = rel(g16[name], g)
        err = rel(gf[name], g)
        assert gf[name].norm() > 0, name
        assert err <= 2 * noise + 5e-3, f"{name}: fused {err:.2e} vs bf16 reference {noise:.2e}"
        assert rel(2 * gf[name], g) > 0.5


def test_codes_refresh_once_per_optimizer_step():
    """Micro-batches between optimizer steps reuse the codes; a step (fused or foreach AdamW:
    fused AdamW does not bump version counters, the step hook catches it), load_state_dict or
    a forced refresh recompute them; the codes always equal the master weights' quantization
    when a forward runs."""
    torch.manual_seed(0)
    model = build_model(tiny_config(), seed=0).to(DEVICE)
    apply_kernels(model)
    layer = model.model.layers[0]
    ids = torch.randint(0, 512, (2, 16), device=DEVICE)

    def expected_qkv():
        return ternary_codes_ref([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                                  layer.self_attn.v_proj.weight])

    model(ids, labels=ids).loss.backward()
    assert torch.equal(layer.qkv_codes, expected_qkv()[0])
    assert refresh_ternary_codes(model) == 0  # nothing changed: a second micro-batch reuses
    for fused in (False, True):
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=fused)
        watch_optimizer(opt, model)
        before = layer.qkv_codes.clone()
        opt.step()
        model(ids, labels=ids)  # the forward pre-hook refreshes
        assert torch.equal(layer.qkv_codes, expected_qkv()[0]), f"fused={fused}"
        assert not torch.equal(layer.qkv_codes, before)
        assert torch.equal(layer.qkv_scale, expected_qkv()[1])
    state = build_model(tiny_config(), seed=1).state_dict()
    model.load_state_dict(state)
    model(ids)
    assert torch.equal(layer.qkv_codes, expected_qkv()[0])
    # a write through .data bypasses the version counter: force=True is the documented remedy
    layer.self_attn.q_proj.weight.data.mul_(-1)
    refresh_ternary_codes(model, force=True)
    assert torch.equal(layer.qkv_codes, expected_qkv()[0])
    assert "qkv_codes" not in model.state_dict()  # derived state is never saved


def test_compiled_fused_blocks_give_eager_gradients():
    """torch.compile around the custom ops changes no gradient (Dynamo treats them as opaque)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_model(tiny_config(), seed=0).to(DEVICE)
    apply_kernels(eager)
    compiled = copy.deepcopy(eager)
    for block in compiled.model.layers:
        block.compile(backend="aot_eager")
    ids = torch.randint(0, 512, (2, 24), device=DEVICE)
    le, ge = _loss_and_grads(eager, ids, None, autocast=True)
    lc, gc = _loss_and_grads(compiled, ids, None, autocast=True)
    assert abs(le - lc) <= 1e-5 * abs(le)
    for name, g in ge.items():
        assert rel(gc[name], g) < 1e-5, name
