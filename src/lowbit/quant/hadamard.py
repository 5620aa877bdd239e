"""Block Walsh–Hadamard transform along the last dimension (K), orthonormal and self-inverse.

QuEST (METHODS.md §4) rotates weights and activations alike with a fixed (not random) Walsh–Hadamard matrix
of block size 128 along K, so that (XH)(WH)ᵀ = X H Hᵀ Wᵀ = XWᵀ. The transform is block diagonal:
H = diag(H_b, …, H_b) with H_b the Sylvester Hadamard matrix scaled by 1/√b, which is symmetric and
orthonormal, hence H_b⁻¹ = H_bᵀ = H_b. It is applied as a (…, K/b, b) @ (b, b) batched matmul: O(K·b)
work per row with a tiny constant matrix, never a dense K×K one.

K not divisible by the block: the block used is the largest power of two that divides K and is at most
the requested block (e.g. K = 192, block 128 → 64). W and X share K, so both sides always get the same
transform and the product identity still holds. An odd K has no Hadamard block at all: ValueError.
"""

from __future__ import annotations

import functools

import torch


def hadamard_block_size(k: int, block: int = 128) -> int:
    """Block actually used for a last dimension of size ``k``: largest power of two dividing k, ≤ block."""
    if block < 2 or block & (block - 1):
        raise ValueError(f"hadamard block must be a power of two ≥ 2, got {block}")
    b = min(block, k & -k)  # k & -k = largest power of two dividing k
    if b < 2:
        raise ValueError(f"cannot apply a Walsh–Hadamard transform along a dimension of odd size {k}")
    return b


@functools.lru_cache(maxsize=32)
def _hadamard_matrix(b: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Sylvester construction H_2m = [[H, H], [H, −H]], built in float64 and scaled by 1/√b. Cached per
    # (size, dtype, device): created on first use, so nothing happens at import and .to() is respected.
    # Built outside inference mode: a cached inference tensor could never be saved for backward, so a first
    # call under torch.inference_mode() (an eval harness, generation) would break every later training step.
    with torch.inference_mode(False), torch.no_grad():
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < b:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return (h / b**0.5).to(dtype=dtype, device=device)


def hadamard_matrix(
    b: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The orthonormal b×b Walsh–Hadamard block H_b (symmetric, H_b @ H_b = I)."""
    hadamard_block_size(b, b)
    return _hadamard_matrix(b, dtype, torch.device(device))


def hadamard(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """x ↦ x·H along the last dim with blocks of :func:`hadamard_block_size`. Its own inverse."""
    k = x.shape[-1]
    b = hadamard_block_size(k, block)
    h = _hadamard_matrix(b, x.dtype, x.device)
    return (x.reshape(*x.shape[:-1], k // b, b) @ h).reshape(x.shape)  # (…, K/b, b) @ (b, b)
