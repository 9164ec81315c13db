"""The ternary weights of a trained model, exactly as its training forward computes them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bitnet_train.model.bitlinear import BitLinear, ternary_weight


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
    out: dict[str, TernaryTensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, BitLinear):
            codes, scale = ternary_weight(module.weight)
            out[f"{name}.weight"] = TernaryTensor(codes=codes.cpu(), scale=scale.cpu())
    return out
