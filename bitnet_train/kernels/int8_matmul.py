"""W1.58A8 matrix product on int8 tensor cores, both scales applied in the epilogue (Triton).

    y[m, n] = (sum_k q[m, k] * codes[n, k]) * col_scale[n] / s_x[m]

q are the per-token int8 activation codes, codes the ternary weight codes (int8 in {-1, 0, 1});
the sum accumulates exactly in int32, which is the arithmetic the deployed W1.58A8 kernels do
(Microsoft's GPU kernel, bitnet.cpp), so training computes what inference computes. On Hopper
the int8 tensor-core rate is twice the bf16 rate, which pays for the quantizers.

`int8_matmul(..., impl="torch")` is the same product through `torch._int_mm` (cuBLASLt int8,
int32 output) and a separate scaling pass, kept as a second implementation for the benchmark.
`dequantize_rows` turns saved int8 codes back into the bf16 activation the weight gradient needs.
Reference: `kernels.reference.int8_matmul_ref`, `dequantize_rows_ref`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from bitnet_train.kernels.rounding import round_to_bf16

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs() -> list[triton.Config]:
    if _INTERPRET:  # the CPU interpreter runs one small tile shape, no tuning
        return [triton.Config({"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 4}, num_warps=4)]
    cfg = []
    # Hopper (sm_90): 128 x 256 x 128 tiles over 3 stages use 144 KiB of shared memory.
    for bm, bn, bk, stages, warps, group in [
        (128, 256, 128, 3, 8, 8), (256, 128, 128, 3, 8, 8), (128, 128, 128, 4, 4, 8),
        (128, 128, 128, 4, 8, 8), (128, 256, 64, 4, 8, 8), (64, 128, 128, 4, 4, 8),
        (128, 256, 128, 4, 8, 16), (256, 128, 128, 4, 8, 16), (128, 128, 256, 3, 8, 8),
        (256, 256, 64, 3, 8, 8), (128, 256, 128, 3, 4, 8),
    ]:
        cfg.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": group},
                                 num_stages=stages, num_warps=warps))
    return cfg


@triton.autotune(configs=_configs(), key=["M", "N", "K"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BK"] == 0})
@triton.jit
def _int8_matmul_kernel(
    A, B, C, SX, CS,
    M, N,
    stride_am, stride_bn, stride_cm,
    K: tl.constexpr, OUT_BF16: tl.constexpr, EVEN_K: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C (M, N) = (A (M, K) int8 @ B (N, K)^T int8, int32 accumulate) * CS[n] / SX[m].
    A and B are K-contiguous (the layout int8 tensor cores take for both operands). K is a
    compile-time constant (a model has two: hidden and FFN width), so the loop bound is static
    and, when BK divides K, the loads carry no K mask."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    # grouped launch order: GROUP_M row-tiles share each column-tile while it sits in L2
    width = GROUP_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    # out-of-range rows / columns load real (wrapped) data and are never stored
    rma = tl.max_contiguous(tl.multiple_of(rm % M, BM), BM)
    rnb = tl.max_contiguous(tl.multiple_of(rn % N, BN), BN)
    a_ptrs = A + rma[:, None].to(tl.int64) * stride_am + rk[None, :]
    b_ptrs = B + rnb[None, :].to(tl.int64) * stride_bn + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BK)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=rk[None, :] < K - k * BK, other=0)
            b = tl.load(b_ptrs, mask=rk[:, None] < K - k * BK, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BK
        b_ptrs += BK
    inv_sx = 1.0 / tl.load(SX + rm, mask=rm < M, other=1.0)
    cs = tl.load(CS + rn, mask=rn < N, other=0.0)
    out = acc.to(tl.float32) * inv_sx[:, None] * cs[None, :]
    if OUT_BF16:
        out = round_to_bf16(out)
    c_ptrs = C + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    tl.store(c_ptrs, out.to(C.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _dequantize_rows_kernel(Q, SX, OUT, stride_q, stride_o, K,
                            OUT_BF16: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT[m, :] = (Q[m, :] / SX[m]) in fp32, cast to OUT's dtype."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = cols < K
    q = tl.load(Q + row * stride_q + cols, mask=mask, other=0).to(tl.float32)
    s = tl.load(SX + row)
    out = tl.math.div_rn(q, s)
    if OUT_BF16:
        out = round_to_bf16(out)
    tl.store(OUT + row * stride_o + cols, out.to(OUT.dtype.element_ty), mask=mask)


def int8_matmul(q: Tensor, s_x: Tensor, codes: Tensor, col_scale: Tensor,
                out_dtype: torch.dtype = torch.bfloat16, impl: str = "triton") -> Tensor:
    """q (M, K) int8, s_x (M,) fp32, codes (N, K) int8, col_scale (N,) fp32 -> (M, N) out_dtype.

    impl "triton": one kernel, scales in the epilogue. impl "torch": `torch._int_mm` (CUDA,
    needs M > 16 and K, N multiples of 8) then the scaling as separate elementwise ops.
    """
    m, k = q.shape
    n = codes.shape[0]
    if codes.shape[1] != k:
        raise ValueError(f"activation codes (M={m}, K={k}) and weight codes {tuple(codes.shape)} "
                         "disagree on K")
    if impl == "torch":
        acc = torch._int_mm(q, codes.t())  # (M, N) int32; codes.t() is the column-major operand
        return (acc.float() * (col_scale[None, :] / s_x[:, None])).to(out_dtype)
    if impl != "triton":
        raise ValueError(f"int8_matmul impl={impl!r}; choose triton or torch")
    q = q if q.stride(-1) == 1 else q.contiguous()
    codes = codes if codes.stride(-1) == 1 else codes.contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=q.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

    _int8_matmul_kernel[grid](q, codes, out, s_x, col_scale, m, n,
                              q.stride(0), codes.stride(0), out.stride(0),
                              K=k, OUT_BF16=out_dtype == torch.bfloat16)
    return out


def dequantize_rows(q: Tensor, s_x: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """q (M, K) int8, s_x (M,) -> (M, K) q / s_x in `dtype` (see `dequantize_rows_ref`)."""
    m, k = q.shape
    out = torch.empty((m, k), dtype=dtype, device=q.device)
    block = min(4096, triton.next_power_of_2(k))
    _dequantize_rows_kernel[(m, triton.cdiv(k, block))](q, s_x, out, q.stride(0), out.stride(0),
                                                        k, OUT_BF16=dtype == torch.bfloat16,
                                                        BLOCK_K=block)
    return out
