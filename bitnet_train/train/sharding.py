"""FSDP2 around `parallelize.apply_fsdp`: which strategy a launch uses, the device mesh, a
model built on the meta device and initialised shard by shard, and the model gathered whole.

    resolve_strategy(parallel, accelerator)   "ddp" | "fsdp2", checked against accelerate's launch
    build_mesh(device)                        1-D DeviceMesh over the processes
    build_meta_model(section)                 the model on the meta device (+ weights to load)
    init_sharded(model, device, seed, state)  allocate this rank's shards and fill them
    gather_full_model(model)                  rank 0: a plain CPU copy of the whole model

Initialisation after sharding gives exactly the weights of today's eager build for the same
seed: `BitNetForCausalLM.init_weights` draws every tensor whole, in module order, from one CPU
generator, and each rank keeps its own shard of every draw.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from bitnet_train.errors import ConfigError
from bitnet_train.model import BitNetConfig, BitNetForCausalLM
from bitnet_train.model.modeling import RotaryEmbedding

log = logging.getLogger(__name__)


def resolve_strategy(strategy: str, accelerator: Any, cpu_offload: bool = False) -> str:
    """`parallel.strategy` ("auto" | "ddp" | "fsdp2") -> "ddp" or "fsdp2" for this launch.

    bitnet-train applies FSDP2 itself (per block, meta init, sharded checkpoints); accelerate's
    FSDP launch (bitnet_train/configs/accelerate/fsdp2.yaml) only selects it. Settings of
    accelerate's FSDP plugin that we would otherwise silently ignore are refused with the key
    to use instead.
    """
    from accelerate.utils import DistributedType

    launched_fsdp = accelerator.distributed_type == DistributedType.FSDP
    if launched_fsdp:
        plugin = accelerator.state.fsdp_plugin
        if plugin.fsdp_version != 2:
            raise ConfigError(
                f"accelerate was launched with FSDP version {plugin.fsdp_version}; bitnet-train "
                "shards with FSDP2: launch with bitnet_train/configs/accelerate/fsdp2.yaml "
                "(fsdp_version: 2)")
        if strategy == "ddp":
            raise ConfigError(
                "parallel.strategy=ddp, but accelerate was launched with FSDP: use "
                "bitnet_train/configs/accelerate/ddp.yaml, or parallel.strategy=fsdp2 (or auto)")
        if plugin.activation_checkpointing:
            raise ConfigError(
                "accelerate's fsdp_activation_checkpointing is not used by bitnet-train: set it "
                "to false and use trainer.activation_checkpointing=full (or selective)")
        from torch.distributed.fsdp import CPUOffloadPolicy

        if isinstance(plugin.cpu_offload, CPUOffloadPolicy) and not cpu_offload:
            raise ConfigError(
                "accelerate's fsdp_offload_params is true but parallel.cpu_offload=false; "
                "bitnet-train reads parallel.cpu_offload: set it to true (or the accelerate key "
                "to false)")
        return "fsdp2"
    return "ddp" if strategy == "auto" else strategy


def maybe_init_cpu_collectives(cpu_offload: bool) -> None:
    """CPU offload on GPUs needs collectives on CPU tensors too (the gradient norm of offloaded
    shards): start the process group as "cuda:nccl,cpu:gloo" (torchtitan's choice) before
    accelerate starts an NCCL-only one. A no-op without offload, a GPU or several processes."""
    import os

    import torch.distributed as dist

    if not (cpu_offload and torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1"))
            > 1 and not dist.is_initialized()):
        return
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="cuda:nccl,cpu:gloo")


def build_mesh(device: torch.device):
    """A 1-D DeviceMesh over every process (the process group accelerate initialised)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise ConfigError("parallel.strategy=fsdp2 over several processes needs a process "
                          "group: launch with accelerate launch or torchrun")
    return init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))


def build_meta_model(config: BitNetConfig, init: str | None = None
                     ) -> tuple[BitNetForCausalLM, dict[str, Tensor] | None]:
    """The model on the meta device (no memory, no initialisation), and the whole CPU weights
    of `init` (a model directory) to load into its shards, or None for a seeded random init."""
    state = None
    if init:
        from bitnet_train.io import load_model

        loaded, _ = load_model(init)
        state = {k: v.detach() for k, v in loaded.state_dict().items()}
        config = loaded.config
    with torch.device("meta"):
        model = BitNetForCausalLM(config)
    return model, state


def write_shard(param: Tensor, value: Tensor) -> None:
    """Store the whole tensor `value` into `param`: its own shard if `param` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds `value` and cuts its own shard, no communication
        value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                  src_data_rank=None).to_local()
        param.to_local().copy_(value)
    else:
        param.copy_(value)


@torch.no_grad()
def init_sharded(model: BitNetForCausalLM, device: torch.device, seed: int,
                 state: dict[str, Tensor] | None = None,
                 buffer_device: torch.device | None = None) -> None:
    """Allocate the (sharded) parameters of a meta-built model on `device` and fill them: the
    seeded init, or the whole tensors of `state`. Buffers go to `buffer_device` (default
    `device`; with CPU offload, the GPU), computed ones (RoPE) recomputed there."""
    model.to_empty(device=device)
    if buffer_device is not None and buffer_device != device:
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                module._buffers[name] = buf.to(buffer_device)
    model.tie_weights()
    if state is None:
        model.init_weights(seed, write=write_shard)
    else:
        for name, param in model.named_parameters():
            if name not in state:
                raise ConfigError(f"model.init has no tensor {name!r}; it was saved for another "
                                  "architecture")
            write_shard(param, state[name])
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_parameters()
    from bitnet_train.kernels.modules import mark_ternary_codes_stale

    mark_ternary_codes_stale(model)


def _full(param: Tensor) -> Tensor:
    """The whole value of a (possibly sharded) parameter, on every rank."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param.detach()
    from bitnet_train.train.ternary_all_gather import plain_dtensor

    return plain_dtensor(param).full_tensor()


@torch.no_grad()
def gather_full_model(model: nn.Module, config: BitNetConfig) -> BitNetForCausalLM | None:
    """A plain fp32 CPU copy of the whole model on rank 0 (None elsewhere), one parameter at a
    time: every rank joins each all-gather, only rank 0 keeps the result (peak: one whole
    parameter on the device)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    values = {}
    for name, param in model.named_parameters():
        full = _full(param)
        if rank == 0:
            values[name] = full.to("cpu", copy=True)
        del full
    if rank != 0:
        return None
    with torch.device("meta"):
        plain = BitNetForCausalLM(config)
    plain.to_empty(device="cpu")
    plain.tie_weights()
    params = dict(plain.named_parameters())
    missing = set(params) - set(values)
    if missing:
        raise RuntimeError(f"gathered model lacks {sorted(missing)}")
    for name, value in values.items():
        params[name].copy_(value)
    for module in plain.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_parameters()
    return plain


class AllGatherMeter:
    """Counts what FSDP2 all-gathers: the calls and the bytes each rank receives (the gathered
    buffers). `meter_all_gathers(model)` installs one on every FSDP module of a model; it does
    the same all-gather as FSDP2's default (torch.distributed.all_gather_into_tensor)."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group, async_op=False):
        import torch.distributed as dist

        self.calls += 1
        self.bytes += output_tensor.numel() * output_tensor.element_size()
        return dist.all_gather_into_tensor(output_tensor, input_tensor, group=group,
                                           async_op=async_op)


def meter_all_gathers(model: nn.Module) -> AllGatherMeter:
    """Route every FSDP2 all-gather of `model` through one AllGatherMeter, and return it."""
    from torch.distributed.fsdp import FSDPModule

    meter = AllGatherMeter()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_all_gather(meter)
    return meter
