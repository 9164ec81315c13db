"""save_model / load_model: transformers' master-weight layout, exact round trips, sharded
files, atomic writes, and errors that name the first offending tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from bitnet_train import load_model, save_model
from bitnet_train.errors import CheckpointError
from bitnet_train.model import build_model
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(initializer_range=0.1), seed=0).eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return save_model(model, tmp_path_factory.mktemp("io") / "final")


def ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))


def test_layout(saved, model):
    assert sorted(p.name for p in saved.iterdir()) == [
        "config.json", "generation_config.json", "manifest.json", "model.safetensors"]
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
    assert cfg["dtype"] == "float32" and cfg["tie_word_embeddings"] is True
    assert json.loads((saved / "generation_config.json").read_text()) == {
        "bos_token_id": 1, "eos_token_id": 2}
    with safe_open(str(saved / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys  # tied, as transformers stores it
    assert keys == set(model.state_dict()) - {"lm_head.weight"}


def test_round_trip_is_exact(saved, model):
    loaded, tokenizer = load_model(saved)
    assert tokenizer is None
    assert not loaded.training
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # re-tied, one Parameter
    assert len(list(loaded.parameters())) == len(list(model.parameters()))
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, model(ids()).logits)


def test_load_dtype(saved):
    loaded, _ = load_model(saved, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_transformers_loads_save_model_output(saved, model):
    with torch.compiler.set_stance("force_eager"):  # same quantizer functions, no CPU compile
        hf = AutoModelForCausalLM.from_pretrained(str(saved)).eval()
        assert hf.dtype == torch.float32  # from config.json's dtype
        with torch.no_grad():
            torch.testing.assert_close(hf(ids()).logits, model(ids()).logits, atol=1e-5, rtol=0)


def test_untied_stores_lm_head(tmp_path):
    untied = build_model(tiny_config(tie_word_embeddings=False), seed=1)
    loaded, _ = load_model(save_model(untied, tmp_path / "m"))
    assert torch.equal(loaded.lm_head.weight, untied.lm_head.weight)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight


def test_bf16_save(tmp_path, model):
    path = save_model(model, tmp_path / "m", dtype=torch.bfloat16)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(str(path / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16


def test_sharded_checkpoint(tmp_path, saved, model):
    tensors = load_file(str(saved / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((saved / "config.json").read_text())
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(out / file), metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded, _ = load_model(out)
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, model(ids()).logits)
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors, which is missing"):
        load_model(out)


def _rewrite(saved, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((saved / "config.json").read_text())
    tensors = load_file(str(saved / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_is_named(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "bad",
                   lambda t: t.pop("model.layers.1.mlp.ffn_sub_norm.weight"))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.mlp\.ffn_sub_norm\.weight "
                       r"\(shape \[160\]\) is missing"):
        load_model(bad)


def test_wrong_shape_names_first_tensor_and_both_shapes(saved, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.v_proj.weight"] = torch.zeros(16, 64)
        t["model.layers.1.self_attn.v_proj.weight"] = torch.zeros(16, 64)

    bad = _rewrite(saved, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.v_proj\.weight has "
                       r"shape \[16, 64\] but config\.json implies \[32, 64\]"):
        load_model(bad)


def test_unexpected_tensor_is_named(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "bad",
                   lambda t: t.__setitem__("model.layers.2.mlp.up_proj.weight", torch.zeros(1)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.2\.mlp\.up_proj"):
        load_model(bad)


def test_config_of_another_model_is_refused(saved, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((saved / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "hidden_size": 128}))
    (bad / "model.safetensors").symlink_to(saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight has shape \[512, 64\] "
                       r"but config\.json implies \[512, 128\]"):
        load_model(bad)


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="not a model directory"):
        load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_model(tmp_path / "empty")


class _ExplodingTokenizer:
    """Fails while the directory is half written (after config and weights)."""

    eos_token_id = pad_token_id = None

    def get_vocab(self):
        return {}

    def save_pretrained(self, path):
        raise OSError("disk full")


def test_write_is_atomic(tmp_path, model):
    path = save_model(model, tmp_path / "final")
    before = (path / "model.safetensors").read_bytes()
    other = build_model(tiny_config(), seed=5)
    with pytest.raises(OSError, match="disk full"):
        save_model(other, path, tokenizer=_ExplodingTokenizer())
    assert (path / "model.safetensors").read_bytes() == before  # the old model is intact
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no temporary left behind
    save_model(other, path)  # a successful save replaces it
    loaded, _ = load_model(path)
    assert torch.equal(loaded.lm_head.weight, other.lm_head.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_tokenizer_round_trip(tmp_path, model):
    from bitnet_train.data.tokenizer import train_demo_tokenizer

    tok = train_demo_tokenizer(["hello world, hello ternary weights"] * 20, tmp_path / "tok",
                               vocab_size=300)
    path = save_model(model, tmp_path / "m", tokenizer=tok)
    _, loaded = load_model(path)
    text = "hello ternary world"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    gen = json.loads((path / "generation_config.json").read_text())
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert gen["eos_token_id"] == [2, tok.eos_token_id, eot]  # config eos, tokenizer eos, eot
    assert gen["pad_token_id"] == tok.pad_token_id
