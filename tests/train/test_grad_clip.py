"""Gradient clipping of a summed loss: per step (the norm grows with the tokens, so a fixed
threshold clips every step) or per item (the threshold grows with them)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from bitnet_train.errors import ConfigError
from bitnet_train.model import BitNetForCausalLM
from bitnet_train.train.checkpoint import Checkpointer
from bitnet_train.train.config import OptimConfig, compose, to_train_config
from bitnet_train.train.objectives.language_model import LanguageModelObjective
from bitnet_train.train.schedules import ScheduleConfig
from bitnet_train.train.trainer import Trainer
from tests.conftest import tiny_config
from tests.train.test_trainer import ListPlan, fixed_batch


def sgd_update(tmp_path, reduction: str, clip: float, per: str):
    """(weight change, step metrics, weights before) of one SGD(lr=1) step on fixed_batch's 2
    micro-batches."""
    torch.manual_seed(0)
    model = BitNetForCausalLM(tiny_config())
    model.init_weights(0)
    # named_parameters, not state_dict: a tied lm_head would count the embeddings twice
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    acc = Accelerator(cpu=True)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt = acc.prepare(model, opt)
    ids, labels = fixed_batch()
    micro = [{"input_ids": ids[:4], "labels": labels[:4]},
             {"input_ids": ids[4:], "labels": labels[4:]}]
    trainer = Trainer(
        accelerator=acc, model=model, objective=LanguageModelObjective(reduction, "torch"),
        optimizer=opt, schedule=ScheduleConfig(warmup_steps=0, stage_boundary=1.0, lr_peak=1.0,
                                               lr_stage1_end=1.0, wd_peak=0.0),
        data=ListPlan([micro]), checkpointer=Checkpointer(tmp_path / "ck", 1), total_steps=1,
        grad_accum=2, grad_clip=clip, grad_clip_per=per, progress_bar=False)
    metrics = trainer.train_step().metrics
    after = dict(acc.unwrap_model(model).named_parameters())
    return {k: after[k].detach() - before[k] for k in before}, metrics, before


@pytest.mark.parametrize("clip", [0.05, 1e6])  # binds (the mean's norm is ~10 at init), not
def test_per_item_clipping_of_a_summed_loss_is_the_clipped_mean_times_n(tmp_path, clip):
    d_sum, m_sum, w = sgd_update(tmp_path / "sum", "sum", clip, "item")
    d_mean, m_mean, _ = sgd_update(tmp_path / "mean", "mean", clip, "step")
    n = m_sum["items"]
    assert n == m_mean["items"] > 100
    for k in d_sum:
        # the mean's update is n times smaller: the fp32 rounding of w + update, a few ulps of
        # |w|, is n times larger relative to it
        ulps = 16 * torch.finfo(torch.float32).eps * float(w[k].abs().max())
        torch.testing.assert_close(d_sum[k], n * d_mean[k], rtol=1e-3, atol=n * ulps)
    assert m_sum["clipped"] == m_mean["clipped"] == float(clip < 1)
    assert m_sum["grad_norm"] == pytest.approx(n * m_mean["grad_norm"], rel=1e-5)


def test_per_step_clipping_of_a_summed_loss_clips_to_the_threshold(tmp_path):
    d, m, _ = sgd_update(tmp_path, "sum", 1.0, "step")
    assert m["clipped"] == 1.0 and m["grad_norm"] > 100  # the sum's norm grows with N
    norm = torch.sqrt(sum((v.float() ** 2).sum() for v in d.values()))
    assert float(norm) == pytest.approx(1.0, rel=1e-4)  # the update is the unit-norm gradient


def test_grad_clip_per_is_validated_and_set_by_the_sft_recipe():
    with pytest.raises(ConfigError, match="grad_clip_per"):
        OptimConfig(grad_clip_per="token")
    cfg = to_train_config(compose(["+recipe=sft_2b4t"]))
    assert cfg.objective.reduction == "sum" and cfg.optim.grad_clip_per == "item"
