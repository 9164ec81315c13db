"""Size report: bytes per export format, computed from a config alone (`--dry-run`).

Each format's report is a dict with the keys `format`, `ternary_bytes` (the projection weights
as the format stores them), `scale_bytes`, `embedding_bytes`, `norm_bytes`, `total_bytes`
(tensor data; file headers and tokenizer metadata add a few MB) and `refused` (why the
exporter would refuse this config, or None); the table adds bits per ternary weight (codes and
scales over the ternary parameter count). The GGUF and GPU reports come from their exporters
(`gguf_size_report`, `gpu_size_report`); the HF ones are computed here.

For reference the header also prints the information-theoretic size of the ternary weights,
log2(3) = 1.585 bits each: for 2B4T about 0.41 GB, the "0.4 GB" of the technical report; no
shipped format reaches it (TQ1_0 comes closest at 1.6875 bits per weight).
"""

from __future__ import annotations

from typing import Any

from bitnet_train.errors import ExportError
from bitnet_train.export.gguf import gguf_size_report
from bitnet_train.export.gpu import gpu_size_report
from bitnet_train.export.packing import VALUES_PER_BYTE, packed_rows
from bitnet_train.model.config import BitNetConfig
from bitnet_train.model.size import model_size, ternary_shapes

BF16_BYTES = 2
FP32_BYTES = 4
GGUF_QUANTS = ("tq2_0", "tq1_0", "i2_s")


def hf_size_report(config: BitNetConfig, packed: bool = True) -> dict[str, Any]:
    """`--format hf` (packed uint8 + fp32 scales, bf16 rest) or `hf-bf16` (bf16 latents)."""
    layers = config.num_hidden_layers
    shapes = ternary_shapes(config)
    n_ternary = layers * sum(o * i for _, o, i in shapes)
    refused = None
    if packed:
        ternary = layers * sum(packed_rows(o) * i for _, o, i in shapes)
        scales = layers * len(shapes) * FP32_BYTES
        bad = [(n, o) for n, o, _ in shapes if o % VALUES_PER_BYTE]
        if bad:
            refused = (f"{bad[0][0]} has {bad[0][1]} output rows, not a multiple of 4: "
                       "transformers cannot load it packed (use hf-bf16)")
    else:
        ternary, scales = BF16_BYTES * n_ternary, 0
    counts = model_size(config)
    embedding = counts.embedding_params * BF16_BYTES
    norms = counts.norm_params * BF16_BYTES
    return {
        "format": "hf" if packed else "hf-bf16",
        "ternary_bytes": ternary,
        "scale_bytes": scales,
        "embedding_bytes": embedding,
        "norm_bytes": norms,
        "total_bytes": ternary + scales + embedding + norms,
        "bits_per_ternary_weight": 8 * (ternary + scales) / max(n_ternary, 1),
        "refused": refused,
    }


def size_report(
    config: BitNetConfig, fmt: str, quant: str | None = None, embedding_type: str = "f16"
) -> dict[str, Any]:
    """The size report of one format (`quant` picks the GGUF type)."""
    if fmt in ("hf", "hf-bf16"):
        return hf_size_report(config, packed=fmt == "hf")
    if fmt == "gguf":
        return gguf_size_report(config, quant or default_gguf_quant(config), embedding_type)
    if fmt == "gpu":
        return gpu_size_report(config)
    raise ExportError(f"unknown format {fmt!r}; choose hf, hf-bf16, gguf or gpu")


def default_gguf_quant(config: BitNetConfig) -> str:
    """i2_s for relu2 models (bitnet.cpp's `bitnet-b1.58` computes relu2), tq2_0 for silu ones
    (llama.cpp's `bitnet` architecture gates its FFN with SiLU)."""
    return "tq2_0" if config.hidden_act == "silu" else "i2_s"


def all_size_reports(config: BitNetConfig, embedding_type: str = "f16") -> list[dict[str, Any]]:
    """Every format, GGUF in each of its ternary types."""
    wanted = [("hf", None), ("hf-bf16", None), *(("gguf", q) for q in GGUF_QUANTS), ("gpu", None)]
    return [size_report(config, fmt, quant, embedding_type) for fmt, quant in wanted]


def human_bytes(n: int | float) -> str:
    """Decimal units, as the 2B4T report counts (0.4 GB = 4e8 bytes)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3f} {unit}"
    return f"{int(n)} B"


def format_reports(config: BitNetConfig, rows: list[dict[str, Any]]) -> str:
    """A text table of `rows`, headed by the model's parameter counts and ternary sizes."""
    size = model_size(config)
    lines = [
        f"model {config.name}: {size.describe()}",
        f"non-embedding ternary weights: {human_bytes(size.ternary_entropy_bytes)} at log2(3) = "
        f"1.58 bits each (the report's figure), {human_bytes(size.ternary_params / 4)} at 2 bits "
        "(4 per byte, as the packed formats store them)",
        "",
        f"{'format':<14}{'ternary':>13}{'scales':>12}{'embeddings':>13}{'norms':>12}"
        f"{'total':>13}{'bits/w':>8}",
    ]
    for r in rows:
        name = r["format"] + (f" {r['quant']}" if r.get("quant") else "")
        bits = 8 * (r["ternary_bytes"] + r["scale_bytes"]) / max(size.ternary_params, 1)
        lines.append(
            f"{name:<14}{human_bytes(r['ternary_bytes']):>13}"
            f"{human_bytes(r['scale_bytes']):>12}{human_bytes(r['embedding_bytes']):>13}"
            f"{human_bytes(r['norm_bytes']):>12}{human_bytes(r['total_bytes']):>13}{bits:>8.3f}"
        )
        if r.get("refused"):
            lines.append(f"{'':<14}refused: {r['refused']}")
    return "\n".join(lines)
