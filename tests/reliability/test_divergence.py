"""Divergence caught before the update: the right "last good" checkpoint, the log's step numbers,
spike detection, trainer.on_divergence=skip, and a guard whose state resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from bitnet_train.errors import TrainingError
from bitnet_train.model import BitNetForCausalLM
from bitnet_train.train.checkpoint import Checkpointer
from bitnet_train.train.divergence import DivergenceGuard
from bitnet_train.train.objectives.base import MicroStep
from bitnet_train.train.objectives.language_model import LanguageModelObjective
from bitnet_train.train.schedules import ScheduleConfig
from bitnet_train.train.trainer import Trainer
from tests.conftest import tiny_config
from tests.train.test_trainer import ListPlan

NAN, LOSS_SPIKE, GRAD_SPIKE = 1, 2, 3


class Faulty:
    """The language-model objective; a batch carrying `fault` misbehaves: NAN gives a NaN loss,
    LOSS_SPIKE multiplies the loss (and its gradient) by `factor`, GRAD_SPIKE only the gradient
    (as a loss-scaling bug would)."""

    reduction = "mean"

    def __init__(self, factor: float = 1.0) -> None:
        self.inner, self.factor = LanguageModelObjective("mean", "torch"), factor

    def setup(self, model, accelerator):
        return None

    def count(self, batch):
        return self.inner.count(batch)

    def micro_step(self, model, batch):
        batch = dict(batch)
        fault = int(batch.pop("fault", torch.tensor(0)))
        out = self.inner.micro_step(model, batch)
        loss, metric = out.loss_sum, out.metric_sums["loss"]
        if fault == NAN:
            loss, metric = loss * float("nan"), metric * float("nan")
        elif fault == LOSS_SPIKE:
            loss, metric = loss * self.factor, metric * self.factor
        elif fault == GRAD_SPIKE:
            loss = loss * self.factor
        return MicroStep(loss_sum=loss, metric_sums={"loss": metric})


def plan(steps: int, faults: dict[int, int]) -> ListPlan:
    """A fixed (2, 16) batch per step (0-based step -> fault code)."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for s in range(steps):
        ids = torch.randint(3, 512, (2, 16), generator=g)
        b = {"input_ids": ids, "labels": ids}
        if s in faults:
            b["fault"] = torch.tensor(faults[s])
        batches.append([b])
    return ListPlan(batches)


def make_trainer(tmp_path, steps, faults, *, optimizer="adamw", lr=1e-3, factor=1.0,
                 guard=None, checkpoint_every=1, keep_last=20, grad_clip=1.0):
    torch.manual_seed(0)
    model = BitNetForCausalLM(tiny_config())
    model.init_weights(0)
    acc = Accelerator(cpu=True)
    opt = (torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=lr))
    model, opt = acc.prepare(model, opt)
    return Trainer(
        accelerator=acc, model=model, objective=Faulty(factor), optimizer=opt,
        schedule=ScheduleConfig(warmup_steps=0, stage_boundary=1.0, lr_peak=lr,
                                lr_stage1_end=lr, wd_peak=0.0),
        data=plan(steps, faults), checkpointer=Checkpointer(tmp_path / "ck", keep_last),
        total_steps=steps, grad_accum=1, grad_clip=grad_clip, checkpoint_every=checkpoint_every,
        progress_bar=False, divergence=guard or DivergenceGuard(),
    )


def weights(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_abs(ckpt) -> float:
    return max(float(t.abs().max()) for t in load_file(ckpt / "model.safetensors").values())


def test_nan_after_a_huge_update_names_the_checkpoint_before_it(tmp_path):
    """The issue's case: the update of step 5 explodes the weights (finite, undetected: spike
    detection off), step 6 computes NaN with them. step_00000005 holds the exploded weights;
    the newest checkpoint written before the divergence is step_00000004."""
    trainer = make_trainer(tmp_path, 10, {4: GRAD_SPIKE}, optimizer="sgd", lr=0.1,
                           factor=1e10, grad_clip=0.0, guard=DivergenceGuard(sigma=0.0))
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    msg = str(err.value)
    ck = tmp_path / "ck"
    assert msg.startswith("training diverged at step 6: non-finite loss"), msg
    assert f"before the divergence began: {ck / 'step_00000004'} (checkpoints from " \
           "step_00000005 on hold the weights whose loss diverged)" in msg
    assert "leaving out the data of step 6;" in msg
    # the named checkpoint is sane, the next one is the exploded one
    assert max_abs(ck / "step_00000004") < 10 and max_abs(ck / "step_00000005") > 1e6
    # and the step in the message is the log's: the log line of the last good step says 5
    assert [h.step + 1 for h in trainer.history] == [1, 2, 3, 4, 5]


def test_a_loss_spike_stops_before_its_update(tmp_path):
    guard = DivergenceGuard(sigma=6.0, window=8)
    trainer = make_trainer(tmp_path, 12, {9: LOSS_SPIKE}, factor=50.0, guard=guard)
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    msg = str(err.value)
    assert msg.startswith("training diverged at step 10: loss "), msg
    assert "standard deviations above the mean" in msg and "of the last 8 accepted steps" in msg
    # the loss was computed with step_9's weights: the one to trust is step_8
    assert f"before the divergence began: {tmp_path / 'ck' / 'step_00000008'}" in msg
    saved = load_file(tmp_path / "ck" / "step_00000009" / "model.safetensors")
    now = weights(trainer)
    assert all(torch.equal(v, now[k]) for k, v in saved.items())  # update not applied


def test_a_gradient_spike_with_a_normal_loss_trusts_the_current_weights(tmp_path):
    trainer = make_trainer(tmp_path, 12, {9: GRAD_SPIKE}, factor=1e4,
                           guard=DivergenceGuard(sigma=6.0, window=8))
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    msg = str(err.value)
    assert msg.startswith("training diverged at step 10: gradient norm "), msg
    assert f"before the divergence began: {tmp_path / 'ck' / 'step_00000009'}." in msg


def test_skip_mode_skips_the_update_and_counts_it(tmp_path):
    trainer = make_trainer(tmp_path, 6, {3: NAN}, guard=DivergenceGuard("skip"))
    snapshots = [weights(trainer)]
    metrics = []
    for _ in range(6):
        metrics.append(trainer.train_step().metrics)
        trainer.step += 1
        snapshots.append(weights(trainer))
    changed = [any(not torch.equal(a[k], b[k]) for k in a)
               for a, b in zip(snapshots, snapshots[1:])]
    assert changed == [True, True, True, False, True, True]  # step 4 (0-based 3) skipped
    assert [m["skipped_steps"] for m in metrics] == [0, 0, 0, 1, 1, 1]
    assert math.isnan(metrics[3]["loss"]) and trainer.divergence.consecutive == 0


def test_too_many_skips_in_a_row_stop_naming_where_it_began(tmp_path):
    guard = DivergenceGuard("skip", max_skips=2)
    trainer = make_trainer(tmp_path, 8, {3: NAN, 4: NAN, 5: NAN}, guard=guard)
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    msg = str(err.value)
    assert msg.startswith("training diverged at step 6: non-finite loss (nan); it began at step "
                          "4 and the 2 updates since were skipped (trainer.divergence_max_skips="
                          "2)"), msg
    # no update since step 3: step_3 holds the weights the NaN came from; step_2 is named, and
    # the checkpoints written while skipping pruned nothing
    assert f"before the divergence began: {tmp_path / 'ck' / 'step_00000002'}" in msg
    assert "steps 4-6" in msg


def test_guard_state_is_checkpointed_so_resume_is_exact(tmp_path):
    """A spike at step 8 is only recognisable with the history of the steps before it: a resume
    at step 5 that forgot the history would apply it."""
    faults = {7: LOSS_SPIKE}

    def guard():
        return DivergenceGuard("skip", sigma=6.0, window=8)

    straight = make_trainer(tmp_path / "a", 10, faults, factor=20.0, guard=guard(),
                            checkpoint_every=5)
    straight.fit()
    assert straight.history[7].metrics["skipped_steps"] == 1
    resumed = make_trainer(tmp_path / "b", 10, faults, factor=20.0, guard=guard(),
                           checkpoint_every=5)
    resumed.load_checkpoint(tmp_path / "a" / "ck" / "step_00000005")
    resumed.fit()
    assert [h.metrics for h in resumed.history] == [h.metrics for h in straight.history[5:]]
    wa, wb = weights(straight), weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_guard_statistics_use_accepted_steps_only():
    g = DivergenceGuard("skip", sigma=3.0, window=4)
    for x in (1.0, 1.1, 0.9, 1.0):
        assert g.observe(0, x, 1.0) == "ok"
    assert g.observe(4, 5.0, 1.0) == "skip"  # 5 is far above mean 1.0, std 0.08
    assert list(g.losses) == [1.0, 1.1, 0.9, 1.0]  # the spike did not enter the history
    assert g.last.metric == "loss" and g.last.mean == pytest.approx(1.0)
    assert g.observe(5, 1.05, 1.0) == "ok" and g.consecutive == 0 and g.skipped == 1
    assert g.observe(6, 0.1, 1.0) == "ok"  # a loss far BELOW the mean is not a divergence
    g.reset_history()
    assert g.observe(7, 50.0, 1.0) == "ok"  # no statistics yet: only non-finite values count
    assert g.observe(8, 1.0, float("inf")) == "skip" and g.last.metric == "grad_norm"


def test_trusted_checkpoint_step():
    g = DivergenceGuard()
    assert g.observe(7, float("nan"), 1.0) == "stop"
    assert g.trusted_up_to(7) == 6  # step_7's weights gave the NaN
    g = DivergenceGuard()
    assert g.observe(7, 1.0, float("nan")) == "stop"
    assert g.trusted_up_to(7) == 7  # the loss with step_7's weights was fine
