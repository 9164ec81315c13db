"""Training throughput beyond one GPU: 1 GPU against DDP and FSDP2 on N GPUs of one host.

Every variant runs the real `Trainer.train_step` (bf16 autocast, AdamW, clipping, one host sync
per step) on synthetic packed rows, at the same per-GPU micro-batch, in fresh processes
(torchrun per variant: clean memory peaks, no shared caches). Models are the 2B4T shape cut to
`--layers`, on the production fast path (fused kernels, FlexAttention, compile per block).

    one          1 GPU (the baseline: what N GPUs must multiply)
    ddp          N GPUs, accelerate's DDP
    fsdp2        N GPUs, FSDP2, parameters gathered in fp32 (the exact default)
    fsdp2_bf16   N GPUs, FSDP2, parameters gathered in bf16 (torchtitan's default)
    fsdp2_ternary    N GPUs, FSDP2 with ternary all-gather (2-bit BitLinear codes)
    fsdp2_ac     N GPUs, FSDP2 (fp32 gather) with selective activation checkpointing
    fsdp2_ternary_ac N GPUs, ternary all-gather with selective activation checkpointing

Reported per variant: tokens/s over all GPUs and per GPU, MFU per GPU (causal attention
counted), peak memory per GPU (the max over ranks), bytes all-gathered per optimizer step per
GPU (FSDP2), loss. Ratios: each N-GPU variant's tokens/s over one GPU's (targets: 1.9x on 2,
3.7x on 4) and ternary over bf16 all-gather bytes (target <= 1/6).

    python scripts/bench_fsdp.py --gpus 2 --layers 8 --micro-batch 4
    python scripts/bench_fsdp.py --gpus 4 --layers 8 --micro-batch 4
    python scripts/bench_fsdp.py --gpus 2 --layers 8 --micro-batch 4 --grad-accum 8 \
        --variants fsdp2_bf16,fsdp2_ternary                  # all-gather bytes per step
    python scripts/bench_fsdp.py --gpus 2 --layers 30 --variants ddp,fsdp2_ternary_ac \
        --find-micro-batch                                    # full 2B4T: largest micro-batch
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    # name: (description, settings)
    "one": ("1 GPU", dict(strategy="one")),
    "ddp": ("DDP", dict(strategy="ddp")),
    "fsdp2": ("FSDP2, fp32 gather", dict(strategy="fsdp2", param_dtype="float32")),
    "fsdp2_bf16": ("FSDP2, bf16 gather", dict(strategy="fsdp2", param_dtype="bfloat16")),
    "fsdp2_ternary": ("FSDP2, ternary gather", dict(strategy="fsdp2", param_dtype="float32",
                                                     ternary=True)),
    "fsdp2_ac": ("FSDP2, fp32 gather, selective AC",
                 dict(strategy="fsdp2", param_dtype="float32", ac="selective")),
    "fsdp2_ternary_ac": ("FSDP2, ternary gather, selective AC",
                         dict(strategy="fsdp2", param_dtype="float32", ternary=True,
                              ac="selective")),
    "fsdp2_ac_full": ("FSDP2, ternary gather, full AC",
                      dict(strategy="fsdp2", param_dtype="float32", ternary=True, ac="full")),
}


def run_variant(name: str, args) -> dict:
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    from bitnet_train.model import BitNetConfig, build_model
    from bitnet_train.train.checkpoint import Checkpointer
    from bitnet_train.train.objectives.language_model import LanguageModelObjective
    from bitnet_train.train.parallelize import FSDPSettings, parallelize
    from bitnet_train.train.run import flops_per_token
    from bitnet_train.train.schedules import ScheduleConfig, param_groups
    from bitnet_train.train.sharding import (
        build_mesh,
        build_meta_model,
        init_sharded,
        meter_all_gathers,
    )
    from bitnet_train.train.trainer import Trainer
    from scripts.bench_train import SyntheticPlan

    desc, s = VARIANTS[name]
    acc = Accelerator(cpu=args.cpu, mixed_precision="no" if args.cpu else "bf16")
    world, cuda = acc.num_processes, acc.device
    config = BitNetConfig(num_hidden_layers=args.layers)
    if args.cpu:  # a smoke test of this script: tiny widths, the reference path, gloo
        config = BitNetConfig(num_hidden_layers=args.layers, hidden_size=64,
                              intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                              vocab_size=512, max_position_embeddings=args.seq)
    fast = dict(kernels="reference" if args.cpu else "triton",
                attention="sdpa" if args.cpu else "flex", compile=not args.no_compile,
                activation_checkpointing=s.get("ac", "none"))
    meter = None
    if s["strategy"] == "fsdp2":
        model, _ = build_meta_model(config)
        fsdp = FSDPSettings(mesh=build_mesh(cuda), param_dtype=getattr(torch, s["param_dtype"]),
                            ternary_all_gather=s.get("ternary", False))
        applied = parallelize(model, cuda, fsdp=fsdp, **fast)
        init_sharded(model, cuda, seed=0)
        meter = meter_all_gathers(model)
    else:
        model = build_model(config, seed=0).to(cuda)
        applied = parallelize(model, cuda, **fast)
    opt = torch.optim.AdamW(param_groups(model), lr=1e-4, betas=(0.9, 0.95), fused=not args.cpu)
    from bitnet_train.kernels.modules import watch_optimizer

    watch_optimizer(opt, model)
    if s.get("ternary"):
        from bitnet_train.train.ternary_all_gather import watch_optimizer_scales

        watch_optimizer_scales(opt, model)
    if s["strategy"] == "ddp":
        model, opt = acc.prepare(model, opt)
    plan = SyntheticPlan(config.vocab_size, args.micro_batch, args.seq,
                         args.warmup + args.steps, args.grad_accum)
    trainer = Trainer(
        accelerator=acc, model=model,
        objective=LanguageModelObjective("mean", "torch" if args.cpu else "liger",
                                         liger_chunk_mem=args.liger_chunk_mem),
        optimizer=opt, schedule=ScheduleConfig(warmup_steps=0, stage_boundary=1.0),
        data=plan, checkpointer=Checkpointer(Path(tempfile.mkdtemp()), 1),
        total_steps=plan.total_steps, grad_accum=args.grad_accum, grad_clip=1.0,
        progress_bar=False)
    times, gathered = [], []
    for step in range(args.warmup + args.steps):
        if step == args.warmup and not args.cpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = meter.bytes if meter else 0
        t0 = time.perf_counter()
        result = trainer.train_step()
        if not args.cpu:
            torch.cuda.synchronize()  # the optimizer step runs after train_step's host sync
        trainer.step += 1
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            gathered.append((meter.bytes - before) if meter else 0)
    peak = torch.tensor([0.0 if args.cpu else torch.cuda.max_memory_allocated() / 2**30],
                        device=cuda)
    step_s = torch.tensor([sorted(times)[len(times) // 2]], device=cuda)
    if world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        dist.all_reduce(step_s, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    tokens = args.micro_batch * args.seq * args.grad_accum * world
    tps = tokens / step_s.item()
    fpt = flops_per_token(config, args.seq)
    return dict(variant=name, desc=desc, gpus=world, applied=applied, step_s=step_s.item(),
                step_s_all=[round(t, 4) for t in times], tokens_per_s=tps,
                tokens_per_s_per_gpu=tps / world,
                mfu=tps / world * fpt / (args.peak_tflops * 1e12), peak_gib=peak.item(),
                all_gather_bytes_per_step=max(gathered) if gathered else 0,
                loss=result.metrics["loss"], micro_batch=args.micro_batch,
                device="cpu" if args.cpu else torch.cuda.get_device_name(),
                torch=torch.__version__)


def launch(name: str, args, micro_batch: int) -> dict:
    gpus = 1 if name == "one" else args.gpus
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus),
           "--master_port", str(args.port), __file__, "--variant", name,
           "--micro-batch", str(micro_batch)]
    for key in ("layers", "seq", "grad_accum", "steps", "warmup", "liger_chunk_mem",
                "peak_tflops"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--no-compile"] if args.no_compile else []
    cmd += ["--cpu"] if args.cpu else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        oom = "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr
        return dict(variant=name, micro_batch=micro_batch, oom=oom, error=proc.stderr[-3000:])
    return json.loads(lines[-1][7:])


def largest_micro_batch(name: str, args) -> dict:
    """Double the micro-batch until it runs out of memory; the last that fit."""
    best, mb = None, 1
    while mb <= args.max_micro_batch:
        r = launch(name, args, mb)
        print(f"[{name}] micro-batch {mb}: " + ("OOM" if r.get("oom") else "error" if "error"
              in r else f"{r['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, peak "
              f"{r['peak_gib']:.1f} GiB"), flush=True)
        if "error" in r:
            if not r.get("oom"):
                print(r["error"], flush=True)
            break
        best, mb = r, mb * 2
    return best or dict(variant=name, error="no micro-batch fits")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="one,ddp,fsdp2,fsdp2_bf16,fsdp2_ternary")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--find-micro-batch", action="store_true",
                   help="for each variant, the largest micro-batch (powers of 2) that fits")
    p.add_argument("--max-micro-batch", type=int, default=64)
    p.add_argument("--liger-chunk-mem", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="bf16 dense peak per GPU used for MFU (H100/H200 SXM datasheet)")
    p.add_argument("--port", type=int, default=29561)
    p.add_argument("--cpu", action="store_true",
                   help="smoke-test this script on the CPU (gloo, tiny widths, reference path)")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # child process
    p.add_argument("--out", default=os.environ.get("OUT") and
                   str(Path(os.environ["OUT"]) / "bench_fsdp.json"))
    args = p.parse_args()
    if args.variant:
        result = run_variant(args.variant, args)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return
    rows = []
    for name in args.variants.split(","):
        r = largest_micro_batch(name, args) if args.find_micro_batch \
            else launch(name, args, args.micro_batch)
        rows.append(r)
        if "error" in r:
            print(f"[{name}] failed:\n{r['error']}", flush=True)
            continue
        print(f"[{name}] {r['desc']} x{r['gpus']}, micro-batch {r['micro_batch']}: "
              f"{r['tokens_per_s']:,.0f} tokens/s ({r['tokens_per_s_per_gpu']:,.0f}/GPU), "
              f"MFU {100 * r['mfu']:.1f}%, peak {r['peak_gib']:.1f} GiB/GPU, "
              f"all-gather {r['all_gather_bytes_per_step'] / 2**20:,.1f} MiB/step/GPU, "
              f"loss {r['loss']:.3f}", flush=True)
    ok = {r["variant"]: r for r in rows if "error" not in r}
    ratios = {}
    if "one" in ok:
        for name, r in ok.items():
            if name != "one" and r["micro_batch"] == ok["one"]["micro_batch"]:
                ratios[f"{name}/one tokens/s"] = r["tokens_per_s"] / ok["one"]["tokens_per_s"]
    gathered = {n: r["all_gather_bytes_per_step"] for n, r in ok.items()}
    if gathered.get("fsdp2_ternary") and gathered.get("fsdp2_bf16"):
        ratios["ternary/bf16 all-gather bytes"] = gathered["fsdp2_ternary"] / gathered["fsdp2_bf16"]
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows,
                                              "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
