"""BitNet b1.58 model: config, BitLinear and the decoder."""

from bitnet_train.model.bitlinear import (
    BitLinear,
    frozen_ternary_weights,
    int8_activation,
    quantize_activation_ste,
    quantize_weight_ste,
    ternary_weight,
)
from bitnet_train.model.config import BitNetConfig
from bitnet_train.model.kv_cache import KVCache
from bitnet_train.model.modeling import BitNetForCausalLM, CausalLMOutput
from bitnet_train.model.size import ModelSize, model_size


def build_model(config: BitNetConfig, seed: int | None = None) -> BitNetForCausalLM:
    """Build a freshly initialised model (fp32 master weights) from its config."""
    model = BitNetForCausalLM(config)
    if seed is not None:
        model.init_weights(seed)
    return model


__all__ = [
    "BitLinear",
    "BitNetConfig",
    "BitNetForCausalLM",
    "CausalLMOutput",
    "KVCache",
    "ModelSize",
    "build_model",
    "frozen_ternary_weights",
    "int8_activation",
    "model_size",
    "quantize_activation_ste",
    "quantize_weight_ste",
    "ternary_weight",
]
