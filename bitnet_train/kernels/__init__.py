"""Fused Triton kernels for ternary training, each beside its PyTorch reference (reference.py).

Four layers, as in Liger Kernel: `@triton.jit` kernels and their launchers (norm_quant.py,
int8_matmul.py), the differentiable op (ternary_linear.py: torch.library custom ops with a
registered backward), and the module swap (modules.py: `apply_kernels`). `resolve_kernels`
decides whether a run uses them.
"""

from __future__ import annotations

import importlib.util
import os

import torch

KERNEL_MODES = ("auto", "triton", "reference")


def resolve_kernels(mode: str, device: torch.device) -> str:
    """"auto" | "triton" | "reference" -> "triton" or "reference" for a model on `device`.

    auto: the Triton kernels on CUDA, the reference model elsewhere. triton: required; on the
    CPU only under Triton's interpreter (TRITON_INTERPRET=1, what the CPU tests use).
    """
    if mode not in KERNEL_MODES:
        raise ValueError(f"trainer.kernels={mode!r}; choose one of {KERNEL_MODES}")
    if mode == "reference":
        return "reference"
    has_triton = importlib.util.find_spec("triton") is not None
    runnable = has_triton and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    if mode == "auto":
        return "triton" if has_triton and device.type == "cuda" else "reference"
    if not runnable:
        raise ValueError(
            f"trainer.kernels=triton needs triton and a CUDA device (found {device.type}"
            f"{'' if has_triton else ', triton not installed'}); use trainer.kernels=auto or "
            "reference, or TRITON_INTERPRET=1 to run the kernels (slowly) on the CPU")
    return "triton"
