"""Named recipes: a (weight spec, activation spec) pair per method, generated as a table.

    bf16                 no quantization
    bitnet-b1.58         BitNet b1.58: ternary absmean weights per tensor, 8-bit absmax activations per token
    quest-wXaY           QuEST: RMS·α_b scale per row, centered grid, Hadamard-128 along K, trust estimator
    quest-wX             QuEST weight-only (activations in high precision)
    quest-noh-wXaY       QuEST without the Hadamard transform (ablation)
    ste-wXaY             per-row absmax, symmetric integer grid, nearest, identity gradient
    lsq-wXaY             one learned step per tensor, centered grid (LSQ)
    pact-wXaY            learned activation clip (PACT); weights as ste
    dqt-ternary, dqt-intN (N = 2, 3, 4, 8), dqt-quest-w4a4, dqt-quest-w8a8, and each with -nearest:
                         direct quantized training, weights stored as codes (``list_recipes(include_direct=True)``)

X, Y ∈ {1, 1.58, 2, 3, 4, 8}. Where a grid does not exist at a bit width the nearest faithful one is used:
1.58 bits always means the ternary grid {−Δ, 0, Δ} (no centered 3-level grid exists; QuEST's 1.58-bit
formula is round(x_c/Δ)·Δ, METHODS.md §4); 1 bit means the binary grid {±s}. The STE baseline at 1 bit has no
symmetric integer grid, so it uses sign(x)·mean|x| (the MSE-optimal binary scale, XNOR-Net/BitNet).
See docs/methods.md.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

from lowbit.quant.spec import QuantSpec

#: Bit widths the recipe names are generated for.
RECIPE_BITS: tuple[float, ...] = (1, 1.58, 2, 3, 4, 8)


@dataclass(frozen=True)
class Recipe:
    """A named quantization method: what happens to the weight and to the input of each target Linear."""

    name: str
    """Registry key, e.g. ``quest-w4a4``."""
    description: str
    """One line for ``lowbit recipes``."""
    weight: QuantSpec | None
    """Spec of the weight (None = high precision)."""
    act: QuantSpec | None
    """Spec of the layer input activation (None = high precision)."""
    direct: bool = False
    """Direct quantized training (DQT): the weight is stored as codes of ``weight`` and updated on its grid
    (``lowbit.nn.DirectQuantLinear`` + ``lowbit.optim.DirectOptimizer``); no latent float weight exists."""
    update_rounding: str = "stochastic"
    """DQT only: how the optimizer puts an updated weight back on the grid (stochastic, or nearest = ablation)."""

    @property
    def is_identity(self) -> bool:
        return self.weight is None and self.act is None


def _b(bits: float) -> str:
    return str(bits)


def _sym_grid(bits: float, zero: bool) -> str:
    """Symmetric grid at ``bits``: centered (no zero) or integer (with zero); ternary/binary where forced."""
    if bits == 1.58:
        return "ternary"
    if bits == 1:
        return "binary"
    return "int" if zero else "centered"


def quest_spec(bits: float, hadamard: bool = True) -> QuantSpec:
    """QuEST (METHODS.md §4): σ = RMS of the (rotated) row, s = α_b·σ, centered grid, trust estimator."""
    return QuantSpec(bits, _sym_grid(bits, zero=False), "rms", "row", hadamard=hadamard, estimator="trust")


def ste_spec(bits: float) -> QuantSpec:
    """STE baseline (§5): per-row absmax, symmetric integer grid, nearest, identity gradient."""
    return QuantSpec(bits, _sym_grid(bits, zero=True), "absmean" if bits == 1 else "absmax", "row")


def lsq_spec(bits: float) -> QuantSpec:
    """LSQ (§5): one learned step per tensor, centered grid; x gets LSQ's clipped straight-through
    gradient."""
    return QuantSpec(bits, _sym_grid(bits, zero=False), "lsq", "tensor", estimator="clipped_ste")


def pact_spec(bits: float) -> QuantSpec:
    """PACT activations (§5): learned clip s per tensor, symmetric integer grid, identity gradient to x inside
    [−s, s], gradient to s from the clipped entries."""
    return QuantSpec(bits, _sym_grid(bits, zero=True), "pact", "tensor", estimator="clipped_ste")


BITNET_WEIGHT = QuantSpec(1.58, "ternary", "absmean", "tensor")  # §2: s = mean|W|, clip(round(W/s),−1,1)·s
BITNET_ACT = QuantSpec(8, "int_asym", "absmax", "row")  # §2: clip(round(x·127/m), −128, 127)·m/127


def dqt_weight_spec(bits: float) -> QuantSpec:
    """DQT weights (METHODS.md §3): per-tensor absmean scale, Δ = mean|W|/Qp (ternary: Δ = mean|W|), the
    asymmetric two's-complement grid Qn = −2^(n−1) … Qp = 2^(n−1) − 1 (ternary: {−1, 0, 1}); no gradient
    estimator — the forward uses the stored weight itself, so its gradient is exact."""
    return QuantSpec(bits, "ternary" if bits == 1.58 else "int_asym", "absmean", "tensor", estimator="none")


#: Bit widths of the DQT recipes: name suffix → bits.
DQT_BITS: dict[str, float] = {"ternary": 1.58, "int2": 2, "int3": 3, "int4": 4, "int8": 8}


def _direct_table() -> list[Recipe]:
    table = []
    for rounding, suffix, what in (("stochastic", "", "stochastic rounding"),
                                   ("nearest", "-nearest", "nearest rounding (ablation)")):
        for name, bits in DQT_BITS.items():
            table.append(Recipe(f"dqt-{name}{suffix}", f"DQT {name}: weights stored as codes, absmean Δ per tensor "
                                f"(frozen), AdamW update put back with {what}; BitNet 8-bit acts",
                                dqt_weight_spec(bits), BITNET_ACT, direct=True, update_rounding=rounding))
        for b in (4, 8):
            table.append(Recipe(f"dqt-quest-w{b}a{b}{suffix}", f"DQT on QuEST's grid: codes of W·H (Hadamard-128), "
                                f"α·RMS per row (frozen), {what}; QuEST {b}-bit acts with trust estimator",
                                quest_spec(b).replace(estimator="none"), quest_spec(b), direct=True,
                                update_rounding=rounding))
    return table


@functools.cache
def _direct_registry() -> dict[str, Recipe]:
    return {r.name: r for r in _direct_table()}


@functools.cache
def _registry() -> dict[str, Recipe]:
    # built on first use (cheap, but nothing at import)
    table = [
        Recipe("bf16", "no quantization (high-precision baseline)", None, None),
        Recipe("bitnet-b1.58", "BitNet b1.58: ternary absmean weights per tensor, 8-bit absmax acts per "
               "token, STE", BITNET_WEIGHT, BITNET_ACT),
    ]
    for w in RECIPE_BITS:
        table.append(Recipe(f"quest-w{_b(w)}", f"QuEST weight-only W{w}: RMS·α scale per row, Hadamard-128, "
                            "trust estimator; activations high precision", quest_spec(w), None))
    families = [
        ("quest", "QuEST", lambda b: quest_spec(b), lambda b: quest_spec(b), "Hadamard-128, RMS·α, trust"),
        ("quest-noh", "QuEST without Hadamard", lambda b: quest_spec(b, False),
         lambda b: quest_spec(b, False), "RMS·α, trust"),
        ("ste", "STE", ste_spec, ste_spec, "per-row absmax, integer grid, identity gradient"),
        ("lsq", "LSQ", lsq_spec, lsq_spec, "learned step per tensor, centered grid"),
        ("pact", "PACT", ste_spec, pact_spec, "learned activation clip; weights as STE"),
    ]
    for prefix, title, wspec, aspec, what in families:
        for w in RECIPE_BITS:
            for a in RECIPE_BITS:
                name = f"{prefix}-w{_b(w)}a{_b(a)}"
                table.append(Recipe(name, f"{title} W{w}A{a}: {what}", wspec(w), aspec(a)))
    return {r.name: r for r in table}


def list_recipes(include_direct: bool = False) -> list[str]:
    """Registered recipe names, in table order: the QAT recipes (a latent float weight, ``quantize_``), plus,
    with ``include_direct``, the DQT ones (weights stored as codes; they need ``lowbit.optim.DirectOptimizer``
    rather than a plain torch optimizer)."""
    return list(_registry()) + (list(_direct_registry()) if include_direct else [])


def get_recipe(name: str | Recipe) -> Recipe:
    """The recipe called ``name`` (a Recipe is passed through). Unknown → ValueError with a suggestion."""
    if isinstance(name, Recipe):
        return name
    reg = _registry() | _direct_registry()
    key = name.strip().lower()
    if key in reg:
        return reg[key]
    close = difflib.get_close_matches(key, list(reg), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown quantization recipe {name!r}{hint} (`lowbit recipes` lists all "
                     f"{len(reg)})")
