"""The recipe table."""

from __future__ import annotations

import pytest

from lowbit.quant import RECIPE_BITS, Recipe, get_recipe, list_recipes


def test_names_are_generated() -> None:
    names = list_recipes()
    assert names[:2] == ["bf16", "bitnet-b1.58"]
    n = len(RECIPE_BITS)
    assert len(names) == 2 + n + 5 * n * n == len(set(names))
    for b in ("1", "1.58", "2", "3", "4", "8"):
        assert f"quest-w{b}" in names
        for prefix in ("quest", "quest-noh", "ste", "lsq", "pact"):
            assert f"{prefix}-w{b}a{b}" in names
    assert "quest-w4a8" in names and "ste-w1.58a8" in names


def test_unknown_name_suggests() -> None:
    with pytest.raises(ValueError, match="did you mean 'quest-w4a4'"):
        get_recipe("qest-w4a4")
    with pytest.raises(ValueError, match="unknown"):
        get_recipe("zzz")
    assert get_recipe(" QuEST-W4A4 ").name == "quest-w4a4"
    r = get_recipe("bf16")
    assert get_recipe(r) is r and r.is_identity


def test_recipe_contents() -> None:
    q = get_recipe("quest-w4a4")
    assert q.weight == q.act
    assert (q.weight.bits, q.weight.grid, q.weight.scale, q.weight.hadamard, q.weight.estimator) == (
        4, "centered", "rms", True, "trust")
    assert get_recipe("quest-w1.58a1.58").weight.grid == "ternary"
    assert get_recipe("quest-w1a1").act.grid == "binary"
    assert get_recipe("quest-w4").act is None
    assert not get_recipe("quest-noh-w4a4").weight.hadamard
    b = get_recipe("bitnet-b1.58")
    assert (b.weight.grid, b.weight.scale, b.weight.granularity) == ("ternary", "absmean", "tensor")
    assert (b.act.bits, b.act.grid, b.act.scale, b.act.granularity) == (8, "int_asym", "absmax", "row")
    s = get_recipe("ste-w8a8")
    assert (s.weight.grid, s.weight.scale, s.weight.estimator) == ("int", "absmax", "ste")
    assert s.weight.info.qmin == -127
    lsq = get_recipe("lsq-w4a4")
    assert lsq.weight.scale == "lsq" and lsq.weight.grid == "centered" and lsq.weight.granularity == "tensor"
    p = get_recipe("pact-w4a4")
    assert p.act.scale == "pact" and p.weight == s.weight.replace(bits=4)
    assert all(isinstance(get_recipe(n), Recipe) for n in list_recipes())
