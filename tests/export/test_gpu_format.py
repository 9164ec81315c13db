"""The microsoft/BitNet GPU W2A8 kernel checkpoint: packing, Q/K permutation, export, read back.

Two decoders written here check the packer independently: one element by element from the
layout description (tile, word, bit), one that replays the CUDA kernel's own addressing
(``ladder_int8xint2_kernel`` and ``decode_i2s_to_i8s`` in gpu/bitnet_kernels/bitnet_kernels.h)
to compute a matrix-vector product, so the layout is checked against its consumer.
"""

from __future__ import annotations

import pytest
import torch

from bitnet_train.errors import ExportError
from bitnet_train.export.gpu import (
    FP16_FILE,
    INT2_FILE,
    WQKV_SCALE_WARNING,
    export_gpu,
    gpu_size_report,
    pack_gpu_weight,
    permute_qk,
    read_gpu_checkpoint,
    unpack_gpu_weight,
    unpermute_qk,
    wqkv_scale_misreads,
)
from bitnet_train.export.ternary import extract_ternary
from bitnet_train.model import BitNetConfig, BitNetForCausalLM
from tests.conftest import tiny_config


def random_ternary(shape, seed=0) -> torch.Tensor:
    return torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.int8)


@pytest.mark.parametrize("shape", [(16, 32), (48, 96), (32, 160), (128, 64)])
def test_pack_unpack_is_identity(shape):
    codes = random_ternary(shape)
    packed = pack_gpu_weight(codes)
    assert packed.dtype == torch.int8 and packed.shape == (shape[0], shape[1] // 4)
    assert torch.equal(unpack_gpu_weight(packed), codes)


@pytest.mark.parametrize("shape", [(15, 32), (16, 48), (8, 8)])
def test_shapes_that_do_not_tile_are_refused(shape):
    with pytest.raises(ExportError, match=r"wqkv.*16 x 32"):
        pack_gpu_weight(random_ternary(shape), "layers.0.attention.wqkv")


def decode_from_layout(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Per element: 16x32 tiles of 128 bytes, row-block first; word w of a tile holds row
    (w//16)*8 + w%8, columns 16*((w%16)//8) + o; value o at bit 8*(o%4) + 2*(o//4); code t+2."""
    raw = packed.view(torch.uint8).reshape(-1).tolist()
    out = torch.empty(n, k, dtype=torch.int8)
    for r in range(n):
        for c in range(k):
            tile = (r // 16) * (k // 32) + c // 32
            rr, cc = r % 16, c % 32
            word_idx = (rr // 8) * 16 + (cc // 16) * 8 + rr % 8
            at = tile * 128 + 4 * word_idx
            word = int.from_bytes(bytes(raw[at:at + 4]), "little")
            o = cc % 16
            out[r, c] = ((word >> (8 * (o % 4) + 2 * (o // 4))) & 3) - 2
    return out


def test_packing_agrees_with_a_per_element_decoder():
    codes = random_ternary((48, 96), seed=3)
    assert torch.equal(decode_from_layout(pack_gpu_weight(codes), 48, 96), codes)


def kernel_matvec(packed: torch.Tensor, x: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Replay ladder_int8xint2_kernel<M=1, N, K, ws_num, K_block_size=8, N_block_size=16> with
    blockDim (8, 16): thread (tx, ty) of block bx reads activations x[k0*128 + tx*16 + j] and the
    int at byte bx*16*K/4 + k0*8*16*16/4 + (tx>>1)*32*16/4 + (ty>>3)*(32*16/2)/4
    + (tx&1)*(32*16/4)/4 + (ty&7)*(32/2)/4, decoded by decode_i2s_to_i8s: lane 4i+b of the 16
    values = ((word >> 2i) >> 8b) & 3, minus 2. Output row bx*16 + ty; integer result."""
    raw = packed.view(torch.uint8).reshape(-1).tolist()
    out = torch.zeros(n, dtype=torch.int64)
    for bx in range(n // 16):
        for ty in range(16):
            acc = 0
            for k0 in range(k // 128):
                for tx in range(8):
                    at = (bx * 16 * k // 4 + k0 * 8 * 16 * 16 // 4 + (tx >> 1) * 32 * 16 // 4
                          + (ty >> 3) * (32 * 16 // 2) // 4 + (tx & 1) * (32 * 16 // 4) // 4
                          + (ty & 7) * (32 // 2) // 4)
                    word = int.from_bytes(bytes(raw[at:at + 4]), "little")
                    for i in range(4):
                        for b in range(4):
                            w = (((word >> (2 * i)) >> (8 * b)) & 3) - 2
                            acc += int(x[k0 * 128 + tx * 16 + 4 * i + b]) * w
            out[bx * 16 + ty] = acc
    return out


@pytest.mark.parametrize("shape", [(32, 256), (48, 128)])
def test_the_kernels_addressing_reads_back_the_matrix(shape):
    n, k = shape
    codes = random_ternary(shape, seed=4)
    x = torch.randint(-128, 128, (k,), generator=torch.Generator().manual_seed(5))
    got = kernel_matvec(pack_gpu_weight(codes), x, n, k)
    assert torch.equal(got, codes.long() @ x)


def test_qk_permutation_is_the_interleaved_rope_layout():
    heads, head_dim, cols = 3, 8, 2
    w = torch.arange(heads * head_dim * cols).reshape(heads * head_dim, cols)
    p = permute_qk(w, heads)
    half = head_dim // 2
    # (h l d) i -> (h d l) i: row h*hd + d*2 + l comes from row h*hd + l*half + d
    for h in range(heads):
        for d in range(half):
            for l_ in range(2):
                assert torch.equal(p[h * head_dim + 2 * d + l_], w[h * head_dim + l_ * half + d])
    assert torch.equal(unpermute_qk(p, heads), w)


@pytest.fixture(scope="module")
def relu2_model() -> BitNetForCausalLM:
    model = BitNetForCausalLM(tiny_config())  # relu2, hidden 64, 4 heads / 2 KV heads, ffn 160
    model.init_weights(seed=1)
    return model.eval()


def expected_keys(n_layers: int, int2: bool) -> set[str]:
    """The state dict keys of gpu/model.py's Transformer (BitLinearKernel adds weight_scale)."""
    keys = {"tok_embeddings.weight", "output.weight", "norm.weight"}
    for i in range(n_layers):
        for m in ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2"):
            keys.add(f"layers.{i}.{m}.weight")
            if int2:
                keys.add(f"layers.{i}.{m}.weight_scale")
        for norm in ("attention_norm", "ffn_norm", "attention.attn_sub_norm",
                     "feed_forward.ffn_sub_norm"):
            keys.add(f"layers.{i}.{norm}.weight")
    return keys


def test_export_writes_the_kernels_checkpoint_and_reads_back(relu2_model, tmp_path):
    out = export_gpu(relu2_model, tmp_path / "gpu")
    cfg = relu2_model.config
    int2 = torch.load(out / INT2_FILE, weights_only=True)
    fp16 = torch.load(out / FP16_FILE, weights_only=True)
    assert set(int2) == expected_keys(cfg.num_hidden_layers, int2=True)
    assert set(fp16) == expected_keys(cfg.num_hidden_layers, int2=False)
    ternary = extract_ternary(relu2_model)
    q, k, v = (ternary[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    # raw wqkv: q and k rows permuted for interleaved RoPE, v as is; scales bf16 [q, k, v, 0]
    wqkv = int2["layers.0.attention.wqkv.weight"]
    assert wqkv.dtype == torch.int8 and wqkv.shape == (64 + 2 * 32, 64 // 4)
    raw = unpack_gpu_weight(wqkv)
    assert torch.equal(raw, torch.cat([permute_qk(q.codes, 4), permute_qk(k.codes, 2), v.codes]))
    scales = int2["layers.0.attention.wqkv.weight_scale"]
    assert scales.dtype == torch.bfloat16 and scales.shape == (4,)
    want = torch.stack([q.scale, k.scale, v.scale, torch.tensor(0.0)]).bfloat16()
    assert torch.equal(scales, want)
    w13 = int2["layers.1.feed_forward.w13.weight_scale"]
    assert w13[2:].eq(0).all() and w13[:2].ne(0).all()
    # fake-quantized file: the same rows times their own scale
    qkv_fp = fp16["layers.0.attention.wqkv.weight"].float()
    assert torch.equal(qkv_fp[:64], (permute_qk(q.codes, 4).float() * q.scale).bfloat16().float())
    assert int2["output.weight"].data_ptr() == int2["tok_embeddings.weight"].data_ptr()  # tied
    # read back: our names, transformers row order, the bf16 scale
    back = read_gpu_checkpoint(out)
    params = dict(relu2_model.named_parameters(remove_duplicate=False))
    assert set(back) == set(params)
    for name, t in ternary.items():
        assert torch.equal(back[name].codes, t.codes), name
        assert float(back[name].scale) == float(t.scale.bfloat16()), name
    for name, p in params.items():
        if name not in ternary:
            assert torch.equal(back[name], p.detach().bfloat16().float()), name


def test_export_refuses_silu(tmp_path):
    model = BitNetForCausalLM(tiny_config(hidden_act="silu"))
    with pytest.raises(ExportError, match="squared ReLU"):
        export_gpu(model, tmp_path)


def test_size_report_matches_the_file(relu2_model, tmp_path):
    out = export_gpu(relu2_model, tmp_path / "gpu")
    int2 = torch.load(out / INT2_FILE, weights_only=True)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in int2.values()}
    report = gpu_size_report(relu2_model.config)
    assert report["total_bytes"] == sum(storages.values())  # tied embeddings stored once
    assert report["refused"] is None and report["kernel_has_shapes"] is False
    assert gpu_size_report(tiny_config(hidden_act="silu"))["refused"] is not None


def kernel_scale_index(n_rows: int) -> list[int]:
    """The scale index bitnet_kernels.cu uses for each fused wqkv row: r / (N / ws_num), 3."""
    return [r // (n_rows // 3) for r in range(n_rows)]


@pytest.mark.parametrize("heads, kv_heads", [(20, 5), (4, 2), (32, 8), (20, 20)])
def test_wqkv_scale_misreads_replays_the_kernels_indexing(heads, kv_heads):
    config = BitNetConfig(hidden_size=64 * heads, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, intermediate_size=128)
    q, kv = 64 * heads, 64 * kv_heads
    owner = ["q"] * q + ["k"] * kv + ["v"] * kv
    read = ["qkv"[min(i, 2)] for i in kernel_scale_index(len(owner))]
    wrong = [r for r in range(len(owner)) if owner[r] != read[r]]
    listed = [r for _, first, last, _ in wqkv_scale_misreads(config)
              for r in range(first, last + 1)]
    assert listed == wrong
    for part, first, last, reads in wqkv_scale_misreads(config):
        assert {owner[r] for r in range(first, last + 1)} == {part}
        assert {read[r] for r in range(first, last + 1)} == {reads}
    if heads == kv_heads:
        assert wrong == []  # multi-head attention: the equal thirds are q, k, v


def test_2b4t_rows_are_those_measured_on_the_h200():
    assert wqkv_scale_misreads(BitNetConfig()) == [("q", 1280, 2559, "k"), ("k", 2560, 3199, "v")]


def test_export_warns_in_one_line_about_the_scale_groups(relu2_model, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="bitnet_train.export.gpu"):
        export_gpu(relu2_model, tmp_path / "gqa")  # 4 heads, 2 KV heads
    (message,) = [r.getMessage() for r in caplog.records if "wqkv" in r.getMessage()]
    assert "\n" not in message
    assert "q rows 42-63 read k's scale; k rows 84-95 read v's scale" in message
    assert "17% (q) and 31% (k)" in message and "model_state_fp16.pt is unaffected" in message
    caplog.clear()
    mha = BitNetForCausalLM(tiny_config(num_key_value_heads=4)).eval()
    with caplog.at_level("WARNING", logger="bitnet_train.export.gpu"):
        export_gpu(mha, tmp_path / "mha")
    assert not [r for r in caplog.records if "wqkv" in r.getMessage()]
    assert WQKV_SCALE_WARNING.count("%s") == 1
