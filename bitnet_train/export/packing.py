"""transformers' 2-bit ternary packing (`integrations/bitnet.py`) and its inverse: pure functions.

Layout (verified against transformers 5.x `pack_weights` / `unpack_weights`): a ternary matrix
``T`` of shape (out, in) with values in {-1, 0, 1} is stored as uint8 ``P`` of shape (R, in)
with ``R = ceil(out / 4)``, packed along the OUTPUT dimension in four row groups:

    P[r, c] = sum_{i=0..3} (T[i * R + r, c] + 1) << (2 * i)

so bits 0-1 of byte row r hold row r, bits 2-3 row R + r, bits 4-5 row 2R + r and bits 6-7 row
3R + r (code t + 1: -1 -> 0b00, 0 -> 0b01, 1 -> 0b10). When 4 does not divide `out`, the rows
past `out` are missing from the last group and their bits stay 0b00, exactly as `pack_weights`
leaves them; `unpack_ternary` needs `out` to drop them (transformers' own `unpack_weights`
returns 4R rows, the padding reading as -1). transformers' loaders only accept out % 4 == 0
(see `bitnet_train.export.hf`), so the HF exporter refuses other shapes before packing.

Unlike transformers' `pack_weights` (which adds 1 to its argument in place), these functions
never modify their inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bitnet_train.errors import ExportError

VALUES_PER_BYTE = 4
"""Ternary values per uint8 (2 bits each)."""


def packed_rows(out_features: int) -> int:
    """Rows of the packed tensor for `out_features` ternary rows: ceil(out / 4)."""
    return -(-out_features // VALUES_PER_BYTE)


def check_ternary(codes: Tensor, name: str = "tensor") -> None:
    """Raise ExportError unless `codes` is an integer tensor with values in {-1, 0, 1}."""
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ExportError(f"{name}: ternary codes must be an integer tensor, got {codes.dtype}")
    if codes.dim() == 0 or codes.shape[0] == 0:
        raise ExportError(f"{name}: cannot pack a tensor of shape {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise ExportError(
            f"{name}: values must be in {{-1, 0, 1}}, found range "
            f"[{int(codes.min())}, {int(codes.max())}]"
        )


def pack_ternary(codes: Tensor, name: str = "tensor") -> Tensor:
    """Pack ternary codes 4 per byte along dim 0, in transformers' order.

    Args:
        codes: (out, ...) integer tensor with values in {-1, 0, 1} (usually (out, in) int8).
        name: used in error messages.
    Returns:
        (ceil(out / 4), ...) uint8; rows past `out` in the last group are 0b00.
    """
    check_ternary(codes, name)
    out = codes.shape[0]
    rows = packed_rows(out)
    padded = torch.zeros((VALUES_PER_BYTE * rows, *codes.shape[1:]), dtype=torch.uint8,
                         device=codes.device)
    padded[:out] = (codes + 1).to(torch.uint8)  # codes 0, 1, 2; padding stays 0
    groups = padded.view(VALUES_PER_BYTE, rows, *codes.shape[1:])  # group i = rows [iR, (i+1)R)
    packed = torch.zeros((rows, *codes.shape[1:]), dtype=torch.uint8, device=codes.device)
    for i in range(VALUES_PER_BYTE):
        packed |= groups[i] << (2 * i)
    return packed


def unpack_ternary(packed: Tensor, out_features: int, name: str = "tensor") -> Tensor:
    """Inverse of `pack_ternary`.

    Args:
        packed: (R, ...) uint8 as written by `pack_ternary` or transformers' `pack_weights`.
        out_features: the number of ternary rows; ceil(out_features / 4) must equal R.
    Returns:
        (out_features, ...) int8 codes in {-1, 0, 1}.
    Raises:
        ExportError: wrong dtype, R that cannot hold `out_features` rows, or a 2-bit code 0b11
            (not a ternary value: the bytes are not this layout).
    """
    if packed.dtype != torch.uint8:
        raise ExportError(f"{name}: packed ternary weights must be uint8, got {packed.dtype}")
    if packed.dim() == 0 or packed_rows(out_features) != packed.shape[0]:
        raise ExportError(
            f"{name}: packed shape {tuple(packed.shape)} cannot hold {out_features} rows "
            f"(expected {packed_rows(out_features)} packed rows = ceil({out_features} / 4))"
        )
    groups = torch.stack([(packed >> (2 * i)) & 0b11 for i in range(VALUES_PER_BYTE)])
    codes = groups.flatten(0, 1)[:out_features]  # (4R, ...) in row order iR + r, padding dropped
    if bool((codes == 0b11).any()):
        raise ExportError(f"{name}: found the 2-bit code 0b11, which is not a ternary value")
    return codes.to(torch.int8) - 1
