"""QuantLinear: correct products with and without Hadamard, parameters kept, learned scales."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.nn import QuantLinear
from lowbit.quant import QuantSpec, fake_quantize, hadamard
from lowbit.quant.recipes import lsq_spec, quest_spec


def _pair(k: int = 256, n: int = 48, bias: bool = False) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=bias)
    return lin, torch.randn(2, 5, k)


def test_from_linear_shares_parameters() -> None:
    lin, x = _pair(bias=True)
    q = QuantLinear.from_linear(lin, None, None)
    assert q.weight is lin.weight and q.bias is lin.bias
    torch.testing.assert_close(q(x), lin(x), rtol=0, atol=0)  # no specs: plain Linear
    assert set(q.state_dict()) == {"weight", "bias"}


def test_shared_rotation_equals_domain_preserving_product() -> None:
    # QuEST multiplies in the rotated domain: Q(XH)·Q(WH)ᵀ; the same as rotating each operand back first
    lin, x = _pair(bias=True)
    spec = quest_spec(4)
    q = QuantLinear.from_linear(lin, spec, spec)
    assert q.shared_rotation
    y = q(x)
    ref = fake_quantize(x, spec) @ fake_quantize(lin.weight, spec).T + lin.bias
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    ref_rot = fake_quantize(hadamard(x), spec.replace(hadamard=False)) @ fake_quantize(
        hadamard(lin.weight), spec.replace(hadamard=False)).T + lin.bias
    torch.testing.assert_close(y, ref_rot, rtol=1e-4, atol=1e-5)


def test_weight_only_hadamard_product_is_correct() -> None:
    """WxA16 quantizes W·H; the layer must still compute ≈ X·Wᵀ (not X·Q(WH)ᵀ)."""
    lin, x = _pair()
    spec = quest_spec(8)
    q = QuantLinear.from_linear(lin, spec, None)
    assert not q.shared_rotation
    y, exact = q(x), lin(x)
    assert (y - exact).norm() / exact.norm() < 0.02  # 8-bit: ~1 % error
    torch.testing.assert_close(y, hadamard(x) @ fake_quantize(lin.weight, spec, rotated=True).T,
                               rtol=1e-4, atol=1e-5)
    wrong = x @ fake_quantize(lin.weight, spec, rotated=True).T
    assert (wrong - exact).norm() / exact.norm() > 0.5


def test_mixed_hadamard_blocks_still_correct() -> None:
    lin, x = _pair()
    q = QuantLinear.from_linear(lin, quest_spec(8), quest_spec(8).replace(hadamard_block=64))
    assert not q.shared_rotation
    assert (q(x) - lin(x)).norm() / lin(x).norm() < 0.03


def test_gradients_flow_to_weight_and_input() -> None:
    lin, x = _pair()
    q = QuantLinear.from_linear(lin, quest_spec(4), quest_spec(4))
    x.requires_grad_()
    q(x).square().sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_learned_scales_initialise_lazily_and_persist() -> None:
    lin, x = _pair()
    spec = lsq_spec(4)
    q = QuantLinear.from_linear(lin, spec, spec)
    assert {"weight_scale", "input_scale", "weight_scale_ready", "input_scale_ready"} <= set(q.state_dict())
    assert not bool(q.input_scale_ready)
    q(x).sum().backward()
    assert bool(q.input_scale_ready) and bool(q.weight_scale_ready)
    torch.testing.assert_close(q.weight_scale.detach(), 2 * lin.weight.abs().mean().reshape(1) / 7.5**0.5)
    torch.testing.assert_close(q.input_scale.detach(), 2 * x.abs().mean().reshape(1) / 7.5**0.5)
    assert q.weight_scale.grad is not None and q.input_scale.grad is not None
    # a second batch does not re-initialise
    before = q.input_scale.detach().clone()
    q(10 * x)
    assert torch.equal(q.input_scale.detach(), before)
    # loading a checkpoint keeps the loaded scale, and the Python flag follows the buffer
    q2 = QuantLinear.from_linear(nn.Linear(256, 48, bias=False), spec, spec)
    q2.load_state_dict(q.state_dict())
    assert q2._input_ready and torch.equal(q2.input_scale, q.input_scale)
    torch.testing.assert_close(q2(x), q(x), rtol=0, atol=0)


def test_bf16_autocast_and_dtype() -> None:
    lin, x = _pair()
    q = QuantLinear.from_linear(lin, quest_spec(4), quest_spec(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    qb = QuantLinear.from_linear(nn.Linear(256, 8, bias=False).bfloat16(), quest_spec(4), quest_spec(4))
    assert qb(x.bfloat16()).dtype == torch.bfloat16


def test_diagnostics_of_one_layer() -> None:
    lin, x = _pair()
    q = QuantLinear.from_linear(lin, quest_spec(4), QuantSpec(8, "int", "absmax"))
    q(x)
    d = q.diagnostics()
    assert set(d) == {"weight_snr_db", "weight_masked", "act_snr_db"}
    assert 15 < d["weight_snr_db"] < 25  # 4-bit Gaussian: −10·log10(0.0115) ≈ 19.4 dB
    assert d["act_snr_db"] > 35
    assert 0 <= d["weight_masked"] < 0.05
    assert "weight=[4b centered rms row H128 trust]" in repr(q)


@pytest.mark.parametrize("k", [192, 96])
def test_hadamard_when_k_is_not_a_multiple_of_the_block(k: int) -> None:
    lin, x = _pair(k=k)
    q = QuantLinear.from_linear(lin, quest_spec(8), quest_spec(8))
    assert (q(x) - lin(x)).norm() / lin(x).norm() < 0.05
