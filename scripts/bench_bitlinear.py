"""Benchmark BitLinear training steps against bf16 nn.Linear at the 2B4T shapes (CUDA).

Prints, per shape, forward+backward time of:
  - nn.Linear in bf16 (the baseline every user compares against),
  - BitLinear under bf16 autocast (eager: quantizers as separate kernels),
  - BitLinear under torch.compile (the quantizers fused by Inductor),
and the ratio of each to the floor: max(GEMM FLOPs / peak bf16 rate, bytes moved / HBM
bandwidth). Forward+backward is 3 GEMMs of 2*M*N*K FLOPs each.
Usage: python scripts/bench_bitlinear.py [--tokens 8192] [--peak-tflops 989] [--hbm-tbps 3.35]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bitnet_train.model.bitlinear import BitLinear  # noqa: E402

# (name, in_features, out_features) of the 2B4T projections
SHAPES = [("qkv(q)", 2560, 2560), ("o_proj", 2560, 2560), ("gate/up", 2560, 6912),
          ("down", 6912, 2560)]


def time_fwd_bwd(layer: nn.Module, x: torch.Tensor, iters: int = 20) -> float:
    """Median milliseconds of forward + backward."""
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            layer(x).float().sum().backward()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            layer(x).float().sum().backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM)")
    p.add_argument("--hbm-tbps", type=float, default=3.35, help="HBM bandwidth (H100 SXM)")
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs CUDA"
    dev = "cuda"
    rows = []
    for name, k, n in SHAPES:
        m = args.tokens
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
        flops = 3 * 2 * m * n * k
        # bytes: read x, W (fp32 master) and grads once each way, write y / grads (bf16)
        bytes_moved = 2 * (2 * m * k + 2 * m * n) + 3 * 4 * n * k
        floor_ms = 1e3 * max(flops / (args.peak_tflops * 1e12),
                             bytes_moved / (args.hbm_tbps * 1e12))
        base = nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        bit = BitLinear(k, n, device=dev)
        compiled = torch.compile(BitLinear(k, n, device=dev))
        t_base = time_fwd_bwd(base, x)
        t_bit = time_fwd_bwd(bit, x)
        t_comp = time_fwd_bwd(compiled, x)
        rows.append(dict(shape=name, M=m, K=k, N=n, floor_ms=round(floor_ms, 4),
                         linear_bf16_ms=round(t_base, 4), bitlinear_eager_ms=round(t_bit, 4),
                         bitlinear_compiled_ms=round(t_comp, 4),
                         eager_vs_linear=round(t_bit / t_base, 2),
                         compiled_vs_linear=round(t_comp / t_base, 2),
                         linear_vs_floor=round(t_base / floor_ms, 2),
                         compiled_vs_floor=round(t_comp / floor_ms, 2)))
        print(json.dumps(rows[-1]))
    out = os.environ.get("OUT")
    if out:
        Path(out, "bench_bitlinear.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
