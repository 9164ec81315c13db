"""Run by tests/train/test_fsdp_gpu.py under `torchrun --nproc_per_node N` on N GPUs (NCCL).

    fsdp_gpu_worker.py gradients OUT.json    one step of the 2B4T-width model (2 layers) under
        FSDP2 (fp32 params; bf16 params; ternary all-gather; + kernels, flex, compile, AC) on
        N GPUs: loss and every parameter's gradient, gathered whole; rank 0 also computes the
        1-GPU fp32 and bf16 eager references on the whole global batch
    fsdp_gpu_worker.py steps WORKDIR OUT.json   20 steps of DDP, FSDP2 and FSDP2 + ternary
        all-gather through run() (2 data shards per process count)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bitnet_train.model import BitNetConfig, build_model  # noqa: E402
from bitnet_train.train.parallelize import FSDPSettings, parallelize  # noqa: E402
from bitnet_train.train.sharding import build_mesh, build_meta_model, init_sharded  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
WIDTH_2B4T = dict(hidden_size=2560, intermediate_size=6912, num_attention_heads=20,
                  num_key_value_heads=5, num_hidden_layers=2, vocab_size=128256,
                  max_position_embeddings=4096, hidden_act="relu2", name="2b4t-2layer")
VARIANTS = {
    # name: parallelize settings and FSDP settings
    "fsdp2": dict(kernels="reference", attention="sdpa", compile=False, ac="none",
                  param_dtype=torch.float32, ternary=False),
    "fsdp2_bf16_params": dict(kernels="reference", attention="sdpa", compile=False, ac="none",
                              param_dtype=torch.bfloat16, ternary=False),
    "fsdp2_ternary": dict(kernels="reference", attention="sdpa", compile=False, ac="none",
                          param_dtype=torch.float32, ternary=True),
    "fsdp2_fast": dict(kernels="triton", attention="flex", compile=True, ac="selective",
                       param_dtype=torch.float32, ternary=True),
}


def batch(rows: int, seq: int = 1024) -> dict[str, torch.Tensor]:
    """The global batch (identical on every rank): three documents per row."""
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, WIDTH_2B4T["vocab_size"], (rows, seq), device="cuda", generator=g)
    bounds = torch.tensor([0, seq // 5, seq // 2])
    docs = ((torch.arange(seq)[:, None] >= bounds[None, :]).sum(-1) - 1).expand(rows, seq)
    pos = (torch.arange(seq) - bounds[docs[0]]).expand(rows, seq)
    return dict(input_ids=ids, labels=ids, document_ids=docs.cuda(), position_ids=pos.cuda())


def loss_and_grads(model, data, bf16: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean token loss of `data` and every gradient, whole, on the CPU."""
    from torch.distributed.tensor import DTensor

    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**data).loss
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[name] = g.float().cpu()
    return loss.item(), grads


def gradients(out_file: str) -> None:
    config = BitNetConfig(**WIDTH_2B4T)
    cuda = torch.device("cuda")
    whole = batch(2 * WORLD)
    mine = {k: v[2 * RANK:2 * RANK + 2] for k, v in whole.items()}
    out: dict = {}
    refs = None
    if RANK == 0:
        model = build_model(config, seed=0).cuda()
        refs = {"fp32": loss_and_grads(model, whole, bf16=False),
                "bf16": loss_and_grads(model, whole, bf16=True)}
        del model
    for name, s in VARIANTS.items():
        torch._dynamo.reset()
        model, _ = build_meta_model(config)
        parallelize(model, cuda, kernels=s["kernels"], attention=s["attention"],
                    compile=s["compile"], activation_checkpointing=s["ac"],
                    fsdp=FSDPSettings(mesh=build_mesh(cuda), param_dtype=s["param_dtype"],
                                      ternary_all_gather=s["ternary"]))
        init_sharded(model, cuda, seed=0)
        # every rank holds 2 of the 2 * WORLD rows (same label count each): the global mean
        # token loss is the mean of the ranks' means, FSDP2's reduce-scatter averages grads
        loss, grads = loss_and_grads(model, mine, bf16=True)
        losses = torch.tensor([loss], device=cuda)
        dist.all_reduce(losses)
        if RANK == 0:
            fp32_loss, g32 = refs["fp32"]
            bf16_loss, g16 = refs["bf16"]
            out[name] = {"loss_err": abs(losses.item() / WORLD - fp32_loss),
                         "loss_bf16_err": abs(bf16_loss - fp32_loss),
                         "grads": {n: [rel(grads[n], g32[n]), rel(g16[n], g32[n])]
                                   for n in g32}}
        del model
        torch.cuda.empty_cache()
    if RANK == 0:
        Path(out_file).write_text(json.dumps(out))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def steps(work: str, out_file: str) -> None:
    from bitnet_train.train.run import run
    from tests.train.helpers import pretrain_config

    work_dir = Path(work)
    out = {}
    for name, extra in {"ddp": ["parallel.strategy=ddp"],
                        "fsdp2": ["parallel.strategy=fsdp2"],
                        "fsdp2_ternary": ["parallel.strategy=fsdp2",
                                          "parallel.ternary_all_gather=true"]}.items():
        if RANK == 0:
            shutil.copytree(work_dir / "tokenizer", work_dir / name / "tokenizer")
        dist.barrier()
        result = run(pretrain_config(work_dir / name, work_dir / "corpus", *GPU_RUN, *extra,
                                     f"trainer.grad_accum={4 // WORLD}"),
                     destroy_process_group=False)
        out[name] = [{"step": h.step, "loss": h.metrics["loss"],
                      "grad_norm": h.metrics["grad_norm"]} for h in result.history]
    if RANK == 0:
        Path(out_file).write_text(json.dumps(out))


GPU_RUN = [f"model.{k}={v}" for k, v in WIDTH_2B4T.items() if k != "name"] + [
    "trainer.max_steps=20", "schedule.warmup_steps=5", "schedule.lr_peak=3e-4",
    "schedule.lr_stage1_end=2e-4", "schedule.lr_stage2_peak=1.5e-4", "schedule.lr_floor=1e-5",
    "data.seq_len=1024", "trainer.micro_batch_size=1", "parallel.data_shards=4",  # 1, 2, 4 GPUs
    "trainer.resume=never", "trainer.device=cuda", "trainer.mixed_precision=bf16"]


if __name__ == "__main__":
    from accelerate import Accelerator

    # NCCL process group from torchrun's environment; bf16 as run()'s own Accelerator asks
    Accelerator(mixed_precision="bf16")
    task, *args = sys.argv[1:]
    {"gradients": gradients, "steps": steps}[task](*args)
    dist.barrier()
