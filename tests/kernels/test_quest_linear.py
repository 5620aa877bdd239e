"""lowbit.kernels.quest_linear: equal to QuantLinear with the quest-wXaY recipes in value and gradient (CPU,
reference backends; Triton's interpreter for the kernels), the memory it saves, and GPU checks at real shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.kernels import scaled_mm as sm
from lowbit.kernels.quest_linear import code_format, quest_linear, quest_linear_args
from lowbit.nn.convert import quantize_
from lowbit.nn.linear import QuantLinear
from lowbit.quant import fake_quantize
from lowbit.quant.recipes import get_recipe, list_recipes, quest_spec
from lowbit.testing import within_one_bf16_ulp

FP8 = torch.float8_e4m3fn


def quest_layer(bits_w, bits_a, k=256, n=48, bias=True, seed=0) -> QuantLinear:
    """A QuantLinear made the way models get one: ``quantize_`` with the quest-wXaY recipe (when it exists)."""
    torch.manual_seed(seed)
    name = f"quest-w{bits_w}a{bits_a}"
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(k, n, bias=bias))
    try:
        quantize_(model, name)
    except ValueError:  # no recipe at this width (5–7 bits): the same specs by hand
        model.q_proj = QuantLinear.from_linear(model.q_proj, quest_spec(bits_w), quest_spec(bits_a))
    return model.q_proj


def run(layer: QuantLinear, x: torch.Tensor, g: torch.Tensor, fn=None, autocast=False):
    """(y, dx, dW, db) of one forward/backward, through ``fn(x)`` or the layer itself."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = (fn or layer)(x)
    y.backward(g.to(y.dtype))
    bias_grad = None if layer.bias is None else layer.bias.grad
    return y.detach(), x.grad, layer.weight.grad, bias_grad


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_code_format():
    assert [code_format(b, b) for b in (1, 1.58, 2, 3, 4)] == ["fp8"] * 5
    assert [code_format(b, b) for b in (5, 6, 7)] == ["int8"] * 3
    assert code_format(8, 8) == "float" and code_format(4, 8) == "float" and code_format(2, 6) == "int8"


def test_quest_linear_args_accepts_exactly_the_quest_recipes():
    for name in list_recipes():
        r = get_recipe(name)
        args = quest_linear_args(r.weight, r.act)
        assert (args is not None) == (name.startswith("quest-w") and "a" in name.split("-")[1]), name
    w, a = quest_spec(4), quest_spec(4)
    assert quest_linear_args(w, a.replace(trust=1.0)) is None  # one trust radius for both operands
    assert quest_linear_args(w.replace(rounding="stochastic"), a) is None
    assert quest_linear_args(w.replace(hadamard_block=64), a.replace(hadamard_block=64))["block"] == 64


@pytest.mark.parametrize("bits_w,bits_a", [(4, 4), (3, 3), (2, 2), (1, 1), (1.58, 1.58), (6, 6), (8, 8), (4, 8)])
def test_matches_quant_linear_fp32(bits_w, bits_a):
    # fp32 on the CPU, reference quantizer and GEMM: the forward differs from the fake-quant product only by
    # float32 rounding (the low-bit sum itself is exact); the gradients are the same operations in the same order
    layer = quest_layer(bits_w, bits_a)
    args = quest_linear_args(layer.weight_spec, layer.act_spec)
    assert args is not None and (args["bits_w"], args["bits_a"]) == (bits_w, bits_a)
    x = torch.randn(3, 37, 256)
    g = torch.randn(3, 37, 48)
    y0, dx0, dw0, db0 = run(layer, x, g)
    y, dx, dw, db = run(layer, x, g, lambda t: quest_linear(t, layer.weight, bias=layer.bias, **args))
    assert y.shape == y0.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6 * y0.abs().max().item())
    torch.testing.assert_close(dx, dx0, rtol=1e-6, atol=1e-7 * dx0.abs().max().item())
    torch.testing.assert_close(dw, dw0, rtol=1e-6, atol=1e-7 * dw0.abs().max().item())
    torch.testing.assert_close(db, db0)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_matches_quant_linear_under_autocast(bits):
    # bf16 autocast on the CPU: the backward GEMMs see the same bf16 operands as autocast gives QuantLinear;
    # the forward is *more* exact than QuantLinear's bf16 GEMM of bf16-rounded operands
    layer = quest_layer(bits, bits)
    x = torch.randn(2, 40, 256)
    g = torch.randn(2, 40, 48)
    y0, dx0, dw0, _ = run(layer, x, g, autocast=True)
    y, dx, dw, _ = run(layer, x, g, lambda t: quest_linear(t, layer.weight, bits, bits, layer.bias), autocast=True)
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.float32 and dw.dtype == torch.float32
    y32 = run(layer, x, g)[0]
    assert relative(y, y32) <= relative(y0, y32) + 2**-9
    torch.testing.assert_close(dx, dx0, rtol=1e-5, atol=1e-6 * dx0.abs().max().item())
    torch.testing.assert_close(dw, dw0, rtol=1e-5, atol=1e-6 * dw0.abs().max().item())


def test_no_bias_2d_input_and_frozen_weight():
    layer = quest_layer(4, 4, bias=False)
    x = torch.randn(37, 256)
    g = torch.randn(37, 48)
    y0, dx0, dw0, _ = run(layer, x, g)
    y, dx, dw, db = run(layer, x, g, lambda t: quest_linear(t, layer.weight, 4, 4))
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6 * y0.abs().max().item())
    torch.testing.assert_close(dx, dx0)
    layer.weight.requires_grad_(False)
    xr = x.clone().requires_grad_(True)
    quest_linear(xr, layer.weight, 4, 4).backward(g)
    torch.testing.assert_close(xr.grad, dx0)


def test_fp8_backward_is_close_to_bf16_backward():
    # G rounded to e4m3 per row: a few percent of relative error, nothing systematic
    layer = quest_layer(4, 4)
    x = torch.randn(4, 32, 256)
    g = torch.randn(4, 32, 48)
    _, dx0, dw0, db0 = run(layer, x, g, lambda t: quest_linear(t, layer.weight, 4, 4, layer.bias))
    y, dx, dw, db = run(layer, x, g, lambda t: quest_linear(t, layer.weight, 4, 4, layer.bias, backward="fp8"))
    assert relative(dx, dx0) < 0.05 and relative(dw, dw0) < 0.05
    torch.testing.assert_close(db, db0)
    # contraction dims that are not multiples of 16 are zero-padded (M = 4·7 = 28 tokens here)
    _, dx, dw, _ = run(layer, x[:, :7], g[:, :7], lambda t: quest_linear(t, layer.weight, 4, 4, backward="fp8"))
    _, dx0, dw0, _ = run(layer, x[:, :7], g[:, :7], lambda t: quest_linear(t, layer.weight, 4, 4))
    assert relative(dx, dx0) < 0.05 and relative(dw, dw0) < 0.05


def test_argument_checks():
    w = torch.randn(48, 256)
    with pytest.raises(ValueError, match="backward"):
        quest_linear(torch.randn(4, 256), w, 4, 4, backward="fp16")
    with pytest.raises(ValueError, match="≤ 4 bits"):
        quest_linear(torch.randn(4, 256), w, 8, 8, backward="fp8")
    with pytest.raises(ValueError, match="weight must be"):
        quest_linear(torch.randn(4, 128), w, 4, 4)


def test_saves_codes_not_copies():
    # what autograd keeps for the backward: FP8 codes (1 byte), float32 row steps, bit-packed masks — under
    # 1.25 bytes per value of x and W, against 2 (bf16) or 4 (fp32) for a saved copy
    layer = quest_layer(4, 4, k=512, n=64)
    x = torch.randn(64, 512, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        quest_linear(x, layer.weight, 4, 4, layer.bias)
    assert {t.dtype for t in saved} == {FP8, torch.float32, torch.uint8}
    nbytes = sum(t.numel() * t.element_size() for t in saved)
    assert nbytes <= 1.25 * (x.numel() + layer.weight.numel()) + 4 * (64 + 64)


def test_compiles():
    layer = quest_layer(4, 4)
    x = torch.randn(37, 256)
    f = torch.compile(lambda t: quest_linear(t, layer.weight, 4, 4, layer.bias), backend="aot_eager")
    g = torch.randn(37, 48)
    y0, dx0, dw0, _ = run(layer, x, g, lambda t: quest_linear(t, layer.weight, 4, 4, layer.bias))
    y, dx, dw, _ = run(layer, x, g, f)
    assert torch.equal(y, y0) and torch.equal(dx, dx0) and torch.equal(dw, dw0)


@pytest.mark.parametrize("bits_w,bits_a", [(4, 4), (2, 2), (1.58, 1.58), (8, 8), (4, 8)])
def test_stats_are_fake_quantize_masked_fractions_exactly(bits_w, bits_a):
    # the op counts the bits of the trust masks it computes anyway: fake_quantize's "masked" of x and of W, to
    # the last bit (the same masks; a popcount sum is exact and dividing by 8 is too)
    layer = quest_layer(bits_w, bits_a)
    x = torch.randn(3, 37, 256)
    ref_x, ref_w = {}, {}
    fake_quantize(x, layer.act_spec, stats=ref_x, rotated=True)
    fake_quantize(layer.weight, layer.weight_spec, stats=ref_w, rotated=True)
    stats = {}
    y = quest_linear(x.requires_grad_(True), layer.weight, bits_w, bits_a, layer.bias, stats=stats)
    assert stats.keys() == {"masked", "weight_masked"}
    for got, ref in ((stats["masked"], ref_x["masked"]), (stats["weight_masked"], ref_w["masked"])):
        assert got.dim() == 0 and got.dtype == torch.float32 and not got.requires_grad
        assert torch.equal(got, ref) and 0 < got.item() < 0.5
    y.sum().backward()  # the masks are extra, non-differentiable outputs: the gradient is unchanged
    assert x.grad is not None


def test_stats_compile_without_graph_breaks():
    # the masks are outputs of the autograd op, so the statistics are graph outputs (no side effect, no break)
    layer = quest_layer(4, 4)
    x = torch.randn(37, 256)

    def f(t):
        st = {}
        return quest_linear(t, layer.weight, 4, 4, layer.bias, stats=st), st["masked"], st["weight_masked"]

    assert torch._dynamo.explain(f)(x).graph_break_count == 0
    torch._dynamo.reset()
    eager = f(x)
    comp = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    for a, b in zip(comp, eager, strict=True):
        assert torch.equal(a, b)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------
# the Triton kernels end to end (interpreter on the CPU)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not sm.has_triton(), reason="triton is not installed (pip install 'lowbit[triton]')")
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test; the GPU tests below cover the kernels")
def test_gemm_kernel_in_interpreter(monkeypatch):
    # the scaled_mm kernel inside the op (the quantizer kernel has its own tests, and needs TRITON_INTERPRET set
    # before triton is first imported): same codes, so the same result bit for bit (float32)
    from lowbit.testing import interpret_in_process

    interpret_in_process(monkeypatch)
    layer = quest_layer(4, 4, k=256, n=40)
    x = torch.randn(37, 256)
    g = torch.randn(37, 40)
    for backward in ("bf16", "fp8"):
        outs = []
        for gemm in ("ref", "triton"):
            fn = lambda t, bw=backward, gb=gemm: quest_linear(t, layer.weight, 4, 4, layer.bias, bw, gemm_backend=gb)
            outs.append(run(layer, x, g, fn))
        for ref, got in zip(*outs, strict=True):
            assert torch.equal(ref, got)


# ----------------------------------------------------------------------------------------------------------
# GPU, real shapes
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.needs_cuda
@pytest.mark.parametrize("m,k,n", [(8192, 4096, 11008), (16384, 1664, 4608), (16384, 768, 2048)])
def test_gpu_real_shapes(m, k, n):
    # forward: the fused path equals the same codes multiplied by the reference GEMM exactly, and QuantLinear
    # under autocast to bf16 accuracy; backward: QuantLinear's gradients to bf16 accuracy
    if not sm.has_triton():
        pytest.skip("triton is not installed")
    torch.manual_seed(0)
    layer = QuantLinear(k, n, weight_spec=quest_spec(4), act_spec=quest_spec(4), device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # no bias here: the kernel may fuse its add into an FMA
        y = quest_linear(x, layer.weight, 4, 4)  # auto: torch's row-wise FP8 GEMM on Ada/Hopper/B200
        y_triton = quest_linear(x, layer.weight, 4, 4, gemm_backend="triton")
        y_refgemm = quest_linear(x, layer.weight, 4, 4, gemm_backend="ref")
    assert torch.equal(y_triton, y_refgemm)
    assert within_one_bf16_ulp(y, y_refgemm)  # the library's epilogue may order the scale multiplies otherwise

    def step(fn):
        xr = x.detach().clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(xr)
        out.backward(g)
        return out.float(), xr.grad.float(), layer.weight.grad.clone()

    y0, dx0, dw0 = step(layer)
    y1, dx1, dw1 = step(lambda t: quest_linear(t, layer.weight, 4, 4, layer.bias))
    assert relative(y1, y0) < 1e-2 and relative(dx1, dx0) < 1e-2 and relative(dw1, dw0) < 1e-2
    y2, dx2, dw2 = step(lambda t: quest_linear(t, layer.weight, 4, 4, layer.bias, backward="fp8"))
    assert relative(dx2, dx0) < 0.05 and relative(dw2, dw0) < 0.05
