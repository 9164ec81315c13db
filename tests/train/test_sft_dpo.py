"""SFT and DPO through the real trainer, on small local data written by the demo writers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from accelerate import Accelerator

from bitnet_train.data.preference import build_preference_dataset
from bitnet_train.data.sft import build_sft_dataset
from bitnet_train.data.tokenizer import load_tokenizer
from bitnet_train.model import BitNetForCausalLM
from bitnet_train.train.objectives.dpo import DPOObjective, evaluate_preferences, make_reference
from bitnet_train.train.run import run
from tests.conftest import tiny_config
from tests.train.helpers import QA, chat_config, write_chat_data


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("sftdpo"))


_cfg = chat_config


def test_sft_trains_assistant_tokens_only(chat_dir, tmp_path):
    cfg = _cfg("demo_sft", chat_dir, tmp_path / "sft",
               f"data.sources.0.path={chat_dir}/chat.jsonl", "data.max_len=64",
               "trainer.epochs=12", "trainer.micro_batch_size=4", "schedule.lr_peak=3e-3")
    assert cfg.objective.reduction == "sum"
    result = run(cfg)
    losses = [h.metrics["loss"] for h in result.history]
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
    # the loss of a step is over assistant tokens only: its item count equals the number of
    # label positions the data marks, and those are exactly the assistant replies + <|eot_id|>
    tok = load_tokenizer(str(chat_dir / "tokenizer"))
    data = build_sft_dataset(cfg.data, tok)
    batch = data.batch(0, 0, 4)
    trained = batch["input_ids"][batch["labels"] != -100].tolist()
    text = tok.decode(trained)
    assert "Assistant" not in text and "User" not in text and "System" not in text
    assert any(a.split()[0] in text for _, a in QA)
    assert trained.count(tok.convert_tokens_to_ids("<|eot_id|>")) >= 1
    # epochs are exact: steps = epochs x ceil(batches per epoch / grad_accum)
    assert len(result.history) == 12 * math.ceil(data.num_batches(4) / 1)


def test_dpo_loss_is_log2_at_step_zero_and_reference_is_frozen(chat_dir):
    tok = load_tokenizer(str(chat_dir / "tokenizer"))
    cfg = _cfg("demo_dpo", chat_dir, chat_dir / "unused",
               f"data.sources.0.path={chat_dir}/pairs.jsonl", "data.max_len=128")
    data = build_preference_dataset(cfg.data, tok)
    batch = data.batch(0, 0, 4)
    torch.manual_seed(0)
    policy = BitNetForCausalLM(tiny_config(vocab_size=512))
    objective = DPOObjective(beta=0.1, loss_impl="torch", reference=make_reference(policy))
    objective.setup(policy, Accelerator(cpu=True))
    out = objective.micro_step(policy, {k: v for k, v in batch.items()})
    pairs = batch["input_ids"].shape[0] // 2
    assert abs(float(out.loss_sum.detach()) / pairs - math.log(2)) < 1e-6
    assert abs(float(out.metric_sums["margin"])) < 1e-6
    ref_before = copy.deepcopy(objective.reference.state_dict())
    out.loss_sum.backward()
    assert all(p.grad is None for p in objective.reference.parameters())
    assert all(not p.requires_grad for p in objective.reference.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    torch.optim.SGD(policy.parameters(), lr=0.1).step()
    after = objective.reference.state_dict()
    assert all(torch.equal(ref_before[k], after[k]) for k in after)


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_run_raises_held_out_accuracy_and_margin(chat_dir, tmp_path, precompute):
    out = tmp_path / "dpo"
    cfg = _cfg("demo_dpo", chat_dir, out, f"data.sources.0.path={chat_dir}/pairs.jsonl",
               "data.max_len=96", "trainer.epochs=1", "trainer.micro_batch_size=16",
               "schedule.lr_peak=2e-3", f"objective.precompute_reference={precompute}",
               "trainer.max_steps=25")
    result = run(cfg)
    held = copy.deepcopy(cfg.data)
    held.sources[0].path = str(chat_dir / "pairs_heldout.jsonl")
    tok = load_tokenizer(str(chat_dir / "tokenizer"))
    policy = result.trainer.accelerator.unwrap_model(result.trainer.model)
    # the reference is the starting point: a fresh init with the run's seed
    reference = BitNetForCausalLM(policy.config)
    reference.init_weights(cfg.seed)
    if not precompute:
        live_ref = result.trainer.objective.reference
        assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(),
                                                     live_ref.state_dict().values()))
    before = evaluate_preferences(reference, reference, held, tok, loss_impl="torch")
    after = evaluate_preferences(policy, reference, held, tok, loss_impl="torch")
    assert before["margin"] == pytest.approx(0.0, abs=1e-6)
    assert after["margin"] > 0.2  # beta x the gap of summed log-ratios, chosen - rejected
    assert after["accuracy"] > 0.75
    # raw log p(chosen) > log p(rejected) also improves (it is length-biased, so less clearly)
    assert after["policy_accuracy"] > before["policy_accuracy"]


def test_sft_resume_mid_epoch_is_exact(chat_dir, tmp_path):
    """Epoch-based data: N steps, checkpoint, resume, the rest == straight through."""
    import shutil

    common = [f"data.sources.0.path={chat_dir}/chat.jsonl", "data.max_len=64",
              "trainer.epochs=2", "trainer.micro_batch_size=4", "trainer.grad_accum=2",
              "trainer.checkpoint_every=3", "trainer.keep_last=10", "schedule.warmup_steps=1"]
    straight = run(_cfg("demo_sft", chat_dir, tmp_path / "a", *common))
    total = len(straight.history)
    assert total > 4  # the checkpoint at step 3 sits inside the first epoch
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_00000003",
                    tmp_path / "b" / "checkpoints" / "step_00000003")
    resumed = run(_cfg("demo_sft", chat_dir, tmp_path / "b", *common))
    assert [h.step for h in resumed.history] == list(range(3, total))
    assert [h.metrics["loss"] for h in resumed.history] == \
        [h.metrics["loss"] for h in straight.history[3:]]
