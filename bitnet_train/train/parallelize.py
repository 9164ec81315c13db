"""Speed-ups applied to a plain model, each an `apply_*` function doing one job.

The model knows nothing of them (torchtitan's split): `parallelize` applies them in a fixed
order after the model is built. Every one is held equal to the eager reference, loss and every
gradient, by the GPU tests (tests/train/test_fast_paths_gpu.py).

    apply_kernels   decoder layers on the fused Triton kernels (RMSNorm + int8 quantization,
                    int8 tensor-core products, ternary codes once per optimizer step)
    apply_attention the attention backend: FlexAttention (block-sparse document-causal mask)
                    or SDPA with a dense mask (the reference)
    apply_compile   torch.compile per decoder block (and the final norm)
"""

from __future__ import annotations

import logging

import torch

from bitnet_train.kernels import resolve_kernels
from bitnet_train.model import BitNetForCausalLM
from bitnet_train.model.attention import make_attention

log = logging.getLogger(__name__)

ATTENTION_MODES = ("auto", "sdpa", "flex")


def resolve_attention(mode: str, device: torch.device) -> str:
    """"auto" | "sdpa" | "flex" -> "sdpa" or "flex"; auto: flex on CUDA, sdpa on the CPU."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"trainer.attention={mode!r}; choose one of {ATTENTION_MODES}")
    if mode == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if mode == "flex" and device.type != "cuda":
        raise ValueError(
            f"trainer.attention=flex needs CUDA: FlexAttention has no backward on {device.type}; "
            "use trainer.attention=auto or sdpa")
    return mode


def apply_attention(model: BitNetForCausalLM, name: str) -> None:
    """Set the attention backend ("sdpa" | "flex") of every layer."""
    model.model.attention = make_attention(name)
    log.debug("attention backend: %s", name)


def apply_kernels(model: BitNetForCausalLM) -> bool:
    """Decoder layers on the fused Triton kernels (see bitnet_train.kernels.modules)."""
    from bitnet_train.kernels.modules import apply_kernels as _apply

    return _apply(model)


def apply_compile(model: BitNetForCausalLM, backend: str = "inductor") -> None:
    """torch.compile each decoder block and the final norm, in place.

    Block by block (as torchtitan does) keeps compile time flat in depth; Inductor fuses what
    the kernels leave around them (RoPE, the activation, residual adds) and, on the reference
    path, the quantizers themselves.
    """
    for block in model.model.layers:
        block.compile(backend=backend)
    model.model.norm.compile(backend=backend)
    log.debug("compiled %d decoder blocks (%s)", len(model.model.layers), backend)


def parallelize(model: BitNetForCausalLM, device: torch.device, kernels: str = "auto",
                attention: str = "auto", compile: bool = False) -> dict[str, str | bool]:
    """Apply, in this order, kernels -> attention -> compile; returns what was applied.

    Compile comes last so it traces the final modules. `compile` is ignored on the CPU, where
    compiling costs more than it saves at the sizes trained there.
    """
    applied: dict[str, str | bool] = {}
    kernel_mode = resolve_kernels(kernels, device)
    applied["kernels"] = "triton" if kernel_mode == "triton" and apply_kernels(model) \
        else "reference"
    applied["attention"] = resolve_attention(attention, device)
    apply_attention(model, applied["attention"])
    applied["compile"] = bool(compile and device.type == "cuda")
    if applied["compile"]:
        apply_compile(model)
    elif compile:
        log.debug("trainer.compile ignored on %s", device.type)
    return applied
