"""`--format hf` and `--format hf-bf16`: directories `transformers.AutoModelForCausalLM` loads.

`hf` (packed, like microsoft/bitnet-b1.58-2B-4T): `quantization_config = {quant_method: bitnet,
linear_class: autobitlinear, quantization_mode: offline}`; every projection `P.weight` is uint8
[out/4, in] holding 4 ternary values per byte in transformers' order
(`bitnet_train.export.packing`), with `P.weight_scale` fp32 [1] = a = mean(|W|), the scale our
training forward uses. transformers' `AutoBitLinear` (offline) computes
``linear(act_quant(x), T) * weight_scale``, i.e. it MULTIPLIES the output by the stored scale;
its other class, `linear_class: bitlinear`, DIVIDES by it and would need 1/a (we do not write
that class). Embeddings, norms (and an untied lm_head) are bf16, as released; the scales stay
fp32 (4 bytes each) so a model loaded in fp32 computes exactly our ternary weights; loaded in
bf16 (the config's `dtype`, transformers' default) they round like everything else.
Load it with that default. With `dtype=torch.float32`, transformers 5.x leaves the embeddings and
norms of a pre-quantized BitNet checkpoint in their stored bf16 (its BitNet deserializer claims
every `*.weight` and the dtype cast is skipped), and the forward fails on mixed dtypes; cast
those parameters to fp32 after loading if you need fp32 (the tests do).

`hf-bf16` (master, like microsoft/bitnet-b1.58-2B-4T-bf16): the latent weights in bf16 with
`quantization_mode: online`, so transformers quantizes them on the fly as our forward does; for
further training elsewhere. It is `bitnet_train.io.save_model(..., dtype=torch.bfloat16)`.
Rounding latent weights to bf16 can move a weight across a rounding threshold, so its forward
matches ours to bf16 precision, not bit for bit; keep `save_model`'s fp32 master to resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bitnet_train.errors import ExportError
from bitnet_train.export.packing import VALUES_PER_BYTE, pack_ternary
from bitnet_train.export.ternary import extract_ternary, require_ternary
from bitnet_train.io import (
    generation_config_dict,
    hf_config_dict,
    save_model,
    state_for_saving,
    write_hf_directory,
)
from bitnet_train.model.modeling import BitNetForCausalLM

EMBEDDING_DTYPE = torch.bfloat16
"""dtype of every non-ternary tensor in both HF formats (as in the released checkpoints)."""
SCALE_DTYPE = torch.float32


def check_hf_packable(name: str, out_features: int) -> None:
    """transformers only loads packed weights whose row count 4 divides.

    `BitNetDeserialize` unpacks a uint8 tensor only when ``4 * rows == out_features`` (and the
    `bitlinear` class allocates ``out // 4`` rows), so any other shape fails or loads garbage.
    """
    if out_features % VALUES_PER_BYTE:
        raise ExportError(
            f"{name}: {out_features} output rows is not a multiple of {VALUES_PER_BYTE}; "
            "transformers cannot load such a packed weight. Use --format hf-bf16 (transformers "
            "quantizes it online) or a hidden/intermediate size divisible by 4"
        )


def packed_state(model: BitNetForCausalLM) -> dict[str, Tensor]:
    """The safetensors content of `--format hf`: uint8 packed projections, fp32 [1] scales,
    bf16 everything else (tied lm_head left out)."""
    ternary = extract_ternary(model)
    state = state_for_saving(model, EMBEDDING_DTYPE, skip=set(ternary))
    for name, t in ternary.items():
        check_hf_packable(name, t.codes.shape[0])
        state[name] = pack_ternary(t.codes, name)
        state[name.removesuffix("weight") + "weight_scale"] = t.scale.reshape(1).to(SCALE_DTYPE)
    return state


def export_hf(
    model: BitNetForCausalLM, tokenizer: Any, out_dir: str | Path, packed: bool = True
) -> Path:
    """Write `model` (+ tokenizer with its chat template) for transformers.

    Args:
        packed: True for `--format hf` (2B4T layout), False for `--format hf-bf16`.
    Returns:
        the output directory (written atomically).
    """
    require_ternary(model)
    if not packed:
        return save_model(model, out_dir, tokenizer=tokenizer, dtype=EMBEDDING_DTYPE)
    state = packed_state(model)
    config_dict = hf_config_dict(model.config, "offline", EMBEDDING_DTYPE)
    generation = generation_config_dict(model.config, tokenizer)
    return write_hf_directory(out_dir, config_dict, state, generation, tokenizer)
