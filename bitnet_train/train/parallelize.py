"""Speed-ups and sharding applied to a plain model, each an `apply_*` function doing one job.

The model knows nothing of them (torchtitan's split): `parallelize` applies them in a fixed
order after the model is built. Every one is held equal to the eager reference, loss and every
gradient, by the tests (tests/train/test_fast_paths_gpu.py, tests/train/test_fsdp*.py).

    apply_kernels   decoder layers on the fused Triton kernels (RMSNorm + int8 quantization,
                    int8 tensor-core products, ternary codes once per optimizer step)
    apply_attention the attention backend: FlexAttention (block-sparse document-causal mask)
                    or SDPA with a dense mask (the reference)
    apply_ac        activation checkpointing per decoder block (full or selective)
    apply_compile   torch.compile per decoder block (and the final norm)
    apply_fsdp      FSDP2: fully_shard per decoder block, then on the root

Order: checkpointing wraps the block's forward before compile traces it (compile then sees
the checkpoint and its policy), and sharding comes last so that FSDP's hooks surround the
compiled, checkpointed block (torchtitan's order). A model to be sharded is built on the meta
device and initialised after `apply_fsdp` (bitnet_train.train.sharding).
"""

from __future__ import annotations

import functools
import logging
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from bitnet_train.kernels import resolve_kernels
from bitnet_train.model import BitNetForCausalLM
from bitnet_train.model.attention import make_attention
from bitnet_train.train.config import AC_MODES

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


# -- activation checkpointing ---------------------------------------------------------------

def _saved_ops() -> set[Any]:
    """Ops whose outputs selective checkpointing keeps: the matrix products and attention
    (expensive to recompute, one output each); everything else in a block is elementwise or a
    reduction over the last dim, cheap to recompute and as large as its input to keep."""
    aten = torch.ops.aten
    ops: set[Any] = {aten.mm.default, aten.addmm.default, aten.bmm.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_flash_attention_for_cpu"):
        if hasattr(aten, name):
            ops.add(getattr(aten, name).default)
    ops.add(torch.ops.higher_order.flex_attention)
    try:  # the fused norm + ternary product, when bitnet_train.kernels is loaded
        ops.add(torch.ops.bitnet_train.norm_ternary_linear.default)
    except (AttributeError, RuntimeError):
        pass
    return ops


def _selective_policy(saved: set[Any]):
    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE
    return policy


def _checkpointed(forward, mode: str):
    """`forward(self, ...)` (a class's) under non-reentrant activation checkpointing."""
    kwargs: dict[str, Any] = {}
    if mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts,
                                                 _selective_policy(_saved_ops()))

    @functools.wraps(forward)
    def run(self, *args, **kw):
        # no dropout in the model: nothing random to replay, so no RNG state to keep
        return checkpoint(forward, self, *args, use_reentrant=False, preserve_rng_state=False,
                          **kwargs, **kw)

    run._ac_mode = mode  # type: ignore[attr-defined]
    return run


def apply_ac(model: BitNetForCausalLM, mode: str) -> None:
    """Checkpoint every decoder block's forward, in place ("none" | "full" | "selective").

    full: keep each block's input only and recompute the whole block in backward (the least
    memory: one (B, L, hidden) tensor per block). selective: keep the outputs of the matrix
    products and attention, recompute the elementwise work (quantizers, norms, RoPE, relu^2).
    The block's bound `forward` is wrapped rather than the block itself (torchtitan's
    checkpoint_wrapper), so parameter names keep transformers' layout, which our checkpoints
    and exporters are written in. FSDP's hooks stay on the block: in backward its pre-backward
    all-gather runs before the recomputation needs the weights.
    """
    if mode not in AC_MODES:
        raise ValueError(f"trainer.activation_checkpointing={mode!r}; choose one of {AC_MODES}")
    if mode == "none":
        return
    for layer in model.model.layers:
        if getattr(layer.forward, "_ac_mode", None):
            continue  # already checkpointed
        # a method bound to the layer (not a closure over it): a deep copy of the model binds
        # the copy's layers
        layer.forward = types.MethodType(_checkpointed(type(layer).forward, mode), layer)
    log.info("activation checkpointing (%s) on %d decoder blocks", mode, len(model.model.layers))


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


# -- FSDP2 ----------------------------------------------------------------------------------

@dataclass
class FSDPSettings:
    """What `apply_fsdp` needs (from the `parallel` config section and the process group)."""

    mesh: Any
    """A 1-D DeviceMesh over the data-parallel processes."""
    param_dtype: torch.dtype = torch.float32
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    ternary_all_gather: bool = False


def apply_fsdp(model: BitNetForCausalLM, settings: FSDPSettings) -> None:
    """fully_shard every decoder block, then the root (embeddings, final norm, lm_head), in place.

    Parameters become DTensor shards (dim 0) of the fp32 master weights; each block's are
    all-gathered before its forward (and again before its backward when resharded), gradients
    reduce-scattered in fp32 after its backward. The root is not resharded after forward (its
    weights are needed again at once by the loss's backward), nor is the last block. With
    `ternary_all_gather`, BitLinear weights are gathered as 2-bit codes (ternary_all_gather.py).
    """
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    if settings.ternary_all_gather:
        from bitnet_train.train.ternary_all_gather import apply_ternary_all_gather

        apply_ternary_all_gather(model)
    mp = MixedPrecisionPolicy(
        param_dtype=None if settings.param_dtype == torch.float32 else settings.param_dtype,
        reduce_dtype=torch.float32)
    common = dict(mesh=settings.mesh, mp_policy=mp,
                  offload_policy=CPUOffloadPolicy() if settings.cpu_offload else OffloadPolicy())
    layers = list(model.model.layers)
    for i, layer in enumerate(layers):
        fully_shard(layer, reshard_after_forward=settings.reshard_after_forward
                    and i < len(layers) - 1, **common)
    fully_shard(model, **common)  # root: reshard_after_forward left to FSDP (not after forward)
    log.info("FSDP2 over %d processes: %d blocks + root, params %s, reduce float32%s%s",
             settings.mesh.size(), len(layers), settings.param_dtype,
             ", CPU offload" if settings.cpu_offload else "",
             ", ternary all-gather" if settings.ternary_all_gather else "")


def is_fsdp(model: nn.Module) -> bool:
    """Whether `model` (the root) is sharded by FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def parallelize(model: BitNetForCausalLM, device: torch.device, kernels: str = "auto",
                attention: str = "auto", compile: bool = False,
                activation_checkpointing: str = "none",
                fsdp: FSDPSettings | None = None) -> dict[str, str | bool]:
    """Apply, in this order, kernels -> attention -> AC -> compile -> FSDP; returns what was
    applied.

    `compile` is ignored on the CPU, where compiling costs more than it saves at the sizes
    trained there. `fsdp`: None leaves the model whole (one process, or DDP by accelerate).
    """
    applied: dict[str, str | bool] = {}
    kernel_mode = resolve_kernels(kernels, device)
    applied["kernels"] = "triton" if kernel_mode == "triton" and apply_kernels(model) \
        else "reference"
    applied["attention"] = resolve_attention(attention, device)
    apply_attention(model, applied["attention"])
    apply_ac(model, activation_checkpointing)
    applied["activation_checkpointing"] = activation_checkpointing
    applied["compile"] = bool(compile and device.type == "cuda")
    if applied["compile"]:
        apply_compile(model)
    elif compile:
        log.debug("trainer.compile ignored on %s", device.type)
    applied["fsdp"] = fsdp is not None
    if fsdp is not None:
        apply_fsdp(model, fsdp)
        applied["ternary_all_gather"] = fsdp.ternary_all_gather
    return applied
