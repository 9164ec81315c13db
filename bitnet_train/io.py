"""Save and load models in transformers' directory layout.

`save_model` writes the master-weight layout of microsoft/bitnet-b1.58-2B-4T-bf16: `config.json`
(`model_type: bitnet`, every default that differs from transformers' written out, and
`quantization_config = {quant_method: bitnet, linear_class: autobitlinear, quantization_mode:
online}` so that transformers quantizes on the fly exactly like our forward), `model.safetensors`
(the latent weights; a tied `lm_head` is not stored, as transformers does),
`generation_config.json` and the tokenizer. The directory appears complete or not at all. The
writer is `bitnet_train.export.hf.write_master`.

`load_model` reads that layout (single-file or sharded safetensors) and also, through
`bitnet_train.export.importers`, transformers' PACKED layout (microsoft/bitnet-b1.58-2B-4T:
uint8 weights, `quantization_mode: offline`) and, through `bitnet_train.export.gguf`, our GGUF
files. Keys and shapes are checked against the config before any weight is read.

This module is where loading lives: it imports the exporters' readers and writers, and nothing
under `bitnet_train/export` imports it back, so the arrows run one way.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from bitnet_train.errors import CheckpointError
from bitnet_train.export.gguf import import_gguf
from bitnet_train.export.hf import (
    CONFIG_FILE,
    EMBED,
    GENERATION_CONFIG_FILE,
    LM_HEAD,
    WEIGHTS_FILE,
    generation_config_dict,
    hf_config_dict,
    write_master,
)
from bitnet_train.export.importers import is_packed_layout, master_state_from_packed
from bitnet_train.integrity import refuse_non_finite, verify_directory
from bitnet_train.model.config import BitNetConfig
from bitnet_train.model.modeling import BitNetForCausalLM, RotaryEmbedding
from bitnet_train.model.size import parameter_shapes

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
IGNORED_KEYS = ("rotary_emb.inv_freq",)
"""Keys some checkpoints store that are recomputed from the config (transformers ignores them)."""


def save_model(
    model: BitNetForCausalLM,
    path: str | Path,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` (and `tokenizer`) as a transformers master-weight directory.

    Args:
        model: our BitNetForCausalLM (unwrapped from DDP/FSDP/accelerate).
        path: output directory; replaced atomically if it is an earlier model directory (a
            non-empty directory without config.json is refused, never overwritten).
        tokenizer: a transformers tokenizer, saved with `save_tokenizer` (chat template included;
            loadable by transformers 4.x and 5.x).
        dtype: cast floating weights (torch.bfloat16 gives the 2B4T-bf16 layout); None keeps the
            model's dtype (fp32 masters: reloading gives bit-identical weights and forward).
    """
    return write_master(model, path, tokenizer=tokenizer, dtype=dtype)


# -- loading ---------------------------------------------------------------------------------


def read_config_dict(path: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of a model directory (CheckpointError if missing or invalid)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{file} not found: expected a model directory written by save_model or a "
            "transformers BitNet directory (config.json + safetensors)"
        )
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON ({err})") from err


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a directory: the shards of model.safetensors.index.json, or
    model.safetensors."""
    path = Path(path)
    index = path / WEIGHTS_INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard {missing[0].name}, which is missing")
        return files
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    raise CheckpointError(
        f"{path} holds neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}; is it a model directory?"
    )


def read_tensor_info(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype such as "BF16" or "U8"), read from headers only."""
    info: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                info[key] = (tuple(sl.get_shape()), sl.get_dtype())
    return info


def read_tensors(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of the directory's safetensors files, on CPU, in their stored dtype."""
    out: dict[str, Tensor] = {}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def check_shapes(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    tied: bool,
    source: str | Path,
) -> None:
    """Raise CheckpointError naming the first missing, mis-shaped or unexpected tensor.

    `expected` comes from the config; a tied `lm_head.weight` may be absent (transformers does
    not store it) or present with the embedding's shape.
    """
    for name, shape in expected.items():
        if name not in found:
            if name == LM_HEAD and tied:
                continue
            raise CheckpointError(
                f"{source}: tensor {name} (shape {list(shape)}) is missing; the weights do not "
                "belong to the architecture in config.json"
            )
        if tuple(found[name]) != tuple(shape):
            raise CheckpointError(
                f"{source}: tensor {name} has shape {list(found[name])} but config.json implies "
                f"{list(shape)}; the weights and config.json describe different models"
            )
    unexpected = [k for k in found if k not in expected and not k.endswith(IGNORED_KEYS)]
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor {unexpected[0]} (shape {list(found[unexpected[0]])})"
            f"{f' and {len(unexpected) - 1} more' if len(unexpected) > 1 else ''}; the weights "
            "hold tensors this architecture does not have"
        )


def model_from_state(
    config: BitNetConfig,
    state: dict[str, Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    source: str | Path = "state dict",
) -> BitNetForCausalLM:
    """Build our model from a transformers-layout master state dict, checking keys and shapes.

    The model is built on the meta device and the loaded tensors are assigned, so no random
    init runs and no second copy of the weights is allocated.
    """
    check_shapes(parameter_shapes(config), {k: tuple(v.shape) for k, v in state.items()},
                 config.tie_word_embeddings, source)
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_KEYS)}
    if config.tie_word_embeddings:
        if LM_HEAD in state and not torch.equal(state[LM_HEAD], state[EMBED]):
            log.warning("%s: tie_word_embeddings is true; ignoring the stored %s, which differs "
                        "from %s (transformers ignores it too)", source, LM_HEAD, EMBED)
        state[LM_HEAD] = state[EMBED]
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):
        model = BitNetForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    # assign=True wraps each entry in its own Parameter: re-tie, and recompute the RoPE table
    # (a non-persistent buffer, still on meta) from the config.
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:  # a tensor the model gained that this loader does not know about
            raise CheckpointError(f"{source}: {name} was not initialised by load_model")
    return model.to(device).eval()


def load_tokenizer_if_present(path: str | Path) -> Any:
    """AutoTokenizer from `path` (or its `tokenizer/` subdirectory) if tokenizer files exist."""
    for d in (Path(path), Path(path) / "tokenizer"):
        if any((d / f).is_file() for f in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(d))
    return None


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[BitNetForCausalLM, Any]:
    """Load (model, tokenizer or None).

    `path` is a directory with config.json and safetensors: our master layout (save_model, or
    microsoft/bitnet-b1.58-2B-4T-bf16), or transformers' packed layout (microsoft/bitnet-b1.58-
    2B-4T), converted to master weights whose forward equals the packed one
    (`bitnet_train.export.importers`); or a `.gguf` file written by our GGUF exporter. The model
    is returned in eval mode, in `dtype`, on `device`.

    Files are checked against the integrity manifest written with them (`manifest.json`, or a
    GGUF's `.manifest.json` sidecar) when there is one, and parameters must be finite.

    Raises:
        CheckpointError: missing files, or weights that do not match config.json (the message
            names the first offending tensor and both shapes), or a non-finite parameter.
        IntegrityError: a file differs from its manifest (truncated, altered); names the file.
    """
    path = Path(path)
    if path.suffix == ".gguf":
        model, tokenizer = import_gguf(path)
        refuse_non_finite(model.named_parameters(), path)
        return model.to(device=device, dtype=dtype).eval(), tokenizer
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a model directory (config.json + safetensors)")
    verify_directory(path)
    config_dict = _checkpoint_config_dict(path) or read_config_dict(path)
    config = BitNetConfig.from_hf_dict(config_dict, name=path.name)
    info = read_tensor_info(path)
    if is_packed_layout(config_dict, {k: v[1] for k, v in info.items()}):
        state = master_state_from_packed(read_tensors(path), config, config_dict, source=path)
    else:
        check_shapes(parameter_shapes(config), {k: v[0] for k, v in info.items()},
                     config.tie_word_embeddings, path)
        state = read_tensors(path)
    model = model_from_state(config, state, dtype=dtype, device=device, source=path)
    refuse_non_finite(model.named_parameters(), path)
    return model, load_tokenizer_if_present(path)


def _checkpoint_config_dict(path: Path) -> dict[str, Any] | None:
    """The model config of a trainer checkpoint without config.json (written before checkpoints
    carried one): its metadata.json's `model_config`; None for any other directory."""
    meta = path / "metadata.json"
    if (path / CONFIG_FILE).is_file() or not meta.is_file():
        return None
    try:
        config = json.loads(meta.read_text()).get("model_config")
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta} is not valid JSON ({err})") from err
    return config if isinstance(config, dict) else None



def write_model_config(directory: str | Path, model: BitNetForCausalLM, tokenizer: Any) -> None:
    """config.json and generation_config.json beside a checkpoint's model.safetensors, so that
    `load_model`, `bitnet-train eval` and transformers read the checkpoint as a model dir."""
    directory = Path(directory)
    dtype = model.model.embed_tokens.weight.dtype
    (directory / CONFIG_FILE).write_text(json.dumps(
        hf_config_dict(model.config, "online", dtype), indent=2, sort_keys=True) + "\n")
    (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(
        generation_config_dict(model.config, tokenizer), indent=2) + "\n")
