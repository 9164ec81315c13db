"""The ternary weights of a trained model, exactly as its training forward computes them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bitnet_train.errors import ExportError
from bitnet_train.model.bitlinear import BitLinear, ternary_weight


def require_ternary(model: nn.Module) -> None:
    """ExportError unless `model` is a ternary (BitLinear) model: a `quantization: none` model
    has full-precision projections that every ternary format would silently quantize."""
    quantization = getattr(getattr(model, "config", None), "quantization", "ternary")
    if quantization != "ternary":
        raise ExportError(
            f"model.quantization={quantization!r}: the model was trained with full-precision "
            "linear layers, and every export format (hf, hf-bf16, gguf, gpu) would run it as "
            "ternary. Save it with save_model (master layout) instead."
        )


@dataclass
class TernaryTensor:
    """codes: (out, in) int8 in {-1, 0, 1}; scale: fp32 scalar a = mean(|W|), W_q = a * codes."""

    codes: Tensor
    scale: Tensor

    def dequantize(self) -> Tensor:
        """(out, in) fp32 a * codes: the weight the training forward multiplies by."""
        return self.codes.float() * self.scale


@torch.no_grad()
def extract_ternary(model: nn.Module) -> dict[str, TernaryTensor]:
    """`<module name>.weight` -> TernaryTensor for every BitLinear of `model`.

    Reuses the model's own quantizer (`ternary_weight`), so export and training agree by
    construction.
    """
    require_ternary(model)
    out: dict[str, TernaryTensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, BitLinear):
            codes, scale = ternary_weight(module.weight)
            out[f"{name}.weight"] = TernaryTensor(codes=codes.cpu(), scale=scale.cpu())
    return out
