"""torch.compile of DQT layers: the weight gradient travels through autograd (the gradient sink), so a block of
DQT layers compiles to one graph, forward and backward, with the eager gradients; α="optimal" costs no break."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from lowbit.nn import DirectQuantLinear, direct_modules, quantize_direct_, set_track_stats
from lowbit.quant import get_recipe


def _breaks(layer: nn.Module, x: torch.Tensor) -> list:
    torch._dynamo.reset()
    out = torch._dynamo.explain(layer)(x).break_reasons
    torch._dynamo.reset()
    return out


@pytest.mark.parametrize("recipe", ["dqt-quest-w4a4", "dqt-quest-w8a8"])
def test_dqt_quest_compiles_alpha_breaks_nothing(recipe):
    # no graph break with α="optimal" (computed) or given as its number. Compiled = eager.
    r = get_recipe(recipe)
    assert r.weight.alpha == "optimal" and r.act.alpha == "optimal"
    torch.manual_seed(0)
    lin = nn.Linear(256, 48, bias=True)
    layer = DirectQuantLinear.from_linear(lin, r.weight, r.act)
    numeric = DirectQuantLinear.from_linear(lin, r.weight, r.act.replace(alpha=r.act.alpha_value))
    x = torch.randn(2, 5, 256)
    breaks = _breaks(layer, x)
    assert breaks == _breaks(numeric, x) == []

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


@pytest.mark.parametrize("recipe", ["dqt-int8", "dqt-ternary", "dqt-quest-w4a4"])
@pytest.mark.parametrize("in_backward", [False, True])
def test_dqt_block_is_one_graph(make_tiny, recipe, in_backward):
    # a transformer block of DQT layers (embeddings and norm gains quantized too) compiles to a single graph with
    # no break, forward and backward; the gradients reach weight_grad (or the update-in-backward hook, once per
    # layer) exactly as in eager mode, accumulated over two micro-batches
    from lowbit.config import DQTConfig

    torch.manual_seed(0)
    model = quantize_direct_(make_tiny(), recipe, dqt=DQTConfig(quantize_embeddings=True))
    set_track_stats(model, False)
    block = model.layers[0]
    x = torch.randn(2, 16, model.cfg.dim)
    cos, sin = model.rope_cos[:16], model.rope_sin[:16]
    mods = [m for _, m in direct_modules(block)]
    seen: list[tuple[object, torch.Tensor]] = []

    def grads(fn):
        for m in mods:
            m.weight_grad = None
            m.grad_hook = (lambda mod, g: seen.append((mod, g.clone()))) if in_backward else None
        seen.clear()
        xr = x.clone().requires_grad_(True)
        for _ in range(2):
            fn(xr, cos, sin).square().mean().backward()
        if in_backward:
            assert len(seen) == 2 * len(mods) and all(m.weight_grad is None for m in mods)
            # per layer, in micro-batch order (the order across layers is the backward's own)
            return xr.grad, [g for m in mods for mod, g in seen if mod is m]
        return xr.grad, [m.weight_grad.clone() for m in mods]

    eager = grads(block)
    torch._dynamo.reset()
    counters.clear()
    compiled = grads(torch.compile(block, backend="aot_eager"))
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    assert len(compiled[1]) == len(eager[1])
    for a, b in zip(compiled[1], eager[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
