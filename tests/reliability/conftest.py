"""The fault-injection suite runs many tiny runs: one intra-op thread is faster for a hidden-64
model and does not fight the other tests for the CPU."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
