"""The grid table: which integer codes a quantized number may take, and where they sit.

Every grid in lowbit is an affine integer grid (METHODS.md §1):

    value = (code + offset) · Δ,    code ∈ {qmin, …, qmax} (integers),    offset ∈ {0, ½}

* ``centered`` — uniform without zero, {(k+½)Δ}, k = −n/2 … n/2−1, n = 2^b levels (QuEST, LSQ reference).
* ``int`` — symmetric integer with zero, {kΔ}, k = −Qp … Qp, Qp = 2^(b−1)−1 (STE baseline); at 1.58 bits it is
  the ternary grid.
* ``int_asym`` — two's-complement integer, k = −2^(b−1) … 2^(b−1)−1 (BitNet activations, DQT weights).
* ``ternary`` — {−Δ, 0, +Δ}, only at 1.58 bits (= ``int`` at 1.58 bits; the name used by BitNet b1.58).
* ``binary`` — {−Δ/2, +Δ/2} in the formula above, i.e. {±s} for clip half-range s; only at 1 bit
  (= ``centered`` at 1 bit).

``top = qmax + offset`` is the largest grid value in units of Δ. A scale rule produces the clip half-range
s (the value the top code stands for), and the step is Δ = s / top. For the centered grid top = (n−1)/2,
so Δ = 2s/(n−1) exactly as QuEST writes it (METHODS.md §4); for BitNet's 8-bit activations top = 127, so
Δ = m/127 (§2); for ternary top = 1, so Δ = s (§2, §4 at 1.58 bits).

Packing code stores the unsigned code ``code − qmin`` ∈ [0, n).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Grid = Literal["centered", "int", "int_asym", "ternary", "binary"]
GRIDS: tuple[str, ...] = ("centered", "int", "int_asym", "ternary", "binary")

#: Bit widths lowbit supports. 1.58 stands for log2(3): three levels.
BITS: tuple[float, ...] = (1, 1.58, 2, 3, 4, 5, 6, 7, 8)


def n_levels(bits: float) -> int:
    """Number of points a b-bit code can address: 2^b, or 3 for 1.58 bits."""
    if bits == 1.58:
        return 3
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; choose one of {list(BITS)}")
    return 2 ** int(bits)


@dataclass(frozen=True)
class GridInfo:
    """Codes ``qmin … qmax`` (integers), each worth ``(code + offset)·Δ``."""

    qmin: int
    qmax: int
    offset: float

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    @property
    def top(self) -> float:
        """Largest grid value in units of Δ: the clip half-range s equals top·Δ."""
        return self.qmax + self.offset

    @property
    def symmetric(self) -> bool:
        return self.qmin + self.offset == -(self.qmax + self.offset)


def grid_info(grid: str, bits: float) -> GridInfo:
    """The one grid table. Raises ValueError (with the fix) for a grid that does not exist at ``bits``."""
    n = n_levels(bits)
    if grid == "centered" or grid == "binary":
        if grid == "binary" and bits != 1:
            raise ValueError(f"grid='binary' is the 1-bit grid; got bits={bits} (use grid='centered')")
        if n % 2:
            raise ValueError("a centered grid (no zero) needs an even number of levels; at 1.58 bits use "
                             "grid='ternary'")
        return GridInfo(-n // 2, n // 2 - 1, 0.5)
    if grid == "int" or grid == "ternary":
        if grid == "ternary" and bits != 1.58:
            raise ValueError(f"grid='ternary' is the 1.58-bit grid; got bits={bits} (use grid='int')")
        qp = (n - 1) // 2  # odd n (1.58 bits): Qp = 1; even n: 2^(b−1) − 1, one code left unused
        if qp < 1:
            raise ValueError("a symmetric integer grid needs at least 1.58 bits; at 1 bit use grid='binary'")
        return GridInfo(-qp, qp, 0.0)
    if grid == "int_asym":
        if n % 2 or n < 4:
            raise ValueError(f"grid='int_asym' needs 2 to 8 whole bits; got bits={bits}")
        return GridInfo(-n // 2, n // 2 - 1, 0.0)
    raise ValueError(f"grid={grid!r} is not one of {list(GRIDS)}")
