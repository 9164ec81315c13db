"""CPU tests of the LM-head losses: the chunked PyTorch path against full-logit definitions
written out here, DPO against hand computations, and Liger's fused DPO (pure PyTorch, so it runs
on the CPU) against ours."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bitnet_train.train.losses import (
    IGNORE_INDEX,
    _liger_dpo_with_reference,
    causal_lm_head_fn,
    dpo_loss_from_logps,
    fused_linear_dpo,
    linear_cross_entropy,
    resolve_impl,
    sequence_logps,
    token_logps_torch,
)
from tests.conftest import tiny_config


def _inputs(n=29, h=16, v=53, ignore_every=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=dtype) / h**0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::ignore_every] = IGNORE_INDEX
    return hidden, weight, targets


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


# ------------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_linear_cross_entropy_matches_full_logits(reduction):
    hidden, weight, targets = _inputs()
    ours = linear_cross_entropy(hidden, weight, targets, reduction, impl="torch", chunk_size=5)
    naive = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100, reduction=reduction)
    torch.testing.assert_close(ours, naive, rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(ours, hidden, weight), _grads(naive, hidden, weight)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sum_is_mean_times_labelled_tokens():
    hidden, weight, targets = _inputs()
    n = int((targets != IGNORE_INDEX).sum())
    assert n == 29 - 8  # every 4th of 29 ignored
    s = linear_cross_entropy(hidden, weight, targets, "sum", impl="torch")
    m = linear_cross_entropy(hidden, weight, targets, "mean", impl="torch")
    torch.testing.assert_close(s, m * n)


@pytest.mark.parametrize("chunk", [1, 3, 7, 29, 1000])
def test_chunked_equals_unchunked(chunk):
    hidden, weight, targets = _inputs()
    whole = token_logps_torch(hidden, weight, targets, chunk_size=29)
    part = token_logps_torch(hidden, weight, targets, chunk_size=chunk)
    torch.testing.assert_close(part, whole, rtol=0, atol=1e-6)
    up = torch.randn(29)  # a non-uniform upstream gradient exercises the per-token backward
    for a, b in zip(_grads((whole * up).sum(), hidden, weight),
                    _grads((part * up).sum(), hidden, weight)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_token_logps_gradcheck_float64():
    hidden, weight, targets = _inputs(n=6, h=3, v=7, ignore_every=3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w: token_logps_torch(h, w, targets, chunk_size=4), (hidden, weight))


def test_all_ignored_gives_zero_loss_and_gradient():
    hidden, weight, _ = _inputs(n=5)
    targets = torch.full((5,), IGNORE_INDEX)
    for reduction in ("sum", "mean"):
        loss = linear_cross_entropy(hidden, weight, targets, reduction, impl="torch")
        assert loss.item() == 0.0
        gh, gw = _grads(loss, hidden, weight)
        assert not gh.any() and not gw.any()


def test_uniform_logits_give_log_vocab():
    # zero weight -> uniform softmax over V -> every token costs exactly log V
    v = 50
    hidden = torch.randn(4, 8)
    weight = torch.zeros(v, 8)
    targets = torch.tensor([0, 7, IGNORE_INDEX, 49])
    loss = linear_cross_entropy(hidden, weight, targets, "sum", impl="torch")
    assert loss.item() == pytest.approx(3 * math.log(v), rel=1e-6)


def test_mixed_dtypes_promote_and_autocast_casts():
    hidden, weight, targets = _inputs()
    ref = linear_cross_entropy(hidden, weight, targets, "mean", impl="torch")
    # bf16 hidden with an fp32 weight and no autocast: computed in fp32 (promotion)
    mixed = linear_cross_entropy(hidden.detach().bfloat16(), weight, targets, "mean",
                                 impl="torch")
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, ref, rtol=2e-2, atol=0)
    # under bf16 autocast the matmuls run in bf16 but the gradient reaches the fp32 weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = linear_cross_entropy(hidden, weight, targets, "mean", impl="torch")
    (gw,) = _grads(amp, weight)
    assert amp.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(amp, ref, rtol=2e-2, atol=0)
    torch.testing.assert_close(gw, _grads(ref, weight)[0], rtol=0, atol=2e-2)


def test_impl_selection():
    cpu = torch.device("cpu")
    assert resolve_impl("auto", cpu) == "torch"
    assert resolve_impl("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_impl("liger", cpu)
    with pytest.raises(ValueError, match="choose one of"):
        resolve_impl("triton", cpu)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(*_inputs(), reduction="none")


# ----------------------------------------------------------------------- causal head (shift)


def _shifted_loop_logps(hidden, weight, labels):
    """(B, L) log p(labels[b, t+1] | hidden[b, t]) by explicit loops, 0 where unlabelled."""
    b, length, _ = hidden.shape
    out = torch.zeros(b, length)
    for i in range(b):
        for t in range(length - 1):
            y = int(labels[i, t + 1])
            if y != IGNORE_INDEX:
                out[i, t] = torch.log_softmax(hidden[i, t] @ weight.T, -1)[y]
    return out


def _batched(b=4, length=7, h=12, v=31, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, length, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g).requires_grad_()
    labels = torch.randint(0, v, (b, length), generator=g)
    labels[:, :3] = IGNORE_INDEX  # a prompt of 3 tokens
    labels[1, 5:] = IGNORE_INDEX  # padding
    return hidden, weight, labels


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_causal_head_fn_shifts_labels(reduction):
    hidden, weight, labels = _batched()
    loss, n = causal_lm_head_fn(labels, reduction, impl="torch", chunk_size=4)(hidden, weight)
    # labelled targets after the shift: columns 3..6 predicted from 2..5; row 1 stops at 4
    assert int(n) == 3 * 4 + 2
    expected = -_shifted_loop_logps(hidden, weight, labels).sum()
    if reduction == "mean":
        expected = expected / 14
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_causal_head_fn_matches_model_builtin_loss():
    from bitnet_train.model import BitNetForCausalLM

    torch.manual_seed(0)
    model = BitNetForCausalLM(tiny_config())
    ids = torch.randint(0, 512, (2, 10))
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    builtin = model(ids, labels=labels).loss
    loss, n = model(ids, head_fn=causal_lm_head_fn(labels, "mean", impl="torch"))
    torch.testing.assert_close(loss, builtin, rtol=1e-5, atol=1e-6)
    loss_sum, _ = model(ids, head_fn=causal_lm_head_fn(labels, "sum", impl="torch"))
    torch.testing.assert_close(loss_sum, builtin * int(n), rtol=1e-5, atol=1e-5)


def test_sequence_logps_sums_response_tokens():
    hidden, weight, labels = _batched()
    ours = sequence_logps(hidden, weight, labels, impl="torch", chunk_size=3)
    expected = _shifted_loop_logps(hidden, weight, labels).sum(-1)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    up = torch.tensor([1.0, -2.0, 0.5, 3.0])
    for a, b in zip(_grads((ours * up).sum(), hidden, weight),
                    _grads((expected * up).sum(), hidden, weight)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------- DPO


def test_dpo_loss_by_hand():
    beta = 0.1
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.5])
    rc, rr = torch.tensor([-1.5, -1.8]), torch.tensor([-2.5, -1.6])
    # pair 0: chosen log-ratio +0.5, rejected -0.5 -> z = 0.1 * 1.0 = 0.1
    # pair 1: chosen log-ratio -0.2, rejected +0.1 -> z = 0.1 * -0.3 = -0.03
    losses = [math.log(1 + math.exp(-0.1)), math.log(1 + math.exp(0.03))]
    loss, m = dpo_loss_from_logps(pc, pr, rc, rr, beta)
    assert loss.item() == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert m["rewards_chosen"].item() == pytest.approx((0.05 - 0.02) / 2, abs=1e-7)
    assert m["rewards_rejected"].item() == pytest.approx((-0.05 + 0.01) / 2, abs=1e-7)
    assert m["margin"].item() == pytest.approx((0.1 - 0.03) / 2, abs=1e-7)
    assert m["accuracy"].item() == 0.5  # pair 0 right, pair 1 wrong


def test_dpo_gradient_by_hand_and_reference_gets_none():
    beta = 0.1
    pc = torch.tensor([-4.0, -2.0], requires_grad=True)
    pr = torch.tensor([-4.0, -3.0], requires_grad=True)
    rc = torch.tensor([-4.0, -2.5], requires_grad=True)
    rr = torch.tensor([-4.0, -2.5], requires_grad=True)
    loss, _ = dpo_loss_from_logps(pc, pr, rc, rr, beta)
    loss.backward()
    # dL/dpc_i = -beta * sigmoid(-z_i) / P, dL/dpr_i = +beta * sigmoid(-z_i) / P
    z = [0.0, beta * (0.5 - (-0.5))]
    s = [1 / (1 + math.exp(zi)) for zi in z]
    torch.testing.assert_close(pc.grad, torch.tensor([-beta * si / 2 for si in s]))
    torch.testing.assert_close(pr.grad, torch.tensor([beta * si / 2 for si in s]))
    assert rc.grad is None and rr.grad is None


def _pairs(pairs=3, length=8, h=12, v=29, seed=2):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * pairs, length, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).requires_grad_()
    labels = torch.randint(0, v, (2 * pairs, length), generator=g)
    labels[:, :3] = IGNORE_INDEX  # shared prompt
    labels[0, 6:] = IGNORE_INDEX  # a shorter chosen response
    return hidden, weight, labels


def test_dpo_at_identical_policy_and_reference_is_log2():
    hidden, weight, labels = _pairs()
    for kw in (dict(ref_hidden=hidden.detach(), ref_weight=weight.detach()),
               dict(ref_logps=tuple(sequence_logps(hidden, weight, labels,
                                                   impl="torch").detach().chunk(2)))):
        loss, m = fused_linear_dpo(hidden, weight, labels, beta=0.1, impl="torch", **kw)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
        for k in ("rewards_chosen", "rewards_rejected", "margin"):
            assert abs(m[k].item()) < 1e-6, k
        assert m["accuracy"].item() == 0.0  # ties are not counted as right


def test_fused_linear_dpo_matches_full_logit_definition():
    hidden, weight, labels = _pairs()
    ref_hidden = hidden.detach() + 0.3 * torch.randn_like(hidden)
    ref_weight = weight.detach() + 0.1 * torch.randn_like(weight)
    loss, m = fused_linear_dpo(hidden, weight, labels, ref_hidden, ref_weight, beta=0.5,
                               impl="torch", chunk_size=5)
    pol = _shifted_loop_logps(hidden, weight, labels).sum(-1)
    ref = _shifted_loop_logps(ref_hidden, ref_weight, labels).sum(-1)
    z = 0.5 * ((pol[:3] - ref[:3]) - (pol[3:] - ref[3:]))
    expected = torch.log1p(torch.exp(-z)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["margin"], z.mean().detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(loss, hidden, weight), _grads(expected, hidden, weight)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_dpo_gradient_step_raises_margin():
    hidden, weight, labels = _pairs()
    ref = tuple(sequence_logps(hidden, weight, labels, impl="torch").detach().chunk(2))
    loss, m0 = fused_linear_dpo(hidden, weight, labels, ref_logps=ref, impl="torch")
    (gw,) = _grads(loss, weight)
    stepped = (weight - 1.0 * gw).detach()
    loss1, m1 = fused_linear_dpo(hidden, stepped, labels, ref_logps=ref, impl="torch")
    assert loss1 < loss and m1["margin"] > m0["margin"] > -1e-6
    assert m1["accuracy"].item() == 1.0


def test_dpo_argument_checks():
    hidden, weight, labels = _pairs()
    with pytest.raises(ValueError, match="either"):
        fused_linear_dpo(hidden, weight, labels, impl="torch")
    with pytest.raises(ValueError, match="either"):
        fused_linear_dpo(hidden, weight, labels, ref_hidden=hidden, impl="torch")
    with pytest.raises(ValueError, match="2B rows"):
        fused_linear_dpo(hidden[:5], weight, labels[:5], ref_logps=(torch.zeros(2),) * 2)


def test_liger_fused_dpo_matches_torch_path_on_cpu():
    """Liger's chunked DPO is PyTorch + torch.func: hold its conventions (no internal shift,
    summed log-probs, mean over pairs) to ours on the CPU, where CI runs."""
    pytest.importorskip("liger_kernel")
    hidden, weight, labels = _pairs()
    ref_hidden = hidden.detach() + 0.3 * torch.randn_like(hidden)
    ref_weight = weight.detach() + 0.1 * torch.randn_like(weight)
    liger, lm = _liger_dpo_with_reference(hidden, weight, labels, ref_hidden, ref_weight,
                                          beta=0.5, chunk_size=1, compiled=False)
    ours, om = fused_linear_dpo(hidden, weight, labels, ref_hidden, ref_weight, beta=0.5,
                                impl="torch")
    torch.testing.assert_close(liger, ours, rtol=1e-5, atol=1e-6)
    for k in om:
        torch.testing.assert_close(lm[k], om[k], rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(liger, hidden, weight), _grads(ours, hidden, weight)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
