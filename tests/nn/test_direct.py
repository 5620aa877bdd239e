"""DirectQuantLinear & co.: weights stored as codes, exact products and gradients, no float weight anywhere."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lowbit.config import DQTConfig, TrainConfig
from lowbit.nn import (
    DirectQuantEmbedding,
    DirectQuantLinear,
    DirectQuantRMSNorm,
    direct_modules,
    quant_diagnostics,
    quantize_,
    quantize_direct_,
)
from lowbit.quant import fake_quantize, get_recipe, hadamard
from lowbit.train.optim import build_optimizer


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """Restore torch's global RNG after each test: tests collected later see the same stream."""
    with torch.random.fork_rng():
        yield


DQT = ["dqt-ternary", "dqt-int2", "dqt-int3", "dqt-int4", "dqt-int8", "dqt-quest-w4a4", "dqt-quest-w8a8"]


def _linear(k: int = 256, n: int = 48, bias: bool = False, seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    nn.init.normal_(lin.weight, 0, 0.02)
    return lin, torch.randn(2, 5, k)


@pytest.mark.parametrize("recipe, dtype, last_dim", [
    ("dqt-ternary", torch.uint8, 64), ("dqt-int2", torch.uint8, 64), ("dqt-int3", torch.uint8, 128),
    ("dqt-int4", torch.uint8, 128), ("dqt-int8", torch.int8, 256), ("dqt-quest-w4a4", torch.uint8, 128)])
def test_storage_is_codes(recipe: str, dtype: torch.dtype, last_dim: int) -> None:
    lin, _ = _linear()
    r = get_recipe(recipe)
    q = DirectQuantLinear.from_linear(lin, r.weight, r.act)
    assert q.weight_codes.dtype == dtype and tuple(q.weight_codes.shape) == (48, last_dim)
    assert not any(p.dim() == 2 for p in q.parameters())  # no weight Parameter
    assert not hasattr(q, "weight")
    assert set(q.state_dict()) == {"weight_codes", "weight_scale", "weight_format"}
    info = r.weight.info
    c = q.codes()
    assert c.dtype == torch.int8 and int(c.min()) >= info.qmin and int(c.max()) <= info.qmax


def test_reference_scale_and_clipping() -> None:
    # DQT's reference scale (METHODS.md §3): Δ = mean|W|/Qp per tensor; ≈ 42 % of a Gaussian at the ends (8-bit)
    torch.manual_seed(0)
    w = torch.randn(512, 512)
    q8 = DirectQuantLinear(w, weight_spec=get_recipe("dqt-int8").weight)
    assert float(q8.weight_scale) == pytest.approx(float(w.abs().mean()) / 127, rel=1e-6)
    assert q8.weight_diagnostics()["weight_at_ends"] == pytest.approx(0.42, abs=0.01)
    q2 = DirectQuantLinear(w, weight_spec=get_recipe("dqt-int2").weight)
    assert sorted(q2.codes().unique().tolist()) == [-2, -1, 0, 1]  # asymmetric 2-bit grid {−2, −1, 0, 1}·Δ
    assert float(q2.weight_scale) == pytest.approx(float(w.abs().mean()), rel=1e-6)
    qt = DirectQuantLinear(w, weight_spec=get_recipe("dqt-ternary").weight)
    assert sorted(qt.codes().unique().tolist()) == [-1, 0, 1]
    assert float(qt.weight_scale) == pytest.approx(float(w.abs().mean()), rel=1e-6)


@pytest.mark.parametrize("recipe", DQT)
def test_forward_and_input_gradient_match_dense_reference(recipe: str) -> None:
    lin, x = _linear(bias=True)
    r = get_recipe(recipe)
    q = DirectQuantLinear.from_linear(lin, r.weight, r.act)
    w = q.dequantized_weight()  # what the layer multiplies with (original domain)
    x1 = x.clone().requires_grad_(True)
    y = q(x1)
    x2 = x.clone().requires_grad_(True)
    w2 = w.clone().requires_grad_(True)
    ref = fake_quantize(x2, r.act) @ w2.T + lin.bias
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)  # exact through the low-bit weight
    # the weight gradient gᵀx, in the codes' domain (W·H for QuEST grids), delivered to the module
    want = hadamard(w2.grad, 128) if r.weight.hadamard else w2.grad
    torch.testing.assert_close(q.weight_grad, want, rtol=1e-4, atol=1e-5)
    assert lin.bias.grad is not None


def test_gradients_accumulate_and_hook() -> None:
    lin, x = _linear()
    q = DirectQuantLinear.from_linear(lin, get_recipe("dqt-int8").weight, None)
    q(x).sum().backward()
    g1 = q.weight_grad.clone()
    q(x).sum().backward()
    torch.testing.assert_close(q.weight_grad, 2 * g1)
    seen = []
    q.weight_grad = None
    q.grad_hook = lambda mod, g: seen.append(g)
    q(x).sum().backward()
    assert q.weight_grad is None and len(seen) == 1
    torch.testing.assert_close(seen[0], g1)
    with torch.no_grad():  # no graph, nothing delivered
        q(x)
    assert len(seen) == 1


def test_state_dict_round_trip_and_format_check() -> None:
    lin, x = _linear()
    q = DirectQuantLinear.from_linear(lin, get_recipe("dqt-ternary").weight, get_recipe("dqt-ternary").act)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    lin2, _ = _linear(seed=1)
    q2 = DirectQuantLinear.from_linear(lin2, q.weight_spec, q.act_spec)
    q2.load_state_dict(torch.load(buf))
    with torch.no_grad():
        torch.testing.assert_close(q2(x), q(x), rtol=0, atol=0)
    bad = dict(q.state_dict())
    bad["weight_format"] = bad["weight_format"].clone()
    bad["weight_format"][0] = 99  # another layout version
    with pytest.raises(RuntimeError, match="format"):
        q2.load_state_dict(bad)


def test_quantize_model_and_diagnostics(make_tiny) -> None:
    m = quantize_(make_tiny(), "dqt-int4")  # quantize_ dispatches DQT recipes to quantize_direct_
    names = [n for n, _ in direct_modules(m)]
    assert len(names) == 14 and all(".layers." in "." + n for n in names)
    assert type(m.lm_head) is nn.Linear and type(m.embed_tokens) is nn.Embedding
    idx = torch.randint(0, 256, (2, 16))
    m(idx, idx).backward()
    d = quant_diagnostics(m)
    assert "weight_at_ends/mean" in d and "act_snr_db/layers.0.mlp.down_proj" in d
    with pytest.raises(ValueError, match="already"):
        quantize_direct_(m, "dqt-int8")


def test_granularity_override(make_tiny) -> None:
    m = quantize_direct_(make_tiny(), "dqt-int8", dqt=DQTConfig(granularity="row"))
    q = m.layers[0].mlp.up_proj
    assert tuple(q.weight_scale.shape) == (128, 1) and q.weight_spec.granularity == "row"
    m = quantize_direct_(make_tiny(), "dqt-int4", dqt=DQTConfig(granularity="group", group_size=32))
    assert tuple(m.layers[0].mlp.down_proj.weight_scale.shape) == (64, 4)


def test_quantize_embeddings_option(make_tiny) -> None:
    m = quantize_direct_(make_tiny(), "dqt-ternary", dqt=DQTConfig(quantize_embeddings=True))
    assert isinstance(m.embed_tokens, DirectQuantEmbedding) and isinstance(m.lm_head, DirectQuantLinear)
    assert isinstance(m.norm, DirectQuantRMSNorm) and isinstance(m.layers[0].input_layernorm, DirectQuantRMSNorm)
    assert not any(p.requires_grad for p in m.parameters())  # nothing float is left to train
    idx = torch.randint(0, 256, (2, 16))
    ref_rows = m.embed_tokens.dequantized_weight()[idx]
    torch.testing.assert_close(m.embed_tokens(idx), ref_rows)
    loss = m(idx, idx)
    loss.backward()
    for name, mod in direct_modules(m):
        assert mod.weight_grad is not None and torch.isfinite(mod.weight_grad).all(), name
    assert m.embed_tokens.weight_grad[idx.unique()].abs().sum() > 0
    opt = build_optimizer(m, TrainConfig(lr=1e-2), torch.device("cpu"))
    assert opt.float_opt is None
    opt.step()
    opt.zero_grad()
    assert torch.isfinite(m(idx, idx))


def test_no_float_weight_survives_a_step(make_tiny) -> None:
    """After a training step: no floating tensor of any quantized weight's full shape among the modules'
    buffers and attributes, nor in the optimizer state (8-bit states), nor stashed gradients."""
    m = quantize_direct_(make_tiny(), "dqt-int8")
    opt = build_optimizer(m, TrainConfig(lr=1e-3), torch.device("cpu"), DQTConfig(state_dtype="8bit"))
    idx = torch.randint(0, 256, (2, 16))
    for _ in range(2):
        m(idx, idx).backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
    shapes = {mod.weight_shape for _, mod in direct_modules(m)}

    def offending(tensors):  # weight-shaped floats that own weight-sized memory (the gradient sink owns 4 bytes)
        return [tuple(t.shape) for t in tensors
                if torch.is_tensor(t) and t.is_floating_point() and tuple(t.shape) in shapes
                and t.untyped_storage().nbytes() >= t.numel()]

    for name, mod in direct_modules(m):
        found = offending(list(mod.buffers()) + list(mod.parameters()) + list(vars(mod).values()))
        assert not found, (name, found)
        assert mod.weight_grad is None
        assert mod._grad_sink.untyped_storage().nbytes() == 4 and mod._grad_sink.shape == mod.weight_shape
    for st in opt.dqt_state.values():
        assert not offending(st.values()) and st["exp_avg_q"].dtype == torch.int8
