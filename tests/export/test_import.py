"""Import back to master weights: from transformers' packed layout (forward must EQUAL the
packed model's, and re-exporting must give the same bytes), from the bf16 master layout, and
refusals that name the offending tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitnet_train.errors import CheckpointError
from bitnet_train.export.hf import export_hf
from bitnet_train.export.importers import master_weight
from bitnet_train.export_cli import import_main
from bitnet_train.integrity import MANIFEST_FILE
from bitnet_train.io import load_model
from bitnet_train.model import BitLinear, ternary_weight
from tests.export.test_hf_export import (
    assert_near_exact,
    bf16_rounded,
    eval_batch,
    load_hf_fp32_packed,
    trained_tiny,
)


@pytest.fixture(autouse=True)
def _eager_transformers():
    """transformers' quantizers run eagerly (same functions, no CPU compile; see test_hf_export)."""
    with torch.compiler.set_stance("force_eager"):
        yield


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    model, tok = trained_tiny()
    root = tmp_path_factory.mktemp("import")
    export_hf(model, tok, root / "hf")
    export_hf(model, tok, root / "hf-bf16", packed=False)
    return root


def test_master_weight_by_hand():
    codes = torch.tensor([[1, 0, -1, 0]], dtype=torch.int8)  # mean|T| = 0.5
    w = master_weight(codes, 0.3)
    assert torch.allclose(w, torch.tensor([[0.6, 0.0, -0.6, 0.0]]))
    t, a = ternary_weight(w)
    assert torch.equal(t, codes) and torch.isclose(a, torch.tensor(0.3))
    # the trap: T * a re-quantizes to the scale a * mean|T| = 0.15, not 0.3
    assert torch.isclose(ternary_weight(codes.float() * 0.3)[1], torch.tensor(0.15))
    assert torch.equal(master_weight(torch.zeros(2, 3, dtype=torch.int8), 0.3), torch.zeros(2, 3))


def test_packed_import_forward_equals_packed_model(dirs):
    model, tok = trained_tiny()
    imported, tokenizer = load_model(dirs / "hf")
    assert tokenizer is not None and tokenizer.chat_template == tok.chat_template
    projections = {n: m for n, m in imported.named_modules() if isinstance(m, BitLinear)}
    assert len(projections) == 14
    for name, module in projections.items():
        codes, a = ternary_weight(module.weight)
        ref_codes, ref_a = ternary_weight(model.get_submodule(name).weight)
        assert torch.equal(codes, ref_codes), name
        torch.testing.assert_close(a, ref_a, rtol=1e-6, atol=0)  # fp32 mean of |W|: an ulp
    batch = eval_batch(tok)
    with torch.no_grad():
        ours = imported(batch).logits
        # the packed model as transformers computes it (fp32), and our model as stored
        assert_near_exact(ours, load_hf_fp32_packed(dirs / "hf")(batch).logits)
        assert_near_exact(ours, bf16_rounded(model)(batch).logits)


def test_reexport_gives_the_same_bytes(dirs, tmp_path):
    imported, tokenizer = load_model(dirs / "hf")
    export_hf(imported, tokenizer, tmp_path / "again")
    first = load_file(str(dirs / "hf" / "model.safetensors"))
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert first.keys() == again.keys()
    for name, t in first.items():
        if name.endswith("weight_scale"):
            torch.testing.assert_close(again[name], t, rtol=1e-6, atol=0)
        else:  # packed uint8 bytes and bf16 tensors: identical
            assert torch.equal(again[name], t), name


def test_bf16_master_import_is_a_plain_load(dirs):
    model, _ = trained_tiny()
    imported, _ = load_model(dirs / "hf-bf16")
    stored = load_file(str(dirs / "hf-bf16" / "model.safetensors"))
    for name, t in stored.items():
        assert torch.equal(imported.state_dict()[name], t.float()), name
    assert imported.lm_head.weight is imported.model.embed_tokens.weight
    assert imported.model.layers[0].mlp.up_proj.weight.dtype == torch.float32


def test_bitlinear_class_divides_by_its_scale(dirs, tmp_path):
    """transformers' `linear_class: bitlinear` stores 1/a: the importer must invert it."""
    model, tok = trained_tiny()
    shutil.copytree(dirs / "hf", tmp_path / "bl")
    (tmp_path / "bl" / MANIFEST_FILE).unlink()  # as transformers would write it: no manifest
    cfg = json.loads((tmp_path / "bl" / "config.json").read_text())
    cfg["quantization_config"]["linear_class"] = "bitlinear"
    (tmp_path / "bl" / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(tmp_path / "bl" / "model.safetensors"))
    tensors = {k: (1.0 / v if k.endswith("weight_scale") else v) for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "bl" / "model.safetensors"))
    imported, _ = load_model(tmp_path / "bl")
    batch = eval_batch(tok)
    with torch.no_grad():
        assert_near_exact(imported(batch).logits, bf16_rounded(model)(batch).logits)


def _edit(src, dst, config=None, tensors=None):
    """A copy of `src` edited as another tool might have written it (hence no manifest)."""
    shutil.copytree(src, dst)
    (dst / MANIFEST_FILE).unlink()
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        t = load_file(str(dst / "model.safetensors"))
        tensors(t)
        save_file(t, str(dst / "model.safetensors"))
    return dst


def test_packed_shape_mismatch_names_the_tensor(dirs, tmp_path):
    bad = _edit(dirs / "hf", tmp_path / "bad", config={"intermediate_size": 96})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has "
                       r"shape \[40, 64\] but config.json implies \[24, 64\]"):
        load_model(bad)


def test_packed_missing_scale_names_the_tensor(dirs, tmp_path):
    bad = _edit(dirs / "hf", tmp_path / "bad",
                tensors=lambda t: t.pop("model.layers.1.self_attn.o_proj.weight_scale"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.o_proj\.weight_scale is "
                       "missing"):
        load_model(bad)


def test_architecture_mismatch_in_master_names_the_tensor(dirs, tmp_path):
    bad = _edit(dirs / "hf-bf16", tmp_path / "bad", config={"num_key_value_heads": 4})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has "
                       r"shape \[32, 64\] but config.json implies \[64, 64\]"):
        load_model(bad)


def test_import_cli_writes_master_weights(dirs, tmp_path, capsys):
    model, tok = trained_tiny()
    assert import_main([str(dirs / "hf"), "--out", str(tmp_path / "master")]) == 0
    assert "wrote master weights" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "master" / "config.json").read_text())
    assert cfg["quantization_config"]["quantization_mode"] == "online"
    reloaded, tokenizer = load_model(tmp_path / "master")
    assert tokenizer is not None
    batch = eval_batch(tok)
    with torch.no_grad():
        assert_near_exact(reloaded(batch).logits, bf16_rounded(model)(batch).logits)
