"""Shared fixtures: tiny configs keep the CPU suite fast."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels run on the CPU through Triton's interpreter, so CI checks them without
    # a GPU. Read when a kernel is decorated: set before bitnet_train.kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bitnet_train.model import BitNetConfig  # noqa: E402


def tiny_config(**overrides) -> BitNetConfig:
    """hidden 64, 2 layers, 4 heads / 2 KV heads, vocab 512."""
    kw = dict(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=10000.0, bos_token_id=1, eos_token_id=2, name="test-tiny",
    )
    kw.update(overrides)
    return BitNetConfig(**kw)


def free_port() -> int:
    """A TCP port nothing listens on now, for a torchrun rendezvous (fixed ports collide when
    suites run side by side)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_cfg() -> BitNetConfig:
    return tiny_config()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
