"""lowbit.kernels.packed_mm: the references against unpack + scaled_mm_ref / matmul, the Triton kernels against them
(Triton's CPU interpreter in a child process; the GPU at real shapes), DirectQuantLinear's dispatch to them."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from lowbit.kernels import packed_mm as pm
from lowbit.kernels.packed_mm import packed_dequant_mm, packed_dequant_mm_ref, packed_scaled_mm, packed_scaled_mm_ref
from lowbit.kernels.scaled_mm import scaled_mm_ref
from lowbit.quant.packing import pack, unpack
from lowbit.testing import run_interpreted_tests

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'lowbit[triton]')")

# (bits, qmin, levels): ternary, 2-bit int, 3-bit int (4-bit storage), 4-bit int
GRIDS = {"ternary": (2, -1, 3), "int2": (2, -2, 4), "int3": (4, -4, 8), "int4": (4, -8, 16)}


def _operands(grid, m, n, k, *, seed=0, device="cpu"):
    bits, qmin, levels = GRIDS[grid]
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    codes = torch.randint(qmin, qmin + levels, (n, k), generator=g).to(torch.int8)
    sa = torch.rand(m, generator=g) + 0.5
    sb = torch.rand(n, generator=g) * 1e-2 + 1e-3
    bias = torch.randn(n, generator=g)
    packed = pack(codes, qmin, levels)
    return [t.to(device) for t in (a, codes, packed, sa, sb, bias)]


# ----------------------------------------------------------------------------------------------------------
# references (any machine)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("k", [13, 64, 130])
def test_refs_equal_unpack_then_gemm(grid, k):
    bits, qmin, levels = GRIDS[grid]
    a, codes, packed, sa, sb, bias = _operands(grid, 5, 7, k)
    assert packed.shape == (7, -(-k // (8 // bits)))
    assert torch.equal(unpack(packed, qmin, levels, k), codes)
    for b in (None, bias):
        want = scaled_mm_ref(a, codes, sa, sb, b, torch.float32)
        for backend in ("ref", "auto"):
            got = packed_scaled_mm(a, packed, sa, sb, b, torch.float32, bits=bits, qmin=qmin, backend=backend)
            assert torch.equal(got, want)
    g = torch.randn(5, 7, dtype=torch.float64).float()
    w = (codes.float() * sb[:, None])
    want = (g.double() @ w.double()).float()
    got = packed_dequant_mm_ref(g, packed, sb, bits=bits, qmin=qmin, k=k)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(packed_dequant_mm(g, packed, sb, bits=bits, qmin=qmin, k=k, backend="ref"), got)


def test_checks():
    a, _, packed, sa, sb, _ = _operands("int4", 3, 4, 10)
    with pytest.raises(ValueError, match="ceil"):
        packed_scaled_mm(a, packed[:, :-1], sa, sb, bits=4, qmin=-8)
    with pytest.raises(ValueError, match="bits"):
        packed_scaled_mm(a, packed, sa, sb, bits=8, qmin=-8)
    with pytest.raises(ValueError, match="backend"):
        packed_scaled_mm(a, packed, sa, sb, bits=4, qmin=-8, backend="cuda")
    with pytest.raises(TypeError, match="int8"):
        packed_scaled_mm(a.float(), packed, sa, sb, bits=4, qmin=-8)
    with pytest.raises(ValueError, match="N = 4"):
        packed_dequant_mm(torch.randn(3, 5), packed, sb, bits=4, qmin=-8, k=10)


def test_custom_ops_opcheck():
    a, _, packed, sa, sb, bias = _operands("ternary", 3, 4, 10)
    torch.library.opcheck(pm._packed_scaled_mm_op, (a, packed, sa, sb, bias, torch.float32, 2, -1, "ref"))
    torch.library.opcheck(pm._packed_dequant_mm_op, (torch.randn(3, 4), packed, sb, 2, -1, 10, "ref"))


# ----------------------------------------------------------------------------------------------------------
# the Triton kernels against the references, in Triton's CPU interpreter (a child process)
# ----------------------------------------------------------------------------------------------------------


@needs_triton
def test_kernels_in_triton_interpreter() -> None:
    run_interpreted_tests(__file__)


# odd shapes: K not a multiple of the codes per byte (nor of BLOCK_K = 32), M and N not multiples of 16
SHAPES = [(5, 7, 13), (19, 33, 50), (17, 16, 64), (1, 40, 97)]


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_forward_exact_interpreted(interpret, grid, m, n, k) -> None:
    bits, qmin, _ = GRIDS[grid]
    a, codes, packed, sa, sb, bias = _operands(grid, m, n, k, seed=m + n + k)
    got = packed_scaled_mm(a, packed, sa, sb, None, torch.float32, bits=bits, qmin=qmin, backend="triton")
    assert torch.equal(got, packed_scaled_mm_ref(a, packed, sa, sb, None, torch.float32, bits=bits, qmin=qmin))
    assert torch.equal(got, scaled_mm_ref(a, codes, sa, sb, None, torch.float32))
    got = packed_scaled_mm(a, packed, sa, sb, bias, torch.float32, bits=bits, qmin=qmin, backend="triton")
    assert torch.equal(got, scaled_mm_ref(a, codes, sa, sb, bias, torch.float32))  # the interpreter fuses no FMA
    # bf16 out: the interpreter truncates float32 → bf16, so at most one bf16 ulp from the rounded reference
    got = packed_scaled_mm(a, packed, sa, sb, None, torch.bfloat16, bits=bits, qmin=qmin, backend="triton")
    want = scaled_mm_ref(a, codes, sa, sb, None, torch.float32)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want).abs() <= want.abs() * 2**-7 + 1e-30).all()


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_dequant_mm_interpreted(interpret, grid, m, n, k) -> None:
    bits, qmin, _ = GRIDS[grid]
    _, codes, packed, _, sb, _ = _operands(grid, m, n, k, seed=m + n + k)
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(k))
    truth = g.double() @ (codes.float() * sb[:, None]).double()
    got = packed_dequant_mm(g, packed, sb, bits=bits, qmin=qmin, k=k, backend="triton")
    assert got.dtype == torch.float32 and got.shape == (m, k)
    torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-6)
    # bf16 g: Ŵ as bf16 (the interpreter truncates float32 → bf16 instead of rounding, Ŵ and the output: one
    # bf16 ulp of each term and of the result)
    gb = g.bfloat16()
    wb = (codes.float() * sb[:, None]).bfloat16()
    truth = gb.double() @ wb.double()
    mag = gb.double().abs() @ wb.double().abs()
    got = packed_dequant_mm(gb, packed, sb, bits=bits, qmin=qmin, k=k, backend="triton")
    assert got.dtype == torch.bfloat16
    assert ((got.double() - truth).abs() <= (mag + truth.abs()) * 2**-7 + 1e-30).all()


def test_configs_interpreted(interpret) -> None:
    """Other tile shapes (BLOCK_K 64: several packed bytes per code block and a K tail)."""
    a, codes, packed, sa, sb, _ = _operands("ternary", 33, 20, 150)
    cfg = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 1}
    got = pm._packed_scaled_mm_triton(a, packed, sa, sb, None, torch.float32, 2, -1, config=cfg)
    assert torch.equal(got, scaled_mm_ref(a, codes, sa, sb, None, torch.float32))
    g = torch.randn(33, 20)
    got = pm._packed_dequant_mm_triton(g, packed, sb, 2, -1, 150, config=cfg)
    torch.testing.assert_close(got, g @ (codes.float() * sb[:, None]), rtol=1e-5, atol=1e-6)


def test_direct_linear_triton_interpreted(interpret) -> None:
    """DirectQuantLinear (dqt-ternary, dqt-int4) on the triton backend: forward and grad_x through the packed
    kernels equal the reference backend (forward exactly; float32)."""
    _direct_linear_vs_ref(["dqt-ternary", "dqt-int4"], "triton", exact=True)


# ----------------------------------------------------------------------------------------------------------
# DirectQuantLinear's dispatch (any machine: the reference backends)
# ----------------------------------------------------------------------------------------------------------


def _direct_linear_vs_ref(recipes, backend, *, exact):
    from lowbit.nn import quantize_
    from lowbit.nn.linear import set_kernels

    for recipe in recipes:
        torch.manual_seed(0)
        base = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(48, 24, bias=False)})
        fast = quantize_(base, recipe)["q_proj"]
        slow = copy.deepcopy(fast)
        set_kernels(fast, "on", gemm_backend=backend, quant_backend="ref")
        set_kernels(slow, "off")
        x = torch.randn(2, 5, 48)
        xf, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
        yf, ys = fast(xf), slow(xs)
        g = torch.randn_like(yf)
        yf.backward(g)
        ys.backward(g)
        if exact:
            lin = fast
            from lowbit.kernels.bitnet_linear import quantize_int8

            cx, sx = quantize_int8(x, lin.act_spec)
            want = scaled_mm_ref(cx, lin.codes(), sx, lin.weight_scale.reshape(-1).expand(24).contiguous(), None,
                                 torch.float32)
            assert torch.equal(yf.detach().reshape(-1, 24), want)
        torch.testing.assert_close(yf, ys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xf.grad, xs.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.weight_grad, slow.weight_grad, rtol=1e-5, atol=1e-5)


def test_direct_linear_packed_dispatch_ref(monkeypatch):
    """dqt-ternary / int2 / int4 with gemm_backend='ref' take the packed ops (not scaled_mm on unpacked codes)
    and match the torch path; dqt-int8 keeps scaled_mm on the stored int8 codes."""
    calls = []
    real_fwd, real_bwd = pm.packed_scaled_mm, pm.packed_dequant_mm
    monkeypatch.setattr(pm, "packed_scaled_mm", lambda *a, **kw: calls.append("fwd") or real_fwd(*a, **kw))
    monkeypatch.setattr(pm, "packed_dequant_mm", lambda *a, **kw: calls.append("bwd") or real_bwd(*a, **kw))
    _direct_linear_vs_ref(["dqt-ternary", "dqt-int2", "dqt-int4"], "ref", exact=True)
    assert calls == ["fwd", "bwd"] * 3
    calls.clear()
    _direct_linear_vs_ref(["dqt-int8"], "ref", exact=False)
    assert calls == []


# ----------------------------------------------------------------------------------------------------------
# real shapes on the GPU
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.needs_cuda
@pytest.mark.parametrize("grid", ["ternary", "int2", "int4"])
@pytest.mark.parametrize(("m", "n", "k"), [(512, 4096, 11008), (512, 11008, 4096), (8, 4096, 11008)])
def test_cuda_real_shapes(grid, m, n, k) -> None:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    bits, qmin, _ = GRIDS[grid]
    a, codes, packed, sa, sb, bias = _operands(grid, m, n, k, seed=n, device="cuda")
    got = packed_scaled_mm(a, packed, sa, sb, None, torch.float32, bits=bits, qmin=qmin, backend="triton")
    assert torch.equal(got, scaled_mm_ref(a, codes, sa, sb, None, torch.float32))
    got = packed_scaled_mm(a, packed, sa, sb, bias, torch.bfloat16, bits=bits, qmin=qmin, backend="triton")
    want = scaled_mm_ref(a, codes, sa, sb, bias, torch.float32)
    assert ((got.float() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.randn(m, n, device="cuda").to(dtype)
        w = (codes.float() * sb[:, None]).to(dtype)
        truth = g.double() @ w.double()
        got = packed_dequant_mm(g, packed, sb, bits=bits, qmin=qmin, k=k, backend="triton")
        tol = (2**-7 if dtype == torch.bfloat16 else 1e-5) * truth.abs() + 1e-4 * truth.abs().max()
        assert ((got.double() - truth).abs() <= tol).all()


@pytest.mark.needs_cuda
def test_cuda_autotuned(monkeypatch) -> None:
    """The autotuned launch (the tests above run DEFAULT_GPU_CONFIG: LOWBIT_AUTOTUNE=0, conftest), both kernels
    at one shape."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("LOWBIT_AUTOTUNE", "1")
    bits, qmin, _ = GRIDS["ternary"]
    m, n, k = 384, 2048, 3000
    a, codes, packed, sa, sb, _ = _operands("ternary", m, n, k, seed=1, device="cuda")
    kern = pm._kernels(False)
    tuned_before = len(kern.fwd_tuned.cache), len(kern.bwd_tuned.cache)
    got = packed_scaled_mm(a, packed, sa, sb, None, torch.float32, bits=bits, qmin=qmin, backend="triton")
    assert torch.equal(got, scaled_mm_ref(a, codes, sa, sb, None, torch.float32))
    g = torch.randn(m, n, device="cuda").bfloat16()
    w = (codes.float() * sb[:, None]).bfloat16()
    truth = g.double() @ w.double()
    got = packed_dequant_mm(g, packed, sb, bits=bits, qmin=qmin, k=k, backend="triton")
    assert ((got.double() - truth).abs() <= 2**-7 * truth.abs() + 1e-4 * truth.abs().max()).all()
    assert (len(kern.fwd_tuned.cache), len(kern.bwd_tuned.cache)) == (tuned_before[0] + 1, tuned_before[1] + 1)
