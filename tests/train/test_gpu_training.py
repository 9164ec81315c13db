"""The trainer on CUDA: bf16 autocast, fused AdamW, Liger's fused CE and fused DPO in the loop."""

from __future__ import annotations

import copy
import shutil

import pytest

from bitnet_train.data.chat import CHAT_TEMPLATE
from bitnet_train.data.demo_data import write_demo_pairs
from bitnet_train.data.tokenizer import load_tokenizer, train_demo_tokenizer
from bitnet_train.model import BitNetForCausalLM
from bitnet_train.train import losses
from bitnet_train.train.config import compose, to_train_config
from bitnet_train.train.objectives.dpo import evaluate_preferences
from bitnet_train.train.run import run
from tests.train.helpers import TINY_MODEL, make_tokenizer, pretrain_config, write_corpus

pytestmark = pytest.mark.gpu


def spy_on(monkeypatch, name: str) -> list[str]:
    """Count the calls of `bitnet_train.train.losses.<name>` (a Liger path), recording the
    device of its first tensor argument; the real function still runs."""
    calls: list[str] = []
    real = getattr(losses, name)

    def spy(*args, **kwargs):
        calls.append(args[0].device.type)
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, name, spy)
    return calls


@pytest.mark.parametrize("compile_blocks", [False, True])
def test_pretrain_on_cuda_bf16_with_liger(tmp_path, compile_blocks, monkeypatch):
    liger_calls = spy_on(monkeypatch, "_liger_flce")
    make_tokenizer(tmp_path)
    corpus = write_corpus(tmp_path / "corpus")
    cfg = pretrain_config(tmp_path, corpus, "trainer.device=cuda", "trainer.max_steps=60",
                          f"trainer.compile={compile_blocks}",
                          "trainer.mixed_precision=auto", "schedule.lr_peak=5e-3",
                          "schedule.lr_stage1_end=4e-3", "schedule.lr_stage2_peak=2e-3")
    result = run(cfg)
    trainer = result.trainer
    assert trainer.accelerator.mixed_precision == "bf16"
    assert next(trainer.model.parameters()).is_cuda
    # "auto" resolved to Liger's fused linear cross-entropy, on the GPU, at every step
    assert len(liger_calls) == len(result.history) == 60 and set(liger_calls) == {"cuda"}
    curve = [h.metrics["loss"] for h in result.history]
    assert curve[-1] < 0.35 * curve[0], curve[::10]
    print(f"cuda pretrain (compile={compile_blocks}): loss {curve[0]:.3f} -> {curve[-1]:.3f}")


def test_dpo_on_cuda_with_liger_fused_dpo(tmp_path, monkeypatch):
    liger_calls = spy_on(monkeypatch, "_liger_dpo_with_reference")
    write_demo_pairs(tmp_path)
    texts = [line for line in (tmp_path / "pairs.jsonl").read_text().splitlines()[:400]]
    tok = train_demo_tokenizer(texts, tmp_path / "tokenizer", vocab_size=500)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(tmp_path / "tokenizer"))
    cfg = to_train_config(compose([
        "+recipe=demo_dpo", f"tokenizer={tmp_path / 'tokenizer'}", f"output_dir={tmp_path / 'o'}",
        "model.init=null", "trainer.device=cuda", "trainer.progress_bar=false",
        f"data.sources.0.path={tmp_path / 'pairs.jsonl'}", "data.max_len=96", "trainer.epochs=1",
        "trainer.max_steps=25", "trainer.micro_batch_size=16", "schedule.lr_peak=2e-3",
        "objective.precompute_reference=false", *TINY_MODEL,
    ]))
    result = run(cfg)
    policy = result.trainer.accelerator.unwrap_model(result.trainer.model).float().cpu()
    reference = BitNetForCausalLM(policy.config)
    reference.init_weights(cfg.seed)
    held = copy.deepcopy(cfg.data)
    held.sources[0].path = str(tmp_path / "pairs_heldout.jsonl")
    tok = load_tokenizer(str(tmp_path / "tokenizer"))
    after = evaluate_preferences(policy, reference, held, tok, loss_impl="torch")
    print(f"cuda dpo (liger fused DPO): held-out margin {after['margin']:.3f}, "
          f"accuracy {after['accuracy']:.2f}")
    assert after["accuracy"] > 0.75 and after["margin"] > 0.2
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
    # every step's loss came from Liger's fused linear DPO on the GPU (reference model path)
    assert len(liger_calls) == len(result.history) > 0 and set(liger_calls) == {"cuda"}
