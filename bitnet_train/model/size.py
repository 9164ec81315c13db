"""Parameter counts, shapes and packed sizes, computed from a config without allocating a
model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bitnet_train.model.config import BitNetConfig
from bitnet_train.model.modeling import BitNetForCausalLM


def ternary_shapes(config: BitNetConfig) -> list[tuple[str, int, int]]:
    """(name, out, in) of the seven BitLinear matrices of one decoder layer."""
    h, m = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q),
            ("gate_proj", m, h), ("up_proj", m, h), ("down_proj", h, m)]


def parameter_shapes(config: BitNetConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor the model's state_dict holds (built on the meta device,
    so nothing is allocated); loaders check a checkpoint against it before reading weights."""
    with torch.device("meta"):
        model = BitNetForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class ModelSize:
    """Counts in parameters, sizes in bytes."""

    total_params: int
    embedding_params: int
    ternary_params: int
    """Parameters of every BitLinear (the quantized projections)."""
    norm_params: int
    ternary_packed_bytes: int
    """Ternary weights at 2 bits each (4 per byte) plus one fp32 scale per matrix."""
    embedding_bytes_bf16: int
    ternary_entropy_bytes: int
    """Ternary weights at log2(3) = 1.585 bits each: the size the 2B4T report quotes (0.4 GB)."""

    @property
    def non_embedding_params(self) -> int:
        return self.total_params - self.embedding_params

    def describe(self) -> str:
        return (
            f"params total {self.total_params / 1e6:.1f}M, non-embedding "
            f"{self.non_embedding_params / 1e6:.1f}M (ternary {self.ternary_params / 1e6:.1f}M); "
            f"ternary {self.ternary_entropy_bytes / 1e9:.3f} GB at 1.58 bits, "
            f"{self.ternary_packed_bytes / 1e9:.3f} GB packed 2-bit; "
            f"embeddings bf16 {self.embedding_bytes_bf16 / 1e9:.3f} GB"
        )


def model_size(config: BitNetConfig) -> ModelSize:
    """Count parameters of `config` and the bytes of its ternary weights packed 4 per byte."""
    h, m, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    d = config.head_dim
    q = h * config.num_attention_heads * d
    kv = 2 * h * config.num_key_value_heads * d
    o = config.num_attention_heads * d * h
    ffn = 3 * h * m
    per_layer_ternary = q + kv + o + ffn
    per_layer_norm = 3 * h + m  # input, post-attention, attn_sub (h) and ffn_sub (m)
    ternary = n * per_layer_ternary
    norms = n * per_layer_norm + h
    emb = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    matrices = 7 * n
    return ModelSize(
        total_params=ternary + norms + emb,
        embedding_params=emb,
        ternary_params=ternary,
        norm_params=norms,
        ternary_packed_bytes=(ternary + 3) // 4 + 4 * matrices,
        embedding_bytes_bf16=2 * emb,
        ternary_entropy_bytes=int(ternary * math.log2(3) / 8),
    )
