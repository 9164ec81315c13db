"""The accelerate trainer: memorisation, exact resume, summed-loss accumulation, errors."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from bitnet_train.errors import CheckpointError, TrainingError
from bitnet_train.io import load_model
from bitnet_train.model import BitNetForCausalLM
from bitnet_train.train.checkpoint import Checkpointer
from bitnet_train.train.objectives.base import MicroStep
from bitnet_train.train.objectives.language_model import LanguageModelObjective
from bitnet_train.train.run import run
from bitnet_train.train.schedules import ScheduleConfig, lr_at
from bitnet_train.train.trainer import BatchPlan, Trainer
from tests.conftest import free_port, tiny_config
from tests.train.helpers import make_tokenizer, pretrain_config, write_corpus


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    make_tokenizer(root)
    return root, write_corpus(root / "corpus")


def test_short_run_memorises_repeated_corpus(workdir, tmp_path, caplog):
    """Loss on a repeated tiny corpus falls far: gradients flow through both STEs."""
    root, corpus = workdir
    shutil.copytree(root / "tokenizer", tmp_path / "tokenizer")
    cfg = pretrain_config(tmp_path, corpus, "trainer.max_steps=60", "schedule.lr_peak=5e-3",
                          "schedule.lr_stage1_end=4e-3", "schedule.lr_stage2_peak=2e-3",
                          "schedule.lr_floor=1e-4")
    with caplog.at_level(logging.INFO, logger="bitnet_train.train.trainer"):
        result = run(cfg)
    losses = [h.metrics["loss"] for h in result.history]
    assert len(losses) == 60
    assert losses[-1] < 0.35 * losses[0], losses[::10]
    last = result.history[-1].metrics
    assert last["lr"] == pytest.approx(lr_at(59, 60, cfg.schedule))
    assert last["weight_decay"] == 0.0  # stage 2
    assert last["grad_norm"] > 0 and last["tokens"] == 4 * 32  # micro-batch 4 x seq 32
    # log_every=1000: one line, at the last step, with throughput and memory
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert line.startswith("step 60/60 ")
    logged = dict(kv.split("=") for kv in line.split()[2:])
    assert float(logged["tokens_per_s"]) > 0 and float(logged["peak_rss_gb"]) > 0
    assert float(logged["loss"]) == pytest.approx(losses[-1], rel=1e-3)
    # DIR/final loads through load_model with the same forward
    model, tok = load_model(result.final_dir)
    assert tok is not None and model.config.hidden_size == 64
    live = result.trainer.accelerator.unwrap_model(result.trainer.model).eval()
    ids = torch.randint(0, 300, (1, 16))
    assert torch.equal(model(ids).logits, live(ids).logits)


def test_run_on_fused_kernels_matches_reference_run(workdir, tmp_path):
    """trainer.kernels=triton (here through Triton's CPU interpreter) trains the same model as
    the reference: the layers are fused, and the losses track the reference run's within
    bf16 noise (the fused products return bf16; the CPU reference runs in fp32)."""
    root, corpus = workdir
    losses = {}
    for mode in ("reference", "triton"):
        shutil.copytree(root / "tokenizer", tmp_path / mode / "tokenizer")
        result = run(pretrain_config(tmp_path / mode, corpus, "trainer.max_steps=3",
                                     f"trainer.kernels={mode}", "schedule.lr_peak=5e-3",
                                     "trainer.micro_batch_size=2"))
        layers = result.trainer.accelerator.unwrap_model(result.trainer.model).model.layers
        assert (type(layers[0]).__name__ == "FusedBitNetDecoderLayer") == (mode == "triton")
        losses[mode] = [h.metrics["loss"] for h in result.history]
    for a, b in zip(losses["triton"], losses["reference"]):
        assert a == pytest.approx(b, rel=2e-2)
    assert losses["triton"][-1] < losses["triton"][0]


def test_resume_is_exact(workdir, tmp_path):
    """2N steps straight == N steps, checkpoint, resume, N steps: every loss and final weights."""
    root, corpus = workdir
    n = 6
    common = ["trainer.max_steps=12", f"trainer.checkpoint_every={n}", "trainer.keep_last=5",
              "data.shuffle_buffer=16"]
    for d in ("a", "b"):
        shutil.copytree(root / "tokenizer", tmp_path / d / "tokenizer")
    straight = run(pretrain_config(tmp_path / "a", corpus, *common))
    # "crash" after step N: a second run directory holding only the step-N checkpoint
    ckpt_a = tmp_path / "a" / "run" / "checkpoints" / f"step_{n:08d}"
    assert (ckpt_a / "COMPLETE").exists()
    (tmp_path / "b" / "run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt_a, tmp_path / "b" / "run" / "checkpoints" / ckpt_a.name)
    resumed = run(pretrain_config(tmp_path / "b", corpus, *common, "trainer.resume=auto"))
    assert [h.step for h in resumed.history] == list(range(n, 2 * n))
    a = [h.metrics["loss"] for h in straight.history[n:]]
    b = [h.metrics["loss"] for h in resumed.history]
    assert a == b
    wa = straight.trainer.accelerator.unwrap_model(straight.trainer.model).state_dict()
    wb = resumed.trainer.accelerator.unwrap_model(resumed.trainer.model).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resuming_a_finished_run_writes_no_new_checkpoint(workdir, tmp_path):
    """Whether the last step is saved is tracked, not read off a directory name: resuming from
    a whole checkpoint stored under another name, at the last step, saves nothing again."""
    root, corpus = workdir
    shutil.copytree(root / "tokenizer", tmp_path / "tokenizer")
    first = run(pretrain_config(tmp_path / "a", corpus, "trainer.max_steps=3",
                                f"tokenizer={tmp_path / 'tokenizer'}"))
    kept = tmp_path / "archive" / "run-a-final"
    shutil.copytree(Path(first.trainer.last_checkpoint), kept)
    again = run(pretrain_config(tmp_path / "b", corpus, "trainer.max_steps=3",
                                f"tokenizer={tmp_path / 'tokenizer'}", f"trainer.resume={kept}"))
    assert again.history == [] and again.trainer.step == 3
    assert Checkpointer(tmp_path / "b" / "run" / "checkpoints", 2).all() == []
    assert again.trainer.last_checkpoint == str(kept)


def test_derived_grad_accum_is_in_the_written_config(workdir, tmp_path, caplog):
    """global_batch_tokens fixes grad_accum at start; config.yaml records the derived value and
    the caller's config is left as it was. No tied-lm_head notice from accelerate."""
    root, corpus = workdir
    shutil.copytree(root / "tokenizer", tmp_path / "tokenizer")
    cfg = pretrain_config(tmp_path, corpus, "trainer.max_steps=4",
                          f"trainer.global_batch_tokens={3 * 4 * 32}")  # 3 x (4 rows x 32)
    with caplog.at_level(logging.WARNING):
        result = run(cfg)
    written = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert written.trainer.grad_accum == 3 and cfg.trainer.grad_accum == 1
    assert written.trainer.global_batch_tokens == 384 and written.data.seq_len == 32
    assert [h.metrics["tokens"] for h in result.history] == [384] * 4
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]


def test_resume_refuses_another_model_shape(workdir, tmp_path):
    root, corpus = workdir
    shutil.copytree(root / "tokenizer", tmp_path / "tokenizer")
    run(pretrain_config(tmp_path, corpus, "trainer.max_steps=3"))
    with pytest.raises(CheckpointError, match="hidden_size"):
        run(pretrain_config(tmp_path, corpus, "trainer.max_steps=6", "model.hidden_size=128",
                            "model.intermediate_size=256"))


class ListPlan(BatchPlan):
    """A fixed list of micro-batches per step (for loop-level tests)."""

    def __init__(self, steps: list[list[dict[str, torch.Tensor]]]) -> None:
        self.steps, self.total_steps = steps, len(steps)

    def batches_for_step(self, step, grad_accum):
        return [dict(b) for b in self.steps[step]] if step < len(self.steps) else []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _one_step(tmp_path, micro_batches, reduction, seed=0):
    """Weights after one SGD(lr=1) step, so the update equals minus the step's gradient."""
    torch.manual_seed(seed)
    model = BitNetForCausalLM(tiny_config())
    model.init_weights(seed)
    acc = Accelerator(cpu=True)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt = acc.prepare(model, opt)
    trainer = Trainer(
        accelerator=acc, model=model, objective=LanguageModelObjective(reduction, "torch"),
        optimizer=opt, schedule=ScheduleConfig(warmup_steps=0, stage_boundary=1.0, lr_peak=1.0,
                                               lr_stage1_end=1.0, wd_peak=0.0),
        data=ListPlan([micro_batches]), checkpointer=Checkpointer(tmp_path / "ck", 1),
        total_steps=1, grad_accum=len(micro_batches), grad_clip=0.0, progress_bar=False,
    )
    trainer.train_step()
    return {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(8, 24) ids and labels with uneven numbers of label tokens per pair of rows."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (8, 24), generator=g)
    labels = ids.clone()
    labels[0, :10] = -100
    labels[5, 4:20] = -100
    return ids, labels


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_accumulation_equals_one_big_batch(tmp_path, reduction):
    """1 process x 4 accumulation steps == 1 process x 1 step on the 4x batch, for the summed
    loss (the 2B4T SFT objective) and for the global per-token mean, with uneven label counts."""
    ids, labels = fixed_batch()
    big = {"input_ids": ids, "labels": labels}
    micro = [{"input_ids": ids[i:i + 2], "labels": labels[i:i + 2]} for i in range(0, 8, 2)]
    w_big = _one_step(tmp_path / "big", [big], reduction)
    w_acc = _one_step(tmp_path / "acc", micro, reduction)
    w0 = BitNetForCausalLM(tiny_config())
    w0.init_weights(0)
    for k, v in w_big.items():
        step = (v - w0.state_dict()[k]).abs().max()
        assert torch.allclose(v, w_acc[k], atol=1e-6 * max(1.0, float(step)), rtol=1e-5), k
    # and the two reductions really differ by the token count (the test can tell them apart)
    if reduction == "sum":
        w_mean = _one_step(tmp_path / "mean", [big], "mean")
        key = "model.layers.0.mlp.down_proj.weight"
        assert not torch.allclose(w_big[key], w_mean[key])


class NaNAtStep:
    """The language-model objective, but the loss of step `bad` is NaN."""

    reduction = "mean"

    def __init__(self, bad: int) -> None:
        self.inner, self.bad, self.calls = LanguageModelObjective("mean", "torch"), bad, 0

    def setup(self, model, accelerator):
        return None

    def count(self, batch):
        return self.inner.count(batch)

    def micro_step(self, model, batch):
        out = self.inner.micro_step(model, batch)
        self.calls += 1
        if self.calls - 1 == self.bad:
            nan = out.loss_sum * float("nan")
            return MicroStep(loss_sum=nan, metric_sums={"loss": nan.detach()})
        return out


def test_non_finite_loss_stops_with_step_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = BitNetForCausalLM(tiny_config())
    acc = Accelerator(cpu=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)
    ids = torch.randint(3, 512, (2, 16))
    plan = ListPlan([[{"input_ids": ids, "labels": ids}] for _ in range(6)])
    trainer = Trainer(
        accelerator=acc, model=model, objective=NaNAtStep(bad=4), optimizer=opt,
        schedule=ScheduleConfig(warmup_steps=0, stage_boundary=1.0, lr_stage1_end=0.0),
        data=plan, checkpointer=Checkpointer(tmp_path / "ck", 2), total_steps=6, grad_accum=1,
        grad_clip=1.0, checkpoint_every=2, progress_bar=False,
    )
    # the 5th step (0-based 4) diverges: its loss was computed with the weights of step_4,
    # so the newest checkpoint written before the divergence is step_2
    with pytest.raises(TrainingError, match=r"diverged at step 5: non-finite loss.*"
                                            r"step_00000002 \(checkpoints from step_00000004"):
        trainer.fit()
    before = {k: v.clone() for k, v in acc.unwrap_model(model).state_dict().items()}
    # the bad update was not applied: weights still equal step-4 checkpoint's
    ck = Checkpointer(tmp_path / "ck", 2).latest()
    assert ck is not None and ck.name == "step_00000004"
    from safetensors.torch import load_file

    saved = load_file(ck / "model.safetensors")
    for k, v in saved.items():
        assert torch.equal(v, before[k]), k
    assert all(math.isfinite(float(p.abs().sum())) for p in model.parameters())


def _two_step_trainer(tmp_path, model, grad_clip: float) -> tuple[Trainer, Accelerator]:
    """A CPU Trainer over two identical micro-batches of random tokens, AdamW."""
    acc = Accelerator(cpu=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = acc.prepare(model, opt)
    ids = torch.randint(3, 512, (2, 16))
    trainer = Trainer(
        accelerator=acc, model=model, objective=LanguageModelObjective("mean", "torch"),
        optimizer=opt, schedule=ScheduleConfig(warmup_steps=0, stage_boundary=1.0),
        data=ListPlan([[{"input_ids": ids, "labels": ids}]] * 2),
        checkpointer=Checkpointer(tmp_path / "ck", 1), total_steps=2, grad_accum=1,
        grad_clip=grad_clip, progress_bar=False,
    )
    return trainer, acc


@pytest.mark.parametrize("fault", ["zero", "nan"])
def test_first_backward_guard_names_parameters_without_gradient(tmp_path, fault):
    """A path that zeroes (or poisons) some gradients stops the run at its first step, naming
    the parameters, before any update."""
    torch.manual_seed(0)
    model = BitNetForCausalLM(tiny_config())
    broken = ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    params = dict(model.named_parameters())
    for name in broken:
        factor = 0.0 if fault == "zero" else float("nan")
        params[name].register_hook(lambda g, f=factor: g * f)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer, acc = _two_step_trainer(tmp_path, model, grad_clip=1.0)
    model = trainer.model
    with pytest.raises(TrainingError, match="2 of") as err:
        trainer.train_step()
    for name in broken:
        assert name in str(err.value)
    assert "embed_tokens" not in str(err.value)
    after = acc.unwrap_model(model).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_first_backward_guard_checks_only_the_first_step(tmp_path):
    """A healthy first step passes the guard; later steps pay nothing for it (a gradient that
    vanishes at step 2 is not looked for)."""
    torch.manual_seed(0)
    trainer, acc = _two_step_trainer(tmp_path, BitNetForCausalLM(tiny_config()), grad_clip=0.0)
    assert trainer.train_step() is not None
    dict(acc.unwrap_model(trainer.model).named_parameters())["model.norm.weight"].register_hook(
        lambda g: g * 0.0)
    trainer.step = 1
    assert trainer.train_step() is not None


def test_default_tracker_is_wandb_offline(workdir, tmp_path):
    """The default logger needs no account: wandb writes an offline run under output_dir."""
    root, corpus = workdir
    shutil.copytree(root / "tokenizer", tmp_path / "tokenizer")
    cfg = pretrain_config(tmp_path, corpus, "trainer.max_steps=4", "trainer.log_every=2",
                          "logger=wandb_offline")
    assert cfg.logger.tracker == "wandb" and cfg.logger.wandb_mode == "offline"
    run(cfg)
    runs = list((tmp_path / "run").glob("wandb/offline-run-*"))
    assert runs, list((tmp_path / "run").rglob("*"))[:20]


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_two_processes_equal_one_big_batch(tmp_path, reduction):
    """2 processes (DDP, and FSDP2, gloo) x 2 accumulation steps == 1 process x 1 step on the
    whole batch: the trainer undoes DDP's mean (FSDP2's reduce-scatter mean) and accelerate's
    accumulation division; the summed SFT loss's step does not depend on the world size."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "ddp.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()),
         str(root / "tests/train/ddp_worker.py"), reduction, str(out)],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids, labels = fixed_batch()
    w_big = _one_step(tmp_path / "big", [{"input_ids": ids, "labels": labels}], reduction)
    w0 = BitNetForCausalLM(tiny_config())
    w0.init_weights(0)
    for strategy in ("ddp", "fsdp2"):
        w_two = torch.load(tmp_path / f"ddp_{strategy}.pt")
        for k, v in w_big.items():
            step = float((v - w0.state_dict()[k]).abs().max())  # summed-loss steps are large
            assert torch.allclose(v, w_two[k], atol=1e-6 * max(1.0, step), rtol=1e-5), \
                (strategy, k)
