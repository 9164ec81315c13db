"""Full optimizer steps of a model config on one GPU: our fast path against its ceiling, our
reference and the peer, each variant in a fresh process (clean memory peaks, no shared caches).

    (a) ours: fused Triton kernels, FlexAttention, torch.compile per block, Liger's fused CE
    (b) the same model with `quantization=none` (plain bf16 linear layers), compiled: our ceiling
    (c) the naive eager reference: BitLinear fake-quantization, SDPA with a dense document mask
    (d) the peer: transformers' BitNetForCausalLM with online-quantizing AutoBitLinear layers,
        SDPA causal attention (no document mask: transformers' best case), the same Liger loss

Every variant runs the real `Trainer.train_step` (bf16 autocast, fused AdamW, clipping, one
host sync) on packed rows of random tokens with documents (mean 1024 tokens). Timing: CUDA
events around each step after warm-up; the median. MFU counts causal attention, per GPU, against
the stated peak. Prints a table and the ratios the targets are written in (a/b, a/c, a/d).

    python scripts/bench_train.py --layers 8 --seq 4096 --micro-batch 4          # 2B4T cut to 8
    python scripts/bench_train.py --layers 30 --micro-batch 2 --variants a,d      # full 2B4T
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    # name: (description, settings)
    "a": ("ours: kernels + flex + compile", dict(kernels="triton", attention="flex",
                                                 compile=True, quantization="ternary")),
    "b": ("quantization=none, flex, compiled (ceiling)", dict(kernels="reference",
          attention="flex", compile=True, quantization="none")),
    "c": ("naive eager reference (sdpa, dense mask)", dict(kernels="reference",
          attention="sdpa", compile=False, quantization="ternary")),
    "d": ("peer: transformers BitNet + AutoBitLinear", dict(peer=True)),
    # diagnostics: one change at a time from (c)
    "c+compile": ("reference, sdpa, compiled", dict(kernels="reference", attention="sdpa",
                                                    compile=True, quantization="ternary")),
    "c+flex+compile": ("reference, flex, compiled", dict(kernels="reference", attention="flex",
                                                         compile=True, quantization="ternary")),
    "a-compile": ("kernels + flex, eager", dict(kernels="triton", attention="flex",
                                                compile=False, quantization="ternary")),
}


def _documents(rows: int, seq: int, mean_len: int, gen):
    """document_ids and position_ids (rows, seq) for packed documents of exponential lengths."""
    import torch

    docs = torch.empty(rows, seq, dtype=torch.long)
    pos = torch.empty(rows, seq, dtype=torch.long)
    for r in range(rows):
        t, d = 0, 0
        while t < seq:
            n = int(torch.empty(1).exponential_(1.0 / mean_len, generator=gen).clamp(16, seq))
            n = min(n, seq - t)
            docs[r, t:t + n] = d
            pos[r, t:t + n] = torch.arange(n)
            t, d = t + n, d + 1
    return docs, pos


class SyntheticPlan:
    """Random packed rows with documents, the same every run (the data is not what we time)."""

    def __init__(self, vocab: int, rows: int, seq: int, steps: int, grad_accum: int) -> None:
        import torch

        gen = torch.Generator().manual_seed(0)
        self.batches = []
        for _ in range(grad_accum):
            ids = torch.randint(0, vocab, (rows, seq), generator=gen)
            docs, pos = _documents(rows, seq, 1024, gen)
            self.batches.append(dict(input_ids=ids, labels=ids, document_ids=docs,
                                     position_ids=pos))
        self.total_steps = steps

    def batches_for_step(self, step, grad_accum):
        return [dict(b) for b in self.batches]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _peer_model(config):
    """transformers' BitNetForCausalLM with every projection an online AutoBitLinear, wrapped to
    take our objective's head_fn (so both sides use the same Liger loss)."""
    import torch
    from torch import nn
    from transformers import BitNetConfig as HFConfig
    from transformers import BitNetForCausalLM as HFBitNet
    from transformers.integrations.bitnet import AutoBitLinear

    hf = HFBitNet(HFConfig(**config.to_hf_dict()))
    hf.config._attn_implementation = "sdpa"
    for name, module in list(hf.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            hf.set_submodule(name, AutoBitLinear(module.in_features, module.out_features,
                                                 bias=False, online_quant=True))

    class Peer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf = hf

        def forward(self, input_ids, attention_mask=None, position_ids=None, document_ids=None,
                    head_fn=None):
            hidden = self.hf.model(input_ids=input_ids).last_hidden_state
            return head_fn(hidden, self.hf.lm_head.weight)

    return Peer().float(), torch


def run_variant(name: str, args) -> dict:
    import torch
    from accelerate import Accelerator

    from bitnet_train.model import BitNetConfig, build_model
    from bitnet_train.train.checkpoint import Checkpointer
    from bitnet_train.train.objectives.language_model import LanguageModelObjective
    from bitnet_train.train.parallelize import parallelize
    from bitnet_train.train.run import flops_per_token
    from bitnet_train.train.schedules import ScheduleConfig, param_groups
    from bitnet_train.train.trainer import Trainer

    desc, s = VARIANTS[name]
    config = BitNetConfig(num_hidden_layers=args.layers,
                          quantization=s.get("quantization", "ternary"))
    torch.manual_seed(0)
    applied: dict = {}
    if s.get("peer"):
        model, _ = _peer_model(config)
    else:
        model = build_model(config, seed=0)
        applied = parallelize(model, torch.device("cuda"), kernels=s["kernels"],
                              attention=s["attention"], compile=s["compile"])
    acc = Accelerator(mixed_precision="bf16")
    opt = torch.optim.AdamW(param_groups(model), lr=1e-4, betas=(0.9, 0.95), fused=True)
    if applied.get("kernels") == "triton":
        from bitnet_train.kernels.modules import watch_optimizer

        watch_optimizer(opt, model)
    model, opt = acc.prepare(model, opt)
    plan = SyntheticPlan(config.vocab_size, args.micro_batch, args.seq,
                         args.warmup + args.steps, args.grad_accum)
    trainer = Trainer(
        accelerator=acc, model=model,
        objective=LanguageModelObjective("mean", "liger", liger_chunk_mem=args.liger_chunk_mem),
        optimizer=opt, schedule=ScheduleConfig(warmup_steps=0, stage_boundary=1.0),
        data=plan, checkpointer=Checkpointer(Path(tempfile.mkdtemp()), 1),
        total_steps=plan.total_steps, grad_accum=args.grad_accum, grad_clip=1.0,
        progress_bar=False)
    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = trainer.train_step()
        end.record()
        torch.cuda.synchronize()
        trainer.step += 1
        if step >= args.warmup:
            times.append(start.elapsed_time(end) / 1e3)
    profile = None
    if args.profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            trainer.train_step()
            torch.cuda.synchronize()
        profile = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile)
        print(profile, file=sys.stderr, flush=True)
    median = sorted(times)[len(times) // 2]
    tokens = args.micro_batch * args.seq * args.grad_accum
    tps = tokens / median
    fpt = flops_per_token(config, args.seq)
    return dict(variant=name, desc=desc, applied=applied, step_s=median,
                step_s_all=[round(t, 4) for t in times], tokens_per_s=tps,
                mfu=tps * fpt / (args.peak_tflops * 1e12),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                loss=result.metrics["loss"], device=torch.cuda.get_device_name(),
                torch=torch.__version__, profile=profile)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="a,b,c,d")
    p.add_argument("--liger-chunk-mem", type=int, default=8,
                   help="Liger chunk_mem_const (the trainer default, objective.liger_chunk_mem)")
    p.add_argument("--profile", type=int, default=0,
                   help="print the N costliest CUDA kernels of one more step per variant")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="bf16 dense peak per GPU used for MFU (H100/H200 SXM datasheet)")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # child process
    p.add_argument("--out", default=os.environ.get("OUT") and
                   str(Path(os.environ["OUT"]) / "bench_train.json"))
    args = p.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant, args)), flush=True)
        return
    rows = []
    for name in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", name]
        for key in ("layers", "seq", "micro_batch", "grad_accum", "steps", "warmup",
                    "liger_chunk_mem", "peak_tflops", "profile"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"[{name}] failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            rows.append(dict(variant=name, error=proc.stderr[-3000:]))
            continue
        rows.append(json.loads(lines[-1][7:]))
        r = rows[-1]
        if r.get("profile"):
            print(f"[{name}] profile of one step:\n{r['profile']}", flush=True)
        print(f"[{name}] {r['desc']}: {r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}%"
              f", peak {r['peak_gib']:.1f} GiB, step {1e3 * r['step_s']:.1f} ms, "
              f"loss {r['loss']:.3f}", flush=True)
    ok = {r["variant"]: r for r in rows if "error" not in r}
    ratios = {}
    for num, den in [("a", "b"), ("a", "c"), ("a", "d")]:
        if num in ok and den in ok:
            ratios[f"{num}/{den} tokens/s"] = ok[num]["tokens_per_s"] / ok[den]["tokens_per_s"]
            ratios[f"{num}/{den} step time"] = ok[num]["step_s"] / ok[den]["step_s"]
            ratios[f"{num}/{den} peak memory"] = ok[num]["peak_gib"] / ok[den]["peak_gib"]
    print(f"\nlayers={args.layers} seq={args.seq} micro_batch={args.micro_batch} "
          f"grad_accum={args.grad_accum} peak={args.peak_tflops} TFLOP/s")
    print(f"{'variant':16s} {'tokens/s':>10s} {'MFU':>6s} {'peak GiB':>9s} {'step ms':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:16s} failed")
            continue
        print(f"{r['variant']:16s} {r['tokens_per_s']:10,.0f} {100 * r['mfu']:5.1f}% "
              f"{r['peak_gib']:9.1f} {1e3 * r['step_s']:8.1f}")
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(args=vars(args), rows=rows, ratios=ratios),
                                             indent=2))


if __name__ == "__main__":
    main()
