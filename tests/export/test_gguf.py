"""GGUF export (TQ1_0 / TQ2_0 for llama.cpp, I2_S for bitnet.cpp), its packers, import and sizes.

The packers are checked against per-element decoders written here from the engines' layout
descriptions (ggml-quants.c's dequantize_row_tq{1,2}_0, bitnet.cpp's quantize_i2_s), the TQ files
are reopened with the `gguf` package's own reader and dequantizer, and the I2_S file (type 36,
which that reader refuses) with a minimal GGUF parser written in this file.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize

from bitnet_train.errors import CheckpointError, ExportError
from bitnet_train.export import gguf as gguf_export
from bitnet_train.export.gguf import export_gguf, gguf_size_report, import_gguf
from bitnet_train.export.gguf_pack import pack_i2s, pack_tq, unpack_i2s, unpack_tq
from bitnet_train.export.ternary import extract_ternary
from bitnet_train.integrity import sidecar_path
from bitnet_train.model import BitNetConfig, BitNetForCausalLM
from bitnet_train.model.bitlinear import fake_quant_weight_ref
from tests.conftest import tiny_config
from tests.export.gguf_assets import CHAT_TEMPLATE, build_tokenizer

VOCAB = 320


def silu_config(**overrides) -> BitNetConfig:
    """Rows of every matrix a multiple of 256 (TQ) and 128 (I2_S)."""
    kw = dict(hidden_size=256, intermediate_size=512, hidden_act="silu", num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1)
    kw.update(overrides)
    return tiny_config(**kw)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def silu_model() -> BitNetForCausalLM:
    model = BitNetForCausalLM(silu_config())
    model.init_weights(seed=0)
    with torch.no_grad():  # non-trivial norms, so a swapped or dropped norm is visible
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


@pytest.fixture(scope="module")
def files(silu_model, tokenizer, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(silu_model, tokenizer, out / f"tiny-{q}.gguf", q)
            for q in ("tq1_0", "tq2_0", "i2_s")}


def random_ternary(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1, 2, size=shape).astype(np.int8)


# Independent decoders (written from the engines' layout descriptions) ------------------------
def fp16(x: float) -> np.float32:
    return np.float32(np.float16(x))


def decode_tq2_0(raw: np.ndarray, n: int) -> np.ndarray:
    """ggml block_tq2_0: qs[64], fp16 d. Element e: qs[(e/128)*32 + e%32] >> 2*((e%128)/32)."""
    out = np.empty(n, dtype=np.float32)
    for b in range(n // 256):
        blk = raw[b * 66:(b + 1) * 66]
        d = np.float32(blk[64:66].view(np.float16)[0])
        for e in range(256):
            q = (int(blk[(e // 128) * 32 + e % 32]) >> (2 * ((e % 128) // 32))) & 3
            out[b * 256 + e] = (q - 1) * d
    return out


def decode_tq1_0(raw: np.ndarray, n: int) -> np.ndarray:
    """ggml block_tq1_0: qs[48], qh[4], fp16 d; five (qs) or four (qh) trits per byte, trit k
    of byte q being ((q * 3^k mod 256) * 3) >> 8; values: qs[0:32] give 5 x 32, qs[32:48] give
    5 x 16, qh gives 4 x 4, in that order (dequantize_row_tq1_0)."""
    def trit(q: int, k: int) -> int:
        return (((q * 3 ** k) % 256) * 3) >> 8

    out = np.empty(n, dtype=np.float32)
    for b in range(n // 256):
        blk = raw[b * 54:(b + 1) * 54]
        qs, qh = [int(x) for x in blk[:48]], [int(x) for x in blk[48:52]]
        d = np.float32(blk[52:54].view(np.float16)[0])
        vals = [trit(qs[m], k) for k in range(5) for m in range(32)]
        vals += [trit(qs[32 + m], k) for k in range(5) for m in range(16)]
        vals += [trit(qh[j], k) for k in range(4) for j in range(4)]
        out[b * 256:(b + 1) * 256] = (np.array(vals) - 1) * d
    return out


def decode_i2s(raw: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """bitnet.cpp quantize_i2_s (x86): value j of 128-chunk i sits in byte i*32 + j%32 at bit
    6 - 2*(j/32), code t + 1; the fp32 scale follows the n/4 code bytes."""
    raw = raw.view(np.uint8)
    out = np.empty(n, dtype=np.int8)
    for e in range(n):
        i, j = divmod(e, 128)
        out[e] = ((int(raw[i * 32 + j % 32]) >> (6 - 2 * (j // 32))) & 3) - 1
    return out, float(raw[n // 4:n // 4 + 4].view("<f4")[0])


# Packers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", ["tq1_0", "tq2_0"])
@pytest.mark.parametrize("shape", [(3, 256), (2, 768)])
def test_tq_pack_matches_ggml_layout_and_round_trips(quant, shape):
    codes, a = random_ternary(shape), 0.0371
    packed = pack_tq(codes, a, quant)
    decode = decode_tq1_0 if quant == "tq1_0" else decode_tq2_0
    values = np.stack([decode(row, shape[1]) for row in packed])
    np.testing.assert_array_equal(values, codes * fp16(a))  # d = fp16(a) in every block
    back, scale = unpack_tq(packed, quant)
    np.testing.assert_array_equal(back, codes)
    assert scale == fp16(a) and abs(scale - a) <= a * 2**-11


@pytest.mark.parametrize("shape", [(1, 128), (3, 256), (5, 384)])
def test_i2s_pack_matches_bitnet_cpp_layout_and_round_trips(shape):
    codes, a = random_ternary(shape, seed=1), 0.0213
    raw = pack_i2s(codes, a)
    n = codes.size
    assert raw.dtype == np.int8 and raw.size == n // 4 + 32
    decoded, scale = decode_i2s(raw, n)
    np.testing.assert_array_equal(decoded.reshape(shape), codes)
    assert scale == np.float32(a)
    assert not raw.view(np.uint8)[n // 4 + 4:].any()  # padding after the scale is zero
    back, scale2 = unpack_i2s(raw, shape)
    np.testing.assert_array_equal(back, codes)
    assert scale2 == np.float32(a)


@pytest.mark.parametrize(("pack", "shape", "block"), [
    (lambda c: pack_tq(c, 1.0, "tq2_0", "blk.0.ffn_down.weight"), (4, 320), 256),
    (lambda c: pack_tq(c, 1.0, "tq1_0", "blk.0.ffn_down.weight"), (4, 128), 256),
    (lambda c: pack_i2s(c, 1.0, "blk.0.ffn_down.weight"), (4, 192), 128),
])
def test_rows_not_multiple_of_block_are_refused(pack, shape, block):
    match = rf"blk\.0\.ffn_down\.weight.*multiple of {block}.*padded"
    with pytest.raises(ExportError, match=match):
        pack(random_ternary(shape))


# Refusals -------------------------------------------------------------------------------------
def test_export_refuses_rows_not_multiple_of_256(tokenizer, tmp_path):
    model = BitNetForCausalLM(tiny_config(hidden_act="silu", vocab_size=VOCAB))  # hidden 64
    with pytest.raises(ExportError, match="multiples of 256"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf", "tq2_0")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("quant", ["tq1_0", "tq2_0"])
def test_relu2_model_is_refused_for_llama_cpp(tokenizer, tmp_path, quant):
    model = BitNetForCausalLM(silu_config(hidden_act="relu2"))
    # kept until upstream llama.cpp honours bitnet.hidden_activation
    with pytest.raises(ExportError, match=r"SiLU.*hidden_activation.*--quant i2_s"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf", quant)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("quant", ["tq1_0", "tq2_0", "i2_s"])
def test_hidden_activation_is_written_under_the_architecture(files, quant):
    """`<arch>.hidden_activation`, the key of the engines' relu2 fix (llama.cpp PR 26751,
    microsoft/BitNet PR 605); our former private key is no longer written."""
    meta, _, _ = read_gguf_raw(files[quant])
    arch = meta["general.architecture"]
    assert arch == ("bitnet-b1.58" if quant == "i2_s" else "bitnet")
    assert meta[f"{arch}.hidden_activation"] == "silu"
    assert "bitnet_train.hidden_act" not in meta


def test_relu2_i2s_file_says_relu2_and_imports_as_relu2(tokenizer, tmp_path):
    model = BitNetForCausalLM(silu_config(hidden_act="relu2"))
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "i2_s")
    meta, _, _ = read_gguf_raw(path)
    assert meta["bitnet-b1.58.hidden_activation"] == "relu2"
    assert import_gguf(path)[0].config.hidden_act == "relu2"


def test_import_reads_the_activation_key_and_the_legacy_one(silu_model, tokenizer, tmp_path,
                                                             monkeypatch):
    """A silu model in a bitnet-b1.58 file (whose engine default is relu2) comes back silu from
    the key alone; so does one of our older files that carry only bitnet_train.hidden_act."""
    path = export_gguf(silu_model, tokenizer, tmp_path / "new.gguf", "i2_s")
    assert import_gguf(path)[0].config.hidden_act == "silu"
    legacy = gguf_export.LEGACY_HIDDEN_ACT_KEY
    monkeypatch.setattr(gguf_export, "hidden_activation_key", lambda arch: legacy)
    old = export_gguf(silu_model, tokenizer, tmp_path / "old.gguf", "i2_s")
    monkeypatch.undo()
    meta, _, _ = read_gguf_raw(old)
    assert "bitnet-b1.58.hidden_activation" not in meta
    assert import_gguf(old)[0].config.hidden_act == "silu"


@pytest.mark.parametrize("quant", ["tq2_0", "i2_s"])
def test_untied_model_is_refused(tokenizer, tmp_path, quant):
    model = BitNetForCausalLM(silu_config(tie_word_embeddings=False))
    with pytest.raises(ExportError, match="untied lm_head"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf", quant)


# TQ files through the gguf package's reader ---------------------------------------------------
def field(reader: GGUFReader, key: str):
    f = reader.get_field(key)
    assert f is not None, f"missing metadata key {key}"
    return f.contents()


def our_to_gguf(i: int) -> dict[str, str]:
    return {
        "input_layernorm": f"blk.{i}.attn_norm", "self_attn.q_proj": f"blk.{i}.attn_q",
        "self_attn.k_proj": f"blk.{i}.attn_k", "self_attn.v_proj": f"blk.{i}.attn_v",
        "self_attn.o_proj": f"blk.{i}.attn_output",
        "self_attn.attn_sub_norm": f"blk.{i}.attn_sub_norm",
        "post_attention_layernorm": f"blk.{i}.ffn_norm", "mlp.gate_proj": f"blk.{i}.ffn_gate",
        "mlp.up_proj": f"blk.{i}.ffn_up", "mlp.down_proj": f"blk.{i}.ffn_down",
        "mlp.ffn_sub_norm": f"blk.{i}.ffn_sub_norm",
    }


@pytest.mark.parametrize("quant", ["tq1_0", "tq2_0"])
def test_tq_file_reopens_with_every_tensor_equal_to_ternary_times_scale(files, silu_model, quant):
    reader = GGUFReader(files[quant])
    tensors = {t.name: t for t in reader.tensors}
    cfg = silu_model.config
    expected = {"token_embd.weight", "output_norm.weight"}
    for i in range(cfg.num_hidden_layers):
        expected |= {f"{g}.weight" for g in our_to_gguf(i).values()}
    assert set(tensors) == expected  # in particular no output.weight (tied) and no .scale tensors
    ternary = extract_ternary(silu_model)
    qtype = GGMLQuantizationType[quant.upper()]
    params = dict(silu_model.named_parameters())
    for i in range(cfg.num_hidden_layers):
        for ours, gguf_name in our_to_gguf(i).items():
            t = tensors[f"{gguf_name}.weight"]
            values = dequantize(t.data, t.tensor_type)
            name = f"model.layers.{i}.{ours}.weight"
            if name in ternary:
                codes, a = ternary[name].codes.numpy(), float(ternary[name].scale)
                assert t.tensor_type == qtype
                np.testing.assert_array_equal(values, codes * fp16(a))
                assert abs(fp16(a) - a) <= a * 2**-11
            else:
                assert t.tensor_type == GGMLQuantizationType.F32
                np.testing.assert_array_equal(values, params[name].detach().numpy())
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == GGMLQuantizationType.F16
    np.testing.assert_array_equal(
        dequantize(emb.data, emb.tensor_type),
        params["model.embed_tokens.weight"].detach().numpy().astype(np.float16).astype(np.float32),
    )
    assert tuple(emb.shape) == (cfg.hidden_size, cfg.vocab_size)  # ggml order: (ne0, ne1)


@pytest.mark.parametrize("quant", ["tq1_0", "tq2_0"])
def test_tq_file_metadata_is_complete(files, silu_model, tokenizer, quant):
    reader = GGUFReader(files[quant])
    cfg = silu_model.config
    assert field(reader, "general.architecture") == "bitnet"
    assert field(reader, "general.file_type") == {"tq1_0": 36, "tq2_0": 37}[quant]
    expected = {
        "bitnet.block_count": cfg.num_hidden_layers, "bitnet.embedding_length": cfg.hidden_size,
        "bitnet.feed_forward_length": cfg.intermediate_size,
        "bitnet.context_length": cfg.max_position_embeddings,
        "bitnet.attention.head_count": cfg.num_attention_heads,
        "bitnet.attention.head_count_kv": cfg.num_key_value_heads,
        "bitnet.rope.dimension_count": cfg.hidden_size // cfg.num_attention_heads,
        "bitnet.vocab_size": cfg.vocab_size,
    }
    for key, value in expected.items():
        assert field(reader, key) == value, key
    assert field(reader, "bitnet.rope.freq_base") == pytest.approx(cfg.rope_theta)
    eps = field(reader, "bitnet.attention.layer_norm_rms_epsilon")
    assert eps == pytest.approx(cfg.rms_norm_eps)
    # tokenizer: byte-level BPE with merges, GPT-2 split regex, specials, chat template
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size
    vocab = tokenizer.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    assert field(reader, "tokenizer.ggml.merges")  # llama.cpp refuses a BPE vocab without merges
    types = field(reader, "tokenizer.ggml.token_type")
    specials = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
    assert [types[vocab[s]] for s in specials] == [3] * 3  # CONTROL
    assert field(reader, "tokenizer.ggml.bos_token_id") == vocab["<|begin_of_text|>"]
    assert field(reader, "tokenizer.ggml.eos_token_id") == vocab["<|end_of_text|>"]
    assert field(reader, "tokenizer.ggml.eot_token_id") == vocab["<|eot_id|>"]
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE


@pytest.mark.parametrize("embedding_type", ["q8_0", "f32"])
def test_embedding_types(silu_model, tokenizer, tmp_path, embedding_type):
    path = export_gguf(silu_model, tokenizer, tmp_path / "m.gguf", "tq2_0", embedding_type)
    emb = next(t for t in GGUFReader(path).tensors if t.name == "token_embd.weight")
    assert emb.tensor_type == GGMLQuantizationType[embedding_type.upper()]
    ref = silu_model.model.embed_tokens.weight.detach().numpy()
    # q8_0: 32-value blocks, step d = absmax / 127 stored in fp16: error <= d / 2 plus up to
    # 127 times the fp16 rounding of d (relative 2**-11)
    amax = np.abs(ref).reshape(-1, 32).max(1).repeat(32).reshape(ref.shape)
    tol = amax * (0.5 / 127 + 2**-11) * 1.01
    err = np.abs(dequantize(emb.data, emb.tensor_type) - ref)
    assert (err <= (tol if embedding_type == "q8_0" else 0)).all()


# I2_S file through a minimal independent GGUF parser -----------------------------------------
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}


def read_gguf_raw(path: Path) -> tuple[dict, dict, bytes]:
    """GGUF v3 (ggml docs/gguf.md): magic, version, counts, key/values, tensor infos, aligned
    data. Returns (metadata, {name: (shape (out, in) order, type id, absolute offset)}, bytes);
    any type id is accepted."""
    buf = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return buf[pos - n:pos].decode("utf-8")

    def value(vtype: int):
        if vtype == 8:
            return string()
        if vtype == 9:
            sub, count = take("I"), take("Q")
            return [value(sub) for _ in range(count)]
        return take(_SCALARS[vtype])

    assert buf[:4] == b"GGUF"
    pos = 4
    assert take("I") == 3
    n_tensors, n_kv = take("Q"), take("Q")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        infos.append((name, tuple(reversed(dims)), take("I"), take("Q")))
    align = meta.get("general.alignment", 32)
    start = (pos + align - 1) // align * align
    return meta, {n: (shape, t, start + off) for n, shape, t, off in infos}, buf


def test_i2s_file_layout(files, silu_model):
    meta, tensors, buf = read_gguf_raw(files["i2_s"])
    cfg = silu_model.config
    assert meta["general.architecture"] == "bitnet-b1.58"
    assert meta["general.file_type"] == 40
    assert meta["bitnet-b1.58.block_count"] == cfg.num_hidden_layers
    assert meta["bitnet-b1.58.attention.head_count_kv"] == cfg.num_key_value_heads
    assert meta["bitnet-b1.58.feed_forward_length"] == cfg.intermediate_size
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.merges"]
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert "output.weight" not in tensors
    ternary = extract_ternary(silu_model)
    for i in range(cfg.num_hidden_layers):
        for ours, gguf_name in our_to_gguf(i).items():
            name = f"model.layers.{i}.{ours}.weight"
            shape, type_id, offset = tensors[f"{gguf_name}.weight"]
            if name not in ternary:
                assert type_id == 0  # F32 norms
                continue
            tt = ternary[name]
            assert type_id == 36 and shape == tuple(tt.codes.shape)
            n = tt.codes.numel()
            raw = np.frombuffer(buf, dtype=np.uint8, count=n // 4 + 32, offset=offset)
            codes, scale = decode_i2s(raw, n)
            np.testing.assert_array_equal(codes.reshape(shape), tt.codes.numpy())
            assert scale == np.float32(tt.scale)  # fp32 scale: exact
    assert tensors["token_embd.weight"][1] == 1  # F16


# Import ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", ["tq2_0", "i2_s"])
def test_import_reproduces_the_packed_model(files, silu_model, tokenizer, quant):
    model, tok = import_gguf(files[quant])
    cfg, orig = model.config, silu_model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "vocab_size", "rope_theta", "rms_norm_eps",
                "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(cfg, key) == getattr(orig, key), key
    want, got = extract_ternary(silu_model), extract_ternary(model)
    modules = dict(model.named_modules())
    for name, t in want.items():
        packed_scale = fp16(float(t.scale)) if quant != "i2_s" else np.float32(t.scale)
        assert torch.equal(got[name].codes, t.codes), name
        assert float(got[name].scale) == pytest.approx(float(packed_scale), rel=1e-6), name
        # the training forward of the imported master weight is the packed weight itself
        w_q = fake_quant_weight_ref(modules[name.removesuffix(".weight")].weight)
        torch.testing.assert_close(w_q, t.codes.float() * float(packed_scale), rtol=1e-6, atol=0)
    params = dict(silu_model.named_parameters())
    for name, p in model.named_parameters():
        if p.ndim == 1:
            assert torch.equal(p, params[name]), name
    assert torch.equal(model.model.embed_tokens.weight,
                       params["model.embed_tokens.weight"].half().float())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    text = "The quick brown fox, 12 345!"
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token == tokenizer.eos_token


def test_import_names_the_mismatched_tensor(silu_model, tokenizer, tmp_path):
    path = export_gguf(silu_model, tokenizer, tmp_path / "m.gguf", "tq2_0")
    reader = GGUFReader(path, "r+")  # edit the metadata in place: ffn 512 -> 768
    reader.get_field("bitnet.feed_forward_length").parts[-1][0] = 768
    reader.data.flush()
    del reader
    with pytest.raises(CheckpointError, match="m.gguf is damaged"):  # the manifest notices
        import_gguf(path)
    sidecar_path(path).unlink()  # an edit on purpose: drop the manifest, as the error says
    match = r"blk\.0\.ffn_gate\.weight.*\(512, 256\).*\(768, 256\)"
    with pytest.raises(CheckpointError, match=match):
        import_gguf(path)


def test_import_refuses_another_architecture(tmp_path):
    writer = GGUFWriter(tmp_path / "llama.gguf", "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="architecture 'llama'"):
        import_gguf(tmp_path / "llama.gguf")


# Sizes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", ["tq1_0", "tq2_0", "i2_s"])
def test_size_report_matches_the_file(files, silu_model, quant):
    report = gguf_size_report(silu_model.config, quant)
    meta, tensors, buf = read_gguf_raw(files[quant])
    offsets = sorted(off for _, _, off in tensors.values())
    data_bytes = len(buf) - offsets[0]  # tensor data, each padded to 32 bytes
    assert report["refused"] is None
    assert 0 <= data_bytes - report["total_bytes"] <= 32 * len(tensors)
    cfg = silu_model.config
    n_ternary = sum(t.codes.numel() for t in extract_ternary(silu_model).values())
    bits = {"tq1_0": 1.6875, "tq2_0": 2.0625}.get(quant)
    if bits is not None:  # 54 / 66 bytes per 256 weights
        assert report["bits_per_ternary_weight"] == pytest.approx(bits)
    else:
        assert report["ternary_bytes"] == n_ternary // 4
        assert report["scale_bytes"] == 32 * 7 * cfg.num_hidden_layers
    assert report["embedding_bytes"] == 2 * cfg.vocab_size * cfg.hidden_size


def test_size_report_for_2b4t_states_the_refusal():
    cfg = BitNetConfig()  # 2B4T: relu2
    assert "--quant i2_s" in gguf_size_report(cfg, "tq1_0")["refused"]
    report = gguf_size_report(cfg, "i2_s")
    assert report["refused"] is None
    assert 0.5e9 < report["ternary_bytes"] < 0.55e9  # 2.08e9 weights at 2 bits


def test_demo_tokenizer_is_written_with_llama3_pre_tokenizer(tmp_path):
    """A BPE trained with LLaMA-3's split (the demo's) tells llama.cpp to split the same way."""
    import json

    from bitnet_train.data.tokenizer import train_demo_tokenizer
    from bitnet_train.export.gguf_vocab import _pre_tokenizer_name

    tok = train_demo_tokenizer(["hello world, 123 times"] * 10, tmp_path, vocab_size=300)
    backend = json.loads(tok.backend_tokenizer.to_str())
    assert _pre_tokenizer_name(tok.get_vocab(), backend) == "llama-bpe"
