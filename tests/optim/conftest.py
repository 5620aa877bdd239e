from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """These tests seed and draw from torch's global RNG: restore it afterwards, so that the tests collected
    after them see the same random stream with or without them."""
    with torch.random.fork_rng():
        yield
