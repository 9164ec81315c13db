"""GGUF export for llama.cpp (TQ1_0 / TQ2_0) and bitnet.cpp (I2_S), and import back.

Two engines, two architectures, one tensor naming (``token_embd``, ``output_norm``,
``blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, attn_sub_norm, ffn_norm, ffn_gate,
ffn_up, ffn_down, ffn_sub_norm}``), both tying the output to ``token_embd`` (there is no
``output.weight``; an untied model is refused), both with rotate-half RoPE, so Q/K rows are
written as trained (no permutation; llama.cpp's ``BitnetModel`` converter permutes nothing):

- ``tq1_0`` / ``tq2_0``: upstream llama.cpp, architecture ``bitnet`` (keys ``bitnet.*``). Its
  graph (``src/models/bitnet.cpp``) gates the FFN with SiLU (``LLM_FFN_SILU, LLM_FFN_PAR``): it
  serves ``hidden_act: silu`` models. A relu2 (2B4T) model would load and compute another
  function, so it is refused with a pointer to ``i2_s`` until upstream honours the activation
  key below (ggml-org/llama.cpp PR 26751 was not merged). The ternary scale travels in each TQ
  block's fp16 ``d`` (see `gguf_pack`), as upstream's converter does; no ``.scale`` tensors.
  CPU, Metal and Vulkan backends run TQ types; activations are quantized per 256-value block
  (Q8_K), not per token, so logits differ from the training forward by a few percent.
- ``i2_s``: microsoft/BitNet's llama.cpp fork, architecture ``bitnet-b1.58`` (keys
  ``bitnet-b1.58.*``), ternary tensors of the fork's type 36 (x86 layout) and
  ``general.file_type`` 40 (``LLAMA_FTYPE_MOSTLY_I2_S``), as its ``convert-ms-to-gguf-bitnet.py``
  + ``llama-quantize I2_S`` pipeline writes them for 2B4T. The architecture was built for 2B4T's
  relu2 FFN, but the fork pinned by microsoft/BitNet in mid-2026 hard-codes SiLU in that graph
  (microsoft/BitNet issues 588 and 602, fixes open): relu2 parity in bitnet.cpp is unverified
  here, and a silu model's result depends on the build. No file is refused for this; a warning
  is logged.

The FFN activation is written as ``<arch>.hidden_activation`` (``relu2`` or ``silu``), the key
that the fix llama.cpp and bitnet.cpp are converging on reads (ggml-org/llama.cpp PR 26751,
microsoft/BitNet PR 605: ``relu2`` selects the squared-ReLU FFN, absence means SiLU), so our
I2_S files of relu2 models compute the right function on engines carrying that fix; engines
without it ignore the key. `import_gguf` reads it back (and, for files we wrote before it, our
former private key ``bitnet_train.hidden_act``).

Embeddings are written f16 by default (``q8_0`` or ``f32`` on request), norms f32.

The PyPI `gguf` reader does not know type 36; `import_gguf` reads I2_S tensors through a small
subclass of its reader that keeps them as raw bytes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
)
from gguf.quants import dequantize, quantize

from bitnet_train.atomic import atomic_file
from bitnet_train.errors import CheckpointError, ConfigError, ExportError
from bitnet_train.export.gguf_pack import (
    I2S_BLOCK,
    I2S_TAIL_BYTES,
    I2S_TYPE_ID,
    TQ_BLOCK,
    TQ_TYPES,
    i2s_bytes,
    pack_i2s,
    pack_tq,
    tq_bytes,
    unpack_i2s,
    unpack_tq,
)
from bitnet_train.export.gguf_vocab import (
    read_vocab,
    tokenizer_from_vocab,
    vocab_from_tokenizer,
    write_vocab,
)
from bitnet_train.export.importers import master_weight
from bitnet_train.export.ternary import extract_ternary
from bitnet_train.integrity import discard_sidecar, verify_file, write_sidecar
from bitnet_train.model.config import BitNetConfig
from bitnet_train.model.modeling import BitNetForCausalLM
from bitnet_train.model.size import ternary_shapes

logger = logging.getLogger(__name__)

QUANTS = ("tq1_0", "tq2_0", "i2_s")
ARCHS = {"tq1_0": "bitnet", "tq2_0": "bitnet", "i2_s": "bitnet-b1.58"}
FILE_TYPES = {
    "tq1_0": int(LlamaFileType.MOSTLY_TQ1_0),
    "tq2_0": int(LlamaFileType.MOSTLY_TQ2_0),
    "i2_s": 40,  # LLAMA_FTYPE_MOSTLY_I2_S in microsoft/BitNet's fork (include/llama.h)
}
EMBEDDING_TYPES = {
    "f16": GGMLQuantizationType.F16,
    "f32": GGMLQuantizationType.F32,
    "q8_0": GGMLQuantizationType.Q8_0,
}
LEGACY_HIDDEN_ACT_KEY = "bitnet_train.hidden_act"
"""Where files written before `<arch>.hidden_activation` recorded the FFN activation."""


def hidden_activation_key(arch: str) -> str:
    """`<arch>.hidden_activation`: llama.cpp's LLM_KV_HIDDEN_ACT under the file's architecture."""
    return f"{arch}.hidden_activation"

# Per-layer parameters (suffix after "model.layers.N.") -> GGUF tensor kind.
_LAYER_TENSORS: dict[str, MODEL_TENSOR] = {
    "input_layernorm": MODEL_TENSOR.ATTN_NORM,
    "self_attn.q_proj": MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj": MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj": MODEL_TENSOR.ATTN_OUT,
    "self_attn.attn_sub_norm": MODEL_TENSOR.ATTN_SUB_NORM,
    "post_attention_layernorm": MODEL_TENSOR.FFN_NORM,
    "mlp.gate_proj": MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": MODEL_TENSOR.FFN_DOWN,
    "mlp.ffn_sub_norm": MODEL_TENSOR.FFN_SUB_NORM,
}
EMBED = "model.embed_tokens.weight"


def tensor_names(config: BitNetConfig) -> dict[str, str]:
    """Our parameter name -> GGUF tensor name, in file order (embeddings, layers, final norm)."""
    names = {EMBED: TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight"}
    for i in range(config.num_hidden_layers):
        for suffix, kind in _LAYER_TENSORS.items():
            gguf_name = TENSOR_NAMES[kind].format(bid=i) + ".weight"
            names[f"model.layers.{i}.{suffix}.weight"] = gguf_name
    names["model.norm.weight"] = TENSOR_NAMES[MODEL_TENSOR.OUTPUT_NORM] + ".weight"
    return names


def _is_ternary(name: str) -> bool:
    return name.endswith("_proj.weight")


def refusal_reason(
    config: BitNetConfig, quant: str, tied: bool, embedding_type: str = "f16"
) -> str | None:
    """Why the engines would not run this model as `quant` GGUF correctly; None if they would."""
    if not tied:
        return (
            "the model has an untied lm_head; llama.cpp and bitnet.cpp always compute the "
            "output with token_embd (an output.weight tensor makes llama.cpp fail to load), so "
            "GGUF export needs tie_word_embeddings: true. Use --format hf for untied models"
        )
    if quant in TQ_TYPES and config.hidden_act != "silu":
        return (
            f"hidden_act={config.hidden_act!r}: llama.cpp's `bitnet` architecture gates the FFN "
            "with SiLU (LLM_FFN_SILU in src/models/bitnet.cpp) and upstream does not yet read "
            "bitnet.hidden_activation, so this model would load but compute a different function "
            "(about 30% logit error for relu2). TQ1_0/TQ2_0 serve silu models; export relu2 "
            "(2B4T-style) models with --quant i2_s for bitnet.cpp's `bitnet-b1.58` architecture"
        )
    block = TQ_BLOCK if quant in TQ_TYPES else I2S_BLOCK
    rows = sorted({cols for _, _, cols in ternary_shapes(config) if cols % block})
    if rows:
        return (
            f"row lengths {rows} (hidden_size, num_attention_heads * head_dim or "
            f"intermediate_size) are not multiples of {block}, the block size of "
            f"{quant.upper()}; the engine multiplies whole blocks of a row and cannot run padded "
            "rows"
        )
    if embedding_type == "q8_0" and config.hidden_size % 32:
        return f"hidden_size={config.hidden_size} is not a multiple of 32 (Q8_0 embedding blocks)"
    return None


def _check_args(quant: str, embedding_type: str) -> None:
    if quant not in QUANTS:
        raise ExportError(f"--quant {quant!r} is not a GGUF ternary type; choose one of {QUANTS}")
    if embedding_type not in EMBEDDING_TYPES:
        raise ExportError(
            f"embedding type {embedding_type!r} is not supported; choose one of "
            f"{tuple(EMBEDDING_TYPES)}"
        )


def _is_tied(model: Any) -> bool:
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    return head is embed or (head.shape == embed.shape and bool(torch.equal(head, embed)))


# Export ---------------------------------------------------------------------------------------
@torch.no_grad()
def export_gguf(model: Any, tokenizer: Any, out_path: str | Path, quant: str,
                embedding_type: str = "f16") -> Path:
    """Write `model` (a BitNetForCausalLM) and its tokenizer as one GGUF file; return its path.

    quant: ``tq1_0`` / ``tq2_0`` (llama.cpp, silu models) or ``i2_s`` (bitnet.cpp).
    embedding_type: ``f16`` (default), ``q8_0`` or ``f32`` for ``token_embd``.
    Raises ExportError for a model the engine would compute wrongly (see `refusal_reason`).
    """
    quant, embedding_type = quant.lower(), embedding_type.lower()
    _check_args(quant, embedding_type)
    config: BitNetConfig = model.config
    reason = refusal_reason(config, quant, _is_tied(model), embedding_type)
    if reason is not None:
        raise ExportError(f"cannot export {config.name!r} as GGUF {quant}: {reason}")
    if quant == "i2_s":
        logger.warning(
            "the file says bitnet-b1.58.hidden_activation=%s; bitnet.cpp builds with the "
            "activation fix (microsoft/BitNet PR 605) honour it, but the fork pinned by "
            "microsoft/BitNet in mid-2026 hard-codes SiLU (issues 588/602): check the model "
            "against your build before relying on it", config.hidden_act,
        )
    vocab = vocab_from_tokenizer(tokenizer, config.vocab_size)
    ternary = extract_ternary(model)
    params = dict(model.named_parameters(remove_duplicate=False))

    out_path = Path(out_path)
    discard_sidecar(out_path)  # no manifest may describe the file while it is replaced
    with atomic_file(out_path) as tmp:  # renamed when complete: never a torn file
        writer = GGUFWriter(tmp, ARCHS[quant])
        _write_hparams(writer, config, quant)
        write_vocab(writer, vocab)
        for name, gguf_name in tensor_names(config).items():
            if _is_ternary(name):
                t = ternary[name]
                codes, scale = t.codes.numpy(), float(t.scale)
                if quant == "i2_s":
                    writer.add_tensor(gguf_name, pack_i2s(codes, scale, gguf_name),
                                      raw_shape=codes.shape, raw_dtype=I2S_TYPE_ID)
                else:
                    packed = pack_tq(codes, scale, quant, gguf_name)
                    writer.add_tensor(gguf_name, packed, raw_shape=packed.shape,
                                      raw_dtype=TQ_TYPES[quant])
            elif name == EMBED:
                embed = params[name].float().cpu().numpy()
                _add_embedding(writer, gguf_name, embed, embedding_type)
            else:  # norms: f32 (ggml's norm ops take f32 weights)
                writer.add_tensor(gguf_name, params[name].float().cpu().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    write_sidecar(out_path)  # sizes and SHA-256, checked by import_gguf
    return out_path


def _write_hparams(writer: GGUFWriter, config: BitNetConfig, quant: str) -> None:
    writer.add_name(config.name)
    writer.add_file_type(FILE_TYPES[quant])
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if quant in TQ_TYPES:  # as upstream's BitnetModel.set_gguf_parameters
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(1.0)
    writer.add_string(hidden_activation_key(ARCHS[quant]), config.hidden_act)


def _add_embedding(writer: GGUFWriter, name: str, embed: np.ndarray, embedding_type: str) -> None:
    qtype = EMBEDDING_TYPES[embedding_type]
    if qtype == GGMLQuantizationType.Q8_0:
        packed = quantize(embed, qtype)
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)
    else:
        writer.add_tensor(name, quantize(embed, qtype))  # f16 / f32 cast


# Size report ----------------------------------------------------------------------------------
def gguf_size_report(
    config: BitNetConfig, quant: str, embedding_type: str = "f16"
) -> dict[str, Any]:
    """Bytes of the GGUF tensors of `config` in `quant`, computed without allocating a model.

    Returns ternary_bytes (2-bit / base-3 codes), scale_bytes (TQ: fp16 d per 256-block; I2_S:
    the 32-byte tail per tensor), embedding_bytes, norm_bytes, total_bytes (tensor data only; the
    tokenizer metadata adds a few MB for a 128k vocabulary), bits_per_ternary_weight, and
    refused: the reason export would refuse this config (assuming tied embeddings as the config
    says), or None.
    """
    quant, embedding_type = quant.lower(), embedding_type.lower()
    _check_args(quant, embedding_type)
    layers = config.num_hidden_layers
    sizes = [o * i for _, o, i in ternary_shapes(config)]
    per_matrix = [i2s_bytes(n) if quant == "i2_s" else tq_bytes(n, quant) for n in sizes]
    codes = layers * sum(c for c, _ in per_matrix)
    scales = layers * sum(s for _, s in per_matrix)
    n_ternary = layers * sum(sizes)
    block, type_size = GGML_QUANT_SIZES[EMBEDDING_TYPES[embedding_type]]
    embedding = config.vocab_size * config.hidden_size * type_size // block
    norms = 4 * (config.num_hidden_layers * (3 * config.hidden_size + config.intermediate_size)
                 + config.hidden_size)
    return {
        "format": "gguf",
        "quant": quant,
        "embedding_type": embedding_type,
        "ternary_bytes": codes,
        "scale_bytes": scales,
        "embedding_bytes": embedding,
        "norm_bytes": norms,
        "total_bytes": codes + scales + embedding + norms,
        "bits_per_ternary_weight": 8 * (codes + scales) / max(n_ternary, 1),
        "refused": refusal_reason(config, quant, config.tie_word_embeddings, embedding_type),
    }


# Import ---------------------------------------------------------------------------------------
class _BitNetCppReader(GGUFReader):
    """GGUFReader that also accepts bitnet.cpp's I2_S tensors (type 36, unknown to `gguf`).

    They are kept aside in `i2s_tensors` (name -> ((out, in), raw bytes)); every other tensor
    goes through the package's own tensor builder. This overrides the reader's private
    `_build_tensors` (unchanged in gguf-py for years) because its constructor rejects unknown
    type ids; the GGUF container itself is parsed by the package.
    """

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        self.i2s_tensors: dict[str, tuple[tuple[int, int], np.ndarray]] = {}
        known = []
        for field in fields:
            _, name, _, dims, raw_dtype, offset = field.parts
            if int(raw_dtype[0]) != I2S_TYPE_ID:
                known.append(field)
                continue
            shape = tuple(int(d) for d in reversed(dims.tolist()))  # ggml dims are (in, out)
            n_bytes = int(np.prod(shape)) // 4 + I2S_TAIL_BYTES
            data = self._get(start_offs + int(offset[0]), np.uint8, n_bytes)
            self.i2s_tensors[str(bytes(name), encoding="utf-8")] = (shape, data)
        super()._build_tensors(start_offs, known)


def import_gguf(path: str | Path) -> tuple[Any, Any]:
    """Read a GGUF file written by `export_gguf` (or any `bitnet` / `bitnet-b1.58` GGUF with
    ternary TQ1_0 / TQ2_0 / I2_S weights) back into a BitNetForCausalLM with master weights.

    Each ternary matrix becomes ``W = T * a / mean(|T|)``: our quantizer then recovers exactly
    ``T`` and ``a`` (``mean(|W|) = a``), so the model's forward equals the packed model's forward
    (a plain ``T * a`` would re-quantize to the scale ``a * mean(|T|)``). Optional upstream
    ``.scale`` tensors multiply ``a``. The FFN activation is read from
    ``<arch>.hidden_activation`` (or our legacy ``bitnet_train.hidden_act``); without either, it
    is the one the file's engine computes (silu for ``bitnet``, relu2 for ``bitnet-b1.58``).
    Returns (model, tokenizer or None if the file has no byte-level BPE vocabulary). Raises
    CheckpointError naming the tensor on any mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    verify_file(path)
    try:
        reader = _BitNetCppReader(path)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: not a readable GGUF file ({exc})") from exc
    fields = reader.fields
    config = _config_from_fields(fields, path)
    tensors = {t.name: t for t in reader.tensors}
    names = tensor_names(config)
    known = set(names.values()) | {n.removesuffix(".weight") + ".scale" for n in names.values()}
    extra = sorted((set(tensors) | set(reader.i2s_tensors)) - known)
    if extra:
        raise CheckpointError(
            f"{path}: unexpected tensors {extra[:5]} for a tied BitNet model "
            "(an output.weight means untied embeddings, which this importer does not support)"
        )
    model = BitNetForCausalLM(config)
    expected = dict(model.named_parameters(remove_duplicate=False))
    state: dict[str, torch.Tensor] = {}
    for name, gguf_name in names.items():
        shape = tuple(expected[name].shape)
        if _is_ternary(name):
            codes, scale = _read_ternary(reader, tensors, gguf_name, shape, path)
            state[name] = master_weight(torch.from_numpy(codes.astype(np.int8)), scale)
        else:
            if gguf_name not in tensors:
                raise CheckpointError(f"{path}: tensor {gguf_name} (for {name}) is missing")
            t = tensors[gguf_name]
            stored = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml dims: innermost first
            if stored != shape:
                raise CheckpointError(
                    f"{path}: tensor {gguf_name} has shape {stored}, the config needs {shape} "
                    f"for {name}"
                )
            values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            state[name] = torch.from_numpy(values.reshape(shape).copy())
    state["lm_head.weight"] = state[EMBED]
    model.load_state_dict(state, strict=True)
    vocab = read_vocab(fields)
    return model, (tokenizer_from_vocab(vocab) if vocab is not None else None)


def _read_ternary(reader: _BitNetCppReader, tensors: dict[str, Any], gguf_name: str,
                  shape: tuple[int, ...], path: Path) -> tuple[np.ndarray, float]:
    if gguf_name in reader.i2s_tensors:
        stored, data = reader.i2s_tensors[gguf_name]
        if stored != shape:
            raise CheckpointError(
                f"{path}: tensor {gguf_name} has shape {stored}, the config needs {shape}"
            )
        codes, scale = unpack_i2s(data, stored, gguf_name)
    elif gguf_name in tensors:
        t = tensors[gguf_name]
        stored = tuple(int(d) for d in reversed(t.shape.tolist()))
        quant = {v: k for k, v in TQ_TYPES.items()}.get(t.tensor_type)
        if quant is None:
            raise CheckpointError(
                f"{path}: tensor {gguf_name} is {t.tensor_type.name}; expected TQ1_0, TQ2_0 or I2_S"
            )
        if stored != shape:
            raise CheckpointError(
                f"{path}: tensor {gguf_name} has shape {stored}, the config needs {shape}"
            )
        codes, scale = unpack_tq(t.data, quant, gguf_name)
    else:
        raise CheckpointError(f"{path}: ternary tensor {gguf_name} is missing")
    scale_name = gguf_name.removesuffix(".weight") + ".scale"
    if scale_name in tensors:
        scale *= float(np.asarray(tensors[scale_name].data, dtype=np.float32).reshape(-1)[0])
    return codes, scale


def _from_f32(x: float) -> float:
    """The shortest decimal that a GGUF float32 came from (1e-5, not 9.99999974e-06)."""
    return float(str(np.float32(x)))


def _config_from_fields(fields: dict[str, Any], path: Path) -> BitNetConfig:
    def get(key: str, default: Any = None, required: bool = True) -> Any:
        field = fields.get(key)
        if field is None:
            if required and default is None:
                raise CheckpointError(f"{path}: metadata key {key} is missing")
            return default
        return field.contents()

    arch = get("general.architecture")
    if arch not in set(ARCHS.values()):
        raise CheckpointError(
            f"{path}: architecture {arch!r} is not a BitNet GGUF (expected 'bitnet' for "
            "llama.cpp or 'bitnet-b1.58' for bitnet.cpp)"
        )
    hidden = int(get(f"{arch}.embedding_length"))
    heads = int(get(f"{arch}.attention.head_count"))
    tokens = get("tokenizer.ggml.tokens", required=False)
    vocab = get(f"{arch}.vocab_size", required=False) or (len(tokens) if tokens else None)
    if vocab is None:
        raise CheckpointError(f"{path}: neither {arch}.vocab_size nor a token list is present")
    rope_dim = get(f"{arch}.rope.dimension_count", required=False)
    if rope_dim is not None and int(rope_dim) != hidden // heads:
        raise CheckpointError(
            f"{path}: {arch}.rope.dimension_count={rope_dim} but head_dim is {hidden // heads}; "
            "partial RoPE is not supported"
        )
    act = (get(hidden_activation_key(arch), required=False)
           or get(LEGACY_HIDDEN_ACT_KEY, required=False)
           or ("silu" if arch == "bitnet" else "relu2"))
    try:
        return BitNetConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get(f"{arch}.feed_forward_length")),
            num_hidden_layers=int(get(f"{arch}.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(get(f"{arch}.attention.head_count_kv", heads)),
            hidden_act=act,
            max_position_embeddings=int(get(f"{arch}.context_length", 4096)),
            rms_norm_eps=_from_f32(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=_from_f32(get(f"{arch}.rope.freq_base", 10000.0)),
            tie_word_embeddings=True,
            bos_token_id=get("tokenizer.ggml.bos_token_id", required=False),
            eos_token_id=get("tokenizer.ggml.eos_token_id", required=False),
            pad_token_id=get("tokenizer.ggml.padding_token_id", required=False),
            name=get("general.name", required=False) or path.stem,
        )
    except ConfigError as exc:
        raise CheckpointError(f"{path}: metadata describes an invalid model: {exc}") from exc
