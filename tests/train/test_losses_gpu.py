"""CUDA tests: Liger's fused losses against our chunked PyTorch path (and both against an fp64
definition), for loss and gradients. Run on the device machine: `pytest -m gpu -v -s`.

Errors are relative Frobenius norms ||a - b|| / ||b||. Tolerances per input dtype:
fp32 (true fp32 matmuls, fp32 softmax in both paths): 1e-5 on losses, 1e-4 on gradients;
bf16 (both paths round the logits to bf16 and the logit gradients to bf16, then differ in
chunking and accumulation order): 2e-3 on losses, 2e-2 on gradients.
"""

from __future__ import annotations

import pytest
import torch

from bitnet_train.train.losses import (
    IGNORE_INDEX,
    causal_lm_head_fn,
    fused_linear_dpo,
    linear_cross_entropy,
    resolve_impl,
    sequence_logps,
    sequence_logps_reference,
)
from tests.conftest import tiny_config

pytestmark = pytest.mark.gpu

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LOSS_TOL = {"fp32": 1e-5, "bf16": 2e-3}
GRAD_TOL = {"fp32": 1e-4, "bf16": 2e-2}
N, H, V = 1037, 256, 5003  # odd sizes: partial chunks and blocks


@pytest.fixture(autouse=True)
def _needs_liger():
    pytest.importorskip("liger_kernel")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 tolerances assume true fp32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _flat_inputs(dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(N, H, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(V, H, device="cuda", generator=g) / H**0.5).to(dtype)
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    targets[torch.rand(N, device="cuda", generator=g) < 0.25] = IGNORE_INDEX
    return hidden, weight, targets


def _run_ce(impl, hidden, weight, targets, reduction):
    h, w = _leaf(hidden), _leaf(weight)
    loss = linear_cross_entropy(h, w, targets, reduction, impl=impl)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def test_auto_picks_liger_on_cuda():
    assert resolve_impl("auto", torch.device("cuda")) == "liger"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_liger_linear_cross_entropy_matches_torch(reduction, dtype):
    hidden, weight, targets = _flat_inputs(DTYPES[dtype])
    liger = _run_ce("liger", hidden, weight, targets, reduction)
    torch_ = _run_ce("torch", hidden, weight, targets, reduction)
    exact = _run_ce("torch", hidden.double(), weight.double(), targets, reduction)
    errs = [rel(a, b) for a, b in zip(liger, torch_)]
    print(f"\n[ce {reduction} {dtype}] liger vs torch: loss {errs[0]:.2e} dh {errs[1]:.2e} "
          f"dW {errs[2]:.2e}; vs fp64: liger loss {rel(liger[0], exact[0]):.2e}, "
          f"torch loss {rel(torch_[0], exact[0]):.2e}")
    assert liger[1].dtype == hidden.dtype and liger[2].dtype == weight.dtype
    assert errs[0] < LOSS_TOL[dtype]
    assert errs[1] < GRAD_TOL[dtype] and errs[2] < GRAD_TOL[dtype]
    for path in (liger, torch_):  # neither path may drift from the definition
        assert rel(path[0], exact[0]) < LOSS_TOL[dtype]
        assert rel(path[1], exact[1]) < GRAD_TOL[dtype]
        assert rel(path[2], exact[2]) < GRAD_TOL[dtype]


def test_liger_under_autocast_reaches_fp32_master_weight():
    hidden, weight, targets = _flat_inputs(torch.float32)
    out = {}
    for impl in ("liger", "torch"):
        h, w = _leaf(hidden), _leaf(weight)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = linear_cross_entropy(h, w, targets, "mean", impl=impl)
        loss.backward()
        assert w.grad.dtype == torch.float32
        out[impl] = (loss.detach(), h.grad, w.grad)
    errs = [rel(a, b) for a, b in zip(out["liger"], out["torch"])]
    print(f"\n[ce autocast bf16] liger vs torch: loss {errs[0]:.2e} dh {errs[1]:.2e} "
          f"dW {errs[2]:.2e}")
    assert errs[0] < LOSS_TOL["bf16"] and max(errs[1:]) < GRAD_TOL["bf16"]


def _batched(dtype, pairs=2, length=67, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(2 * pairs, length, H, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(V, H, device="cuda", generator=g) / H**0.5).to(dtype)
    labels = torch.randint(0, V, (2 * pairs, length), device="cuda", generator=g)
    labels[:, :20] = IGNORE_INDEX  # shared prompt
    labels[0, 50:] = IGNORE_INDEX  # a shorter chosen response
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", DTYPES)
def test_liger_sequence_logps_matches_torch(dtype):
    hidden, weight, labels = _batched(DTYPES[dtype])
    up = torch.tensor([1.0, -2.0, 0.5, 3.0], device="cuda")  # per-sequence upstream gradient
    out = {}
    for impl in ("liger", "torch"):
        h, w = _leaf(hidden), _leaf(weight)
        lp = sequence_logps(h, w, labels, impl=impl)
        (lp * up).sum().backward()
        out[impl] = (lp.detach(), h.grad, w.grad)
    exact = sequence_logps_reference(hidden.double(), weight.double(), labels)
    errs = [rel(a, b) for a, b in zip(out["liger"], out["torch"])]
    print(f"\n[seq logps {dtype}] liger vs torch: logps {errs[0]:.2e} dh {errs[1]:.2e} "
          f"dW {errs[2]:.2e}; liger vs fp64 {rel(out['liger'][0], exact):.2e}")
    assert errs[0] < LOSS_TOL[dtype] and rel(out["liger"][0], exact) < LOSS_TOL[dtype]
    assert errs[1] < GRAD_TOL[dtype] and errs[2] < GRAD_TOL[dtype]


def _run_dpo(impl, hidden, weight, labels, ref_hidden=None, ref_weight=None, ref_logps=None):
    h, w = _leaf(hidden), _leaf(weight)
    loss, metrics = fused_linear_dpo(h, w, labels, ref_hidden, ref_weight, ref_logps,
                                     beta=0.1, impl=impl)
    loss.backward()
    return loss.detach(), metrics, h.grad, w.grad


def _compare_dpo(tag, dtype, liger, torch_):
    errs = {"loss": rel(liger[0], torch_[0]), "dh": rel(liger[2], torch_[2]),
            "dW": rel(liger[3], torch_[3])}
    metric_diff = {k: abs(liger[1][k].item() - torch_[1][k].item()) for k in torch_[1]}
    print(f"\n[{tag} {dtype}] liger vs torch: " + " ".join(f"{k} {v:.2e}" for k, v in errs.items())
          + "; |metric diff| " + " ".join(f"{k} {v:.1e}" for k, v in metric_diff.items())
          + f"; loss {liger[0].item():.6f} margin {liger[1]['margin'].item():+.5f}")
    assert errs["loss"] < LOSS_TOL[dtype]
    assert errs["dh"] < GRAD_TOL[dtype] and errs["dW"] < GRAD_TOL[dtype]
    # rewards are beta * (sums of ~45 token log-probs): absolute tolerance, scaled by dtype
    atol = 1e-5 if dtype == "fp32" else 5e-3
    assert all(metric_diff[k] < atol for k in ("rewards_chosen", "rewards_rejected", "margin"))
    assert metric_diff["accuracy"] == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_liger_fused_dpo_with_reference_model_matches_torch(dtype):
    hidden, weight, labels = _batched(DTYPES[dtype])
    g = torch.Generator(device="cuda").manual_seed(7)
    ref_hidden = (hidden.float() + 0.5 * torch.randn(hidden.shape, device="cuda", generator=g)
                  ).to(hidden.dtype)
    ref_weight = weight.clone()
    liger = _run_dpo("liger", hidden, weight, labels, ref_hidden, ref_weight)
    torch_ = _run_dpo("torch", hidden, weight, labels, ref_hidden, ref_weight)
    _compare_dpo("dpo ref-model", dtype, liger, torch_)


@pytest.mark.parametrize("dtype", DTYPES)
def test_liger_dpo_with_precomputed_reference_matches_torch(dtype):
    hidden, weight, labels = _batched(DTYPES[dtype])
    with torch.no_grad():
        ref = sequence_logps(hidden, weight, labels, impl="torch")
    ref = ref + torch.tensor([3.0, -2.0, -1.0, 4.0], device="cuda")  # a reference that differs
    ref_logps = (ref[:2], ref[2:])
    liger = _run_dpo("liger", hidden, weight, labels, ref_logps=ref_logps)
    torch_ = _run_dpo("torch", hidden, weight, labels, ref_logps=ref_logps)
    _compare_dpo("dpo ref-logps", dtype, liger, torch_)


def test_model_head_fn_liger_matches_torch():
    from bitnet_train.model import BitNetForCausalLM

    torch.manual_seed(0)
    model = BitNetForCausalLM(tiny_config()).cuda()
    ids = torch.randint(0, 512, (3, 40), device="cuda")
    labels = ids.clone()
    labels[:, :10] = IGNORE_INDEX
    grads = {}
    for impl in ("liger", "torch"):
        model.zero_grad(set_to_none=True)
        loss, n = model(ids, head_fn=causal_lm_head_fn(labels, "sum", impl=impl))
        loss.backward()
        grads[impl] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    assert int(n) == 3 * 30
    worst = max(rel(a, b) for a, b in zip(grads["liger"][1], grads["torch"][1]))
    print(f"\n[model head_fn fp32] loss {rel(grads['liger'][0], grads['torch'][0]):.2e} "
          f"worst param grad {worst:.2e}")
    assert rel(grads["liger"][0], grads["torch"][0]) < LOSS_TOL["fp32"]
    assert worst < GRAD_TOL["fp32"]
