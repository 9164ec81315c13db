"""The attention backends compute the same function: FlexAttention's block-sparse document-causal
mask against SDPA's dense mask, and the mask semantics by hand.

FlexAttention has no backward on the CPU: here the outputs are compared (forward, with GQA,
documents and padding); the gradients are compared on the GPU (tests/train/test_fast_paths_gpu.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

from bitnet_train.model import build_model
from bitnet_train.model.attention import (
    FlexAttention,
    SDPAAttention,
    build_attention_mask,
    make_attention,
)
from tests.conftest import tiny_config


def test_dense_mask_semantics_by_hand():
    docs = torch.tensor([[0, 0, 1, 1, 1]])
    valid = torch.tensor([[0, 1, 1, 1, 1]])  # left padding at position 0
    m = build_attention_mask(1, 5, torch.device("cpu"), valid, docs)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0],  # a padded query sees only itself
        [0, 1, 0, 0, 0],  # the padded key is hidden
        [0, 0, 1, 0, 0],  # a new document starts
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]).bool()
    assert torch.equal(m, expected)


@pytest.mark.parametrize("padding", [False, True])
def test_flex_equals_sdpa_outputs(padding):
    torch.manual_seed(0)
    b, heads, kv, seq, d = 2, 4, 2, 50, 16
    q = torch.randn(b, heads, seq, d)
    k = torch.randn(b, kv, seq, d)
    v = torch.randn(b, kv, seq, d)
    docs = torch.cat([torch.zeros(b, 17), torch.ones(b, 20), 2 * torch.ones(b, 13)], 1).long()
    valid = None
    if padding:
        valid = torch.ones(b, seq, dtype=torch.long)
        valid[1, :9] = 0
    outs = []
    for backend in (SDPAAttention(), FlexAttention()):
        mask = backend.build_mask(b, seq, q.device, valid, docs)
        outs.append(backend(q, k, v, mask))
    assert ((outs[1] - outs[0]).norm() / outs[0].norm()) < 1e-5
    # and the mask matters: without documents the outputs differ
    plain = FlexAttention()
    unmasked = plain(q, k, v, plain.build_mask(b, seq, q.device, None, None))
    assert ((unmasked - outs[0]).norm() / outs[0].norm()) > 1e-2


@torch.no_grad()
def test_flex_model_equals_sdpa_model():
    """The whole model with either backend: same logits and loss (fp32, CPU)."""
    torch.manual_seed(0)
    sdpa = build_model(tiny_config(), seed=0)
    flex = copy.deepcopy(sdpa)
    flex.model.attention = make_attention("flex")
    ids = torch.randint(0, 512, (2, 30))
    docs = torch.cat([torch.zeros(2, 12), torch.ones(2, 18)], 1).long()
    a = sdpa(ids, document_ids=docs, labels=ids)
    b = flex(ids, document_ids=docs, labels=ids)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)
    assert ((a.logits - b.logits).norm() / a.logits.norm()) < 1e-5
