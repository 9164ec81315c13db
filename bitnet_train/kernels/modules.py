"""The decoder layer on fused kernels, swapped in by `apply_kernels` (Liger's module layer).

`FusedBitNetDecoderLayer` is the reference `BitNetDecoderLayer` with the same parameters and
names (the swap changes the instance's class, nothing else): each RMSNorm and the projections
that read it run as one `norm_ternary_linear` (input_layernorm -> q|k|v, attn_sub_norm -> o,
post_attention_layernorm -> gate|up, ffn_sub_norm -> down); RoPE, the attention backend, the
activation and the residual adds are the reference's own code. Tests hold it equal to the
reference, loss and every gradient.

Ternary codes are computed once per optimizer step, not per micro-batch and call: the layer
keeps them in non-persistent buffers (int8 codes and a per-row scale for each stacked group),
and a forward pre-hook on each fused layer recomputes its stale ones before its forward. A group
is stale when the optimizer stepped (`watch_optimizer` registers a step hook: fused AdamW updates
parameters without bumping their version counters) or when one of its weights changed in place
otherwise (`Tensor._version`: `copy_`, `load_state_dict`). `refresh_ternary_codes(model,
force=True)` recomputes everything, for writes that bypass both (through `.data`).

Under FSDP2 the weights are DTensor shards outside a block's forward; the hook is on the layer
itself and FSDP's all-gather hook runs first (it is prepended), so the codes are computed from
the whole weight (the per-tensor absmean over every element, never a shard's). The gathered
weight is rewritten by every all-gather, so there staleness is the step hook alone (and
`mark_ternary_codes_stale`, which the sharded loaders call).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import Tensor, nn

from bitnet_train.kernels.reference import ternary_codes_ref
from bitnet_train.kernels.ternary_linear import norm_ternary_linear
from bitnet_train.kernels.weight_quant import ternary_codes_into
from bitnet_train.model.attention import AttentionBackend
from bitnet_train.model.kv_cache import LayerKVCache
from bitnet_train.model.modeling import BitNetDecoderLayer, BitNetForCausalLM

log = logging.getLogger(__name__)

GROUPS = {
    # group: (norm, projections reading it), paths relative to the decoder layer
    "qkv": ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "o": ("self_attn.attn_sub_norm", ("self_attn.o_proj",)),
    "gate_up": ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    "down": ("mlp.ffn_sub_norm", ("mlp.down_proj",)),
}


class FusedBitNetDecoderLayer(BitNetDecoderLayer):
    """A BitNetDecoderLayer whose norm + BitLinear pairs run on the fused kernels."""

    def _weights(self, group: str) -> list[Tensor]:
        return [self.get_submodule(p).weight for p in GROUPS[group][1]]

    def _project(self, group: str, x: Tensor) -> Tensor:
        norm = self.get_submodule(GROUPS[group][0])
        return norm_ternary_linear(x, norm.weight, self._weights(group),
                                   getattr(self, f"{group}_codes"),
                                   getattr(self, f"{group}_scale"), norm.eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Any,
                backend: AttentionBackend, cache: LayerKVCache | None = None) -> Tensor:
        attn, mlp = self.self_attn, self.mlp
        q_dim, kv_dim = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
        q, k, v = self._project("qkv", x).split([q_dim, kv_dim, kv_dim], dim=-1)
        x = x + self._project("o", attn.attend(q, k, v, cos, sin, mask, backend, cache))
        gate, up = self._project("gate_up", x).chunk(2, dim=-1)
        return x + self._project("down", mlp.act(gate) * up)

    @torch.no_grad()
    def refresh_codes(self, force: bool = False) -> int:
        """Recompute the codes of every group whose weights changed; returns how many."""
        refreshed = 0
        from torch.distributed.fsdp import FSDPModule

        sharded = isinstance(self, FSDPModule)
        for group in GROUPS:
            weights = self._weights(group)
            key = None if sharded else tuple((w._version, w.data_ptr()) for w in weights)
            if not force and group in self._code_keys and self._code_keys[group] == key:
                continue
            codes, scale = getattr(self, f"{group}_codes"), getattr(self, f"{group}_scale")
            if codes.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
                ternary_codes_into(weights, codes, scale)
            else:  # a model on the CPU without the interpreter runs the reference layers anyway
                ref_codes, ref_scale = ternary_codes_ref(weights)
                codes.copy_(ref_codes)
                scale.copy_(ref_scale)
            self._code_keys[group] = key
            refreshed += 1
        return refreshed


def _to_fused(layer: BitNetDecoderLayer) -> FusedBitNetDecoderLayer:
    layer.__class__ = FusedBitNetDecoderLayer
    fused: FusedBitNetDecoderLayer = layer  # type: ignore[assignment]
    for group in GROUPS:
        weights = fused._weights(group)
        rows, k = sum(w.shape[0] for w in weights), weights[0].shape[1]
        dev = weights[0].device
        fused.register_buffer(f"{group}_codes", torch.zeros(rows, k, dtype=torch.int8,
                                                             device=dev), persistent=False)
        fused.register_buffer(f"{group}_scale", torch.zeros(rows, dtype=torch.float32,
                                                            device=dev), persistent=False)
    fused._code_keys = {}
    fused.register_forward_pre_hook(_refresh_hook)
    return fused


def refresh_ternary_codes(model: nn.Module, force: bool = False) -> int:
    """Bring every fused layer's codes up to date with its master weights; returns the number of
    groups recomputed (0 between optimizer steps)."""
    return sum(m.refresh_codes(force) for m in model.modules()
               if isinstance(m, FusedBitNetDecoderLayer))


def mark_ternary_codes_stale(model: nn.Module) -> None:
    """Make the next forward recompute every fused layer's codes."""
    for m in model.modules():
        if isinstance(m, FusedBitNetDecoderLayer):
            m._code_keys.clear()


def watch_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """After every `optimizer.step()`, mark `model`'s ternary codes stale (a no-op for models
    without fused layers)."""
    optimizer.register_step_post_hook(lambda *_: mark_ternary_codes_stale(model))


@torch._dynamo.disable  # runs eagerly before a compiled block (as FSDP's own hooks do)
def _refresh_hook(layer: FusedBitNetDecoderLayer, args: Any) -> None:
    layer.refresh_codes()


def apply_kernels(model: BitNetForCausalLM) -> bool:
    """Swap every decoder layer of a ternary model to the fused kernels, in place; returns
    whether anything changed (a `quantization: none` model has nothing to fuse)."""
    if model.config.quantization != "ternary":
        log.debug("model.quantization=%s: no ternary projections to fuse",
                  model.config.quantization)
        return False
    for layer in model.model.layers:
        if not isinstance(layer, FusedBitNetDecoderLayer):
            # the codes are computed at the layer's first forward, on its device by then
            _to_fused(layer)
    log.debug("fused Triton kernels in %d decoder layers", len(model.model.layers))
    return True
