"""Run by tests/train/test_fsdp.py under `torchrun --nproc_per_node 2` (gloo, CPU).

    fsdp_worker.py equality WORKDIR OUT.json   pretrain runs (DDP, FSDP2, FSDP2 + ternary
        all-gather + selective AC), SFT and DPO runs under FSDP2, meta init, all-gather bytes,
        accelerate's own FSDP2 preparation of our model
    fsdp_worker.py resume WORKDIR OUT.json     FSDP2: a straight run with a checkpoint, its
        resume on 2 processes, and the resume of a 1-process run's checkpoint on 2

Rank 0 writes what the test asserts on (per-step losses and gradient norms, ...) to OUT.json;
the assertions live in the test, next to the single-process runs they compare with.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bitnet_train.train.run import run as train  # noqa: E402
from tests.train.helpers import bitlinear_modules, chat_config, pretrain_config  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))


def history(result, *keys: str) -> list[dict[str, float]]:
    return [{"step": h.step, **{k: h.metrics[k] for k in keys}} for h in result.history]


def run(cfg):
    """`run`, leaving the process group up for the next run in these processes."""
    return train(cfg, destroy_process_group=False)


def pretrain(work: Path, name: str, *overrides: str):
    """The tiny pretraining run every equality test compares (2 logical data shards)."""
    return run(pretrain_config(work / name, work / "corpus", *PRETRAIN, *overrides))


PRETRAIN = ["trainer.max_steps=5", "schedule.warmup_steps=2", "schedule.lr_peak=3e-3",
            "trainer.micro_batch_size=2", "parallel.data_shards=2", "trainer.resume=never"]
SFT = ["trainer.epochs=1", "trainer.max_steps=4", "trainer.micro_batch_size=2",
       "data.max_len=64", "parallel.data_shards=2", "schedule.warmup_steps=1"]
DPO = ["trainer.epochs=1", "trainer.max_steps=2", "trainer.micro_batch_size=4",
       "data.max_len=96", "parallel.data_shards=2", "schedule.warmup_steps=1"]


def _copy_tokenizer(work: Path, name: str) -> None:
    if RANK == 0:
        shutil.copytree(work / "tokenizer", work / name / "tokenizer", dirs_exist_ok=True)
    dist.barrier()


FSDP2 = ["parallel.strategy=fsdp2"]


def equality(work: Path) -> dict:
    out: dict = {}
    for name, extra in {
        "ddp": ["parallel.strategy=ddp"],
        "fsdp2": ["parallel.strategy=fsdp2"],
        "fsdp2_ternary_ac": ["parallel.strategy=fsdp2", "parallel.ternary_all_gather=true",
                             "trainer.activation_checkpointing=selective"],
    }.items():
        _copy_tokenizer(work, name)
        out[name] = history(pretrain(work, name, *extra), "loss", "grad_norm")
    chat = work / "chat"
    sft = run(chat_config("demo_sft", chat, work / "sft",
                          f"data.sources.0.path={chat}/chat.jsonl", *FSDP2, *SFT))
    out["sft"] = history(sft, "loss_sum", "grad_norm")
    for name, precompute in (("dpo", False), ("dpo_precomputed", True)):
        dpo = run(chat_config("demo_dpo", chat, work / name,
                              f"data.sources.0.path={chat}/pairs.jsonl", *FSDP2, *DPO,
                              f"objective.precompute_reference={precompute}"))
        out[name] = history(dpo, "loss", "grad_norm", "margin")
        if not precompute:
            out["dpo_reference"] = type(dpo.trainer.objective.reference).__name__
    out["fused_kernels"] = fused_kernels_under_fsdp()
    out["ternary_uneven_shards"] = ternary_scale_over_whole_weight()
    out["init_equal"] = meta_init_equals_eager()
    out["all_gather_bytes"] = all_gather_bytes()
    out["accelerate_fsdp2"] = accelerate_prepare()
    return out


def meta_init_equals_eager() -> bool | None:
    """Built on meta, sharded, initialised: gathered whole, the weights of the eager build."""
    from bitnet_train.model import build_model
    from bitnet_train.train.parallelize import FSDPSettings, parallelize
    from bitnet_train.train.sharding import (
        build_mesh,
        build_meta_model,
        gather_full_model,
        init_sharded,
    )
    from tests.conftest import tiny_config

    config = tiny_config(tie_word_embeddings=True)
    model, _ = build_meta_model(config)
    cpu = torch.device("cpu")
    parallelize(model, cpu, kernels="reference", attention="sdpa",
                fsdp=FSDPSettings(mesh=build_mesh(cpu)))
    from torch.distributed.tensor import DTensor

    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, DTensor)
    init_sharded(model, cpu, seed=7)
    whole = gather_full_model(model, config)
    if whole is None:
        return None
    eager = build_model(config, seed=7).state_dict()
    mine = whole.state_dict()
    return set(eager) == set(mine) and all(torch.equal(eager[k], mine[k]) for k in eager)


def fused_kernels_under_fsdp() -> dict[str, Any]:
    """The fused Triton kernels (Triton's interpreter on the CPU) in an FSDP2 model: the codes
    come from the whole gathered weight, once per optimizer step; the loss and every gradient
    equal the unsharded fused model's on the whole batch."""
    from bitnet_train.kernels.modules import FusedBitNetDecoderLayer, watch_optimizer
    from bitnet_train.kernels.reference import ternary_codes_ref
    from bitnet_train.model import build_model
    from bitnet_train.train.parallelize import FSDPSettings, parallelize
    from bitnet_train.train.sharding import build_mesh, build_meta_model, init_sharded
    from tests.conftest import tiny_config

    cpu = torch.device("cpu")
    config = tiny_config(tie_word_embeddings=True)
    ids = torch.randint(3, 512, (4, 16), generator=torch.Generator().manual_seed(3))
    whole = build_model(config, seed=5)
    parallelize(whole, cpu, kernels="triton", attention="sdpa")
    loss = whole(ids, labels=ids).loss
    loss.backward()
    model, _ = build_meta_model(config)
    applied = parallelize(model, cpu, kernels="triton", attention="sdpa",
                          fsdp=FSDPSettings(mesh=build_mesh(cpu)))
    init_sharded(model, cpu, seed=5)
    layer = model.model.layers[0]
    assert isinstance(layer, FusedBitNetDecoderLayer) and applied["kernels"] == "triton"
    mine = ids[2 * RANK:2 * RANK + 2]
    part = model(mine, labels=mine).loss
    part.backward()  # equal token counts: the mean of the two halves' means
    losses = [torch.zeros(()), torch.zeros(())]
    dist.all_gather(losses, part.detach())
    worst = 0.0
    grads = dict(whole.named_parameters())
    for name, p in model.named_parameters():
        full = p.grad.full_tensor()
        ref = grads[name].grad
        worst = max(worst, float((full - ref).abs().max() / ref.abs().max()))
    attn = layer.self_attn
    qkv = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    codes_ok = torch.equal(layer.qkv_codes, ternary_codes_ref([w.full_tensor() for w in qkv])[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    watch_optimizer(opt, model)
    before = layer.qkv_codes.clone()
    opt.step()
    model(mine, labels=mine)  # the codes refresh from the updated, gathered weights
    fresh = ternary_codes_ref([w.full_tensor() for w in qkv])[0]
    return {"loss": float(sum(losses) / 2), "whole_loss": float(loss.detach()), "worst_grad": worst,
            "codes_from_whole_weight": codes_ok, "refreshed_after_step": torch.equal(
                layer.qkv_codes, fresh) and not torch.equal(before, fresh)}


def ternary_scale_over_whole_weight() -> dict[str, float]:
    """Ternary all-gather when the two shards of every projection differ tenfold in scale (rows
    of the second half x10): a per-shard absmean would give other codes; the whole tensor's
    gives the unsharded model's loss. Also with an MLP width that FSDP2 shards unevenly
    (gate/up rows and down columns odd: int8 codes, padded, instead of packed)."""
    from bitnet_train.model import build_model
    from bitnet_train.train.parallelize import FSDPSettings, parallelize
    from bitnet_train.train.sharding import build_mesh, build_meta_model, init_sharded
    from tests.conftest import tiny_config

    cpu = torch.device("cpu")
    out = {}
    for name, config in (("even", tiny_config()),
                         ("uneven", tiny_config(hidden_size=60, num_attention_heads=3,
                                                num_key_value_heads=1, intermediate_size=91))):
        whole = build_model(config, seed=1)
        with torch.no_grad():
            for module in bitlinear_modules(whole).values():
                module.weight[module.weight.shape[0] // 2:] *= 10.0
        state = {k: v.clone() for k, v in whole.state_dict().items()}
        ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(4))
        model, _ = build_meta_model(config)
        parallelize(model, cpu, kernels="reference", attention="sdpa",
                    fsdp=FSDPSettings(mesh=build_mesh(cpu), ternary_all_gather=True))
        init_sharded(model, cpu, seed=0, state=state)
        out[name] = abs(float(model(ids, labels=ids).loss.detach())
                        - float(whole(ids, labels=ids).loss.detach()))
    return out


def all_gather_bytes() -> dict[str, int]:
    """Bytes each rank receives from FSDP2 all-gathers in one optimizer step of 2 micro-batches,
    for float32, bfloat16 and ternary all-gather (float32 for the rest)."""
    from accelerate import Accelerator

    from bitnet_train.train.checkpoint import Checkpointer
    from bitnet_train.train.objectives.language_model import LanguageModelObjective
    from bitnet_train.train.parallelize import FSDPSettings, parallelize
    from bitnet_train.train.schedules import ScheduleConfig
    from bitnet_train.train.sharding import build_mesh, build_meta_model, init_sharded
    from bitnet_train.train.sharding import meter_all_gathers as meter_of
    from bitnet_train.train.trainer import Trainer
    from tests.conftest import tiny_config
    from tests.train.test_trainer import ListPlan, fixed_batch

    out = {}
    cpu = torch.device("cpu")
    ids, labels = fixed_batch()
    mine = [{"input_ids": ids[4 * RANK + i:4 * RANK + i + 2],
             "labels": labels[4 * RANK + i:4 * RANK + i + 2]} for i in (0, 2)]
    for name, dtype, ternary in (("float32", torch.float32, False),
                                 ("bfloat16", torch.bfloat16, False),
                                 ("ternary", torch.float32, True)):
        model, _ = build_meta_model(tiny_config(tie_word_embeddings=True))
        parallelize(model, cpu, kernels="reference", attention="sdpa",
                    fsdp=FSDPSettings(mesh=build_mesh(cpu), param_dtype=dtype,
                                      ternary_all_gather=ternary))
        init_sharded(model, cpu, seed=0)
        meter = meter_of(model)
        trainer = Trainer(
            accelerator=Accelerator(cpu=True), model=model,
            objective=LanguageModelObjective("mean", "torch"),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            schedule=ScheduleConfig(warmup_steps=0, stage_boundary=1.0), data=ListPlan([mine]),
            checkpointer=Checkpointer(Path("/nonexistent"), 1), total_steps=1, grad_accum=2,
            grad_clip=0.0, progress_bar=False)
        trainer.train_step()
        out[name] = meter.bytes
        out[f"{name}_calls"] = meter.calls
    return out


def accelerate_prepare() -> dict[str, Any]:
    """accelerate's own FSDP2 preparation of our model (what `accelerate launch --use_fsdp
    --fsdp_version 2` does; its --fsdp_cpu_ram_efficient_loading defaults to true, which moves
    the model to the meta device and back). accelerate enables FSDP only on accelerators, so on
    the CPU its state is switched to FSDP here; the preparation itself is accelerate's code."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from bitnet_train.model import build_model
    from bitnet_train.train.schedules import param_groups
    from tests.conftest import tiny_config

    acc = Accelerator(cpu=True)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, cpu_ram_efficient_loading=True, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["BitNetDecoderLayer"], state_dict_type="SHARDED_STATE_DICT")
    previous = acc.state.distributed_type, getattr(acc.state, "fsdp_plugin", None)
    acc.state.distributed_type, acc.state.fsdp_plugin = DistributedType.FSDP, plugin
    try:
        from bitnet_train.errors import ConfigError
        from bitnet_train.train.sharding import resolve_strategy

        refused = []
        assert resolve_strategy("auto", acc) == "fsdp2"  # the launch selects our FSDP2
        for strategy, setting in (("ddp", None), ("auto", "activation_checkpointing")):
            if setting:
                setattr(plugin, setting, True)
            try:
                resolve_strategy(strategy, acc)
            except ConfigError as err:
                refused.append(str(err).split(":")[0])
            if setting:
                setattr(plugin, setting, False)
        model = build_model(tiny_config(tie_word_embeddings=True), seed=0)
        opt = torch.optim.AdamW(param_groups(model), lr=1e-3)
        model, opt = acc.prepare(model, opt)
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        return {"tied": model.lm_head.weight is model.model.embed_tokens.weight,
                "not_in_optimizer": [n for n, p in model.named_parameters() if id(p) not in held],
                "refused": refused}
    finally:
        acc.state.distributed_type, acc.state.fsdp_plugin = previous


def resume(work: Path) -> dict:
    """Straight 2-process FSDP2 run (checkpoint at step 4), its resume, and the resume on 2
    processes of the 1-process run in WORKDIR/one (written by the test)."""
    common = ["trainer.max_steps=8", "trainer.checkpoint_every=4", "trainer.keep_last=5",
              "data.shuffle_buffer=8", "parallel.strategy=fsdp2", "trainer.resume=auto",
              "trainer.micro_batch_size=2", "schedule.warmup_steps=2", "schedule.lr_peak=3e-3"]
    out = {}
    runs = (("two", None), ("two_resumed", work / "two"), ("one_on_two", work / "one"))
    for name, source in runs:
        if RANK == 0:
            shutil.copytree(work / "tokenizer", work / name / "tokenizer", dirs_exist_ok=True)
            if source is not None:  # a run directory holding only the step-4 checkpoint
                step4 = source / "run" / "checkpoints" / "step_00000004"
                shutil.copytree(step4, work / name / "run" / "checkpoints" / step4.name)
        dist.barrier()
        result = run(pretrain_config(work / name, work / "corpus", *common))
        out[name] = history(result, "loss", "grad_norm")
    return out


FOUR = ["trainer.max_steps=6", "trainer.checkpoint_every=3", "trainer.keep_last=5",
        "data.shuffle_buffer=8", "parallel.strategy=fsdp2", "trainer.resume=auto",
        "trainer.micro_batch_size=2", "schedule.warmup_steps=2", "schedule.lr_peak=3e-3",
        "parallel.data_shards=4"]


def four(work: Path) -> dict:
    """A straight 4-process FSDP2 run (4 data shards, one micro-batch each per step) in
    WORKDIR/four, checkpointed at step 3."""
    if RANK == 0:
        shutil.copytree(work / "tokenizer", work / "four" / "tokenizer", dirs_exist_ok=True)
    dist.barrier()
    result = run(pretrain_config(work / "four", work / "corpus", *FOUR, "trainer.grad_accum=1"))
    return {"four": history(result, "loss", "grad_norm")}


def four_on_two(work: Path) -> dict:
    """The 4-process run's step-3 checkpoint resumed on 2 processes (2 shards each)."""
    if RANK == 0:
        step3 = work / "four" / "run" / "checkpoints" / "step_00000003"
        shutil.copytree(work / "tokenizer", work / "four_on_two" / "tokenizer",
                        dirs_exist_ok=True)
        shutil.copytree(step3, work / "four_on_two" / "run" / "checkpoints" / step3.name)
    dist.barrier()
    result = run(pretrain_config(work / "four_on_two", work / "corpus", *FOUR,
                                 "trainer.grad_accum=2"))
    return {"four_on_two": history(result, "loss", "grad_norm")}


def main(task: str, work: str, out_file: str) -> None:
    from accelerate import Accelerator

    Accelerator(cpu=True)  # initialises the gloo process group from torchrun's environment
    tasks = {"equality": equality, "resume": resume, "four": four, "four_on_two": four_on_two}
    out = tasks[task](Path(work))
    if RANK == 0:
        Path(out_file).write_text(json.dumps(out, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
