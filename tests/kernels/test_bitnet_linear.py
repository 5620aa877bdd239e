"""lowbit.kernels.bitnet_linear: equal to QuantLinear with bitnet-b1.58 (and the integer-grid STE recipes) in value
and gradient (CPU, reference GEMM; Triton's interpreter for the INT8 kernel), the memory it saves, and a GPU check."""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels import scaled_mm as sm
from lowbit.kernels.bitnet_linear import bitnet_linear, bitnet_linear_args, bitnet_linear_ref, quantize_int8
from lowbit.nn.linear import QuantLinear
from lowbit.quant import fake_quantize
from lowbit.quant.recipes import BITNET_ACT, BITNET_WEIGHT, get_recipe, list_recipes


def layer_for(recipe="bitnet-b1.58", k=256, n=48, bias=True, seed=0) -> QuantLinear:
    torch.manual_seed(seed)
    r = get_recipe(recipe)
    layer = QuantLinear(k, n, bias=bias, weight_spec=r.weight, act_spec=r.act)
    layer.kernels = "off"
    return layer


def run(layer, x, g, fn=None, autocast=False):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = (fn or layer)(x)
    y.backward(g.to(y.dtype))
    return y.detach(), x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


def relative(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_grid_and_codes():
    # BitNet's codes: ternary weights, 8-bit two's-complement activations; absmax never reaches −128
    x = torch.randn(64, 256)
    cx, sx = quantize_int8(x, BITNET_ACT)
    assert cx.dtype == torch.int8 and sx.shape == (64,) and cx.min() >= -127 and cx.max() <= 127
    assert torch.equal(cx.float() * sx[:, None], fake_quantize(x, BITNET_ACT))
    w = torch.randn(48, 256)
    cw, sw = quantize_int8(w, BITNET_WEIGHT)
    assert set(cw.unique().tolist()) <= {-1, 0, 1} and sw.shape == (48,) and (sw == sw[0]).all()
    assert torch.equal(cw.float() * sw[:, None], fake_quantize(w, BITNET_WEIGHT))


def test_args_accept_the_integer_ste_recipes():
    for name in list_recipes():
        r = get_recipe(name)
        ok = bitnet_linear_args(r.weight, r.act) is not None
        assert ok == (name == "bitnet-b1.58" or (name.startswith("ste-w") and not name.startswith("ste-w1a")
                                                 and not name.endswith("a1"))), name


@pytest.mark.parametrize("recipe", ["bitnet-b1.58", "ste-w4a8", "ste-w8a8", "ste-w1.58a4"])
def test_matches_quant_linear_fp32(recipe):
    layer = layer_for(recipe)
    args = bitnet_linear_args(layer.weight_spec, layer.act_spec)
    x, g = torch.randn(3, 37, 256), torch.randn(3, 37, 48)
    y0, dx0, dw0, db0 = run(layer, x, g)
    y, dx, dw, db = run(layer, x, g, lambda t: bitnet_linear(t, layer.weight, layer.bias, gemm_backend="ref", **args))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6 * y0.abs().max().item())
    torch.testing.assert_close(dx, dx0, rtol=1e-6, atol=1e-7 * dx0.abs().max().item())
    torch.testing.assert_close(dw, dw0, rtol=1e-6, atol=1e-7 * dw0.abs().max().item())
    torch.testing.assert_close(db, db0)
    y_ref = bitnet_linear_ref(x, layer.weight, layer.bias, **args)
    torch.testing.assert_close(y_ref, y0)


def test_matches_quant_linear_under_autocast():
    # the backward GEMMs see the same bf16 operands; the forward is more exact than the bf16 fake-quant GEMM
    layer = layer_for()
    x, g = torch.randn(2, 40, 256), torch.randn(2, 40, 48)
    y0, dx0, dw0, db0 = run(layer, x, g, autocast=True)
    y, dx, dw, db = run(layer, x, g, lambda t: bitnet_linear(t, layer.weight, layer.bias), autocast=True)
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.float32 and dw.dtype == torch.float32
    y32 = run(layer, x, g)[0]
    assert relative(y, y32) <= relative(y0, y32) + 2**-9
    torch.testing.assert_close(dx, dx0, rtol=1e-5, atol=1e-6 * dx0.abs().max().item())
    torch.testing.assert_close(dw, dw0, rtol=1e-5, atol=1e-6 * dw0.abs().max().item())
    torch.testing.assert_close(db, db0)


def test_stats_equal_fake_quantize():
    x = torch.randn(5, 256)
    w = torch.randn(48, 256)
    st, st0 = {}, {}
    bitnet_linear(x, w, stats=st)
    fake_quantize(x, BITNET_ACT, stats=st0)
    assert st.keys() == st0.keys()
    for k in st:
        torch.testing.assert_close(st[k], st0[k], rtol=1e-6, atol=0)


def test_saves_int8_codes_and_checks_arguments():
    layer = layer_for(k=512, n=64)
    x = torch.randn(64, 512, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        bitnet_linear(x, layer.weight, layer.bias)
    assert {t.dtype for t in saved} == {torch.int8, torch.float32}
    assert sum(t.numel() * t.element_size() for t in saved) <= x.numel() + layer.weight.numel() + 4 * (64 + 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        bitnet_linear(torch.randn(4, 40), torch.randn(8, 40))
    with pytest.raises(ValueError, match="weight must be"):
        bitnet_linear(torch.randn(4, 64), torch.randn(8, 32))
    with pytest.raises(ValueError, match="integer"):
        bitnet_linear(x, layer.weight, act_spec=get_recipe("quest-w4a4").act)


def test_compiles():
    layer = layer_for()
    x, g = torch.randn(37, 256), torch.randn(37, 48)
    f = torch.compile(lambda t: bitnet_linear(t, layer.weight, layer.bias), backend="aot_eager")
    ref = run(layer, x, g, lambda t: bitnet_linear(t, layer.weight, layer.bias))
    got = run(layer, x, g, f)
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)
    torch._dynamo.reset()


@pytest.mark.skipif(not sm.has_triton(), reason="triton is not installed (pip install 'lowbit[triton]')")
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test; the GPU test below covers the kernel")
def test_int8_kernel_in_interpreter(monkeypatch):
    # the Triton INT8 GEMM inside the op: the integer sum is exact, so it equals the reference GEMM bit for bit;
    # and the DQT layer's INT8 forward through the same kernel
    from lowbit.testing import interpret_in_process

    interpret_in_process(monkeypatch)
    layer = layer_for(k=128, n=40)
    x, g = torch.randn(37, 128), torch.randn(37, 40)
    outs = [run(layer, x, g, lambda t, b=b: bitnet_linear(t, layer.weight, gemm_backend=b)) for b in ("ref", "triton")]
    for ref, got in zip(*outs, strict=True):
        if ref is not None:
            assert torch.equal(ref, got)

    from lowbit.nn import DirectQuantLinear

    r = get_recipe("dqt-ternary")
    torch.manual_seed(0)
    d = DirectQuantLinear(torch.randn(40, 128) * 0.02, weight_spec=r.weight, act_spec=r.act)
    ys = []
    for backend in ("ref", "triton"):
        d.kernels, d.gemm_backend = "on", backend
        ys.append(d(x))
    assert torch.equal(ys[0], ys[1])
    d.kernels = "off"
    torch.testing.assert_close(ys[0], d(x), rtol=1e-5, atol=1e-6 * ys[0].abs().max().item())


@pytest.mark.needs_cuda
@pytest.mark.parametrize("m,k,n", [(16384, 768, 2048), (16384, 4608, 1664)])
def test_gpu_real_shapes(m, k, n):
    # the Triton INT8 path equals the reference GEMM on the same codes; QuantLinear (fake quant, bf16 autocast)
    # to bf16 accuracy in value and gradients
    if not sm.has_triton():
        pytest.skip("triton is not installed")
    torch.manual_seed(0)
    r = get_recipe("bitnet-b1.58")
    layer = QuantLinear(k, n, bias=False, weight_spec=r.weight, act_spec=r.act, device="cuda")
    layer.kernels = "off"
    x = torch.randn(m, k, device="cuda")
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = bitnet_linear(x, layer.weight)
        y_ref = bitnet_linear(x, layer.weight, gemm_backend="ref")
    assert (y.float() - y_ref.float()).abs().max() <= 2**-7 * y_ref.float().abs().max()  # bf16 rounding only

    def step(fn):
        xr = x.detach().clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(xr)
        out.backward(g)
        return out.float(), xr.grad.float(), layer.weight.grad.clone()

    y0, dx0, dw0 = step(layer)
    y1, dx1, dw1 = step(lambda t: bitnet_linear(t, layer.weight))
    assert relative(y1, y0) < 1e-2 and relative(dx1, dx0) < 1e-2 and relative(dw1, dw0) < 1e-2
