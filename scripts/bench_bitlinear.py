"""Norm -> ternary projection units at the 2B4T shapes, forward + backward, on one GPU.

Per group of projections that read one RMSNorm (q|k|v, o, gate|up, down), M tokens:
  linear_bf16   RMSNorm + bf16 nn.Linear (what a full-precision model pays; our ceiling)
  ref_eager     RMSNorm + BitLinear, the reference fake-quantization, eager (bf16 autocast)
  ref_compiled  the same under torch.compile (Inductor fuses the quantizers)
  fused         `norm_ternary_linear`: fused norm+int8 quantization, int8 tensor-core product
and the forward products alone: bf16 cuBLAS, int8 Triton (scales in the epilogue) and int8
`torch._int_mm` + a scaling pass. Floors: forward+backward is 3 GEMMs of 2MNK FLOPs at the bf16
peak (or 1 int8 + 2 bf16 for the fused path); the forward product alone 2MNK at the int8 or bf16
peak. Medians of CUDA-event timings.

    python scripts/bench_bitlinear.py [--tokens 16384] [--peak-tflops 989] [--int8-peak-tops 1979]
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
from bitnet_train.kernels.int8_matmul import int8_matmul  # noqa: E402
from bitnet_train.kernels.norm_quant import rmsnorm_quant  # noqa: E402
from bitnet_train.kernels.reference import ternary_codes_ref  # noqa: E402
from bitnet_train.kernels.ternary_linear import norm_ternary_linear  # noqa: E402
from bitnet_train.model.bitlinear import BitLinear  # noqa: E402
from bitnet_train.model.modeling import RMSNorm  # noqa: E402

# group: (K, [N of each projection]) at the 2B4T shapes
GROUPS = {"qkv": (2560, [2560, 640, 640]), "o": (2560, [2560]), "gate_up": (2560, [6912, 6912]),
          "down": (6912, [2560])}


def bench(fn, iters: int = 20, warmup: int = 5) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


class Unit(nn.Module):
    """RMSNorm then several projections, concatenated (the reference structure)."""

    def __init__(self, k: int, ns: list[int], linear: type) -> None:
        super().__init__()
        self.norm = RMSNorm(k, 1e-5)
        self.projs = nn.ModuleList(
            nn.Linear(k, n, bias=False) if linear is nn.Linear else BitLinear(k, n) for n in ns)

    def forward(self, x):
        h = self.norm(x)
        return torch.cat([p(h) for p in self.projs], dim=-1)


def bench_group(group: str, k: int, ns: list[int], m: int, args) -> dict:
    """Every timing of one group of projections (see the module docstring)."""
    dev = "cuda"
    n = sum(ns)
    flops = 2 * m * n * k
    x = torch.randn(m, k, device=dev, requires_grad=True)  # the fp32 residual stream
    g = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    row = dict(group=group, M=m, K=k, N=n)
    # forward products alone
    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    q = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=dev)
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, device=dev)
    s_x = torch.rand(m, device=dev) + 1
    cs = torch.rand(n, device=dev)
    row["gemm_bf16_ms"] = bench(lambda: a @ w.T)
    row["gemm_int8_triton_ms"] = bench(lambda: int8_matmul(q, s_x, codes, cs))
    row["gemm_int8_torch_ms"] = bench(lambda: int8_matmul(q, s_x, codes, cs, impl="torch"))
    row["gemm_bf16_tflops"] = flops / row["gemm_bf16_ms"] / 1e9
    row["gemm_int8_triton_tops"] = flops / row["gemm_int8_triton_ms"] / 1e9
    row["gemm_int8_torch_tops"] = flops / row["gemm_int8_torch_ms"] / 1e9
    ones = torch.ones(k, device=dev)
    row["norm_quant_ms"] = bench(lambda: rmsnorm_quant(x.detach(), ones, 1e-5))
    row["norm_quant_gbps"] = (m * k * (4 + 1) + 8 * m) / row["norm_quant_ms"] / 1e6
    # units, forward + backward
    for name, linear, compiled in [("linear_bf16", nn.Linear, True),
                                   ("ref_eager", BitLinear, False),
                                   ("ref_compiled", BitLinear, True)]:
        unit = Unit(k, ns, linear).to(dev)
        fwd = torch.compile(unit) if compiled else unit

        def step(fwd=fwd):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = fwd(x)
            y.backward(g)

        row[f"{name}_ms"] = bench(step)
    unit = Unit(k, ns, BitLinear).to(dev)
    weights = [pr.weight for pr in unit.projs]
    codes_c, scale_c = ternary_codes_ref(weights)

    def fused_step():
        y = norm_ternary_linear(x, unit.norm.weight, weights, codes_c, scale_c, 1e-5)
        y.backward(g)

    row["fused_ms"] = bench(fused_step)
    bytes_moved = m * k * (4 + 4) + m * n * 2 * 2 + n * k * 4 * 3  # x, dx, y, dy, W/dW
    row["floor_bf16_ms"] = 1e3 * max(3 * flops / (args.peak_tflops * 1e12),
                                     bytes_moved / (args.hbm_tbps * 1e12))
    row["floor_fused_ms"] = 1e3 * max(flops / (args.int8_peak_tops * 1e12)
                                      + 2 * flops / (args.peak_tflops * 1e12),
                                      bytes_moved / (args.hbm_tbps * 1e12))
    for key in ("linear_bf16", "ref_eager", "ref_compiled", "fused"):
        row[f"{key}_vs_linear"] = row[f"{key}_ms"] / row["linear_bf16_ms"]
    row["fused_vs_floor"] = row["fused_ms"] / row["floor_fused_ms"]
    row["linear_vs_floor"] = row["linear_bf16_ms"] / row["floor_bf16_ms"]
    return {k_: round(v, 4) if isinstance(v, float) else v for k_, v in row.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak")
    p.add_argument("--int8-peak-tops", type=float, default=1979.0, help="int8 dense peak")
    p.add_argument("--hbm-tbps", type=float, default=4.8, help="H200 HBM3e bandwidth")
    args = p.parse_args()
    m = args.tokens
    rows = []
    for group, (k, ns) in GROUPS.items():
        rows.append(bench_group(group, k, ns, m, args))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nM={m} tokens; fwd+bwd ms (x nn.Linear bf16) | forward product alone")
    print(f"{'group':8s} {'floor':>6s} {'bf16':>6s} {'ref':>13s} {'ref comp':>13s} "
          f"{'fused':>13s} | {'bf16 TF/s':>9s} {'int8 tri':>9s} {'int8 mm':>8s}")
    for r in rows:
        print(f"{r['group']:8s} {r['floor_fused_ms']:6.2f} {r['linear_bf16_ms']:6.2f} "
              f"{r['ref_eager_ms']:6.2f} ({r['ref_eager_vs_linear']:.2f}x) "
              f"{r['ref_compiled_ms']:6.2f} ({r['ref_compiled_vs_linear']:.2f}x) "
              f"{r['fused_ms']:6.2f} ({r['fused_vs_linear']:.2f}x) | "
              f"{r['gemm_bf16_tflops']:9.0f} {r['gemm_int8_triton_tops']:9.0f} "
              f"{r['gemm_int8_torch_tops']:8.0f}")
    out = os.environ.get("OUT")
    if out:
        Path(out, "bench_bitlinear.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
            indent=2))


if __name__ == "__main__":
    main()
