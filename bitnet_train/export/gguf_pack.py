"""Pack and unpack ternary matrices for GGUF: TQ1_0 / TQ2_0 (llama.cpp) and I2_S (bitnet.cpp).

Pure numpy functions on the internal form of a ternary weight: ``codes`` (out, in) int8 in
{-1, 0, 1} and one fp32 ``scale`` a, so that the weight is ``a * codes``.

TQ1_0 / TQ2_0 (ggml types 34 / 35) are quantized by the `gguf` package itself
(`gguf.quants.quantize`): each block of 256 values carries its own fp16 ``d`` = block absmax.
Quantizing ``a * codes`` gives ``d = fp16(a)`` in every block holding a non-zero code (0 in an
all-zero block, which decodes to zeros just the same), so the per-tensor scale travels inside
the blocks, as llama.cpp's own converter does it (`BitnetModel.weight_quant` writes ``a * T``
and lets the TQ quantizer pack it; no separate ``.scale`` tensor). The only loss is the fp16
rounding of ``a`` (relative error <= 2**-11).

I2_S (type 36 in microsoft/BitNet's llama.cpp fork; no upstream equivalent) is written here, as
the fork's ``quantize_i2_s`` lays it out on x86 (``ACT_PARALLEL``, the default of its
``gemm-config.h``): the row-major [out, in] matrix flattened and cut into 128-value chunks of
32 bytes, byte j of a chunk holding ``c[j] << 6 | c[32 + j] << 4 | c[64 + j] << 2 | c[96 + j]``
with ``c = t + 1``; after all ``out * in / 4`` bytes a 32-byte tail whose first 4 bytes are the
fp32 scale ``a`` (a multiplier; the fork writes the absmax of ``a * T``, which is ``a``). ARM
builds of bitnet.cpp quantize with 64-value chunks instead, so a file written here is for x86
builds, like a file made by the fork's ``llama-quantize`` on x86.

Row lengths: llama.cpp's TQ dot products work on whole 256-value blocks of a row and bitnet.cpp's
I2_S kernels on whole 128-value chunks. A padded row would need the activations padded too,
which neither engine does, so a matrix whose row length is not a multiple of the block size is
refused with an ExportError rather than padded.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from bitnet_train.errors import CheckpointError, ExportError

TQ_BLOCK = 256
"""Values per TQ1_0 / TQ2_0 block (ggml's QK_K)."""
I2S_BLOCK = 128
"""Values per I2_S chunk on x86 (bitnet.cpp's QK_I2_S)."""
I2S_TAIL_BYTES = 32
"""Bytes after the packed codes of an I2_S tensor: fp32 scale, then 28 bytes of zero padding."""
I2S_TYPE_ID = 36
"""ggml type id of I2_S in microsoft/BitNet's llama.cpp fork (unknown to the PyPI `gguf`)."""

TQ_TYPES: dict[str, GGMLQuantizationType] = {
    "tq1_0": GGMLQuantizationType.TQ1_0,
    "tq2_0": GGMLQuantizationType.TQ2_0,
}


def check_row_length(name: str, shape: tuple[int, ...], block: int, fmt: str) -> None:
    """Raise ExportError unless the row length (last dim) of `name` is a multiple of `block`."""
    if shape[-1] % block:
        raise ExportError(
            f"{name}: row length {shape[-1]} (shape {tuple(shape)}) is not a multiple of {block}, "
            f"the block size of {fmt}. The engine multiplies whole blocks of a row and cannot run "
            f"padded rows, so this model cannot be written as {fmt}: choose hidden_size, "
            f"intermediate_size and heads * head_dim as multiples of {block}"
        )


def _check_codes(name: str, codes: np.ndarray) -> None:
    if codes.ndim != 2:
        raise ExportError(f"{name}: expected a 2-D ternary matrix, got shape {codes.shape}")
    if codes.size and (codes.min() < -1 or codes.max() > 1):
        raise ExportError(f"{name}: codes must lie in {{-1, 0, 1}}")


# TQ1_0 / TQ2_0 --------------------------------------------------------------------------------
def pack_tq(codes: np.ndarray, scale: float, quant: str, name: str = "tensor") -> np.ndarray:
    """(out, in) ternary codes and scale -> (out, in / 256 * type_size) uint8 TQ blocks.

    The values ``a * codes`` are quantized by `gguf.quants.quantize`, so each block's fp16 ``d``
    is ``fp16(a)`` (see the module docstring).
    """
    qtype = TQ_TYPES[quant]
    _check_codes(name, codes)
    check_row_length(name, codes.shape, TQ_BLOCK, quant.upper())
    values = codes.astype(np.float32) * np.float32(scale)
    return quantize(values, qtype)


def unpack_tq(packed: np.ndarray, quant: str, name: str = "tensor") -> tuple[np.ndarray, float]:
    """Inverse of `pack_tq`: (out, bytes) uint8 -> ((out, in) int8 codes, fp32 scale).

    Every non-zero value of a tensor packed by `pack_tq` has the same magnitude fp16(a); a file
    whose blocks carry different scales is not a per-tensor ternary matrix and is refused.
    An all-zero matrix returns scale 0.
    """
    values = dequantize(packed, TQ_TYPES[quant])
    codes = np.sign(values).astype(np.int8)
    mags = np.abs(values[codes != 0])
    if mags.size == 0:
        return codes, 0.0
    if mags.max() != mags.min():
        raise CheckpointError(
            f"{name}: its {quant.upper()} blocks carry different scales "
            f"({mags.min():.6g} .. {mags.max():.6g}); expected one scale per tensor, as a BitNet "
            "b1.58 export writes"
        )
    return codes, float(mags[0])


def tq_bytes(n_values: int, quant: str) -> tuple[int, int]:
    """(code bytes, scale bytes) of `n_values` values in TQ1_0 / TQ2_0 (2 bytes of d per block)."""
    block, type_size = GGML_QUANT_SIZES[TQ_TYPES[quant]]
    n_blocks = n_values // block
    return n_blocks * (type_size - 2), n_blocks * 2


# I2_S -----------------------------------------------------------------------------------------
def pack_i2s(codes: np.ndarray, scale: float, name: str = "tensor") -> np.ndarray:
    """(out, in) ternary codes and scale -> 1-D int8 array of out * in / 4 + 32 bytes (I2_S, x86).

    Returned as int8 because that is what `GGUFWriter.add_tensor` takes for a raw type it does
    not know (a uint8 array would be reinterpreted through the package's block-size table).
    """
    _check_codes(name, codes)
    check_row_length(name, codes.shape, I2S_BLOCK, "I2_S")
    c = (codes.reshape(-1, 4, 32).astype(np.int16) + 1).astype(np.uint8)  # (chunks, 4, 32)
    packed = (c[:, 0] << 6) | (c[:, 1] << 4) | (c[:, 2] << 2) | c[:, 3]  # (chunks, 32)
    tail = np.zeros(I2S_TAIL_BYTES, dtype=np.uint8)
    tail[:4] = np.array([scale], dtype="<f4").view(np.uint8)
    return np.concatenate([packed.reshape(-1), tail]).view(np.int8)


def unpack_i2s(
    data: np.ndarray, shape: tuple[int, int], name: str = "tensor"
) -> tuple[np.ndarray, float]:
    """Inverse of `pack_i2s`: raw bytes of one I2_S tensor -> ((out, in) int8 codes, fp32 scale)."""
    out_features, in_features = shape
    n = out_features * in_features
    raw = np.asarray(data).reshape(-1).view(np.uint8)
    if n % I2S_BLOCK or raw.size != n // 4 + I2S_TAIL_BYTES:
        raise CheckpointError(
            f"{name}: {raw.size} bytes do not hold an I2_S tensor of shape {tuple(shape)} "
            f"(expected {n // 4 + I2S_TAIL_BYTES})"
        )
    packed = raw[: n // 4].reshape(-1, 1, 32)  # (chunks, 1, 32)
    shifts = np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)
    c = (packed >> shifts) & 3  # (chunks, 4, 32): c[:, g, j] is value 32 * g + j of the chunk
    if (c == 3).any():
        raise CheckpointError(f"{name}: I2_S code 3 found; valid codes are 0, 1, 2 (-1, 0, +1)")
    codes = (c.astype(np.int8) - 1).reshape(out_features, in_features)
    scale = float(raw[n // 4 : n // 4 + 4].view("<f4")[0])
    return codes, scale


def i2s_bytes(n_values: int) -> tuple[int, int]:
    """(code bytes, scale-tail bytes) of one I2_S tensor of `n_values` values."""
    return n_values // 4, I2S_TAIL_BYTES
