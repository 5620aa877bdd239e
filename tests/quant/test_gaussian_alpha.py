"""α_b: the Gaussian-MSE-optimal clip, computed in code, against METHODS.md §4."""

from __future__ import annotations

import pytest

from lowbit.quant import REFERENCE_ALPHA, QuantSpec, gaussian_mse, n_levels, optimal_alpha

# METHODS.md §4: bits → (α true optimum, min MSE)
TRUE_OPTIMUM = {
    1: (0.79788, 0.36338),
    1.58: (1.22401, 0.19017),
    2: (1.49353, 0.11885),
    3: (2.05107, 0.037440),
    4: (2.51400, 0.011543),
    5: (2.91615, 0.0034952),
    6: (3.27798, 0.0010400),
    7: (3.6111, 3.0433e-4),
    8: (3.9222, 8.7686e-5),
}


@pytest.mark.parametrize("bits", list(TRUE_OPTIMUM))
def test_alpha_matches_true_optimum(bits: float) -> None:
    alpha, mse = TRUE_OPTIMUM[bits]
    n = n_levels(bits)
    a = optimal_alpha(n)
    # the table is given to 5–6 significant digits
    assert a == pytest.approx(alpha, abs=2e-5 if bits < 7 else 1e-4)
    assert gaussian_mse(a, n) == pytest.approx(mse, rel=1e-4)


def test_reference_alpha_is_slightly_worse_at_8_bits() -> None:
    # METHODS.md: the reference code's 8-bit α gives MSE 8.782e-5 instead of 8.769e-5
    assert gaussian_mse(REFERENCE_ALPHA[256], 256) == pytest.approx(8.782e-5, rel=2e-4)
    assert gaussian_mse(REFERENCE_ALPHA[256], 256) > gaussian_mse(optimal_alpha(256), 256)


def test_closed_forms() -> None:
    # 1 bit: α = E|Z| = √(2/π), MSE = 1 − 2/π
    import math

    assert optimal_alpha(2) == pytest.approx(math.sqrt(2 / math.pi), abs=1e-7)  # flat minimum: ~√eps
    assert gaussian_mse(math.sqrt(2 / math.pi), 2) == pytest.approx(1 - 2 / math.pi, abs=1e-12)


def test_spec_alpha_options() -> None:
    assert QuantSpec(4, "centered", "rms").alpha_value == pytest.approx(2.51400, abs=2e-5)
    assert QuantSpec(4, "centered", "rms", alpha="reference").alpha_value == 2.51393
    assert QuantSpec(4, "centered", "rms", alpha=3.0).alpha_value == 3.0
    assert QuantSpec(1.58, "ternary", "rms", alpha="reference").alpha_value == 1.22401


@pytest.mark.parametrize("bits", [1, 1.58, 2, 4, 8])
def test_optimal_alpha_is_a_constant_under_torch_compile(bits):
    # dynamo would trace the NumPy search into tensor ops and fail on it (a graph break; an error with
    # fullgraph=True): optimal_alpha is assume_constant_result, so fake_quantize with alpha="optimal" compiles
    # whole, also on a cold cache, to the value eager gives
    import torch

    from lowbit.quant import fake_quantize, gaussian
    from lowbit.quant.recipes import quest_spec

    gaussian._optimal_alpha.cache_clear()
    torch._dynamo.reset()
    spec = quest_spec(bits)
    assert spec.alpha == "optimal"
    x = torch.randn(6, 256)
    for s in (spec, spec.replace(hadamard=False)):
        f = lambda t, s=s: fake_quantize(t, s, rotated=True)  # noqa: E731
        assert torch._dynamo.explain(f)(x).graph_break_count == 0
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ye = f(xe)
        yc = torch.compile(f, backend="aot_eager", fullgraph=True)(xc)
        assert torch.equal(yc, ye)
        g = torch.randn_like(ye)
        ye.backward(g)
        yc.backward(g)
        assert torch.equal(xc.grad, xe.grad)
    torch._dynamo.reset()
    assert optimal_alpha(n_levels(bits)) == gaussian._optimal_alpha(n_levels(bits))
