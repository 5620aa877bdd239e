from __future__ import annotations

import pytest
import torch

from lowbit.config import ModelConfig
from lowbit.models.llama import Llama


def tiny_llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(ModelConfig(size="tiny", vocab_size=256, dim=64, n_layers=2, n_heads=2, ffn_dim=128,
                             max_seq_len=32))


@pytest.fixture
def make_tiny():
    return tiny_llama
