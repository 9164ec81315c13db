"""Model structure, config validation, masking, sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitnet_train.errors import ConfigError
from bitnet_train.model import BitLinear, BitNetConfig, BitNetForCausalLM, model_size
from tests.conftest import tiny_config


def test_every_projection_is_bitlinear_and_embeddings_are_not(tiny_cfg):
    model = BitNetForCausalLM(tiny_cfg)
    bit = {n: m for n, m in model.named_modules() if isinstance(m, BitLinear)}
    assert len(bit) == 7 * tiny_cfg.num_hidden_layers
    for name in bit:
        assert name.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj", "o_proj",
                                           "gate_proj", "up_proj", "down_proj"}
    assert not isinstance(model.lm_head, BitLinear) and isinstance(model.lm_head, nn.Linear)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    # no plain nn.Linear left besides lm_head, and no bias anywhere
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert plain == ["lm_head"]
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]


def test_parameter_names_follow_transformers(tiny_cfg):
    names = set(BitNetForCausalLM(tiny_cfg).state_dict())
    for expected in ("model.embed_tokens.weight", "model.norm.weight",
                     "model.layers.0.self_attn.q_proj.weight",
                     "model.layers.0.self_attn.attn_sub_norm.weight",
                     "model.layers.1.mlp.ffn_sub_norm.weight",
                     "model.layers.1.input_layernorm.weight",
                     "model.layers.1.post_attention_layernorm.weight"):
        assert expected in names


def test_tied_and_untied_embeddings():
    tied = BitNetForCausalLM(tiny_config())
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = BitNetForCausalLM(tiny_config(tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(hidden_size=64, num_attention_heads=5, num_key_value_heads=5), "does not divide"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads=3"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
    ],
)
def test_config_validation_errors(kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        tiny_config(**kw)


def test_relu2_and_silu_differ():
    torch.manual_seed(0)
    a = BitNetForCausalLM(tiny_config(hidden_act="relu2"))
    b = BitNetForCausalLM(tiny_config(hidden_act="silu"))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 512, (1, 12))
    assert not torch.allclose(a(ids).logits, b(ids).logits)


def test_document_mask_isolates_packed_documents(tiny_cfg):
    torch.manual_seed(0)
    model = BitNetForCausalLM(tiny_cfg).eval()
    doc_a, doc_b = torch.randint(3, 512, (1, 7)), torch.randint(3, 512, (1, 9))
    packed = torch.cat([doc_a, doc_b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        alone = model(doc_b).logits
        together = model(packed, position_ids=pos, document_ids=doc_ids).logits
        leaky = model(packed).logits
    assert torch.allclose(together[:, 7:], alone, atol=1e-5)
    assert not torch.allclose(leaky[:, 7:], alone, atol=1e-3)


def test_head_fn_receives_hidden_and_lm_head(tiny_cfg):
    model = BitNetForCausalLM(tiny_cfg)
    ids = torch.randint(0, 512, (2, 5))
    hidden, weight = model(ids, head_fn=lambda h, w: (h, w))
    assert hidden.shape == (2, 5, tiny_cfg.hidden_size)
    assert weight is model.lm_head.weight
    assert torch.allclose(hidden @ weight.T, model(ids).logits, atol=1e-5)


def test_training_step_reduces_loss_on_repeated_batch(tiny_cfg):
    """Gradients flow through the STE: a few steps memorise a batch."""
    torch.manual_seed(0)
    model = BitNetForCausalLM(tiny_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 512, (4, 32))
    first = None
    for _ in range(40):
        loss = model(ids, labels=ids).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_hf_config_round_trip():
    cfg = tiny_config(hidden_act="silu", tie_word_embeddings=False)
    d = cfg.to_hf_dict()
    assert d["model_type"] == "bitnet" and d["architectures"] == ["BitNetForCausalLM"]
    back = BitNetConfig.from_hf_dict(d, name=cfg.name)
    assert back == cfg


def test_2b4t_size_report_matches_the_report():
    size = model_size(BitNetConfig())  # defaults are the released 2B4T
    print("2b4t:", size.describe())
    # 2.08B ternary weights: log2(3) bits each is the report's ~0.4 GB non-embedding figure
    assert 2.0e9 < size.ternary_params < 2.2e9
    assert 0.38e9 < size.ternary_entropy_bytes < 0.43e9
    # stored 4 per byte (transformers / I2_S / GPU kernel): ~0.52 GB
    assert 0.50e9 < size.ternary_packed_bytes < 0.54e9
    assert size.embedding_params == 128256 * 2560
    # cross-check the count against an instantiated tiny model
    cfg = tiny_config()
    counted = sum(p.numel() for p in BitNetForCausalLM(cfg).parameters())
    assert model_size(cfg).total_params == counted
