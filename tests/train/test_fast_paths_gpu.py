"""Every fast path against the eager reference at the 2B4T width, on the GPU: loss and every
parameter's gradient.

A fast path passes when, for the loss and for each parameter's gradient, its error against the
fp32 eager reference is at most twice the bf16 eager reference's own error (bf16 noise) plus a
small floor. A zeroed gradient (torch 2.11's compile did that to every decoder weight), a
doubled one or a gradient sent to the wrong parameter is off by ~100% and fails. Run on the device
machine: `pytest -m gpu tests/train/test_fast_paths_gpu.py -s`; `-s` prints the error table.
"""

from __future__ import annotations

import copy

import pytest
import torch

from bitnet_train.model import BitNetConfig, build_model
from bitnet_train.train.parallelize import apply_attention, apply_compile, apply_kernels

pytestmark = pytest.mark.gpu

WIDTH_2B4T = dict(hidden_size=2560, intermediate_size=6912, num_attention_heads=20,
                  num_key_value_heads=5, num_hidden_layers=2, vocab_size=128256,
                  max_position_embeddings=4096, hidden_act="relu2", name="2b4t-2layer")

VARIANTS = {
    # name: (kernels, attention, compile)
    "compile": (False, "sdpa", True),
    "flex": (False, "flex", False),
    "kernels": (True, "sdpa", False),
    "kernels+flex": (True, "flex", False),
    "kernels+flex+compile": (True, "flex", True),  # the production fast path
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _batch(seq: int = 1024, rows: int = 2):
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, WIDTH_2B4T["vocab_size"], (rows, seq), device="cuda", generator=g)
    # three documents per row, of unequal lengths
    bounds = torch.tensor([0, seq // 5, seq // 2])
    docs = (torch.arange(seq)[:, None] >= bounds[None, :]).sum(-1) - 1
    docs = docs.expand(rows, seq).cuda()
    starts = bounds[docs[0].cpu()].cuda()
    pos = (torch.arange(seq, device="cuda") - starts).expand(rows, seq)
    return dict(input_ids=ids, labels=ids, document_ids=docs, position_ids=pos)


def _loss_and_grads(model, batch, bf16: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.backward()
    torch.cuda.synchronize()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def references():
    torch.manual_seed(0)
    model = build_model(BitNetConfig(**WIDTH_2B4T), seed=0).cuda()
    batch = _batch()
    ref32 = _loss_and_grads(model, batch, bf16=False)
    ref16 = _loss_and_grads(model, batch, bf16=True)
    model.zero_grad(set_to_none=True)
    return model, batch, ref32, ref16


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fast_path_matches_eager_loss_and_every_gradient(references, variant):
    model, batch, (loss32, g32), (loss16, g16) = references
    kernels, attention, compile_ = VARIANTS[variant]
    torch._dynamo.reset()
    fast = copy.deepcopy(model)
    if kernels:
        assert apply_kernels(fast)
    apply_attention(fast, attention)
    if compile_:
        apply_compile(fast)
    loss, grads = _loss_and_grads(fast, batch, bf16=True)
    worst, worst_name, failures = 0.0, "", []
    for name, g in g32.items():
        noise, err = rel(g16[name], g), rel(grads[name], g)
        if err > worst:
            worst, worst_name = err, name
        if not (err <= 2 * noise + 2e-3 and grads[name].norm() > 0):
            failures.append(f"{name}: {err:.2e} (bf16 eager {noise:.2e})")
    print(f"\n[{variant}] loss {loss:.6f} (fp32 eager {loss32:.6f}, bf16 eager {loss16:.6f}); "
          f"worst gradient error {worst:.2e} at {worst_name}")
    assert abs(loss - loss32) <= 2 * abs(loss16 - loss32) + 1e-3 * abs(loss32)
    assert not failures, failures[:10]


def test_int8_matmul_at_2b4t_shapes_is_exact():
    """The int8 product at the real shapes (K = 2560 and 6912): the exact integer sum, then two
    fp32 roundings and one bf16 rounding of the scaled result."""
    from bitnet_train.kernels.int8_matmul import int8_matmul
    from bitnet_train.kernels.reference import int8_matmul_ref

    g = torch.Generator(device="cuda").manual_seed(1)
    for n, k in [(3840, 2560), (2560, 2560), (13824, 2560), (2560, 6912)]:
        q = torch.randint(-128, 128, (4096, k), dtype=torch.int8, device="cuda", generator=g)
        codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda", generator=g)
        s_x = torch.rand(4096, device="cuda", generator=g) * 50 + 1
        scale = torch.rand(n, device="cuda", generator=g) * 0.05 + 1e-3
        ref = int8_matmul_ref(q, s_x, codes, scale, torch.float64)
        for impl in ("triton", "torch"):
            y = int8_matmul(q, s_x, codes, scale, torch.bfloat16, impl=impl).double()
            assert ((y - ref).abs() <= 2.0**-8 * ref.abs() + 1e-9).all(), (n, k, impl)
