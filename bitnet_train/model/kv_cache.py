"""A static key/value cache for incremental decoding.

Keys and values of every layer live in two preallocated buffers of `capacity` positions
(prompt + new tokens), so decoding never reallocates or concatenates. A forward with a cache
writes its new positions at `length`, attends over `[0, length + new)`, and the model advances
`length` once all layers are done (`BitNetModel.forward`). Keys are stored after RoPE, as the
attention computes them, so a cached forward equals a full recompute.

Memory: 2 x layers x batch x kv_heads x capacity x head_dim elements. At the 2B4T shape
(30 layers, 5 KV heads of 128) in bf16: 75 KiB per position per sequence, 300 MiB for a
sequence of 4096 positions, 19 GiB for 64 of them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bitnet_train.model.config import BitNetConfig


class LayerKVCache:
    """One layer's view of a `KVCache`: `update` stores new keys/values and returns all."""

    def __init__(self, parent: KVCache, index: int) -> None:
        self.parent = parent
        self.index = index

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (B, kv_heads, n, D) for positions [length, length + n) -> the keys and values
        of positions [0, length + n), each (B, kv_heads, length + n, D)."""
        return self.parent.write(self.index, k, v)


class KVCache:
    """Keys and values of `num_layers` layers for `batch` sequences of up to `capacity`.

    The buffers are allocated at the first write, in the dtype and on the device of the keys
    the attention produces (the fused kernels return bf16 projections from fp32 weights).
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int,
                 capacity: int) -> None:
        if capacity < 1 or batch < 1:
            raise ValueError(f"KV cache needs capacity >= 1 and batch >= 1, got {capacity}, "
                             f"{batch}")
        self.shape = (num_layers, batch, kv_heads, capacity, head_dim)
        self.keys: Tensor | None = None  # (layers, B, kv_heads, capacity, head_dim)
        self.values: Tensor | None = None
        self.capacity = capacity
        self.length = 0
        """Positions already stored (the same for every layer between forwards)."""
        self.layers = [LayerKVCache(self, i) for i in range(num_layers)]

    @classmethod
    def for_model(cls, config: BitNetConfig, batch: int, capacity: int) -> KVCache:
        return cls(config.num_hidden_layers, batch, config.num_key_value_heads, config.head_dim,
                   capacity)

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys is None or self.values is None:
            self.keys = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.values = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        start, n = self.length, k.shape[2]
        if start + n > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; {start} are used and "
                             f"{n} more do not fit. Allocate it for prompt + max_new_tokens")
        self.keys[layer, :, :, start:start + n] = k
        self.values[layer, :, :, start:start + n] = v
        return self.keys[layer, :, :, :start + n], self.values[layer, :, :, :start + n]

    def advance(self, n: int) -> None:
        """Called by the model after every layer has written its `n` new positions."""
        self.length += n
