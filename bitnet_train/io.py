"""Save and load models in transformers' directory layout.

`save_model` writes the master-weight layout of microsoft/bitnet-b1.58-2B-4T-bf16: `config.json`
(`model_type: bitnet`, every default that differs from transformers' written out, and
`quantization_config = {quant_method: bitnet, linear_class: autobitlinear, quantization_mode:
online}` so that transformers quantizes on the fly exactly like our forward), `model.safetensors`
(the latent weights; a tied `lm_head` is not stored, as transformers does),
`generation_config.json` and the tokenizer. The directory appears complete or not at all.

`load_model` reads that layout (single-file or sharded safetensors) and also, through
`bitnet_train.export.importers`, transformers' PACKED layout (microsoft/bitnet-b1.58-2B-4T:
uint8 weights, `quantization_mode: offline`) and, through `bitnet_train.export.gguf`, our GGUF
files. Keys and shapes are checked against the config before any weight is read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from bitnet_train.errors import CheckpointError
from bitnet_train.model.config import BitNetConfig
from bitnet_train.model.modeling import BitNetForCausalLM, RotaryEmbedding

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
EOT_TOKEN = "<|eot_id|>"
"""LLaMA-3's end-of-turn token: the chat template ends every turn with it, so generation stops
there too (the released 2B4T lists it beside <|end_of_text|> in generation_config.json)."""

LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"
IGNORED_KEYS = ("rotary_emb.inv_freq",)
"""Keys some checkpoints store that are recomputed from the config (transformers ignores them)."""


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
    tokenizer has it, so chat replies stop at the end of the turn."""
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
        if _is_sharded(t):
            raise CheckpointError(
                f"{name} is a shard of an FSDP2-sharded model: gather the model whole first "
                "(bitnet_train.train.sharding.gather_full_model; the trainer does it for final/)")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[name] = t.to("cpu", copy=True).contiguous()
    return state


def _is_sharded(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to fill; on success it replaces `path` by a rename.

    A reader therefore sees the old complete directory, the new complete one, or (for the
    instant between two renames, when `path` existed before) none, never a half-written one.
    On error the temporary directory is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory; choose another output path")
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # unlike tempfile.mkdtemp (mode 0700), honours the umask like the final dir
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = tmp.with_name(tmp.name.replace(".tmp-", ".old-")) if path.exists() else None
    if old is not None:
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        if old is not None:
            os.replace(old, path)  # put the previous complete directory back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_hf_directory(
    path: str | Path,
    config_dict: dict[str, Any],
    tensors: dict[str, Tensor],
    generation: dict[str, Any],
    tokenizer: Any = None,
) -> Path:
    """Atomically write config.json, model.safetensors, generation_config.json and the tokenizer."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return path


def save_model(
    model: BitNetForCausalLM,
    path: str | Path,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` (and `tokenizer`) as a transformers master-weight directory.

    Args:
        model: our BitNetForCausalLM (unwrapped from DDP/FSDP/accelerate).
        path: output directory; replaced atomically if it exists.
        tokenizer: a transformers tokenizer, saved with `save_pretrained` (chat template included).
        dtype: cast floating weights (torch.bfloat16 gives the 2B4T-bf16 layout); None keeps the
            model's dtype (fp32 masters: reloading gives bit-identical weights and forward).
    """
    state = state_for_saving(model, dtype)
    stored = dtype or model.model.embed_tokens.weight.dtype
    config_dict = hf_config_dict(model.config, "online", stored)
    return write_hf_directory(path, config_dict, state,
                              generation_config_dict(model.config, tokenizer), tokenizer)


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


def expected_shapes(config: BitNetConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor the model's state_dict holds (built on the meta device)."""
    with torch.device("meta"):
        model = BitNetForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


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
    check_shapes(expected_shapes(config), {k: tuple(v.shape) for k, v in state.items()},
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

    Raises:
        CheckpointError: missing files, or weights that do not match config.json (the message
            names the first offending tensor and both shapes).
    """
    path = Path(path)
    if path.suffix == ".gguf":
        model, tokenizer = _import_gguf(path)
        return model.to(device=device, dtype=dtype).eval(), tokenizer
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a model directory (config.json + safetensors)")
    config_dict = read_config_dict(path)
    config = BitNetConfig.from_hf_dict(config_dict, name=path.name)
    info = read_tensor_info(path)

    from bitnet_train.export.importers import is_packed_layout, master_state_from_packed

    if is_packed_layout(config_dict, {k: v[1] for k, v in info.items()}):
        state = master_state_from_packed(read_tensors(path), config, config_dict, source=path)
    else:
        check_shapes(expected_shapes(config), {k: v[0] for k, v in info.items()},
                     config.tie_word_embeddings, path)
        state = read_tensors(path)
    model = model_from_state(config, state, dtype=dtype, device=device, source=path)
    return model, load_tokenizer_if_present(path)


def _import_gguf(path: Path) -> tuple[BitNetForCausalLM, Any]:
    try:
        from bitnet_train.export.gguf import import_gguf
    except ImportError as err:
        raise CheckpointError(
            f"cannot read {path}: the GGUF importer (bitnet_train.export.gguf.import_gguf) is not "
            f"available ({err})"
        ) from err
    return import_gguf(path)
