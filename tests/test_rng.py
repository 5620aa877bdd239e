"""The counter-based uniforms of stochastic rounding: a pure, documented function of (seed, step, stream,
index)."""

from __future__ import annotations

import pytest
import torch

from lowbit.rng import counter_bits, counter_key, counter_uniform, stream_id

MASK = 0xFFFFFFFF


def _h(v: int) -> int:  # PCG hash, written out from the docstring in plain Python
    s = (v * 747796405 + 2891336453) & MASK
    w = (((s >> ((s >> 28) + 4)) ^ s) * 277803737) & MASK
    return (w >> 22) ^ w


def _reference(seed: int, step: int, stream: int, index: int) -> float:
    k = _h(seed & MASK)
    k = _h(k ^ (seed >> 32))
    k = _h(k ^ (step & MASK))
    k = _h(k ^ (step >> 32))
    k = _h(k ^ stream)
    k2 = _h(k ^ 0x9E3779B9)
    x = _h(_h((index & MASK) ^ k) ^ (index >> 32) ^ k2)
    return (x >> 8) / 2**24


def test_matches_the_documented_function() -> None:
    cases = [(0, 0, 0), (1, 7, 12345), (2**40 + 3, 2**33 + 1, MASK), (123456789, 1000, stream_id("a.weight"))]
    idx = torch.tensor([0, 1, 2, 1000, 2**31, MASK, 2**32 + 5, 2**45 + 17])
    for seed, step, stream in cases:
        got = counter_uniform(seed, step, stream, index=idx)
        want = [_reference(seed, step, stream, int(i)) for i in idx]
        assert got.tolist() == want
    big = counter_uniform(5, 6, 7, (200_000,))  # across the CPU path's chunk boundaries
    assert [float(big[i]) for i in (0, 65535, 65536, 199_999)] == [_reference(5, 6, 7, i)
                                                                    for i in (0, 65535, 65536, 199_999)]


def test_pure_and_shardable() -> None:
    a = counter_uniform(3, 5, 9, (6, 10))
    assert torch.equal(a, counter_uniform(3, 5, 9, (6, 10)))  # same coordinates, same bits
    # a shard of rows 2..4 passes its global indices and gets exactly its slice
    rows = torch.arange(2, 5)[:, None] * 10 + torch.arange(10)
    assert torch.equal(counter_uniform(3, 5, 9, index=rows), a[2:5])
    assert torch.equal(counter_uniform(3, 5, 9, (3, 10), offset=20), a[2:5])
    for other in (counter_uniform(4, 5, 9, (6, 10)), counter_uniform(3, 6, 9, (6, 10)),
                  counter_uniform(3, 5, 8, (6, 10))):
        assert (other != a).float().mean() > 0.99


def test_uniform_statistics() -> None:
    u = counter_uniform(0, 1, stream_id("w"), (200_000,))
    assert u.dtype == torch.float32 and float(u.min()) >= 0 and float(u.max()) < 1
    assert torch.equal(u * 2**24, torch.round(u * 2**24))  # multiples of 2^-24
    assert abs(float(u.mean()) - 0.5) < 0.003 and abs(float(u.var()) - 1 / 12) < 0.002
    hist = torch.histc(u, bins=20, min=0, max=1) / u.numel()
    assert float((hist - 0.05).abs().max()) < 0.003
    v = counter_uniform(0, 2, stream_id("w"), (200_000,))  # next step: uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01  # neighbours


def test_bits_and_keys() -> None:
    b = counter_bits(1, 2, 3, torch.arange(1000))
    assert int(b.min()) >= 0 and int(b.max()) <= MASK
    assert counter_key(1, 2, 3) == counter_key(1, 2, 3) != counter_key(1, 2, 4)
    assert stream_id("layers.0.q_proj.weight") == stream_id("layers.0.q_proj.weight")
    with pytest.raises(ValueError):
        counter_key(-1, 0, 0)
