"""The quantizer body: grid membership, (de)quantize consistency, idempotence, rounding, exact formulas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant import BITS, GRIDS, QuantSpec, dequantize, fake_quantize, hadamard, quantize, scale_shape


def _valid_specs() -> list[QuantSpec]:
    out = []
    for bits, grid, scale, gran, had in itertools.product(
        BITS, GRIDS, ("absmax", "absmean", "rms"), ("tensor", "row", "group"), (False, True)
    ):
        try:
            out.append(QuantSpec(bits, grid, scale, gran, group_size=16, hadamard=had, hadamard_block=32))
        except ValueError:
            pass
    return out


SPECS = _valid_specs()


def _x(seed: int, shape=(3, 5, 64), heavy: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if heavy:  # outliers, as in real activations
        x = x * torch.exp(torch.randn(shape, generator=g))
    return x


def test_many_specs_exist() -> None:
    assert len(SPECS) > 300


@settings(max_examples=80, deadline=None)
@given(spec=st.sampled_from(SPECS), seed=st.integers(0, 2**16), heavy=st.booleans())
def test_values_land_on_the_grid(spec: QuantSpec, seed: int, heavy: bool) -> None:
    x = _x(seed, heavy=heavy)
    codes, step = quantize(x, spec)
    info = spec.info
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert step.shape == scale_shape(x.shape, spec)
    assert int(codes.min()) >= info.qmin and int(codes.max()) <= info.qmax
    # fake_quantize = dequantize∘quantize in value; in the quantization domain every value is (k+offset)·Δ
    y = fake_quantize(x, spec, rotated=True)
    torch.testing.assert_close(y, dequantize(codes, step, spec, rotated=True), rtol=0, atol=0)
    from lowbit.quant.core import _groups, _step

    yg = _groups(y, spec)
    k = yg / _step(yg, spec, step) - info.offset
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-4)
    # and the levels used are at most n
    assert len(torch.unique(codes)) <= info.levels


@settings(max_examples=60, deadline=None)
@given(spec=st.sampled_from(SPECS), seed=st.integers(0, 2**16))
def test_fake_quantize_is_dequantize_of_quantize(spec: QuantSpec, seed: int) -> None:
    x = _x(seed)
    codes, step = quantize(x, spec)
    torch.testing.assert_close(fake_quantize(x, spec), dequantize(codes, step, spec), rtol=0, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(spec=st.sampled_from(SPECS), seed=st.integers(0, 2**16))
def test_idempotent_with_fixed_scale(spec: QuantSpec, seed: int) -> None:
    # re-quantizing grid values with the same step changes nothing (scales that depend on x, e.g. RMS,
    # would legitimately move when recomputed from Q(x); the grid itself is a fixed point)
    x = _x(seed)
    codes, step = quantize(x, spec)
    y = dequantize(codes, step, spec)
    codes2, _ = quantize(y, spec, scale=step)
    assert torch.equal(codes, codes2)
    torch.testing.assert_close(fake_quantize(y, spec, scale=step), y, rtol=0, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(spec=st.sampled_from([s for s in SPECS if s.scale == "absmax" and not s.hadamard]),
       seed=st.integers(0, 2**16))
def test_idempotent_absmax(spec: QuantSpec, seed: int) -> None:
    # absmax maps the largest entry onto the top level, so the recomputed scale is the same
    x = _x(seed)
    y = fake_quantize(x, spec)
    torch.testing.assert_close(fake_quantize(y, spec), y, rtol=1e-6, atol=1e-7)


def test_quest_forward_exact() -> None:
    """METHODS.md §4: Δ = 2s/(n−1), x_c = clamp(x, −s, s), Q = (round(x_c/Δ + ½) − ½)·Δ, s = α·RMS(row)."""
    x = _x(0, (16, 256), heavy=True)
    for bits in (1, 2, 3, 4, 8):
        spec = QuantSpec(bits, "centered", "rms", "row")
        n = 2**bits
        s = spec.alpha_value * x.pow(2).mean(-1, keepdim=True).sqrt()
        d = 2 * s / (n - 1)
        xc = torch.clamp(x, -s, s)
        ref = (torch.round(xc / d + 0.5) - 0.5) * d
        torch.testing.assert_close(fake_quantize(x, spec), ref, rtol=1e-6, atol=1e-6)
    # 1 bit: sign(x)·0.798σ
    spec = QuantSpec(1, "binary", "rms", "row")
    sigma = x.pow(2).mean(-1, keepdim=True).sqrt()
    ref = torch.sign(x) * 0.7978845608 * sigma
    torch.testing.assert_close(fake_quantize(x, spec), ref, rtol=1e-6, atol=1e-7)


def test_quest_158_is_exactly_three_levels() -> None:
    spec = QuantSpec(1.58, "ternary", "rms", "row", hadamard=True)
    x = _x(1, (8, 256))
    y = fake_quantize(x, spec, rotated=True)
    sigma = hadamard(x).pow(2).mean(-1, keepdim=True).sqrt()
    units = y / (spec.alpha_value * sigma)  # {−α, 0, α}·σ
    assert set(torch.unique(units.round()).tolist()) == {-1.0, 0.0, 1.0}
    torch.testing.assert_close(units, units.round(), rtol=0, atol=1e-5)
    for row in y:
        assert len(torch.unique(row)) == 3


def test_bitnet_formulas_exact() -> None:
    """METHODS.md §2, written as the BitNet reference does."""
    from lowbit.quant.recipes import BITNET_ACT, BITNET_WEIGHT

    w = _x(2, (32, 64)) * 0.02
    s = w.abs().mean().clamp(min=1e-5)
    torch.testing.assert_close(fake_quantize(w, BITNET_WEIGHT), (w / s).round().clamp(-1, 1) * s)
    x = _x(3, (2, 4, 64), heavy=True)
    x[0, 0] = 0.0  # all-zero token stays finite
    m = x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    ref = (x * 127 / m).round().clamp(-128, 127) * m / 127
    y = fake_quantize(x, BITNET_ACT)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(y).all() and (y[0, 0] == 0).all()


def test_group_granularity_is_per_block() -> None:
    spec = QuantSpec(4, "int", "absmax", "group", group_size=16)
    x = _x(4, (3, 64))
    codes, step = quantize(x, spec)
    assert step.shape == (3, 4)
    torch.testing.assert_close(step, x.reshape(3, 4, 16).abs().amax(-1) / 7)
    with pytest.raises(ValueError, match="does not divide"):
        quantize(torch.randn(3, 40), spec)


def test_stochastic_rounding_unbiased_and_seeded() -> None:
    spec = QuantSpec(2, "centered", "absmax", "tensor", rounding="stochastic")
    x = torch.linspace(-0.74, 0.74, 37)  # inside the representable range
    step = torch.tensor(0.5)  # fixed scale: levels ±0.25, ±0.75
    n = 4000
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([fake_quantize(x, spec, scale=step, generator=g) for _ in range(n)])
    # per entry the draw is one of two neighbours Δ apart: std ≤ Δ/2, so the mean is within 5·Δ/(2√n)
    assert (draws.mean(0) - x).abs().max() < 5 * 0.5 / (2 * math.sqrt(n))
    # nearest is biased on the same inputs (sanity check that the test has power)
    near = fake_quantize(x, spec.replace(rounding="nearest"), scale=step)
    assert (near - x).abs().max() > 0.2
    # same seed → same draw; explicit uniforms give floor(y + u)
    a = fake_quantize(x, spec, scale=step, generator=torch.Generator().manual_seed(7))
    b = fake_quantize(x, spec, scale=step, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    u = torch.full_like(x, 0.999999)
    up = fake_quantize(x, spec, scale=step, noise=u)  # u → 1: always rounds up (to the next level)
    assert torch.all(up >= x - 1e-6)


def test_dtype_and_autocast() -> None:
    spec = QuantSpec(4, "centered", "rms", "row", hadamard=True, estimator="trust")
    x = _x(5, (4, 128)).bfloat16().requires_grad_()
    y = fake_quantize(x, spec)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = fake_quantize(x.detach().float(), spec)
    assert z.dtype == torch.float32  # computed in fp32 even under autocast


def test_zero_input_is_finite() -> None:
    for spec in (QuantSpec(4, "centered", "rms"), QuantSpec(1.58, "ternary", "absmean", "tensor"),
                 QuantSpec(8, "int_asym", "absmax")):
        y = fake_quantize(torch.zeros(2, 64), spec)
        assert torch.isfinite(y).all()
