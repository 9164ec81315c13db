"""The two-stage LR / WD shape, pinned with values computed by hand (math.cos), and the way
apply_schedule / param_groups drive a real AdamW."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from bitnet_train.errors import ConfigError
from bitnet_train.model import BitNetForCausalLM
from bitnet_train.model.bitlinear import BitLinear
from bitnet_train.train.schedules import (
    ScheduleConfig,
    apply_schedule,
    lr_at,
    param_groups,
    stage_at,
    stage_boundary_step,
    warmup_length,
    wd_at,
)
from tests.conftest import tiny_config

T = 100  # total steps; boundary at 50, warmup 10
CFG = ScheduleConfig(
    warmup_steps=10,
    stage_boundary=0.5,
    lr_peak=1e-3,
    lr_stage1_end=6e-4,
    lr_stage2_peak=2e-4,
    lr_floor=1e-5,
    wd_peak=0.1,
)
LRS = [lr_at(s, T, CFG) for s in range(T)]
WDS = [wd_at(s, T, CFG) for s in range(T)]


def test_values_by_hand_at_warmup_boundary_and_end():
    assert LRS[0] == pytest.approx(1e-4)  # lr_peak / warmup: the first step already learns
    assert LRS[4] == pytest.approx(5e-4)
    assert LRS[9] == pytest.approx(1e-3)  # last warmup step reaches the peak
    assert LRS[10] == pytest.approx(1e-3)  # cosine progress 0
    # stage-1 cosine over [10, 50): progress 39/40 at step 49
    assert LRS[49] == pytest.approx(6e-4 + 4e-4 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert LRS[30] == pytest.approx(8e-4)  # halfway: the mean of peak and end
    assert LRS[50] == pytest.approx(2e-4)  # the stage-2 peak, exactly at the boundary
    # stage-2 cosine over [50, 100): progress 49/50 at the last step
    assert LRS[99] == pytest.approx(1e-5 + 1.9e-4 * 0.5 * (1 + math.cos(math.pi * 49 / 50)))
    assert LRS[99] > 1e-5  # the last step does not run at the floor
    assert lr_at(T, T, CFG) == pytest.approx(1e-5)  # past the end: the floor


def test_abrupt_drop_at_the_boundary():
    assert stage_boundary_step(T, CFG) == 50
    assert [stage_at(s, T, CFG) for s in (0, 49, 50, 99)] == [1, 1, 2, 2]
    assert LRS[49] > 2.9 * LRS[50]


def test_continuity_and_monotone_decay_inside_each_stage():
    # warmup: equal increments of lr_peak / warmup, and no jump into the cosine
    assert all(b - a == pytest.approx(1e-4) for a, b in zip(LRS[:9], LRS[1:10], strict=True))
    assert LRS[10] == pytest.approx(LRS[9])
    # a half-cosine from A to B over n steps moves at most (A - B) * pi / (2 n) per step
    for lo, hi, span in ((10, 50, 4e-4), (50, 100, 1.9e-4)):
        seg = LRS[lo:hi]
        steps = [a - b for a, b in zip(seg, seg[1:], strict=False)]
        assert all(0 < d <= span * math.pi / (2 * (hi - lo)) + 1e-12 for d in steps)


def test_weight_decay_zero_throughout_stage_two_and_positive_in_stage_one():
    assert all(w == 0.0 for w in WDS[50:])
    assert all(w > 0.0 for w in WDS[:50])
    assert max(WDS) == pytest.approx(0.1)
    assert WDS[9] == pytest.approx(0.1)  # peaks where the LR peaks
    assert WDS[0] == pytest.approx(0.01)
    assert WDS[49] == pytest.approx(0.1 * (0.6 + 0.4 * 0.5 * (1 + math.cos(math.pi * 39 / 40))))
    assert all(a >= b for a, b in zip(WDS[9:50], WDS[10:50], strict=False))


def test_boundary_step_rounds_to_nearest_and_single_stage_has_no_stage_two():
    assert stage_boundary_step(101, CFG) == 51  # 50.5 rounds up
    single = ScheduleConfig(
        warmup_steps=0,
        stage_boundary=1.0,
        lr_peak=2e-7,
        lr_stage1_end=0.0,
        lr_stage2_peak=1.0,
        wd_peak=0.0,
    )  # stage-2 fields unused
    assert stage_boundary_step(10, single) == 10
    assert [stage_at(s, 10, single) for s in range(10)] == [1] * 10
    assert lr_at(0, 10, single) == pytest.approx(2e-7)
    assert lr_at(9, 10, single) == pytest.approx(2e-7 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert wd_at(5, 10, single) == 0.0


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"stage_boundary": 0.0}, "stage_boundary"),
        ({"stage_boundary": 1.5}, "stage_boundary"),
        ({"lr_stage2_peak": 1.1e-3}, "lr_stage2_peak"),  # > lr_stage1_end: a jump up, not a drop
        ({"lr_stage1_end": 2e-3}, "lr_stage1_end"),
        ({"lr_floor": 1e-3}, "lr_floor"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ],
)
def test_invalid_configs_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        ScheduleConfig(**kwargs)


def test_warmup_longer_than_stage_one_is_refused():
    with pytest.raises(ConfigError, match="warmup_steps"):
        lr_at(0, 600, ScheduleConfig())  # default warmup 375 > 300 steps of stage 1


def test_warmup_ratio_scales_with_the_run_length():
    """warmup_ratio, when warmup_steps is 0: 20 steps of 300, none of 5 (the demo's smoke run);
    warmup_steps > 0 takes precedence, as in transformers."""
    cfg = ScheduleConfig(warmup_steps=0, warmup_ratio=0.0667, stage_boundary=0.7)
    assert warmup_length(300, cfg) == 20 and warmup_length(5, cfg) == 0
    assert warmup_length(300, ScheduleConfig(warmup_steps=3, warmup_ratio=0.0667)) == 3
    # linear warmup over exactly those 20 steps, at the peak on step 19
    assert lr_at(0, 300, cfg) == pytest.approx(cfg.lr_peak / 20)
    assert lr_at(19, 300, cfg) == pytest.approx(cfg.lr_peak)
    assert lr_at(0, 5, cfg) == pytest.approx(cfg.lr_peak)  # no warmup in a 5-step run
    with pytest.raises(ConfigError, match=r"warmup_ratio=0.9 \(9 warmup steps\)"):
        lr_at(0, 10, ScheduleConfig(warmup_steps=0, warmup_ratio=0.9))


def test_omegaconf_structured_config_validates():
    merged = OmegaConf.merge(OmegaConf.structured(ScheduleConfig), {"lr_floor": 0})
    assert OmegaConf.to_object(merged).lr_floor == 0.0
    bad = OmegaConf.merge(OmegaConf.structured(ScheduleConfig), {"lr_stage2_peak": 5e-3})
    with pytest.raises(ConfigError, match="lr_stage2_peak"):
        OmegaConf.to_object(bad)


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("tied", [True, False])
def test_param_groups_decay_only_projection_matrices(tied):
    model = BitNetForCausalLM(tiny_config(tie_word_embeddings=tied))
    groups = {g["name"]: g for g in param_groups(model)}
    decay, no_decay = _names(model, groups["decay"]), _names(model, groups["no_decay"])
    bitlinear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, BitLinear)}
    assert len(bitlinear) == 2 * 7
    assert decay == bitlinear | (set() if tied else {"lm_head.weight"})
    assert "model.embed_tokens.weight" in no_decay
    assert "model.norm.weight" in no_decay and "model.layers.0.mlp.ffn_sub_norm.weight" in no_decay
    assert decay.isdisjoint(no_decay)
    assert decay | no_decay == {n for n, _ in model.named_parameters()}
    assert groups["decay"]["apply_weight_decay"] and not groups["no_decay"]["apply_weight_decay"]

    with_emb = {g["name"]: g for g in param_groups(model, decay_embeddings=True)}
    assert "model.embed_tokens.weight" in _names(model, with_emb["decay"])


def test_apply_schedule_drives_adamw_decay_only_on_decay_groups():
    torch.manual_seed(0)
    model = BitNetForCausalLM(tiny_config())
    opt = torch.optim.AdamW(param_groups(model), lr=1.0)
    out = apply_schedule(opt, 20, T, CFG)
    lr20 = 6e-4 + 4e-4 * 0.5 * (1 + math.cos(math.pi * 10 / 40))  # progress 10/40
    assert out["lr"] == pytest.approx(lr20)
    assert out["weight_decay"] == pytest.approx(0.1 * lr20 / 1e-3)
    for g in opt.param_groups:
        assert g["lr"] == out["lr"]
        assert g["weight_decay"] == (out["weight_decay"] if g["apply_weight_decay"] else 0.0)

    # With zero gradients AdamW's only move is the decoupled decay p *= 1 - lr * wd.
    proj = model.model.layers[0].self_attn.q_proj.weight
    emb, norm = model.model.embed_tokens.weight, model.model.norm.weight
    before = {k: t.detach().clone() for k, t in (("proj", proj), ("emb", emb), ("norm", norm))}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(proj, before["proj"] * (1 - out["lr"] * out["weight_decay"]))
    torch.testing.assert_close(emb, before["emb"], rtol=0, atol=0)
    torch.testing.assert_close(norm, before["norm"], rtol=0, atol=0)

    out2 = apply_schedule(opt, 60, T, CFG)  # stage 2
    assert out2["weight_decay"] == 0.0
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)
