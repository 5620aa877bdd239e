"""Gaussian-MSE-optimal clip constants α (QuEST's scale: s = α·σ, METHODS.md §4).

For Z ~ N(0, 1) and a uniform grid of n points spanning [−α, α] (step Δ = 2α/(n−1); centered for even n,
with zero for odd n), nearest rounding with clipping gives

    MSE(α) = E[(Z − Q(Z))²] = 2 · Σ_cells ∫_{cell ∩ [0,∞)} (z − c)² φ(z) dz      (the grid is symmetric).

Each bounded cell is integrated with Gauss–Legendre quadrature (the integrand is smooth on a cell, so 24
nodes are exact to float64 rounding and, unlike the closed form, do not cancel catastrophically); the
outermost cell [b, ∞) uses the closed form ∫_b^∞ (z−c)²φ = (1+c²)·Q(b) + (b − 2c)·φ(b), Q(b) = ½erfc(b/√2).
α is then found by golden-section search in float64 (MSE is unimodal in α). Everything is computed on first
use and cached; nothing runs at import.

Under ``torch.compile`` α is a constant: :func:`optimal_alpha` is marked ``torch.compiler.assume_constant_result``,
so dynamo calls it (cached) instead of tracing the NumPy search — which it would otherwise turn into tensor
ops and then fail on (a graph break, or an error under ``fullgraph=True``). ``alpha="optimal"`` therefore
compiles to the same number the eager path uses, in ``fake_quantize`` (QuantLinear, DirectQuantLinear) and
everywhere else.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

#: α_b of the QuEST reference code, by number of levels (METHODS.md §4, first row). Its optimiser stopped a
#: little short for 6–8 bits; offered as ``QuantSpec(alpha="reference")`` for bit-exact comparisons.
REFERENCE_ALPHA: dict[int, float] = {
    2: 0.79788, 3: 1.22401, 4: 1.49353, 8: 2.05107, 16: 2.51393, 32: 2.91609, 64: 3.27660, 128: 3.60105,
    256: 3.88494,
}

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(24)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gaussian_mse(alpha: float, levels: int) -> float:
    """E[(Z − Q(Z))²] for Z ~ N(0,1), Q = nearest point of the n-level uniform grid spanning [−α, α]."""
    if levels < 2:
        raise ValueError("need at least 2 levels")
    if alpha <= 0:
        return 1.0  # everything collapses to 0 (odd n) or to ±0 (even n): the error is the whole variance
    step = 2.0 * alpha / (levels - 1)
    pts = -alpha + step * np.arange(levels, dtype=np.float64)
    pts = pts[pts > 0] if levels % 2 == 0 else pts[pts >= 0]  # levels whose cell meets [0, ∞)
    lo = np.maximum(pts - step / 2, 0.0)  # decision boundaries are midpoints; clip the first cell at 0
    hi = pts + step / 2
    # bounded cells: all but the last (outermost) one
    a, b, c = lo[:-1, None], hi[:-1, None], pts[:-1, None]
    z = (a + b) / 2 + (b - a) / 2 * _GL_NODES[None, :]
    f = (z - c) ** 2 * np.exp(-0.5 * z * z) * _INV_SQRT_2PI
    bounded = float(((b - a)[:, 0] / 2 * (f @ _GL_WEIGHTS)).sum())
    # outermost cell [b, ∞) in closed form
    bt, ct = float(lo[-1]), float(pts[-1])
    tail = (1.0 + ct * ct) * 0.5 * math.erfc(bt / math.sqrt(2.0)) + (bt - 2.0 * ct) * math.exp(
        -0.5 * bt * bt
    ) * _INV_SQRT_2PI
    return 2.0 * (bounded + tail)


@torch.compiler.assume_constant_result  # a constant for torch.compile (module docstring): called, not traced
def optimal_alpha(levels: int) -> float:
    """The α minimising :func:`gaussian_mse` for ``levels`` points (golden-section search, float64; cached)."""
    # the mark sits on this plain function: dynamo looks through a functools.cache wrapper (and its marks) to
    # trace the wrapped function
    return _optimal_alpha(levels)


@functools.cache
def _optimal_alpha(levels: int) -> float:
    lo, hi = 1e-3, 3.0 + math.log2(levels)  # optimum grows ~√(2 ln n); this bracket covers n ≤ 2^16
    invphi = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = hi - invphi * (hi - lo), lo + invphi * (hi - lo)
    f1, f2 = gaussian_mse(x1, levels), gaussian_mse(x2, levels)
    while hi - lo > 1e-10:
        if f1 < f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - invphi * (hi - lo)
            f1 = gaussian_mse(x1, levels)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + invphi * (hi - lo)
            f2 = gaussian_mse(x2, levels)
    return (lo + hi) / 2


def alpha_for(levels: int, option: str | float = "optimal") -> float:
    """Clip constant for ``levels`` points: ``"optimal"`` (computed), ``"reference"`` (QuEST code's table),
    or an explicit number."""
    if isinstance(option, int | float) and not isinstance(option, bool):
        return float(option)
    if option == "optimal":
        return optimal_alpha(levels)
    if option == "reference":
        if levels not in REFERENCE_ALPHA:
            raise ValueError(f"the QuEST reference table has no entry for {levels} levels; "
                             "use alpha='optimal'")
        return REFERENCE_ALPHA[levels]
    raise ValueError(f"alpha={option!r}: use 'optimal', 'reference' or a positive number")
