"""Our BitNetForCausalLM against transformers' own BitNetForCausalLM with online-quantizing
`AutoBitLinear` projections (transformers.integrations.bitnet): same weights, same logits.

transformers' quantizers (`WeightQuant`, `ActQuant`) are `torch.compile`d; compiling them on CPU
costs about 20 s per process here, so these tests run them under
`torch.compiler.set_stance("force_eager")`, which executes the very same Python functions
eagerly (the modules below are transformers' classes, asserted so).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BitNetConfig as HFConfig
from transformers import BitNetForCausalLM as HFBitNetForCausalLM
from transformers.integrations.bitnet import AutoBitLinear

from bitnet_train.model import BitNetForCausalLM, build_model
from tests.conftest import tiny_config

ATOL = 1e-5  # fp32, same ops in the same order up to SDPA's kernel choice


@pytest.fixture(autouse=True)
def _eager_transformers():
    with torch.compiler.set_stance("force_eager"):
        yield


def hf_online_model(model: BitNetForCausalLM, attn_implementation: str) -> HFBitNetForCausalLM:
    """transformers' model of our config, every projection but lm_head an online AutoBitLinear."""
    hf = HFBitNetForCausalLM(HFConfig(**model.config.to_hf_dict()))
    hf.config._attn_implementation = attn_implementation
    for name, module in list(hf.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            hf.set_submodule(name, AutoBitLinear(module.in_features, module.out_features,
                                                 bias=False, online_quant=True))
    return hf.eval()


@pytest.fixture(scope="module")
def models() -> tuple[BitNetForCausalLM, dict[str, HFBitNetForCausalLM]]:
    # initializer_range 0.1 gives logits of order 1-10, so ATOL is a strict relative bound too
    ours = build_model(tiny_config(initializer_range=0.1), seed=0).eval()
    hfs = {}
    with torch.compiler.set_stance("force_eager"):
        for impl in ("sdpa", "eager"):
            hf = hf_online_model(ours, impl)
            hf.load_state_dict(ours.state_dict(), strict=True)
            hfs[impl] = hf
    return ours, hfs


def test_every_projection_is_transformers_autobitlinear(models):
    _, hfs = models
    for hf in hfs.values():
        proj = {n: m for n, m in hf.named_modules() if n.endswith("_proj")}
        assert len(proj) == 7 * hf.config.num_hidden_layers
        assert all(type(m) is AutoBitLinear and m.online_quant for m in proj.values())
        assert type(hf.lm_head) is nn.Linear


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_logits_equal_on_random_ids(models, impl):
    ours, hfs = models
    ids = torch.randint(0, 512, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(ids).logits
        b = hfs[impl](ids).logits
    assert a.abs().max() > 1.0  # non-trivial logits, so ATOL is meaningful
    torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_equal_with_padding(models, impl, side):
    ours, hfs = models
    gen = torch.Generator().manual_seed(2)
    lengths = [12, 7, 3]
    seq = max(lengths)
    ids = torch.randint(3, ours.config.vocab_size, (len(lengths), seq), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, seq - n:] = 1
    ids = ids.masked_fill(mask == 0, 0)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens count from 0 either side
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, position_ids=position_ids).logits
        b = hfs[impl](ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()  # pad positions are free to differ (transformers lets them see nothing)
    torch.testing.assert_close(b[real], a[real], atol=ATOL, rtol=0)


def test_state_dict_round_trip(models):
    ours, hfs = models
    hf = hfs["sdpa"]
    back = BitNetForCausalLM(ours.config)
    back.load_state_dict(hf.state_dict(), strict=True)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert back.lm_head.weight is back.model.embed_tokens.weight  # still tied after loading
    assert set(hf.state_dict()) == set(ours.state_dict())


def test_untied_round_trip_and_parity():
    ours = build_model(tiny_config(tie_word_embeddings=False, initializer_range=0.1), seed=3).eval()
    hf = hf_online_model(ours, "sdpa")
    hf.load_state_dict(ours.state_dict(), strict=True)
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=ATOL, rtol=0)
    back = BitNetForCausalLM(ours.config)
    back.load_state_dict(hf.state_dict(), strict=True)
    assert torch.equal(back.lm_head.weight, ours.lm_head.weight)
