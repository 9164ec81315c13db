"""`--format hf` / `hf-bf16`: transformers loads the exported directories and computes our model.

Tolerance. Both formats store embeddings and norms in bf16 (8 significant bits: each value moves
by up to 2^-9 relative), transformers runs the model in bf16 by default (the config's `dtype`),
and hf-bf16 also rounds the latent weights (a few flip ternary code). Every perturbation can
flip per-token int8 activation codes downstream. Measured on the trained tiny model below: the
relative RMS logit error is 1.2% (hf) and 1.9% (hf-bf16). We require
< 5% (REL_TOL); a wrong packing order (here: transformers' row groups read as interleaved rows)
gives about 100%, so the bound cannot pass a wrong layout. Loaded in fp32, the packed directory
computes our model with bf16-rounded embeddings/norms up to fp32 rounding (`assert_near_exact`):
at most 6e-6 for logits of magnitude 10 (relative RMS 3e-7); where that rounding flips an int8
activation code (one step is 1/127 of the token's absmax) a position moves by ~1e-3, so we
require 3/4 of the positions within 1e-6 * max|logit| and a relative RMS error below 0.2%.

transformers' unpacking and quantizers are `torch.compile`d (about 20 s of CPU compilation per
process), so transformers runs under `torch.compiler.set_stance("force_eager")`: the same
functions (`unpack_weights`, `AutoBitLinear.forward`), executed eagerly; the tests assert that
the loaded projections are transformers' AutoBitLinear holding the unpacked ternary weights.
"""

from __future__ import annotations

import copy
import functools
import json
import stat
import tempfile

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.integrations.bitnet import AutoBitLinear

from bitnet_train.data.chat import CHAT_TEMPLATE
from bitnet_train.data.tokenizer import train_demo_tokenizer
from bitnet_train.errors import ExportError
from bitnet_train.export import hf as hf_export
from bitnet_train.export.packing import unpack_ternary
from bitnet_train.export.size import hf_size_report
from bitnet_train.export_cli import main as export_main
from bitnet_train.export_cli import resolve_config
from bitnet_train.io import save_model
from bitnet_train.model import (
    BitLinear,
    BitNetForCausalLM,
    build_model,
    model_size,
    ternary_weight,
)
from tests.conftest import tiny_config

REL_TOL = 0.05
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A ternary weight is minus one, zero or one; the scale is the mean absolute value.",
    "Small models learn short texts quickly when the text repeats many times.",
    "User: what is two plus two? Assistant: two plus two is four.",
]


@functools.lru_cache(maxsize=1)
def trained_tiny() -> tuple[BitNetForCausalLM, object]:
    """(tiny model trained 100 AdamW steps on CORPUS, its byte-level BPE tokenizer), cached per
    process (test_import reuses it); callers must not modify the model.

    Trained until it recites the corpus (loss ~0.4), so greedy decoding has clear margins (top-2
    logit gap > 1 along the continuation tested below), not a near-tie a bf16 rounding flips.
    """
    with tempfile.TemporaryDirectory() as d:
        tok = train_demo_tokenizer(CORPUS * 4, d, vocab_size=320)
    tok.chat_template = CHAT_TEMPLATE
    model = build_model(tiny_config(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
                        seed=0)
    ids = torch.tensor(tok(" ".join(CORPUS * 6))["input_ids"])
    windows = ids.unfold(0, 32, 16)  # (n, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hidden 64: one thread is fastest, and immune to a busy machine
    try:
        for _ in range(100):
            batch = windows[torch.randint(len(windows), (8,), generator=gen)]
            loss = model(batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), tok


def eval_batch(tok) -> torch.Tensor:
    rows = [tok(text)["input_ids"][:12] for text in (CORPUS[0], CORPUS[3], CORPUS[1])]
    return torch.tensor(rows)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def assert_near_exact(a: torch.Tensor, b: torch.Tensor) -> None:
    """Logits (B, L, V) equal up to fp32 rounding and the rare int8 code flip it causes."""
    per_position = (a.float() - b.float()).abs().amax(-1)
    atol = 1e-6 * float(b.abs().max().clamp(min=10.0))
    assert (per_position <= atol).float().mean() >= 0.75, per_position
    assert rel_rms(a, b) < 2e-3, rel_rms(a, b)


def bf16_rounded(model: BitNetForCausalLM) -> BitNetForCausalLM:
    """A copy whose non-ternary tensors (embeddings, norms) went through bf16, as stored."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if not name.endswith("_proj.weight"):
                p.copy_(p.bfloat16().float())
    return out


def load_hf(path, **kwargs):
    with torch.compiler.set_stance("force_eager"):
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()


def load_hf_fp32_packed(path):
    """Packed dir in fp32. transformers 5.x applies the BitNet deserializer to every `*.weight`
    and then skips the dtype cast, so embeddings/norms stay bf16 (and F.linear fails on mixed
    dtypes); cast them to fp32 by hand (exact: bf16 -> fp32)."""
    model = load_hf(path, dtype=torch.float32)
    for p in model.parameters():
        p.data = p.data.float()
    return model


@pytest.fixture(autouse=True)
def _eager_transformers():
    with torch.compiler.set_stance("force_eager"):
        yield


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The trained model exported through the CLI (save_model dir -> hf and hf-bf16)."""
    model, tok = trained_tiny()
    root = tmp_path_factory.mktemp("hf_export")
    save_model(model, root / "final", tokenizer=tok)
    for fmt in ("hf", "hf-bf16"):
        assert export_main([str(root / "final"), "--format", fmt, "--out", str(root / fmt)]) == 0
    return root


def test_config_json_is_2b4t_style(exported):
    model, _ = trained_tiny()
    for fmt, mode in (("hf", "offline"), ("hf-bf16", "online")):
        cfg = json.loads((exported / fmt / "config.json").read_text())
        assert cfg["model_type"] == "bitnet"
        assert cfg["architectures"] == ["BitNetForCausalLM"]
        assert cfg["quantization_config"] == {
            "quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": mode}
        # defaults transformers would get wrong if absent (its defaults: False, 2048)
        assert cfg["tie_word_embeddings"] is True
        assert cfg["max_position_embeddings"] == model.config.max_position_embeddings == 256
        assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 10000.0
        assert cfg["dtype"] == "bfloat16"


def test_every_file_has_the_mode_open_gives(exported):
    """model.safetensors came out 0600 (safetensors writes through mkstemp), unlike the rest."""
    probe = exported / "probe"
    probe.write_text("x")
    plain = stat.S_IMODE(probe.stat().st_mode)
    for fmt in ("final", "hf", "hf-bf16"):
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (exported / fmt).iterdir()}
        assert "model.safetensors" in modes and set(modes.values()) == {plain}, (fmt, modes)


def test_packed_tensors(exported):
    model, _ = trained_tiny()
    with safe_open(str(exported / "hf" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys  # tied: transformers re-ties it
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
        projections = {n: m for n, m in model.named_modules() if isinstance(m, BitLinear)}
        assert len(projections) == 14
        for name, module in projections.items():
            packed = f.get_tensor(f"{name}.weight")
            scale = f.get_tensor(f"{name}.weight_scale")
            out, inp = module.weight.shape
            assert packed.dtype == torch.uint8 and packed.shape == (out // 4, inp)
            assert scale.shape == (1,) and scale.dtype == torch.float32
            codes, a = ternary_weight(module.weight)
            assert torch.equal(unpack_ternary(packed, out), codes)
            assert float(scale) == float(module.weight.detach().abs().mean())  # a, not 1 / a
        assert len(keys) == 2 * 14 + 1 + 2 * 4 + 1  # projections+scales, embed, 4 norms/layer, norm


def test_transformers_loads_packed_and_matches(exported):
    model, tok = trained_tiny()
    hf = load_hf(exported / "hf")  # as a user would: dtype from config.json (bf16)
    assert hf.dtype == torch.bfloat16
    q = hf.model.layers[0].self_attn.q_proj
    assert type(q) is AutoBitLinear and not q.online_quant  # the offline (packed) code path
    codes, a = ternary_weight(model.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(q.weight.float(), codes.float())  # unpack_weights ran at load
    batch = eval_batch(tok)
    with torch.no_grad():
        ours = model(batch).logits
        theirs = hf(batch).logits
    err = rel_rms(theirs, ours)
    assert err < REL_TOL, err


def test_packed_fp32_is_exact_up_to_bf16_storage(exported):
    model, tok = trained_tiny()
    hf = load_hf_fp32_packed(exported / "hf")
    batch = eval_batch(tok)
    with torch.no_grad():
        assert_near_exact(hf(batch).logits, bf16_rounded(model)(batch).logits)


def test_wrong_packing_order_fails_by_far(tmp_path, monkeypatch):
    model, tok = trained_tiny()

    def interleaved(codes, name="tensor"):  # row 4r + i in bits 2i: a plausible wrong order
        rows = codes.shape[0] // 4
        groups = (codes + 1).to(torch.uint8).view(rows, 4, *codes.shape[1:])
        return sum((groups[:, i] << (2 * i) for i in range(4)), torch.zeros_like(groups[:, 0]))

    monkeypatch.setattr(hf_export, "pack_ternary", interleaved)
    hf_export.export_hf(model, tok, tmp_path / "wrong")
    batch = eval_batch(tok)
    with torch.no_grad():
        err = rel_rms(load_hf(tmp_path / "wrong")(batch).logits, model(batch).logits)
    assert err > 6 * REL_TOL, err


def test_greedy_generation_matches(exported):
    model, tok = trained_tiny()
    prompt = torch.tensor([tok(CORPUS[1])["input_ids"][:6]])
    ours = model.generate(prompt, max_new_tokens=16)
    assert len(set(ours[0, 6:].tolist())) > 4  # not a degenerate repetition
    for fmt in ("hf", "hf-bf16"):
        hf = load_hf(exported / fmt)
        eos = hf.generation_config.eos_token_id
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                             do_sample=False)
        n = theirs.shape[1]
        assert torch.equal(theirs, ours[:, :n]), (fmt, theirs, ours)
        assert n == ours.shape[1] or theirs[0, -1].item() in eos  # stopped early only at eos


def test_transformers_loads_bf16_master_and_matches(exported):
    model, tok = trained_tiny()
    hf = load_hf(exported / "hf-bf16")
    q = hf.model.layers[0].self_attn.q_proj
    assert type(q) is AutoBitLinear and q.online_quant  # quantizes the bf16 latent weight
    assert torch.equal(q.weight, model.model.layers[0].self_attn.q_proj.weight.bfloat16())
    batch = eval_batch(tok)
    with torch.no_grad():
        err = rel_rms(hf(batch).logits, model(batch).logits)
    assert err < REL_TOL, err


def test_tokenizer_and_generation_config(exported):
    _, tok = trained_tiny()
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    for fmt in ("hf", "hf-bf16"):
        loaded = AutoTokenizer.from_pretrained(str(exported / fmt))
        assert loaded.chat_template == CHAT_TEMPLATE
        text = loaded.apply_chat_template([{"role": "user", "content": " hi "}], tokenize=False,
                                          add_generation_prompt=True)
        assert text == "User: hi<|eot_id|>Assistant: "  # the released template adds no BOS
        gen = GenerationConfig.from_pretrained(str(exported / fmt))
        assert gen.bos_token_id == tok.bos_token_id
        assert gen.eos_token_id == [tok.eos_token_id, eot]


def test_untied_model_stores_lm_head(tmp_path):
    model = build_model(tiny_config(tie_word_embeddings=False), seed=1).eval()
    hf_export.export_hf(model, None, tmp_path / "untied")
    with safe_open(str(tmp_path / "untied" / "model.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), model.lm_head.weight.bfloat16())
    hf = load_hf_fp32_packed(tmp_path / "untied")
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_near_exact(hf(ids).logits, bf16_rounded(model)(ids).logits)


def test_refuses_rows_not_divisible_by_four(tmp_path):
    model = build_model(tiny_config(intermediate_size=162), seed=0)
    with pytest.raises(ExportError, match=r"mlp\.gate_proj\.weight: 162 output rows"):
        hf_export.export_hf(model, None, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    hf_export.export_hf(model, None, tmp_path / "ok", packed=False)  # hf-bf16 has no such limit


# -- size report / --dry-run -----------------------------------------------------------------


def test_hf_size_report_by_hand(tmp_path, exported):
    cfg = tiny_config()
    # per layer, ceil(out / 4) * in bytes: q 16*64, k 8*64, v 8*64, o 16*64, gate 40*64,
    # up 40*64, down 16*160 = 10752; two layers
    r = hf_size_report(cfg)
    assert r["ternary_bytes"] == 2 * 10752
    assert r["scale_bytes"] == 2 * 7 * 4
    assert r["embedding_bytes"] == 512 * 64 * 2  # tied: one bf16 matrix
    assert r["norm_bytes"] == 2 * (2 * (3 * 64 + 160) + 64)
    b = hf_size_report(cfg, packed=False)
    assert b["ternary_bytes"] == 2 * 2 * (64 * 64 * 2 + 32 * 64 * 2 + 160 * 64 * 2 + 64 * 160)
    # the exported file holds exactly these tensors plus the safetensors header
    file = exported / "hf" / "model.safetensors"
    real = resolve_config(exported / "hf")
    overhead = file.stat().st_size - hf_size_report(real)["total_bytes"]
    assert 0 < overhead < 8192


def test_2b4t_non_embedding_bytes():
    cfg = resolve_config("2b4t")
    size = model_size(cfg)
    r = hf_size_report(cfg)
    print(f"2b4t ternary: {size.ternary_entropy_bytes / 1e9:.3f} GB at 1.58 bits, "
          f"{r['ternary_bytes'] / 1e9:.3f} GB packed 2-bit (hf)")
    assert 0.39e9 < size.ternary_entropy_bytes < 0.43e9  # the report's "0.4 GB"
    assert r["ternary_bytes"] == size.ternary_params // 4  # 2 bits each, 4 divides every out
    assert 0.50e9 < r["ternary_bytes"] < 0.54e9


def test_dry_run_prints_every_format(capsys):
    assert export_main(["2b4t", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in ("hf ", "hf-bf16", "gguf tq2_0", "gguf tq1_0", "gguf i2_s", "gpu"):
        assert f"\n{name}" in out, name
    assert "412.892 MB at log2(3)" in out and "521.011 MB at 2 bits" in out


def test_dry_run_composes_a_users_model_config(tmp_path, capsys):
    """A model YAML of one's own, by name with --config-dir or by path, composed by Hydra like a
    run's model group (its defaults list starts from the shipped tiny)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "wide_tiny.yaml").write_text(
        "defaults: [tiny, _self_]\nname: wide_tiny\nhidden_size: 512\n")
    assert export_main(["wide_tiny", "--config-dir", str(tmp_path), "--dry-run"]) == 0
    assert "model wide_tiny: params total" in capsys.readouterr().out
    cfg = resolve_config(tmp_path / "model" / "wide_tiny.yaml")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (512, 4, 4096)
    assert export_main(["wide_tiny", "--dry-run"]) == 1  # not shipped
    assert "known names: 1.3b, 2b4t" in capsys.readouterr().err


def test_cli_errors_are_clear(tmp_path, capsys):
    assert export_main([str(tmp_path / "missing"), "--format", "hf", "--out",
                        str(tmp_path / "o")]) == 1
    assert "not a model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main(["2b4t", "--format", "hf"])  # --out missing
