"""The checkpoint of Microsoft's BitNet GPU W2A8 kernel (microsoft/BitNet ``gpu/``), and its reader.

Layout, as ``gpu/convert_safetensors.py`` + ``gpu/convert_checkpoint.py`` + ``gpu/pack_weight.py``
write it and ``gpu/model.py`` / ``gpu/bitnet_kernels`` read it:

- Two files: ``model_state_int2.pt`` (packed ternary weights, what ``generate.py`` loads) and
  ``model_state_fp16.pt`` (the same model with fake-quantized ``a * T`` weights in bf16, for a
  plain PyTorch prefill). Both are ``torch.save``d state dicts of ``gpu/model.py``'s Transformer.
  We add ``config.json`` (transformers layout) so that `read_gpu_checkpoint` can split the fused
  matrices; ``model.py`` ignores it.
- Keys: ``layers.{i}.attention.wqkv.weight`` (q, k, v stacked along rows),
  ``layers.{i}.attention.wo.weight``, ``layers.{i}.feed_forward.w13.weight`` (gate, then up),
  ``layers.{i}.feed_forward.w2.weight``, each with ``.weight_scale``: bf16 [4] holding the
  absmean ``a`` of each sub-matrix (each of q, k, v, gate, up quantized on its own, as our
  BitLinears are), zero padded (bf16 as the released converter writes it: the scale is
  rounded to relative error <= 2**-9); norms ``layers.{i}.attention_norm``,
  ``layers.{i}.ffn_norm``, ``layers.{i}.attention.attn_sub_norm``,
  ``layers.{i}.feed_forward.ffn_sub_norm``; ``tok_embeddings``, ``output`` (the embeddings
  again when tied) and ``norm``, all bf16.
- Q and K rows are permuted from the transformers (rotate-half) layout to the interleaved
  RoPE that ``xformers.ops.rope_padded`` applies: ``(h l d) i -> (h d l) i`` with l = 2.
- Packed weights: int8 [N, K / 4]; code ``t + 2`` per trit (-1 -> 1, 0 -> 2, 1 -> 3); the matrix
  cut into 16 x 32 tiles (16 rows, 32 columns) of 128 contiguous bytes, tiles ordered row-block
  first; in a tile, 32 little-endian uint32 words, word k holding row ``(k // 16) * 8 + k % 8``
  and columns ``16 * ((k % 16) // 8) + o`` for o = 0..15, value o at bit
  ``8 * (o % 4) + 2 * (o // 4)`` (so that one ``lop3`` per 4 values unpacks them to int8 lanes).
  The [N, K / 4] shape is nominal: rows of the array are not rows of the matrix.

Limits of the released kernel, worth knowing before deploying this format: it is a decode
kernel, dispatched only for M = 1 token and ten (N, K) shapes of the 2B4T-class models
(`KERNEL_SHAPES`); any other call prints "required ladder gemm kernel" and leaves the output
zero, so a multi-token prefill needs the fp16 file and a plain PyTorch path; and
``gpu/model.py`` hard-codes the squared-ReLU FFN and the 2B4T dimensions. Export refuses
non-relu2 models and warns about shapes the kernel lacks.

The kernel also scales the fused wqkv wrongly under GQA. ``bitnet_kernels.cu`` picks the scale
of output row r as ``ws[r / (N / ws_num)]`` with ``ws_num = 3`` for the wqkv shape
(3840, 2560): three equal row groups of 1280, while 2B4T's q / k / v have 2560 / 640 / 640
rows. So q rows 1280-2559 read k's scale and k's rows (2560-3199) read v's
(`wqkv_scale_misreads` lists the rows for any config). Measured on an H200 with Microsoft's own
kernel (compiled for sm_90) fed our export of a 2-layer 2B4T-width model, one int8 activation
row per matrix, against ``(x_q / s) @ (T * a)^T`` from our master weights: wo, w13, w2 within
1.7e-3 to 4.4e-3 relative (bf16 output rounding), q rows 0-1279 and v rows within 3.8e-3, so
the packing is exact; q rows 1280-2559 were 17% off and k rows 31% off. Every GQA model with
distinct q / k / v scales, the released 2B4T included, gets wrong attention from that kernel;
export warns (`WQKV_SCALE_WARNING`). The fp16 file is unaffected.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bitnet_train.atomic import atomic_directory
from bitnet_train.errors import CheckpointError, ExportError
from bitnet_train.export.ternary import TernaryTensor, extract_ternary
from bitnet_train.integrity import verify_directory, write_manifest
from bitnet_train.model.config import BitNetConfig

logger = logging.getLogger(__name__)

INT2_FILE = "model_state_int2.pt"
FP16_FILE = "model_state_fp16.pt"
CONFIG_FILE = "config.json"
TILE_N, TILE_K = 16, 32
KERNEL_SHAPES = frozenset({
    (3840, 2560), (2560, 2560), (13824, 2560), (2560, 6912), (4800, 3200), (3200, 3200),
    (20480, 3200), (3200, 10240), (5120, 27648), (55296, 5120),
})
"""(N, K) pairs compiled into gpu/bitnet_kernels/bitnet_kernels.cu."""
N_SCALES = 4
KERNEL_WQKV_SCALE_GROUPS = 3
"""``ws_num`` of the fused wqkv in bitnet_kernels.cu: row r is scaled by ws[r / (N / 3)]."""
WQKV_SCALE_WARNING = (
    "Microsoft's GPU kernel scales fused wqkv row r by ws[r // (N / 3)] (three equal row "
    "groups), which misses the q/k/v boundaries of this GQA model: %s. On an H200 with a "
    "2-layer 2B4T-width export, such rows came out 17%% (q) and 31%% (k) off while every other "
    "row matched within 4.4e-3; attention from model_state_int2.pt is wrong until the kernel "
    "takes per-sub-matrix scales (model_state_fp16.pt is unaffected)"
)

# Word k of a tile holds tile row _WORD_ROW[k], columns 16 * _WORD_HALF[k] + 0..15.
_K = torch.arange(32)
_WORD_ROW = (_K // 16) * 8 + _K % 8
_WORD_HALF = (_K % 16) // 8
_SHIFTS = (2 * torch.arange(4, dtype=torch.uint8)).view(4, 1)  # 2 * j for value o = 4 j + b


# Packing --------------------------------------------------------------------------------------
def check_gpu_shape(name: str, n: int, k: int) -> None:
    """Raise ExportError unless (N, K) tiles into 16 x 32 blocks."""
    if n % TILE_N or k % TILE_K:
        raise ExportError(
            f"{name}: shape ({n}, {k}) does not tile into the kernel's {TILE_N} x {TILE_K} blocks: "
            f"output rows must be a multiple of {TILE_N} and input columns of {TILE_K}"
        )


def pack_gpu_weight(codes: Tensor, name: str = "tensor") -> Tensor:
    """(N, K) ternary int8 codes -> (N, K / 4) int8 in the kernel's tile layout."""
    n, k = codes.shape
    check_gpu_shape(name, n, k)
    c = (codes.to(torch.int16) + 2).to(torch.uint8)
    tiles = c.view(n // TILE_N, TILE_N, k // TILE_K, TILE_K).permute(0, 2, 1, 3)  # (nb, kb, 16, 32)
    halves = tiles.reshape(*tiles.shape[:2], TILE_N, 2, 16)  # (nb, kb, row, half, o)
    words = halves[:, :, _WORD_ROW, _WORD_HALF, :]  # (nb, kb, 32 words, 16 values)
    vals = words.reshape(*words.shape[:3], 4, 4)  # (nb, kb, word, j, b) with o = 4 j + b
    packed = (vals << _SHIFTS).sum(dim=3, dtype=torch.uint8)  # byte b = sum_j v[j, b] << 2 j
    return packed.reshape(n, k // 4).view(torch.int8)


def unpack_gpu_weight(packed: Tensor, name: str = "tensor") -> Tensor:
    """Inverse of `pack_gpu_weight`: (N, K / 4) int8 -> (N, K) int8 codes in {-1, 0, 1}."""
    n, k = packed.shape[0], packed.shape[1] * 4
    check_gpu_shape(name, n, k)
    raw = packed.contiguous().view(torch.uint8).reshape(n // TILE_N, k // TILE_K, 32, 1, 4)
    vals = (raw >> _SHIFTS) & 3  # (nb, kb, word, j, b)
    if (vals == 0).any():
        raise CheckpointError(f"{name}: code 0 found; valid codes are 1, 2, 3 (-1, 0, +1)")
    words = vals.reshape(n // TILE_N, k // TILE_K, 32, 16)
    halves = torch.empty(n // TILE_N, k // TILE_K, TILE_N, 2, 16, dtype=torch.uint8)
    halves[:, :, _WORD_ROW, _WORD_HALF, :] = words
    tiles = halves.reshape(n // TILE_N, k // TILE_K, TILE_N, TILE_K).permute(0, 2, 1, 3)
    return (tiles.reshape(n, k).to(torch.int8) - 2).contiguous()


def permute_qk(w: Tensor, n_heads: int) -> Tensor:
    """Rotate-half rows -> interleaved-pair rows per head: ``(h l d) i -> (h d l) i``, l = 2."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_qk(w: Tensor, n_heads: int) -> Tensor:
    """Inverse of `permute_qk`: ``(h d l) i -> (h l d) i``."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# Export ---------------------------------------------------------------------------------------
def _our(i: int, suffix: str) -> str:
    return f"model.layers.{i}.{suffix}.weight"


_FUSED = {  # gpu key suffix -> our BitLinears, in stacking order
    "attention.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.wo": ("self_attn.o_proj",),
    "feed_forward.w13": ("mlp.gate_proj", "mlp.up_proj"),
    "feed_forward.w2": ("mlp.down_proj",),
}
_NORMS = {  # gpu key suffix -> our norm
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attention.attn_sub_norm": "self_attn.attn_sub_norm",
    "feed_forward.ffn_sub_norm": "mlp.ffn_sub_norm",
}


def wqkv_scale_misreads(config: BitNetConfig) -> list[tuple[str, int, int, str]]:
    """Rows of the fused wqkv that the released kernel scales with another sub-matrix's scale.

    Returns (sub-matrix, first row, last row, sub-matrix whose scale it reads), rows numbered
    in the fused (N, K) matrix; empty when the three equal row groups coincide with q / k / v
    (multi-head attention). 2B4T: [("q", 1280, 2559, "k"), ("k", 2560, 3199, "v")].
    """
    hd = config.head_dim
    parts = [("q", config.num_attention_heads * hd), ("k", config.num_key_value_heads * hd),
             ("v", config.num_key_value_heads * hd)]
    group = sum(rows for _, rows in parts) // KERNEL_WQKV_SCALE_GROUPS  # N / ws_num, truncated
    out: list[tuple[str, int, int, str]] = []
    start = 0
    for name, rows in parts:
        first = start
        while first < start + rows:  # runs of this sub-matrix's rows that read one scale
            index = min(first // group, KERNEL_WQKV_SCALE_GROUPS - 1)
            last = min((index + 1) * group, start + rows) - 1
            if index == KERNEL_WQKV_SCALE_GROUPS - 1:
                last = start + rows - 1
            if parts[index][0] != name:
                out.append((name, first, last, parts[index][0]))
            first = last + 1
        start += rows
    return out


def _head_counts(config: BitNetConfig) -> dict[str, int]:
    return {"self_attn.q_proj": config.num_attention_heads,
            "self_attn.k_proj": config.num_key_value_heads}


@torch.no_grad()
def export_gpu(model: Any, out_dir: str | Path) -> Path:
    """Write `model` as the GPU kernel's checkpoint (two .pt files + config.json); return the dir.

    Raises ExportError for a non-relu2 model (``gpu/model.py`` hard-codes squared ReLU) or a
    matrix that does not tile into 16 x 32 blocks.
    """
    config: BitNetConfig = model.config
    if config.hidden_act != "relu2":
        raise ExportError(
            f"hidden_act={config.hidden_act!r}: microsoft/BitNet's gpu/model.py computes the FFN "
            "with squared ReLU (2B4T), so this model would run and compute a different function; "
            "the gpu format serves relu2 models only"
        )
    misreads = wqkv_scale_misreads(config)
    if misreads:
        rows = "; ".join(f"{part} rows {first}-{last} read {read}'s scale"
                         for part, first, last, read in misreads)
        logger.warning(WQKV_SCALE_WARNING, rows)
    ternary = extract_ternary(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    bf16 = {n: p.detach().to(torch.bfloat16).cpu()  # the full-precision parameters only
            for n, p in params.items() if n not in ternary}
    heads = _head_counts(config)
    int2: dict[str, Tensor] = {}
    fp16: dict[str, Tensor] = {}
    missing_kernels = set()
    for i in range(config.num_hidden_layers):
        for key, parts in _FUSED.items():
            gpu_key = f"layers.{i}.{key}"
            tts = [ternary[_our(i, p)] for p in parts]
            codes = torch.cat([
                permute_qk(t.codes, heads[p]) if p in heads else t.codes for p, t in zip(parts, tts)
            ])
            scales = torch.zeros(N_SCALES, dtype=torch.bfloat16)
            scales[: len(tts)] = torch.stack([t.scale for t in tts]).to(torch.bfloat16)
            int2[f"{gpu_key}.weight"] = pack_gpu_weight(codes, gpu_key)
            int2[f"{gpu_key}.weight_scale"] = scales
            row_scales = torch.cat([t.scale.expand(t.codes.shape[0]) for t in tts])[:, None]
            fp16[f"{gpu_key}.weight"] = (codes.float() * row_scales).to(torch.bfloat16)
            if tuple(codes.shape) not in KERNEL_SHAPES:
                missing_kernels.add(tuple(codes.shape))
        for key, ours in _NORMS.items():
            norm = bf16[_our(i, ours)]
            int2[f"layers.{i}.{key}.weight"] = fp16[f"layers.{i}.{key}.weight"] = norm
    embed = bf16["model.embed_tokens.weight"]
    tail = {
        "tok_embeddings.weight": embed,
        # the same tensor object when tied, so torch.save stores it once
        "output.weight": embed if _tied(model) else bf16["lm_head.weight"],
        "norm.weight": bf16["model.norm.weight"],
    }
    int2.update(tail)
    fp16.update(tail)
    if missing_kernels:
        logger.warning(
            "the released GPU kernel has no code for (N, K) = %s (it only has %s): those matmuls "
            "return zeros until kernels are generated for them",
            sorted(missing_kernels), sorted(KERNEL_SHAPES),
        )
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, marker=CONFIG_FILE) as tmp:  # never a torn directory
        torch.save(int2, tmp / INT2_FILE)
        torch.save(fp16, tmp / FP16_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        write_manifest(tmp, [INT2_FILE, FP16_FILE, CONFIG_FILE])
    return out_dir


def _tied(model: Any) -> bool:
    return model.lm_head.weight is model.model.embed_tokens.weight


# Read back ------------------------------------------------------------------------------------
def read_gpu_checkpoint(out_dir: str | Path) -> dict[str, TernaryTensor | Tensor]:
    """Unpack a GPU kernel checkpoint back to our parameter names.

    Returns ``model.layers.N.*_proj.weight`` -> TernaryTensor (codes in the transformers row
    order, Q/K permutation undone; scale = the stored bf16 absmean as fp32) and every other
    parameter (norms, ``model.embed_tokens.weight``, ``lm_head.weight``) -> fp32 tensor.
    Needs the ``config.json`` that `export_gpu` writes beside the .pt files.
    """
    out_dir = Path(out_dir)
    for fname in (INT2_FILE, CONFIG_FILE):
        if not (out_dir / fname).is_file():
            raise CheckpointError(f"{out_dir / fname} is missing: not a GPU checkpoint of ours")
    verify_directory(out_dir)
    config = BitNetConfig.from_hf_dict(json.loads((out_dir / CONFIG_FILE).read_text()))
    state = torch.load(out_dir / INT2_FILE, map_location="cpu", weights_only=True)
    heads = _head_counts(config)
    hd = config.head_dim
    rows = {"self_attn.q_proj": config.num_attention_heads * hd,
            "self_attn.k_proj": config.num_key_value_heads * hd,
            "self_attn.v_proj": config.num_key_value_heads * hd,
            "self_attn.o_proj": config.hidden_size,
            "mlp.gate_proj": config.intermediate_size, "mlp.up_proj": config.intermediate_size,
            "mlp.down_proj": config.hidden_size}

    def get(key: str) -> Tensor:
        if key not in state:
            raise CheckpointError(f"{out_dir / INT2_FILE}: key {key} is missing")
        return state[key]

    out: dict[str, TernaryTensor | Tensor] = {}
    for i in range(config.num_hidden_layers):
        for key, parts in _FUSED.items():
            gpu_key = f"layers.{i}.{key}"
            packed, scales = get(f"{gpu_key}.weight"), get(f"{gpu_key}.weight_scale").float()
            expected_n = sum(rows[p] for p in parts)
            if packed.shape[0] != expected_n or scales.shape != (N_SCALES,):
                raise CheckpointError(
                    f"{out_dir / INT2_FILE}: {gpu_key}.weight has {packed.shape[0]} rows and "
                    f"{tuple(scales.shape)} scales; config.json needs {expected_n} rows, "
                    f"({N_SCALES},) scales"
                )
            codes = unpack_gpu_weight(packed, gpu_key).split([rows[p] for p in parts])
            for j, (p, c) in enumerate(zip(parts, codes)):
                c = unpermute_qk(c, heads[p]) if p in heads else c
                out[_our(i, p)] = TernaryTensor(codes=c.contiguous(), scale=scales[j].clone())
        for key, ours in _NORMS.items():
            out[_our(i, ours)] = get(f"layers.{i}.{key}.weight").float()
    out["model.embed_tokens.weight"] = get("tok_embeddings.weight").float()
    out["lm_head.weight"] = get("output.weight").float()
    out["model.norm.weight"] = get("norm.weight").float()
    return out


# Size report ----------------------------------------------------------------------------------
def gpu_size_report(config: BitNetConfig) -> dict[str, Any]:
    """Bytes of the GPU checkpoint of `config` (tensor data; pickle overhead excluded).

    ternary_bytes: 2 bits per weight; scale_bytes: bf16 [4] per fused matrix; embedding_bytes:
    bf16 embeddings (twice if untied); norm_bytes: bf16 norms; total_bytes: model_state_int2.pt;
    fp16_file_bytes: model_state_fp16.pt (ternary weights as bf16); refused: why export would
    refuse the config, or None.
    """
    h, m, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    shapes = [(q + 2 * kv, h), (h, q), (2 * m, h), (h, m)]
    n_ternary = n * sum(a * b for a, b in shapes)
    ternary = n_ternary // 4
    scales = n * len(shapes) * N_SCALES * 2
    embedding = config.vocab_size * h * 2 * (1 if config.tie_word_embeddings else 2)
    norms = 2 * (n * (3 * h + m) + h)
    refused = None
    if config.hidden_act != "relu2":
        refused = f"hidden_act={config.hidden_act!r}: gpu/model.py hard-codes squared ReLU"
    return {
        "format": "gpu",
        "ternary_bytes": ternary,
        "scale_bytes": scales,
        "embedding_bytes": embedding,
        "norm_bytes": norms,
        "total_bytes": ternary + scales + embedding + norms,
        "fp16_file_bytes": 2 * n_ternary + embedding + norms,
        "kernel_has_shapes": all(s in KERNEL_SHAPES for s in shapes),
        "refused": refused,
    }
