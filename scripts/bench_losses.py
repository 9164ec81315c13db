"""Benchmark the LM-head cross-entropy (forward + backward) at the 2B4T shape (CUDA).

Variants, all computing the same summed next-token loss and its gradients (hidden, weight):
  - naive:        full logits (N, V) then F.cross_entropy in fp32 (what a plain model does),
  - torch chunked: our `_ChunkedTokenLogps` (the CPU path; logits one chunk at a time, 4 matmuls),
                   at its default chunk (LOGITS_BUDGET / V tokens) and at 256 tokens,
  - liger:        Liger's fused linear cross-entropy, reduction="sum" (grads in forward, 3 matmuls),
  - liger tokens: Liger per token, reduction="none" (the DPO policy path; recomputes in backward).
Prints time (median of CUDA-event timings), peak memory above the inputs, and the ratio to the
floor: 3 matmuls of 2*N*H*V FLOPs over the bf16 dense rate (datasheet, --peak-tflops, and the
rate measured here on one matmul of the same shape). Bytes are no floor here: 3 x 2NHV FLOPs over
~4 x 2(N + V)H bytes (inputs read and gradients written, twice) is ~5800 FLOPs per byte at the
default shape, far above the H100's ~300 (990 TFLOP/s over 3.35 TB/s).
Usage: python scripts/bench_losses.py [--tokens 8192] [--hidden 2560] [--vocab 128256]
       [--peak-tflops 989.4] [--out DIR]   (results also go to $OUT when set)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bitnet_train.train.losses import (  # noqa: E402
    IGNORE_INDEX,
    LOGITS_BUDGET,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    token_logps_liger,
)

GIB = 1 << 30


def time_ms(fn, iters: int, warmup: int = 2) -> float:
    """Median milliseconds of fn() over `iters` runs, each bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_gib(fn) -> float:
    """Peak allocated memory during one fn() above what was allocated before it, GiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GIB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2560)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--peak-tflops", type=float, default=989.4,
                   help="bf16 dense datasheet rate (H100 SXM: 989.4)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_losses.py needs CUDA")

    n, h, v = args.tokens, args.hidden, args.vocab
    g = torch.Generator(device="cuda").manual_seed(0)
    # random data, never zeros (zeros run faster than real data and hide errors)
    hidden = torch.randn(n, h, device="cuda", generator=g, dtype=torch.bfloat16)
    weight = (torch.randn(v, h, device="cuda", generator=g) / h**0.5).bfloat16()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[torch.rand(n, device="cuda", generator=g) < 0.1] = IGNORE_INDEX
    hidden.requires_grad_()
    weight.requires_grad_()

    flops = 3 * 2 * n * h * v
    mm_ms = time_ms(lambda: hidden.detach() @ weight.detach().T, args.iters)
    measured_tflops = 2 * n * h * v / mm_ms / 1e9
    floor_ms = flops / (args.peak_tflops * 1e12) * 1e3
    floor_measured_ms = flops / (measured_tflops * 1e12) * 1e3

    variants = {
        "naive (full logits)": lambda: linear_cross_entropy_reference(hidden, weight, targets,
                                                                       "sum"),
        "torch chunked (default)": lambda: linear_cross_entropy(hidden, weight, targets, "sum",
                                                                impl="torch"),
        "torch chunked, 256/chunk": lambda: linear_cross_entropy(
            hidden, weight, targets, "sum", impl="torch", chunk_size=256),
        "liger FLCE (sum)": lambda: linear_cross_entropy(hidden, weight, targets, "sum",
                                                         impl="liger"),
        "liger per-token (none)": lambda: -token_logps_liger(hidden, weight, targets).sum(),
    }

    def step(loss_fn):
        hidden.grad = weight.grad = None
        loss_fn().backward()

    rows, losses = [], {}
    for name, fn in variants.items():
        with torch.no_grad():
            losses[name] = fn().item()
        ms = time_ms(lambda fn=fn: step(fn), args.iters)
        mem = peak_gib(lambda fn=fn: step(fn))
        rows.append({"variant": name, "ms": ms, "peak_gib": mem, "x_floor": ms / floor_ms,
                     "x_floor_measured": ms / floor_measured_ms, "loss": losses[name]})

    dev = torch.cuda.get_device_name()
    head = (f"device: {dev}; torch {torch.__version__}; N={n} H={h} V={v} bf16, 10% ignored\n"
            f"FLOPs fwd+bwd = 3 x 2NHV = {flops / 1e12:.2f} TFLOP; floor {floor_ms:.2f} ms at "
            f"{args.peak_tflops} TFLOP/s (datasheet), {floor_measured_ms:.2f} ms at "
            f"{measured_tflops:.0f} TFLOP/s (measured: one bf16 (N,H)@(H,V) matmul, "
            f"{mm_ms:.2f} ms)\n"
            f"inputs: hidden {hidden.numel() * 2 / GIB:.3f} GiB, weight "
            f"{weight.numel() * 2 / GIB:.3f} GiB; a bf16 N x V logits tensor is "
            f"{n * v * 2 / GIB:.2f} GiB")
    table = [f"{'variant':26s} {'ms':>8s} {'peak GiB':>9s} {'x floor':>8s} {'x meas.':>8s} "
             f"{'loss/token':>11s}"]
    n_lab = int((targets != IGNORE_INDEX).sum())
    for r in rows:
        table.append(f"{r['variant']:26s} {r['ms']:8.2f} {r['peak_gib']:9.2f} "
                     f"{r['x_floor']:8.2f} {r['x_floor_measured']:8.2f} "
                     f"{r['loss'] / n_lab:11.5f}")
    text = head + "\n" + "\n".join(table)
    text += f"\ntorch chunked default chunk: {LOGITS_BUDGET // v} tokens"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_losses.txt").write_text(text + "\n")
        (out / "bench_losses.json").write_text(json.dumps({
            "device": dev, "torch": torch.__version__, "tokens": n, "hidden": h, "vocab": v,
            "flops": flops, "peak_tflops": args.peak_tflops, "measured_tflops": measured_tflops,
            "floor_ms": floor_ms, "floor_measured_ms": floor_measured_ms, "rows": rows,
        }, indent=2))


if __name__ == "__main__":
    main()
