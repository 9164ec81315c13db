"""FSDP2 trains like one process: 2 gloo processes on the CPU against single-process runs.

Each test launches tests/train/fsdp_worker.py once under torchrun (2 processes) and runs the
single-process side here. Every comparison is of the same global batch: the runs split their
data into 2 logical shards (parallel.data_shards=2), which 2 processes read one each and one
process reads in turn with twice the accumulation (train/data_shards.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitnet_train.io import load_model
from bitnet_train.train.run import run
from tests.conftest import free_port
from tests.train.fsdp_worker import DPO, PRETRAIN, SFT
from tests.train.helpers import (
    bitlinear_modules,
    chat_config,
    make_tokenizer,
    pretrain_config,
    write_chat_data,
    write_corpus,
)

ROOT = Path(__file__).resolve().parents[2]
REL = 2e-5  # fp32 sums in another order (all-reduce / reduce-scatter), over a few steps


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    make_tokenizer(root)
    write_corpus(root / "corpus")
    write_chat_data(root / "chat")
    return root


def launch(task: str, work: Path, port: int, accelerate: bool = False, processes: int = 2
           ) -> dict:
    """fsdp_worker.py TASK on 2 processes: through torchrun, or `accelerate launch` (its
    multi-GPU launcher; the workers still train on the CPU, trainer.device=cpu)."""
    out = work / f"{task}.json"
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", str(port)]
    if accelerate:
        launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(port)]
    proc = subprocess.run(
        [sys.executable, *launcher, str(ROOT / "tests/train/fsdp_worker.py"), task, str(work),
         str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        # the workers train on the CPU, and run the Triton kernels there through the
        # interpreter, on a GPU machine too
        env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def assert_same_steps(two: list[dict], one: list[dict], keys: tuple[str, ...], what: str,
                      rel: float = REL, abs_tol: float = 1e-6) -> None:
    assert [h["step"] for h in two] == [h["step"] for h in one], what
    for a, b in zip(two, one):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=rel, abs=abs_tol), \
                f"{what}: step {a['step']} {k}: 2 processes {a[k]}, 1 process {b[k]}"


def single(result, *keys: str) -> list[dict]:
    return [{"step": h.step, **{k: h.metrics[k] for k in keys}} for h in result.history]


@pytest.mark.slow
def test_fsdp2_and_ddp_equal_one_process(work):
    """Pretraining: losses and gradient norms of DDP, FSDP2, and FSDP2 with ternary all-gather
    and selective activation checkpointing on 2 processes equal the 1-process run, step by step
    (clipping active: the first norms are ~5 > 1). SFT's summed loss and its gradient norm, and
    DPO with a sharded reference, equal theirs too. Also: a sharded model starts from the eager
    init's exact weights; ternary all-gather moves less than a third of fp32's bytes; and
    accelerate's own FSDP2 preparation keeps our tied lm_head in the optimizer (issue 9's
    divergence: it untied it, and lm_head trained frozen)."""
    got = launch("equality", work, free_port())
    shutil.copytree(work / "tokenizer", work / "one" / "tokenizer")
    one = run(pretrain_config(work / "one", work / "corpus", *PRETRAIN, "trainer.grad_accum=2"))
    reference = single(one, "loss", "grad_norm")
    assert reference[0]["grad_norm"] > 1.0  # so clipping acts on the DTensor gradients
    for name in ("ddp", "fsdp2", "fsdp2_ternary_ac"):
        assert_same_steps(got[name], reference, ("loss", "grad_norm"), name)

    chat = work / "chat"
    sft = run(chat_config("demo_sft", chat, work / "sft1",
                          f"data.sources.0.path={chat}/chat.jsonl", "trainer.grad_accum=2", *SFT))
    assert_same_steps(got["sft"], single(sft, "loss_sum", "grad_norm"), ("loss_sum", "grad_norm"),
                      "SFT (sum)")
    for name, precompute in (("dpo", False), ("dpo_precomputed", True)):
        dpo = run(chat_config("demo_dpo", chat, work / f"{name}1",
                              f"data.sources.0.path={chat}/pairs.jsonl", "trainer.grad_accum=2",
                              *DPO, f"objective.precompute_reference={precompute}"))
        # DPO's margin is a difference of sequence log-probs (~ -300 each) through int8 and
        # ternary roundings: a 1e-7 relative change of the initial weights moves the second
        # step's margin by ~2e-5 (measured on one process), which is what reduce-scatter's
        # other summation order does after the first update (DDP happens to sum in the
        # 1-process order). The first step, before any update, is tight: a sharded reference
        # that differed from the policy's initial weights would show there.
        one_dpo = single(dpo, "loss", "grad_norm", "margin")
        assert len(one_dpo) == 2
        assert_same_steps(got[name][:1], one_dpo[:1], ("loss", "grad_norm", "margin"), name)
        assert_same_steps(got[name], one_dpo, ("loss", "grad_norm", "margin"), name, rel=2e-4,
                          abs_tol=1e-4)
    assert got["dpo_reference"].startswith("FSDP")  # the live reference was sharded too

    fused = got["fused_kernels"]  # Triton's interpreter: codes from the gathered weights
    assert fused["loss"] == pytest.approx(fused["whole_loss"], rel=1e-5)
    # the fused backward returns bf16 weight gradients: each process's half is rounded to bf16
    # before the fp32 reduce-scatter sums them (2^-8 relative); codes from a shard would be O(1)
    assert fused["worst_grad"] < 1e-2, fused
    assert fused["codes_from_whole_weight"] and fused["refreshed_after_step"]
    # ternary all-gather quantizes each shard with the WHOLE tensor's absmean
    assert got["ternary_uneven_shards"]["even"] < 1e-5, got["ternary_uneven_shards"]
    assert got["ternary_uneven_shards"]["uneven"] < 1e-5, got["ternary_uneven_shards"]
    assert got["init_equal"] is True
    b = got["all_gather_bytes"]
    # same collectives, fewer bytes: the BitLinear weights as 2-bit codes (1/16 of fp32)
    assert b["ternary_calls"] == b["float32_calls"] == b["bfloat16_calls"]
    assert b["bfloat16"] * 2 == b["float32"]
    assert b["ternary"] < b["float32"] / 3, b
    acc = got["accelerate_fsdp2"]
    assert acc["tied"] is True and acc["not_in_optimizer"] == []
    # under accelerate's FSDP launch: strategy auto is our fsdp2; ddp and accelerate's own
    # activation checkpointing are refused, naming the keys
    assert acc["refused"] == ["parallel.strategy=ddp, but accelerate was launched with FSDP",
                              "accelerate's fsdp_activation_checkpointing is not used by "
                              "bitnet-train"]


@pytest.mark.slow
def test_fsdp2_checkpoints_resume_on_1_and_2_processes(work, tmp_path):
    """Under `accelerate launch`. Sharded checkpoints (DCP, no rank gathers the model): a
    2-process run resumed on 2
    processes, a 1-process run's checkpoint resumed on 2, and a 2-process run's checkpoint
    resumed on 1 all continue exactly as the run that wrote them (every logical data shard
    keeps its position); DIR/final of a sharded run loads whole and exports."""
    common = ["trainer.max_steps=8", "trainer.checkpoint_every=4", "trainer.keep_last=5",
              "data.shuffle_buffer=8", "parallel.strategy=fsdp2", "trainer.micro_batch_size=2",
              "schedule.warmup_steps=2", "schedule.lr_peak=3e-3"]
    shutil.copytree(work / "tokenizer", work / "one" / "tokenizer", dirs_exist_ok=True)
    one = run(pretrain_config(work / "one", work / "corpus", *common, "trainer.grad_accum=2",
                              "parallel.data_shards=2", "trainer.resume=never"))
    ckpt = work / "one" / "run" / "checkpoints" / "step_00000004"
    assert (ckpt / "model_optim" / ".metadata").is_file()
    assert not (ckpt / "model.safetensors").exists()  # sharded: nobody wrote the whole model

    got = launch("resume", work, free_port(), accelerate=True)
    two = got["two"]
    assert_same_steps(got["two_resumed"], two[4:], ("loss", "grad_norm"), "2 -> 2")
    assert_same_steps(got["one_on_two"], single(one, "loss", "grad_norm")[4:],
                      ("loss", "grad_norm"), "1 -> 2")
    # 2 -> 1: the 2-process run's step-4 checkpoint on one process (2 shards, accumulation 2)
    step4 = work / "two" / "run" / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in step4.glob("data_state_shard*.pt")) == [
        "data_state_shard00000.pt", "data_state_shard00001.pt"]
    shutil.copytree(work / "tokenizer", tmp_path / "tokenizer")
    shutil.copytree(step4, tmp_path / "run" / "checkpoints" / step4.name)
    back = run(pretrain_config(tmp_path, work / "corpus", *common, "trainer.grad_accum=2"))
    assert_same_steps(single(back, "loss", "grad_norm"), two[4:], ("loss", "grad_norm"), "2 -> 1")

    # final/ of the sharded run: the whole model, loadable and exportable
    whole, tok = load_model(work / "two" / "run" / "final")
    resumed_whole, _ = load_model(tmp_path / "run" / "final")
    assert tok is not None
    for (k, a), b in zip(whole.state_dict().items(), resumed_whole.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), k
    from bitnet_train.export.hf import export_hf
    from bitnet_train.model import ternary_weight

    export_hf(whole, tok, tmp_path / "packed")  # transformers' packed 2B4T layout
    packed, _ = load_model(tmp_path / "packed")
    unpacked = bitlinear_modules(packed)
    for name, module in bitlinear_modules(whole).items():
        codes, scale = ternary_weight(module.weight)
        codes_back, scale_back = ternary_weight(unpacked[name].weight)
        assert torch.equal(codes, codes_back), name
        assert scale_back == pytest.approx(float(scale), rel=1e-2), name  # stored in bf16


def test_fsdp2_checkpoint_of_4_processes_resumes_on_2(work):
    """4 -> 2: a 4-process run's sharded checkpoint (4 data shards) continues on 2 processes,
    each reading 2 shards from their saved positions: the same losses and gradient norms as
    the 4-process run from the resumed step on."""
    straight = launch("four", work, free_port(), processes=4)["four"]
    resumed = launch("four_on_two", work, free_port())["four_on_two"]
    assert [h["step"] for h in straight] == list(range(6))
    assert_same_steps(resumed, straight[3:], ("loss", "grad_norm"), "4 -> 2")


def test_a_data_shard_count_that_does_not_split_is_refused(work, tmp_path):
    """Resuming needs a process count that divides the checkpoint's data shards, and the
    same global batch: both refused with the key to change."""
    from bitnet_train.errors import ConfigError

    shutil.copytree(work / "tokenizer", tmp_path / "tokenizer")
    base = ["trainer.max_steps=4", "schedule.warmup_steps=1", "parallel.strategy=fsdp2",
            "trainer.micro_batch_size=2"]
    with pytest.raises(ConfigError, match="grad_accum=2"):
        run(pretrain_config(tmp_path, work / "corpus", *base, "parallel.data_shards=2"))
    run(pretrain_config(tmp_path, work / "corpus", *base, "parallel.data_shards=2",
                        "trainer.grad_accum=2"))
    with pytest.raises(ConfigError, match="trainer.grad_accum=2"):  # another global batch
        run(pretrain_config(tmp_path, work / "corpus", *base, "trainer.grad_accum=4",
                            "trainer.max_steps=5"))
    with pytest.raises(ConfigError, match="data_shards"):
        run(pretrain_config(tmp_path, work / "corpus", *base, "parallel.data_shards=3",
                            "trainer.grad_accum=2", "trainer.max_steps=5"))
