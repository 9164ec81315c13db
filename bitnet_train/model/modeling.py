"""BitNet b1.58 decoder (2B4T architecture) in plain PyTorch.

Pre-norm blocks; GQA attention with split-half RoPE through SDPA and an RMSNorm (`attn_sub_norm`)
before `o_proj`; a gated FFN ``down(ffn_sub_norm(act(gate(x)) * up(x)))`` with act = relu^2 (2B4T)
or SiLU; every projection a BitLinear; embeddings and lm_head full precision; no biases anywhere.
Parameter names equal transformers' `BitNetForCausalLM`, so state dicts move both ways unchanged.

The model knows nothing of parallelism, compilation or losses beyond a hook: `forward(...,
head_fn=f)` hands the final hidden states and the lm_head weight to `f`, so objectives can use a
fused linear cross-entropy (Liger) without materialising logits, while staying inside `forward`
(which DDP and FSDP need).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitnet_train.model.attention import AttentionBackend, SDPAAttention
from bitnet_train.model.bitlinear import BitLinear
from bitnet_train.model.config import BitNetConfig
from bitnet_train.model.kv_cache import KVCache, LayerKVCache


def make_projection(config: BitNetConfig, in_features: int, out_features: int) -> nn.Module:
    """A BitLinear, or a plain bias-free nn.Linear when `config.quantization == "none"` (the
    same model in full precision: for ablations, and the ceiling a ternary step is measured
    against). Both own a `weight` (out, in), so parameter names do not change."""
    if config.quantization == "none":
        return nn.Linear(in_features, out_features, bias=False)
    return BitLinear(in_features, out_features)


class RMSNorm(nn.Module):
    """RMSNorm without bias, computed in fp32 (as transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class RotaryEmbedding(nn.Module):
    """Split-half ("rotate_half", NEOX) RoPE tables from position ids."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)compute the frequencies, e.g. after a model built on the meta device is
        materialised (the buffer is not in the state dict)."""
        self.inv_freq.copy_(1.0 / (self.theta ** (
            torch.arange(0, self.head_dim, 2, dtype=torch.float, device=self.inv_freq.device)
            / self.head_dim)))

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """position_ids (B, L) -> cos, sin each (B, L, head_dim), in `dtype`."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, L, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, heads, L, head_dim); cos/sin (B, L, head_dim)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class BitNetAttention(nn.Module):
    def __init__(self, config: BitNetConfig) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d
        self.q_proj = make_projection(config, h, self.num_heads * d)
        self.k_proj = make_projection(config, h, self.num_kv_heads * d)
        self.v_proj = make_projection(config, h, self.num_kv_heads * d)
        self.o_proj = make_projection(config, self.num_heads * d, h)
        self.attn_sub_norm = RMSNorm(h, config.rms_norm_eps)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, mask: Any,
               backend: AttentionBackend, cache: LayerKVCache | None = None) -> Tensor:
        """Projected q (B, L, heads*D), k/v (B, L, kv_heads*D) -> attention output (B, L, heads*D),
        before attn_sub_norm and o_proj: RoPE, then the backend's masked softmax attention.

        With a `cache`, the L new keys/values (after RoPE) are appended to it and the queries
        attend over every cached position too (`mask` from the backend's build_cached_mask).
        """
        b, seq, _ = q.shape
        q = q.view(b, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # RoPE in the tables' precision (fp32 from fp32 embeddings), then back to the projections'
        # dtype, which is what SDPA's autocast would cast to (and what flex needs: one dtype)
        q = apply_rope(q, cos, sin).to(v.dtype)  # (B, heads, L, head_dim)
        k = apply_rope(k, cos, sin).to(v.dtype)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, kv_heads, past + L, head_dim)
        out = backend(q, k, v, mask)  # (B, heads, L, head_dim)
        return out.transpose(1, 2).reshape(b, seq, self.num_heads * self.head_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Any,
                backend: AttentionBackend, cache: LayerKVCache | None = None) -> Tensor:
        out = self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, mask, backend,
                          cache)
        return self.o_proj(self.attn_sub_norm(out))


class BitNetMLP(nn.Module):
    def __init__(self, config: BitNetConfig) -> None:
        super().__init__()
        h, m = config.hidden_size, config.intermediate_size
        self.gate_proj = make_projection(config, h, m)
        self.up_proj = make_projection(config, h, m)
        self.down_proj = make_projection(config, m, h)
        self.ffn_sub_norm = RMSNorm(m, config.rms_norm_eps)
        self.act: Callable[[Tensor], Tensor] = (
            (lambda t: F.relu(t).square()) if config.hidden_act == "relu2" else F.silu
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.ffn_sub_norm(self.act(self.gate_proj(x)) * self.up_proj(x)))


class BitNetDecoderLayer(nn.Module):
    def __init__(self, config: BitNetConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = BitNetAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = BitNetMLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Any,
                backend: AttentionBackend, cache: LayerKVCache | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, backend, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class BitNetModel(nn.Module):
    """Embeddings, decoder stack and final norm: token ids -> hidden states (B, L, hidden).

    `attention` is the attention backend (bitnet_train.model.attention): SDPA with a dense mask
    by default; `apply_attention` swaps in FlexAttention on CUDA. A plain attribute, not a
    module: it holds no parameters and is not part of the state dict.
    """

    def __init__(self, config: BitNetConfig) -> None:
        super().__init__()
        self.attention: AttentionBackend = SDPAAttention()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            BitNetDecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """With a `cache` (decoding), input_ids (B, L) are the positions after the cached ones,
        attention_mask (B, past + L) covers cached and new positions (transformers'
        convention), and position_ids default to past .. past + L - 1."""
        b, seq = input_ids.shape
        past = 0 if cache is None else cache.length
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=input_ids.device).expand(b, seq)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        if cache is None:
            mask = self.attention.build_mask(b, seq, input_ids.device, attention_mask,
                                             document_ids)
        else:
            if document_ids is not None:
                raise ValueError("document_ids (packed documents) cannot be decoded with a KV "
                                 "cache; decode one document per row")
            mask = self.attention.build_cached_mask(b, seq, past, input_ids.device,
                                                    attention_mask)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, self.attention,
                      None if cache is None else cache.layers[i])
        if cache is not None:
            cache.advance(seq)
        return self.norm(x)


@dataclass
class CausalLMOutput:
    """logits (B, L, vocab) unless a head_fn took over; loss when labels were given."""

    logits: Tensor | None = None
    loss: Tensor | None = None


HeadFn = Callable[[Tensor, Tensor], Any]
"""(hidden (B, L, H), lm_head weight (vocab, H)) -> whatever the objective needs."""


class BitNetForCausalLM(nn.Module):
    """Causal LM with transformers' BitNetForCausalLM parameter names."""

    def __init__(self, config: BitNetConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.model = BitNetModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        if self.lm_head.weight.device.type != "meta":  # a meta model is initialised once sharded
            self.init_weights()

    def tie_weights(self) -> None:
        """lm_head shares the embedding matrix when `config.tie_word_embeddings` (transformers'
        name: accelerate calls it after moving a model to the meta device, which unties)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None,
                     write: Callable[[Tensor, Tensor], None] | None = None) -> None:
        """Normal(0, initializer_range) for every matrix; residual outputs (o_proj, down_proj)
        scaled by 1/sqrt(2 * layers) (GPT-2 / OLMo); norm weights 1.

        Why: a BitLinear's output is proportional to mean(|W|) of its latent weight, so the usual
        depth scaling still controls how fast the residual stream grows; the sub-norms keep each
        branch's input at unit RMS. Latent weights of std 0.02 sit where LRs around 1e-3 flip a
        useful fraction of ternary codes per step, which is what BitNet training relies on.

        Every value is drawn on the CPU, whole tensor by whole tensor in module order, so the
        weights depend on the seed only. `write(param, value)` stores a whole fp32 CPU tensor
        into `param` (default: a copy); a sharded parameter keeps its own shard of it, which
        gives a sharded model exactly the weights of an unsharded one (train.parallelize).
        """
        write = write or (lambda p, v: p.copy_(v))
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        resid_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, BitLinear | nn.Linear | nn.Embedding):  # every matrix
                s = resid_std if name.endswith(("o_proj", "down_proj")) else std
                w = module.weight
                write(w, torch.randn(w.shape, generator=gen, dtype=torch.float32).mul_(s))
            elif isinstance(module, RMSNorm):
                write(module.weight, torch.ones(module.weight.shape))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
        labels: Tensor | None = None,
        head_fn: HeadFn | None = None,
        cache: KVCache | None = None,
    ) -> Any:
        """input_ids (B, L) -> CausalLMOutput, or head_fn(hidden, lm_head.weight) if given.

        labels (B, L) are not shifted (as in transformers): position t predicts labels[t + 1];
        -100 is ignored. With labels the loss is the mean token cross-entropy. `cache`: decode
        incrementally (see BitNetModel.forward and bitnet_train.eval.generation).
        """
        hidden = self.model(input_ids, attention_mask, position_ids, document_ids, cache)
        if head_fn is not None:
            return head_fn(hidden, self.lm_head.weight)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutput(logits=logits, loss=loss)

    @torch.no_grad()
    def generate(
        self, input_ids: Tensor, max_new_tokens: int, eos_token_id: int | None = None
    ) -> Tensor:
        """Greedy decoding without a KV cache: re-runs the whole prefix for every token.

        The reference that the fast path (`bitnet_train.eval.generation.generate`: batched, KV
        cache, sampling, stop strings) is tested against. input_ids (1, L) -> (1, L + n),
        stopping early at eos_token_id.
        """
        ids = input_ids
        for _ in range(max_new_tokens):
            logits = self(ids[:, -self.config.max_position_embeddings:]).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
        return ids
