"""The grid table and QuantSpec validation."""

from __future__ import annotations

import pytest

from lowbit.quant import QuantSpec, grid_info, n_levels


@pytest.mark.parametrize(
    "grid,bits,expected",
    [
        ("centered", 4, (-8, 7, 0.5)),  # {(k+½)Δ}, k = −8 … 7
        ("centered", 1, (-1, 0, 0.5)),  # = binary: ±Δ/2
        ("binary", 1, (-1, 0, 0.5)),
        ("int", 8, (-127, 127, 0.0)),  # symmetric: −Qp … Qp
        ("int", 2, (-1, 1, 0.0)),
        ("int", 1.58, (-1, 1, 0.0)),
        ("ternary", 1.58, (-1, 1, 0.0)),
        ("int_asym", 8, (-128, 127, 0.0)),  # BitNet activations
        ("int_asym", 2, (-2, 1, 0.0)),  # DQT 2-bit: {−2, −1, 0, 1}·Δ
    ],
)
def test_grid_table(grid: str, bits: float, expected: tuple) -> None:
    info = grid_info(grid, bits)
    assert (info.qmin, info.qmax, info.offset) == expected


def test_top_gives_quest_step() -> None:
    # Δ = s/top must equal QuEST's 2s/(n−1) on the centered grid, and BitNet's m/127 on int_asym 8-bit
    for bits in (1, 2, 3, 4, 8):
        n = n_levels(bits)
        assert grid_info("centered", bits).top == (n - 1) / 2
    assert grid_info("int_asym", 8).top == 127
    assert grid_info("ternary", 1.58).top == 1


@pytest.mark.parametrize(
    "grid,bits", [("centered", 1.58), ("binary", 2), ("ternary", 2), ("int", 1), ("int_asym", 1.58), ("x", 4)]
)
def test_grid_does_not_exist(grid: str, bits: float) -> None:
    with pytest.raises(ValueError):
        grid_info(grid, bits)


def test_spec_normalises_bits_and_validates() -> None:
    assert QuantSpec(4.0).bits == 4 and isinstance(QuantSpec(4.0).bits, int)
    assert QuantSpec(1.58, "ternary").bits == 1.58
    with pytest.raises(ValueError, match="did you mean 'absmax'"):
        QuantSpec(4, scale="absmx")
    with pytest.raises(ValueError):
        QuantSpec(9)
    with pytest.raises(ValueError, match="symmetric"):
        QuantSpec(8, "int_asym", "rms")
    with pytest.raises(ValueError, match="per tensor|granularity='tensor'"):
        QuantSpec(4, scale="lsq", granularity="row")
    with pytest.raises(ValueError, match="reference"):
        QuantSpec(8, "int", "rms", alpha="reference")  # 255 levels: not in the QuEST table
    with pytest.raises(ValueError):
        QuantSpec(4, scale="absmax", alpha="reference")  # alpha only for rms
    with pytest.raises(ValueError):
        QuantSpec(4, hadamard_block=96)
    with pytest.raises(ValueError):
        QuantSpec(4, trust=0.0)


def test_spec_is_hashable_and_short() -> None:
    s = QuantSpec(4, "centered", "rms", hadamard=True, estimator="trust")
    assert hash(s) == hash(QuantSpec(4, "centered", "rms", hadamard=True, estimator="trust"))
    assert s.short() == "4b centered rms row H128 trust"
