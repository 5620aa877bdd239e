"""``QuantSpec``: one frozen dataclass that names a quantizer (METHODS.md §1).

A method is a combination of fields, not a class: QuEST W4 is ``QuantSpec(4, "centered", "rms",
hadamard=True, estimator="trust")``, BitNet's weights ``QuantSpec(1.58, "ternary", "absmean", "tensor")``.
:func:`lowbit.quant.fake_quantize` executes any spec.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from lowbit.quant.gaussian import alpha_for
from lowbit.quant.grids import BITS, GridInfo, grid_info

ScaleKind = Literal["absmax", "absmean", "rms", "lsq", "pact"]
Granularity = Literal["tensor", "row", "group"]
Rounding = Literal["nearest", "stochastic"]
Estimator = Literal["ste", "clipped_ste", "trust", "none"]

SCALES = ("absmax", "absmean", "rms", "lsq", "pact")
LEARNED_SCALES = ("lsq", "pact")
GRANULARITIES = ("tensor", "row", "group")
ROUNDINGS = ("nearest", "stochastic")
ESTIMATORS = ("ste", "clipped_ste", "trust", "none")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. Validated on construction; hashable, so it can key caches."""

    bits: float = 4
    """Bit width: 1, 1.58 (three levels), 2 … 8."""
    grid: str = "centered"
    """Grid kind (see :mod:`lowbit.quant.grids`): centered (no zero), int (symmetric, with zero), int_asym
    (−2^(b−1) … 2^(b−1)−1), ternary (1.58 bits), binary (1 bit)."""
    scale: str = "absmax"
    """How the clip half-range s (the value of the top grid point) is chosen: absmax = max|x|; absmean =
    mean|x| (BitNet); rms = α·RMS(x) with α Gaussian-MSE-optimal (QuEST); lsq = learned step Δ (LSQ);
    pact = learned clip s (PACT). Learned ones are parameters held by the layer and passed in as ``scale``."""
    granularity: str = "row"
    """Group of values sharing one scale: tensor; row (the last dim K: output channel of a weight, token
    of an activation); group (``group_size`` consecutive values along K)."""
    group_size: int = 128
    """Values per scale when granularity='group'; must divide K."""
    hadamard: bool = False
    """Quantize in the block Walsh–Hadamard domain along K (QuEST). Codes live in that domain; dequantized
    and fake-quantized values are rotated back unless asked not to."""
    hadamard_block: int = 128
    """Hadamard block (power of two); shrunk to the largest power of two dividing K when K needs it."""
    rounding: str = "nearest"
    """nearest (round half to even, at exact ties only) or stochastic (floor(y + u), u ~ U[0,1): unbiased)."""
    estimator: str = "ste"
    """Gradient to x: ste (identity), clipped_ste (zero outside the representable range), trust (QuEST:
    g·1[|Q(x)−x| ≤ T·σ] in the quantization domain), none (zero: no surrogate)."""
    trust: float | None = None
    """Trust radius T in units of σ = RMS of the scale group; None = half a step (Δ/2σ), the QuEST default,
    so the gradient flows for |x| ≤ s + Δ/2."""
    alpha: str | float = "optimal"
    """scale='rms' only: 'optimal' (computed numerically), 'reference' (QuEST code's table), or a number."""
    eps: float = 1e-5
    """Floor on the scale statistic (BitNet clamps mean|W| and max|x| at 1e-5): an all-zero group stays
    finite."""

    def __post_init__(self) -> None:
        b = float(self.bits)
        if b not in BITS:
            raise ValueError(f"QuantSpec.bits={self.bits!r} is not one of {list(BITS)}")
        object.__setattr__(self, "bits", int(b) if b.is_integer() else b)
        # raises with the fix when the grid does not exist at these bits; kept as a plain attribute (not a
        # field), which torch.compile reads without tracing a cached_property's lock
        object.__setattr__(self, "_info", grid_info(self.grid, self.bits))
        _check("scale", self.scale, SCALES)
        _check("granularity", self.granularity, GRANULARITIES)
        _check("rounding", self.rounding, ROUNDINGS)
        _check("estimator", self.estimator, ESTIMATORS)
        if self.granularity == "group" and self.group_size < 1:
            raise ValueError(f"QuantSpec.group_size must be ≥ 1, got {self.group_size}")
        if self.hadamard_block < 2 or self.hadamard_block & (self.hadamard_block - 1):
            raise ValueError(f"QuantSpec.hadamard_block must be a power of two ≥ 2, got "
                             f"{self.hadamard_block}")
        if self.trust is not None and not self.trust > 0:
            raise ValueError(f"QuantSpec.trust must be > 0 or None, got {self.trust}")
        if self.eps <= 0:
            raise ValueError("QuantSpec.eps must be > 0")
        if self.scale == "rms":
            if not self.info.symmetric:
                raise ValueError("scale='rms' (Gaussian-optimal clip) needs a symmetric grid, not int_asym")
            if isinstance(self.alpha, int | float) and not self.alpha > 0:
                raise ValueError(f"QuantSpec.alpha must be > 0, got {self.alpha}")
            if self.alpha != "optimal":  # 'optimal' is computed on first use, not at construction
                alpha_for(self.info.levels, self.alpha)  # raises for unknown names / missing table entries
        elif self.alpha != "optimal":
            raise ValueError("QuantSpec.alpha only applies to scale='rms'")
        if self.scale in LEARNED_SCALES and self.granularity != "tensor":
            raise ValueError(f"scale={self.scale!r} learns one value per tensor: use granularity='tensor'")

    # ---- derived ------------------------------------------------------------------------------------------
    @property
    def info(self) -> GridInfo:
        """qmin, qmax, offset, levels, top of this spec's grid (computed once, at construction; not a field)."""
        return self._info  # type: ignore[attr-defined]

    @property
    def learned(self) -> bool:
        """Whether the scale is a learned parameter (LSQ step or PACT clip) the caller must pass in."""
        return self.scale in LEARNED_SCALES

    @property
    def alpha_value(self) -> float:
        """α for scale='rms' (computed on first use, cached)."""
        return alpha_for(self.info.levels, self.alpha)

    def replace(self, **changes: object) -> QuantSpec:
        return dataclasses.replace(self, **changes)

    def short(self) -> str:
        """Compact human-readable summary, e.g. ``4b centered rms row H128 trust``."""
        parts = [f"{self.bits}b", self.grid, self.scale, self.granularity]
        if self.granularity == "group":
            parts[-1] += str(self.group_size)
        if self.hadamard:
            parts.append(f"H{self.hadamard_block}")
        if self.rounding != "nearest":
            parts.append(self.rounding)
        parts.append(self.estimator)
        return " ".join(parts)


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        import difflib

        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"QuantSpec.{name}={value!r} is not one of {list(choices)}{hint}")
