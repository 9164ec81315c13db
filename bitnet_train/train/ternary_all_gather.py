"""Ternary all-gather: FSDP2 gathers each BitLinear weight as 2-bit codes, not float weights.

The forward and the input gradient of a BitLinear need only its ternary codes and one scale,
so each rank quantizes its own fp32 shard with the whole tensor's scale and FSDP2 all-gathers
the codes, four to a byte (a sixteenth of fp32's bytes, an eighth of bf16's), through its
all-gather extension hooks (`fsdp_pre_all_gather` / `fsdp_post_all_gather` on the shard's
tensor subclass, as torchao's float8 and BitNet recipes do):

    once per optimizer step (before the next forward), for every ternary weight at once:
      scale a = max(mean |W|, 1e-5) over the WHOLE weight: one all-reduce of the shards'
              partial sums of |W|
      codes   T_shard = clamp(round(W_shard * (1/a)), -1, 1), packed 2 bits per code and kept
              until the next step (every micro-batch's forward and backward gathers reuse them)
      m = mean |T| over the whole weight: one all-reduce of the shards' nonzero counts
    pre:      the kept packed codes (no work)
    post:     W' = T * (a / m) in one table lookup per byte of codes (4 values per byte)

W' is the ternary weight in the one form the BitLinear quantizer maps back onto itself:
mean |W'| = a, so round(W' / a) = T / m rounds to T (|T / m| >= 1 where T != 0) and the layer
computes T * a, the codes of the fp32 master weights with their scale, up to the rounding of
a / m (fp32: ~1e-7 relative; bf16 with parallel.param_dtype=bfloat16). The model, the fused
kernels and the straight-through gradient (reduce-scattered as usual) are untouched.

Codes are packed when every rank's shard has the same shape (rows divisible by the number of
processes) and cols by 4; otherwise FSDP2 requires the padded shard's shape, and the codes go
as one int8 each (a quarter of fp32's bytes).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import Tensor, nn

from bitnet_train.model.bitlinear import WEIGHT_EPS, BitLinear

log = logging.getLogger(__name__)
aten = torch.ops.aten

# ops whose result is the same master weight (a view, a copy, a new buffer of its kind): the
# result stays a TernaryShard sharing the scale; every other op computes with the plain data
_KEEP = {
    aten.detach.default, aten.alias.default, aten.view.default, aten._unsafe_view.default,
    aten.as_strided.default, aten.slice.Tensor, aten.narrow.default, aten.split.Tensor,
    aten.split_with_sizes.default, aten.t.default, aten.clone.default, aten.empty_like.default,
    aten.new_zeros.default, aten.new_empty.default, aten._to_copy.default,
    aten._pin_memory.default,
}


def pack_ternary(codes: Tensor) -> Tensor:
    """(rows, cols) int8 in {-1, 0, 1}, cols % 4 == 0 -> (rows, cols / 4) uint8: code + 1 in
    two bits, the first code in the low bits."""
    q = (codes.to(torch.int16) + 1).to(torch.uint8).view(codes.shape[0], -1, 4)
    return q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)


def unpack_ternary(packed: Tensor) -> Tensor:
    """Inverse of `pack_ternary`: (rows, cols / 4) uint8 -> (rows, cols) int8."""
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=packed.device)
    q = (packed.unsqueeze(-1) >> shifts) & 3  # (rows, cols / 4, 4)
    return (q.to(torch.int8) - 1).reshape(packed.shape[0], -1)


def ternarize(weight: Tensor, scale: Tensor) -> Tensor:
    """clamp(round(W * (1 / a)), -1, 1) as int8: the reference's operations, `a` given."""
    return (weight.float() * (1.0 / scale)).round().clamp(-1, 1).to(torch.int8)


class _ScaleBox:
    """What `refresh_scales` computes once per step for one master weight, shared by every
    view FSDP2 makes of its shard: the whole tensor's absmean, this shard's codes (packed, or
    int8 padded to FSDP2's shard shape) and the gathered weight's value per code, a / m."""

    scale: Tensor | None = None
    codes: Tensor | None = None
    packed: bool = False
    step: Tensor | None = None
    table: Tensor | None = None  # byte_codes(device), built once


class TernaryShard(Tensor):
    """An fp32 master weight (or its shard) that FSDP2 all-gathers as ternary codes.

    A wrapper subclass around `_data`: every op but views and copies runs on `_data` and
    returns plain tensors (AdamW's updates land in `_data`; its states stay plain)."""

    _data: Tensor
    _box: _ScaleBox

    @staticmethod
    def __new__(cls, data: Tensor, box: _ScaleBox | None = None):
        return Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(),
                                             dtype=data.dtype, device=data.device,
                                             requires_grad=data.requires_grad)

    def __init__(self, data: Tensor, box: _ScaleBox | None = None) -> None:
        self._data = data
        self._box = box if box is not None else _ScaleBox()

    def __repr__(self) -> str:
        return f"TernaryShard({self._data!r})"

    def __tensor_flatten__(self):
        return ["_data"], self._box

    @classmethod
    def __tensor_unflatten__(cls, inner: dict[str, Tensor], box: _ScaleBox, outer_size,
                             outer_stride):
        return cls(inner["_data"], box)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        box = next(x._box for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, cls))
        out = func(*pytree.tree_map_only(cls, lambda x: x._data, args),
                   **pytree.tree_map_only(cls, lambda x: x._data, kwargs))
        if func._schema.is_mutable:  # in place (copy_, add_, _foreach_*_): the wrapper itself
            return args[0] if func._schema.returns else None
        if func in _KEEP:
            return pytree.tree_map_only(Tensor, lambda t: cls(t, box), out)
        return out

    # -- FSDP2 all-gather extension ---------------------------------------------------------
    @torch.no_grad()
    def fsdp_pre_all_gather(self, mesh, outer_size: torch.Size, outer_stride, module: nn.Module,
                            mp_policy) -> tuple[tuple[Tensor, ...], Any]:
        """This rank's codes of the step (computed by `refresh_scales`)."""
        box = self._box
        if box.codes is None:
            raise RuntimeError("ternary all-gather: the weight codes were not computed; "
                               "refresh_scales(model) must run before the forward")
        rows, cols = outer_size
        device = self._data.device  # with CPU offload, FSDP2's device copy of the CPU shard
        return ((box.codes.to(device, non_blocking=True),),
                (box.step.to(device, non_blocking=True), rows, cols, box.packed))

    @torch.no_grad()
    def fsdp_post_all_gather(self, all_gather_outputs: tuple[Tensor, ...], metadata: Any,
                             param_dtype: torch.dtype, *, out: Tensor | None = None):
        """Gathered codes -> the whole weight W' = T * (a / mean |T|) in `param_dtype`."""
        (gathered,) = all_gather_outputs
        step, rows, cols, packed = metadata
        if packed:  # one lookup per byte: its four values, already times a / m
            box = self._box
            if box.table is None or box.table.device != gathered.device:
                box.table = byte_codes(gathered.device)
            table = (box.table * step).to(param_dtype)
            index = gathered.reshape(-1).to(torch.int32)
            if out is not None:  # later gathers: into the storage FSDP2 re-allocated
                torch.index_select(table, 0, index, out=out.view(-1, 4))
                return None
            value = torch.index_select(table, 0, index).view(rows, cols)
            return value, (value,)
        value = (gathered[:rows].float() * step).to(param_dtype)
        if out is not None:
            out.copy_(value)
            return None
        return value, (value,)


def byte_codes(device: torch.device) -> Tensor:
    """(256, 4) fp32: byte b of packed codes -> its four codes, in pack_ternary's order. Built
    on `device` by arange (a host-to-device copy would stall the stream at every gather)."""
    shifts = torch.arange(0, 8, 2, dtype=torch.int32, device=device)
    return ((torch.arange(256, dtype=torch.int32, device=device)[:, None] >> shifts) & 3
            ).float() - 1.0


def apply_ternary_all_gather(model: nn.Module) -> int:
    """Make every BitLinear weight a TernaryShard (before fully_shard); returns how many. The
    model's root gets the hook that computes the scales before a forward when stale."""
    count = 0
    for module in model.modules():
        if isinstance(module, BitLinear) and not isinstance(module.weight, TernaryShard):
            w = module.weight
            module.weight = nn.Parameter(TernaryShard(w.detach()), requires_grad=w.requires_grad)
            count += 1
    if count and not hasattr(model, "_ternary_scales_stale"):
        model._ternary_scales_stale = True
        model.register_forward_pre_hook(_refresh_hook, prepend=True)
    log.info("ternary all-gather for %d BitLinear weights", count)
    return count


def _shards(model: nn.Module) -> list[Tensor]:
    from torch.distributed.tensor import DTensor

    return [p for p in model.parameters()
            if isinstance(p, DTensor) and isinstance(p._local_tensor, TernaryShard)]


@torch.no_grad()
def refresh_scales(model: nn.Module) -> None:
    """Every ternary weight's step state (see module doc): its scale max(mean |W|, 1e-5) over
    the whole tensor from the shards' partial sums of |W| in fp32 (ONE all-reduce for all
    layers), this shard's codes, and a / m from the shards' nonzero counts (one more)."""
    params = _shards(model)
    if params:
        group = params[0].device_mesh.get_group()
        world = params[0].device_mesh.size()
        local = torch.stack([p._local_tensor._data.float().abs().sum() for p in params])
        dist.all_reduce(local, group=group)
        numel = getattr(model, "_ternary_numel", None)
        if numel is None or numel.device != local.device:  # built once: a copy syncs the host
            numel = torch.tensor([float(p.numel()) for p in params], device=local.device)
            model._ternary_numel = numel
        scales = (local / numel).clamp(min=WEIGHT_EPS)
        nonzero = []
        for p, a in zip(params, scales):
            box = p._local_tensor._box
            rows, cols = p.shape
            codes = ternarize(p._local_tensor._data, a)
            nonzero.append(torch.count_nonzero(codes))
            box.scale, box.packed = a, rows % world == 0 and cols % 4 == 0
            padded_rows = -(-rows // world)
            if box.packed:
                box.codes = pack_ternary(codes)
            elif codes.shape[0] != padded_rows:  # FSDP2 gathers the padded shard's shape
                box.codes = torch.cat([codes, codes.new_zeros(padded_rows - codes.shape[0],
                                                              cols)])
            else:
                box.codes = codes
        counts = torch.stack(nonzero).float()
        dist.all_reduce(counts, group=group)
        # W' = T * a / m, m = nonzero / numel; all codes 0: W' = 0
        steps = torch.where(counts > 0, scales * numel / counts.clamp(min=1.0),
                            torch.zeros_like(scales))
        for p, step in zip(params, steps):
            p._local_tensor._box.step = step
    model._ternary_scales_stale = False


def _refresh_hook(model: nn.Module, args: Any) -> None:
    if model._ternary_scales_stale:
        refresh_scales(model)


def mark_scales_stale(model: nn.Module) -> None:
    """Make the next forward recompute the scales (after the weights changed)."""
    if hasattr(model, "_ternary_scales_stale"):
        model._ternary_scales_stale = True


def watch_optimizer_scales(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """After every optimizer step, the scales are recomputed before the next forward."""
    optimizer.register_step_post_hook(lambda *_: mark_scales_stale(model))


def plain_dtensor(param: Tensor) -> Tensor:
    """A DTensor whose shard is a TernaryShard, as a plain DTensor over the same storage (for
    checkpoints and gathers); anything else unchanged."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor) and isinstance(param._local_tensor, TernaryShard):
        return DTensor.from_local(param._local_tensor._data, param.device_mesh, param.placements,
                                  shape=param.shape, stride=param.stride(), run_check=False)
    return param
