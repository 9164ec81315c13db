"""BitNetConfig: the model's shape, with transformers' field names (model_type "bitnet").

A plain dataclass, so that it doubles as the Hydra structured config of the `model` group;
`to_hf_dict` / `from_hf_dict` convert to and from transformers' `config.json`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bitnet_train.errors import ConfigError

HIDDEN_ACTS = ("relu2", "silu")
QUANTIZATIONS = ("ternary", "none")


@dataclass
class BitNetConfig:
    """Shape and numerics of a BitNet b1.58 model. Defaults are the released 2B4T."""

    vocab_size: int = 128256
    """Token vocabulary size (LLaMA-3: 128256)."""
    hidden_size: int = 2560
    """Residual stream width."""
    intermediate_size: int = 6912
    """FFN inner width (gate/up output, down input)."""
    num_hidden_layers: int = 30
    num_attention_heads: int = 20
    num_key_value_heads: int = 5
    """GQA: KV heads; must divide num_attention_heads."""
    hidden_act: str = "relu2"
    """FFN gate activation: relu2 (2B4T) or silu (original BitNet b1.58, llama.cpp's `bitnet`)."""
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    initializer_range: float = 0.02
    """Std of the normal init of every matrix (residual outputs scaled by 1/sqrt(2 * layers))."""
    tie_word_embeddings: bool = True
    """Share lm_head with embed_tokens (as released; llama.cpp and bitnet.cpp require it)."""
    bos_token_id: int | None = 128000
    eos_token_id: int | None = 128001
    pad_token_id: int | None = None
    quantization: str = "ternary"
    """ternary: every projection a BitLinear (W1.58A8, the model this project trains) | none:
    plain bf16-trained linear layers, the same model otherwise (ablations; the ceiling a ternary
    training step is benchmarked against). Only ternary models export to the ternary formats."""
    name: str = "2b4t"
    """A label for logs and file names; not part of the architecture."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Unrecognised keys read from a config.json, written back unchanged."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field."""
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if int(getattr(self, key)) <= 0:
                raise ConfigError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} does not divide "
                f"model.hidden_size={self.hidden_size}: choose a head count that divides it"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.num_key_value_heads={self.num_key_value_heads} does not divide "
                f"model.num_attention_heads={self.num_attention_heads} (GQA groups query heads "
                "evenly over KV heads)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"model.quantization={self.quantization!r}; choose one of {QUANTIZATIONS}"
            )
        if self.hidden_act not in HIDDEN_ACTS:
            raise ConfigError(
                f"model.hidden_act={self.hidden_act!r} is not supported; "
                f"choose one of {HIDDEN_ACTS}"
            )

    # transformers interop -------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers `config.json` dict (BitNetForCausalLM), every differing default explicit.

        RoPE theta is written both as `rope_theta` (transformers 4.x) and inside `rope_parameters`
        (5.x), so either generation of the library reads it.
        """
        d = {
            "architectures": ["BitNetForCausalLM"],
            "model_type": "bitnet",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_cache": True,
        }
        if self.quantization != "ternary":
            # not a transformers key: transformers would run these weights through its ternary
            # quantizer; our loaders read it back, and the exporters refuse such a model
            d["bitnet_train_quantization"] = self.quantization
        d.update(self.extra)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str | None = None) -> BitNetConfig:
        """Read a transformers config.json dict; keys we do not model go to `extra`."""
        if d.get("model_type", "bitnet") != "bitnet":
            raise ConfigError(
                f"config.json has model_type={d.get('model_type')!r}; expected 'bitnet'"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "name"}
        kwargs = {k: d[k] for k in known if k in d}
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if "rope_theta" not in kwargs and isinstance(rope, dict) and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        if "tie_word_embeddings" not in d:
            kwargs["tie_word_embeddings"] = False  # transformers' default when absent
        if "max_position_embeddings" not in d:
            kwargs["max_position_embeddings"] = 2048  # transformers' default when absent
        if "bitnet_train_quantization" in d:
            kwargs["quantization"] = d["bitnet_train_quantization"]
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, list):
            kwargs["eos_token_id"] = eos[0]
        skip = known | {"architectures", "model_type", "rope_parameters", "head_dim",
                        "attention_bias", "attention_dropout", "use_cache", "torch_dtype", "dtype",
                        "transformers_version", "quantization_config",
                        "bitnet_train_quantization"}
        extra = {k: v for k, v in d.items() if k not in skip}
        return cls(**kwargs, name=name or "hf", extra=extra)
