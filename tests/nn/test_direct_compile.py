"""torch.compile of DirectQuantLinear's fake-quant QuEST path (dqt-quest-*): α="optimal" costs no graph break."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.nn import DirectQuantLinear
from lowbit.quant import get_recipe


def _breaks(layer: nn.Module, x: torch.Tensor) -> list:
    torch._dynamo.reset()
    out = torch._dynamo.explain(layer)(x).break_reasons
    torch._dynamo.reset()
    return out


@pytest.mark.parametrize("recipe", ["dqt-quest-w4a4", "dqt-quest-w8a8"])
def test_dqt_quest_compiles_alpha_breaks_nothing(recipe):
    # DQT layers graph-break once on their own (the autograd.Function that delivers the weight gradient to the
    # module takes an anchor tensor created with requires_grad); alpha="optimal" adds no break: the same count
    # as with α given as its number, and none of the breaks is in the α computation. Compiled = eager.
    r = get_recipe(recipe)
    assert r.weight.alpha == "optimal" and r.act.alpha == "optimal"
    torch.manual_seed(0)
    lin = nn.Linear(256, 48, bias=True)
    layer = DirectQuantLinear.from_linear(lin, r.weight, r.act)
    numeric = DirectQuantLinear.from_linear(lin, r.weight, r.act.replace(alpha=r.act.alpha_value))
    x = torch.randn(2, 5, 256)
    breaks = _breaks(layer, x)
    assert len(breaks) == len(_breaks(numeric, x)) <= 1
    assert not any("gaussian.py" in fs.filename for b in breaks for fs in b.user_stack)

    def step(fn):
        xr = x.clone().requires_grad_(True)
        layer.weight_grad = None
        y = fn(xr)
        y.backward(torch.ones_like(y))
        return y.detach(), xr.grad, layer.weight_grad.clone()

    eager = step(layer)
    comp = step(torch.compile(layer, backend="aot_eager"))
    for a, b in zip(comp, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()
