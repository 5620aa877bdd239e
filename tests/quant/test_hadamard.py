"""Block Walsh–Hadamard: orthonormal, self-inverse, and (XH)(WH)ᵀ = XWᵀ."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant import hadamard, hadamard_block_size, hadamard_matrix


@pytest.mark.parametrize("b", [2, 4, 16, 64, 128, 256])
def test_block_is_orthonormal_symmetric(b: int) -> None:
    h = hadamard_matrix(b, torch.float64)
    torch.testing.assert_close(h @ h.T, torch.eye(b, dtype=torch.float64))
    torch.testing.assert_close(h, h.T)
    assert torch.all(h.abs() == h.abs()[0, 0])  # ±1/√b entries


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 5), k_mult=st.sampled_from([1, 2, 3, 5]), block=st.sampled_from([2, 8, 32, 128]),
       seed=st.integers(0, 2**16))
def test_self_inverse_and_norm_preserving(rows: int, k_mult: int, block: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 3, 64 * k_mult, generator=g, dtype=torch.float64)
    y = hadamard(x, block)
    torch.testing.assert_close(hadamard(y, block), x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


@settings(max_examples=20, deadline=None)
@given(k=st.sampled_from([64, 128, 192, 640, 768]), seed=st.integers(0, 2**16))
def test_product_identity(k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, k, generator=g, dtype=torch.float64)
    w = torch.randn(5, k, generator=g, dtype=torch.float64)
    torch.testing.assert_close(hadamard(x) @ hadamard(w).T, x @ w.T)


def test_matches_dense_block_diagonal() -> None:
    x = torch.randn(3, 256, dtype=torch.float64)
    h = torch.block_diag(hadamard_matrix(128, torch.float64), hadamard_matrix(128, torch.float64))
    torch.testing.assert_close(hadamard(x, 128), x @ h)


def test_block_size_rule() -> None:
    assert hadamard_block_size(4096, 128) == 128
    assert hadamard_block_size(192, 128) == 64  # largest power of two dividing K, capped at the block
    assert hadamard_block_size(1664, 128) == 128  # QuEST 430M: 13·128
    assert hadamard_block_size(96, 128) == 32
    with pytest.raises(ValueError, match="odd"):
        hadamard_block_size(63, 128)


def test_first_use_under_inference_mode_does_not_break_training():
    """The cached block matrix must not be an inference tensor, or autograd could never save it later."""
    import importlib

    hmod = importlib.import_module("lowbit.quant.hadamard")  # the module, not the function of that name
    hmod._hadamard_matrix.cache_clear()
    x = torch.randn(3, 256)
    with torch.inference_mode():
        hmod.hadamard(x)
    w = torch.randn(3, 256, requires_grad=True)
    hmod.hadamard(w).pow(2).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
