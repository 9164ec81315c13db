"""transformers' directory layout, written: `--format hf`, `--format hf-bf16` and `save_model`.

Every directory holds `config.json` (`model_type: bitnet`, every default that differs from
transformers' written out, the BitNet `quantization_config` and the storage dtype),
`model.safetensors`, `generation_config.json` and the tokenizer, and appears complete or not
at all (`bitnet_train.atomic`). Reading it back is `bitnet_train.io.load_model`'s job.

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
further training elsewhere. It is `write_master` in bf16; `bitnet_train.io.save_model` is
`write_master` in the model's own dtype (fp32 masters: reloading is bit-exact).
Rounding latent weights to bf16 can move a weight across a rounding threshold, so its forward
matches ours to bf16 precision, not bit for bit; keep `save_model`'s fp32 master to resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from torch.distributed.tensor import DTensor

from bitnet_train.atomic import atomic_directory
from bitnet_train.data.chat import EOT_TOKEN
from bitnet_train.data.tokenizer import save_tokenizer
from bitnet_train.errors import ExportError
from bitnet_train.export.packing import VALUES_PER_BYTE, pack_ternary
from bitnet_train.export.ternary import extract_ternary, require_ternary
from bitnet_train.integrity import write_manifest
from bitnet_train.model.config import BitNetConfig
from bitnet_train.model.modeling import BitNetForCausalLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"

EMBEDDING_DTYPE = torch.bfloat16
"""dtype of every non-ternary tensor in both HF formats (as in the released checkpoints)."""
SCALE_DTYPE = torch.float32


def quantization_config(mode: str) -> dict[str, str]:
    """transformers' BitNet quantization config: `online` (latent weights, quantized each
    forward, as we train) or `offline` (packed ternary weights with a stored scale)."""
    return {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": mode}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the spelling of config.json's `dtype`)."""
    return str(dtype).removeprefix("torch.")


def hf_config_dict(config: BitNetConfig, quantization_mode: str, dtype: torch.dtype) -> dict:
    """`config.json` content: our config, the BitNet quantization config and the storage dtype.

    The dtype is written as both `dtype` (transformers 5) and `torch_dtype` (4.x); with
    `dtype="auto"` transformers loads the model in it.
    """
    d = config.to_hf_dict()
    d.pop("auto_map", None)  # a remote-code pointer read from some config.json: we ship no code
    d["quantization_config"] = quantization_config(quantization_mode)
    d["dtype"] = d["torch_dtype"] = dtype_name(dtype)
    return d


def generation_config_dict(config: BitNetConfig, tokenizer: Any = None) -> dict[str, Any]:
    """bos / eos / pad ids for `generation_config.json`; eos includes <|eot_id|> when the
    tokenizer has it: the chat template ends every turn with it, so chat replies stop at the end
    of the turn (the released 2B4T lists it beside <|end_of_text|>)."""
    eos: list[int] = [] if config.eos_token_id is None else [int(config.eos_token_id)]
    pad = config.pad_token_id
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None and int(tokenizer.eos_token_id) not in eos:
            eos.append(int(tokenizer.eos_token_id))
        eot = tokenizer.get_vocab().get(EOT_TOKEN)
        if eot is not None and eot not in eos:
            eos.append(int(eot))
        if pad is None:
            pad = tokenizer.pad_token_id
    out: dict[str, Any] = {"bos_token_id": config.bos_token_id, "pad_token_id": pad}
    out["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
    return {k: v for k, v in out.items() if v is not None}


def state_for_saving(
    model: BitNetForCausalLM, dtype: torch.dtype | None = None, skip: frozenset | set = frozenset()
) -> dict[str, Tensor]:
    """CPU, contiguous copies of the model's tensors in transformers' key layout.

    A tied `lm_head.weight` is dropped (transformers re-ties it from `tie_word_embeddings`;
    safetensors also refuses tensors that share memory). `dtype` casts floating tensors;
    names in `skip` are left out (the packed exporter writes those itself).
    """
    state: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name in skip or (name == LM_HEAD and model.config.tie_word_embeddings):
            continue
        t = tensor.detach()
        if isinstance(t, DTensor):
            raise ExportError(
                f"{name} is a shard of an FSDP2-sharded model: gather the model whole first "
                "(bitnet_train.train.sharding.gather_full_model; the trainer does it for final/)")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[name] = t.to("cpu", copy=True).contiguous()
    return state


def write_hf_directory(
    path: str | Path,
    config_dict: dict[str, Any],
    tensors: dict[str, Tensor],
    generation: dict[str, Any],
    tokenizer: Any = None,
) -> Path:
    """Atomically write config.json, model.safetensors, generation_config.json and the tokenizer."""
    path = Path(path)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_directory(path, marker=CONFIG_FILE, expected_bytes=nbytes) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        write_manifest(tmp)  # last: sizes and SHA-256 of every file, checked by load_model
    return path


def write_master(
    model: BitNetForCausalLM, path: str | Path, tokenizer: Any = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """The master-weight layout (`quantization_mode: online`): latent weights in `dtype` (None:
    the model's own), which transformers quantizes on the fly exactly like our forward."""
    state = state_for_saving(model, dtype)
    stored = dtype or model.model.embed_tokens.weight.dtype
    config_dict = hf_config_dict(model.config, "online", stored)
    return write_hf_directory(path, config_dict, state,
                              generation_config_dict(model.config, tokenizer), tokenizer)


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
        return write_master(model, out_dir, tokenizer=tokenizer, dtype=EMBEDDING_DTYPE)
    state = packed_state(model)
    config_dict = hf_config_dict(model.config, "offline", EMBEDDING_DTYPE)
    generation = generation_config_dict(model.config, tokenizer)
    return write_hf_directory(out_dir, config_dict, state, generation, tokenizer)
