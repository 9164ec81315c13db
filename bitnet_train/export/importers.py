"""Import released / exported weights back to master (latent) weights we can fine-tune.

Three sources reach `bitnet_train.load_model` (`bitnet_train.io`, which imports this module;
this module does not import it back):
- transformers' master layout (microsoft/bitnet-b1.58-2B-4T-bf16, our `save_model`, `--format
  hf-bf16`): a plain load, handled in `bitnet_train.io`.
- transformers' PACKED layout (microsoft/bitnet-b1.58-2B-4T, `--format hf`): uint8 weights
  (`bitnet_train.export.packing`) and one `weight_scale` per projection, converted here.
- GGUF files (`bitnet_train.export.gguf.import_gguf`).

A packed tensor holds only the ternary codes T and the scale a, not the latent weights. The
master weight we rebuild is ``W = T * a / mean(|T|)``: our absmean quantizer then returns exactly
T (every non-zero |W| is a / mean(|T|) >= a, so it rounds to +-1, zeros stay 0) and the scale
mean(|W|) = a, so the imported model's forward equals the packed model's (up to fp32 rounding
of that mean). The naive ``W = T * a`` would re-quantize to the scale ``a * mean(|T|)``, since
the absmean of a ternary tensor is its fraction of non-zeros, not 1.

Fine-tuning: start from the bf16 master weights (microsoft/bitnet-b1.58-2B-4T-bf16) when you
can. A packed import sits every latent weight exactly on a quantization level, as far from the
rounding thresholds as possible, so the first updates flip almost no codes and the optimizer
does not see how close each weight was to flipping; the forward is right, the training
dynamics are not those of the original run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bitnet_train.errors import CheckpointError, ExportError
from bitnet_train.export.packing import packed_rows, unpack_ternary
from bitnet_train.model.config import BitNetConfig
from bitnet_train.model.size import parameter_shapes

SCALE_SUFFIX = "weight_scale"
PROJ_SUFFIX = "_proj.weight"


def master_weight(codes: Tensor, scale: float | Tensor) -> Tensor:
    """(out, in) fp32 latent weight that our quantizer maps back to exactly (codes, scale).

    ``W = T * a / mean(|T|)``; an all-zero T gives W = 0 (whose forward is 0 at any scale).
    """
    t = codes.float()
    frac = t.abs().mean()
    if frac == 0:
        return torch.zeros_like(t)
    return t * (torch.as_tensor(scale, dtype=torch.float32) / frac)


def is_packed_layout(config_dict: dict[str, Any], dtypes: dict[str, str]) -> bool:
    """True for transformers' offline (pre-quantized) BitNet layout.

    That is `quantization_mode: offline` or `linear_class: bitlinear` (which only exists packed)
    in config.json, or uint8 projection weights. `dtypes`: tensor name -> safetensors dtype.
    """
    qc = config_dict.get("quantization_config") or {}
    if qc.get("quant_method") == "bitnet" and (
        qc.get("quantization_mode", "offline") == "offline"
        or qc.get("linear_class", "bitlinear") == "bitlinear"
    ):
        return True
    return any(k.endswith(PROJ_SUFFIX) and d == "U8" for k, d in dtypes.items())


def _projection_shapes(config: BitNetConfig) -> dict[str, tuple[int, int]]:
    """Name -> (out, in) of every BitLinear weight, from the config."""
    return {k: v for k, v in parameter_shapes(config).items() if k.endswith(PROJ_SUFFIX)}


def master_state_from_packed(
    tensors: dict[str, Tensor],
    config: BitNetConfig,
    config_dict: dict[str, Any],
    source: str | Path = "checkpoint",
) -> dict[str, Tensor]:
    """Turn a packed transformers state dict into a master state dict for `config`.

    Every projection `P.weight` is uint8 (ceil(out/4), in) (or already-unpacked ternary floats
    (out, in), which transformers also loads) with `P.weight_scale` of one element: a = scale for
    `linear_class: autobitlinear` (it multiplies the output), a = 1 / scale for `bitlinear` (it
    divides). Other tensors pass through as fp32. Raises CheckpointError naming the tensor.
    """
    qc = config_dict.get("quantization_config") or {}
    reciprocal = qc.get("linear_class", "bitlinear") == "bitlinear"
    out = {k: v for k, v in tensors.items() if not k.endswith(SCALE_SUFFIX)}
    for name, (rows, cols) in _projection_shapes(config).items():
        if name not in tensors:
            raise CheckpointError(f"{source}: tensor {name} is missing")
        stored = tensors[name]
        if stored.dtype == torch.uint8:
            want: tuple[int, ...] = (packed_rows(rows), cols)
        else:
            want = (rows, cols)
        if tuple(stored.shape) != want:
            packed = "packed 4 rows per byte from " if stored.dtype == torch.uint8 else ""
            raise CheckpointError(
                f"{source}: tensor {name} has shape {list(stored.shape)} but config.json implies "
                f"{list(want)} ({packed}[{rows}, {cols}]); the weights and config.json describe "
                "different models"
            )
        scale_name = name.removesuffix("weight") + SCALE_SUFFIX
        if scale_name not in tensors:
            raise CheckpointError(f"{source}: {scale_name} is missing (needed to unpack {name})")
        scale_t = tensors[scale_name].float().reshape(-1)
        if scale_t.numel() != 1:
            raise CheckpointError(
                f"{source}: {scale_name} has {scale_t.numel()} elements; expected one per-tensor "
                "scale"
            )
        a = 1.0 / scale_t[0] if reciprocal else scale_t[0]
        try:
            if stored.dtype == torch.uint8:
                codes = unpack_ternary(stored, rows, name)
            else:
                codes = stored.round().to(torch.int8)
                if not torch.equal(codes.float(), stored.float()) or codes.abs().max() > 1:
                    raise ExportError(f"{name}: an offline weight must be ternary")
        except ExportError as err:
            raise CheckpointError(f"{source}: {err}") from err
        out[name] = master_weight(codes, a)
    stray = [k for k in tensors if k.endswith(SCALE_SUFFIX)
             and k.removesuffix(SCALE_SUFFIX) + "weight" not in out]
    if stray:
        raise CheckpointError(f"{source}: unexpected tensor {stray[0]} (no matching projection)")
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
