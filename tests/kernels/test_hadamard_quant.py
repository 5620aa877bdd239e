"""Fused QuEST quantizer (lowbit.kernels.hadamard_quant): the reference against lowbit's quantizer (exact), the
Triton kernels against the reference (under TRITON_INTERPRET=1 on the CPU, on CUDA at real shapes), the mask
bit layout, the custom ops and the autograd op."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.kernels import hadamard_quant as hq
from lowbit.kernels.hadamard_quant import (
    hadamard_quantize,
    hadamard_quantize_ref,
    masked_fraction,
    masked_inverse_hadamard,
    masked_inverse_hadamard_ref,
    pack_mask,
    quest_fake_quant,
    unpack_mask,
)
from lowbit.quant import fake_quantize, hadamard
from lowbit.quant.recipes import quest_spec
from lowbit.testing import run_interpreted_tests

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'lowbit[triton]')")
QUEST_BITS = (1, 1.58, 2, 3, 4, 8)


def _x(shape, dtype=torch.float32, seed=0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 1.7
    x[..., 3] += 9.0  # an outlier channel: clipped entries, masked gradients
    return x.to(device=device, dtype=dtype)


def _spec(bits, trust=None, block=128):
    return quest_spec(bits).replace(trust=trust, hadamard_block=block)


def _outs(bits) -> list[str]:
    levels = 3 if bits == 1.58 else 2 ** int(bits)
    return ["float"] + (["fp8"] if levels <= 16 else []) + (["int8"] if levels <= 128 else [])


def _grad(fn, x, g) -> torch.Tensor:
    x = x.detach().clone().requires_grad_()
    (gx,) = torch.autograd.grad(fn(x), x, g)
    return gx


# ----------------------------------------------------------------------------------------------------------
# the reference is lowbit's QuEST quantizer, bit for bit
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trust", [None, 0.6])
@pytest.mark.parametrize("bits", QUEST_BITS)
def test_ref_equals_fake_quantize(bits, trust, dtype) -> None:
    x = _x((3, 5, 256), dtype, seed=int(bits * 10))
    spec = _spec(bits, trust)
    fq = fake_quantize(x, spec, rotated=True)
    masks = []
    for out in _outs(bits):
        codes, scale, mask = hadamard_quantize_ref(x, bits, trust=trust, out=out)
        assert scale.shape == x.shape[:-1] and scale.dtype == torch.float32
        assert mask.shape == (3, 5, 32) and mask.dtype == torch.uint8
        if out == "float":
            assert codes.dtype == dtype and torch.equal(codes, fq)
        else:
            assert codes.dtype == {"fp8": torch.float8_e4m3fn, "int8": torch.int8}[out]
            # dequantized = codes · scale, exactly fake_quantize's value (compared in float32)
            assert torch.equal(codes.float() * scale[..., None], fake_quantize(x.float(), spec, rotated=True))
        masks.append(mask)
    assert all(torch.equal(m, masks[0]) for m in masks)
    # the packed mask is the estimator's: feed g = 1 and rotate the gradient back (H is its own inverse)
    g1 = _grad(lambda t: fake_quantize(t, spec, rotated=True), x.float(), torch.ones(x.shape))
    assert torch.equal(unpack_mask(mask), hadamard(g1.double()).round().bool())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [1, 1.58, 4, 8])
def test_ref_backward_equals_fake_quantize_gradient(bits, dtype) -> None:
    x = _x((4, 384), dtype, seed=1)
    g = _x((4, 384), dtype, seed=2)
    spec = _spec(bits)
    expect = _grad(lambda t: fake_quantize(t, spec, rotated=True), x, g)
    _, _, mask = hadamard_quantize_ref(x, bits, out="float")
    assert torch.equal(masked_inverse_hadamard_ref(g, mask), expect)


def test_masked_fractions_as_in_methods() -> None:
    """METHODS.md §4: Gaussian input masks ≈ 11 % (1 bit), 4.6 % (2), 1.9 % (3), 0.73 % (4) of the gradient."""
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    for bits, expect in ((1, 0.11), (2, 0.046), (3, 0.019), (4, 0.0073)):
        masked = 1 - unpack_mask(hadamard_quantize_ref(x, bits, out="float")[2]).float().mean().item()
        assert abs(masked - expect) < 0.15 * expect


def test_output_formats() -> None:
    x = _x((8, 128))
    c4, s4, _ = hadamard_quantize_ref(x, 4, out="fp8")
    assert set(c4.float().unique().tolist()) <= {k + 0.5 for k in range(-8, 8)}
    i4, si4, _ = hadamard_quantize_ref(x, 4, out="int8")
    assert torch.equal(i4.float(), 2 * c4.float()) and torch.equal(si4, s4 / 2)  # odd codes, half the step
    assert set(i4.unique().tolist()) <= set(range(-15, 16, 2))
    t, st, _ = hadamard_quantize_ref(x, 1.58, out="int8")
    assert set(t.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(hadamard_quantize_ref(x, 1.58, out="fp8")[0].float(), t.float())
    b, _, _ = hadamard_quantize_ref(x, 1, out="fp8")
    assert set(b.float().unique().tolist()) <= {-0.5, 0.5}
    # lowbit's storage codes (lowbit.quant.quantize) from the int8 ones
    from lowbit.quant import quantize

    codes, step = quantize(x, quest_spec(4))
    assert torch.equal(torch.div(i4 - 1, 2, rounding_mode="floor").to(torch.int8), codes)
    assert torch.equal(step.squeeze(-1), s4)


def test_checks() -> None:
    x = torch.randn(2, 192)
    with pytest.raises(ValueError, match="multiple of the Hadamard block 128"):
        hadamard_quantize(x, 4)
    with pytest.raises(ValueError, match="not exact in float8"):
        hadamard_quantize(torch.randn(2, 128), 8, out="fp8")
    with pytest.raises(ValueError, match="int8"):
        hadamard_quantize(torch.randn(2, 128), 8, out="int8")
    with pytest.raises(ValueError, match="out must be"):
        hadamard_quantize(torch.randn(2, 128), 4, out="nf4")
    with pytest.raises(TypeError):
        hadamard_quantize(torch.ones(2, 128, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="bits"):
        hadamard_quantize(torch.randn(2, 128), 5.5)
    with pytest.raises(ValueError, match="backend"):
        hadamard_quantize(torch.randn(2, 128), 4, backend="cuda")
    with pytest.raises(ValueError, match="mask_bits"):
        masked_inverse_hadamard(torch.randn(2, 128), torch.zeros(2, 8, dtype=torch.uint8))
    assert hadamard_quantize(torch.randn(2, 64), 4, block=64)[2].shape == (2, 8)  # other blocks are fine


# ----------------------------------------------------------------------------------------------------------
# mask bit layout
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8,), (3, 16), (2, 5, 136), (0, 64), (1, 1, 1, 4096)])
def test_pack_unpack_roundtrip(shape) -> None:
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) < 0.7
    packed = pack_mask(keep)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 8)
    assert torch.equal(unpack_mask(packed), keep)


def test_masked_fraction() -> None:
    x = _x((4, 3, 256))
    _, _, mask = hadamard_quantize_ref(x, 2)
    stats = {}
    fake_quantize(x, quest_spec(2), stats=stats, rotated=True)
    torch.testing.assert_close(masked_fraction(mask), stats["masked"])
    assert 0 < stats["masked"] < 0.2


def test_pack_bit_order_is_little_endian() -> None:
    keep = torch.zeros(2, 16, dtype=torch.bool)
    keep[0, 0] = keep[0, 7] = keep[0, 9] = True  # byte 0: bits 0 and 7; byte 1: bit 1
    keep[1, 8:] = True
    assert pack_mask(keep).tolist() == [[0b1000_0001, 0b0000_0010], [0, 255]]
    with pytest.raises(ValueError):
        pack_mask(torch.zeros(3, 12, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------------
# custom ops, autograd op, torch.compile (reference backend: runs anywhere)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quest_fake_quant_equals_fake_quantize(dtype) -> None:
    x, g = _x((2, 3, 256), dtype), _x((2, 3, 256), dtype, seed=5)
    spec = quest_spec(4)
    y = quest_fake_quant(x, 4, backend="ref")
    assert torch.equal(y, fake_quantize(x, spec, rotated=True))
    got = _grad(lambda t: quest_fake_quant(t, 4, backend="ref"), x, g)
    assert torch.equal(got, _grad(lambda t: fake_quantize(t, spec, rotated=True), x, g))


def test_opcheck() -> None:
    x = _x((2, 3, 256))
    for args in [(x, 4.0, 128, None, "fp8", None, "ref"), (x.bfloat16(), 1.58, 128, 0.5, "int8", 1.2, "ref"),
                 (x, 8.0, 128, None, "float", None, "ref")]:  # fmt: skip
        torch.library.opcheck(hq._hadamard_quantize_op, args)
    mask = hadamard_quantize(x, 4, backend="ref")[2]
    torch.library.opcheck(hq._masked_inverse_hadamard_op, (x, mask, 128, "ref"))
    torch.library.opcheck(hq._quest_fake_quant_op, (x.clone().requires_grad_(), 4.0, 128, None, None, "ref"))
    xt = _x((256, 6)).t()  # non-contiguous rows: the outputs are contiguous, in the fake implementations too
    torch.library.opcheck(hq._quest_fake_quant_op, (xt, 4.0, 128, None, None, "ref"))
    torch.library.opcheck(hq._masked_inverse_hadamard_op, (xt, hadamard_quantize(xt, 4)[2], 128, "ref"))


def test_torch_compile_traces_the_ops() -> None:
    x, g = _x((2, 3, 256)), _x((2, 3, 256), seed=3)
    spec = quest_spec(2)

    def f(t):
        return quest_fake_quant(t, 2, backend="ref") * 2.0

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), 2 * fake_quantize(x, spec, rotated=True))
    assert torch.equal(_grad(compiled, x, g), _grad(lambda t: 2 * fake_quantize(t, spec, rotated=True), x, g))
    codes, scale, mask = torch.compile(lambda t: hadamard_quantize(t, 4, out="fp8"), fullgraph=True,
                                       backend="aot_eager")(x)  # fmt: skip
    ref = hadamard_quantize_ref(x, 4)
    assert torch.equal(codes.float(), ref[0].float()) and torch.equal(scale, ref[1]) and torch.equal(mask, ref[2])


def test_alpha_options() -> None:
    x = _x((4, 128))
    for alpha in ("reference", 2.0):
        got = hadamard_quantize(x, 4, out="float", alpha=alpha)[0]
        assert torch.equal(got, fake_quantize(x, quest_spec(4).replace(alpha=alpha), rotated=True))


# ----------------------------------------------------------------------------------------------------------
# kernel vs reference: comparison with tolerances from the reference's own float32 error
# ----------------------------------------------------------------------------------------------------------


def _truth(x: torch.Tensor, bits, block: int, trust=None):
    """float64 rotation, step and scaled values y = r/Δ + o (the quantity that is rounded)."""
    spec = _spec(bits, trust, block)
    r = hadamard(x.double(), block)
    sigma = r.square().mean(-1, keepdim=True).sqrt()
    step = sigma.clamp_min(spec.eps) * spec.alpha_value / spec.info.top
    return step.squeeze(-1), r / step + spec.info.offset


def assert_kernel_matches_ref(got, ref, x, bits, out, block=128, trust=None, max_frac=1e-4) -> None:
    """Scale within a few times the reference's float32 error; codes equal except near rounding ties (fraction
    < max_frac, or one element on small inputs), and there by one grid step; masks likewise."""
    (ck, sk, mk), (cr, sr, mr) = got, ref
    assert ck.dtype == cr.dtype and ck.shape == cr.shape and sk.shape == sr.shape and mk.shape == mr.shape
    n = x.numel()
    allowed = max(1, int(max_frac * n))
    step64, y64 = _truth(x, bits, block, trust)
    mul = 2.0 if (out == "int8" and bits != 1.58) else 1.0
    ref_err = ((sr.double() * mul - step64).abs() / step64).max().item()
    scale_err = ((sk.double() - sr.double()).abs() / sr.double()).max().item()
    tol = 4 * ref_err + 2**-23
    assert scale_err <= tol, f"scale: relative error {scale_err:.3g} > {tol:.3g} (reference's own: {ref_err:.3g})"

    if out == "float":  # values: agree to the scale's error (plus the output rounding) or differ by one step
        qk, qr = ck.double(), cr.double()
        out_eps = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11}[ck.dtype]
        close = (qk - qr).abs() <= qr.abs() * (tol + 2 * out_eps) + 1e-30
        differ = ~close
        step = sr.double()[..., None]
        one_step = ((qk - qr).abs() - step).abs() <= 0.02 * step + (qk.abs() + qr.abs()) * out_eps
    else:
        gk, gr = ck.double(), cr.double()
        differ = gk != gr
        one_step = (gk - gr).abs() == mul
    nd = int(differ.sum())
    assert nd <= allowed, f"{nd} of {n} codes differ (allowed {allowed})"
    assert one_step[differ].all(), "codes differ by more than one grid step"
    # ...and only where the exact scaled value sits on a rounding tie (a half-integer, clamp edges included)
    tie_dist = (y64 - y64.floor() - 0.5).abs()
    assert (tie_dist[differ] <= 1e-5 * (1 + y64.abs()[differ])).all(), "a code differs away from a rounding tie"
    nm = int((unpack_mask(mk) != unpack_mask(mr)).sum())
    assert nm <= allowed, f"{nm} of {n} mask bits differ (allowed {allowed})"


def assert_grad_matches_ref(got, g, mask, block=128) -> None:
    """Backward: within the output rounding plus a few times the reference's float32 error of the float64 truth."""
    truth = hadamard(g.double() * unpack_mask(mask), block)
    ref32 = masked_inverse_hadamard_ref(g.float(), mask, block).double()
    ref_err = (ref32 - truth).abs().max().item()
    out_eps = {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}[got.dtype]  # unit roundoff
    # 8×: tensor-core float32 accumulation may truncate where the reference's FMAs round (about twice the error)
    # (the rounding's absolute floor, half a subnormal step, matters for fp16)
    rounding = (truth.abs() + torch.finfo(got.dtype).smallest_normal) * out_eps * 1.01
    bound = rounding + 8 * ref_err + 1e-30
    bad = (got.double() - truth).abs() > bound
    assert not bad.any(), f"{int(bad.sum())} gradient entries off by more than {bound.max().item():.3g}"


@needs_triton
def test_kernels_in_triton_interpreter() -> None:
    run_interpreted_tests(__file__)


@needs_triton
@pytest.mark.parametrize(
    ("bits", "dtype", "out", "shape", "trust", "block"),
    [
        (4, torch.float32, "fp8", (37, 256), None, 128),
        (4, torch.bfloat16, "int8", (2, 3, 384), None, 128),
        (4, torch.float16, "float", (21, 128), None, 128),
        (1, torch.bfloat16, "fp8", (17, 256), None, 128),
        (1.58, torch.float32, "int8", (19, 256), 0.7, 128),
        (2, torch.float32, "float", (16, 256), None, 128),
        (3, torch.bfloat16, "fp8", (5, 256), None, 32),
        (8, torch.bfloat16, "float", (33, 256), None, 128),
        (8, torch.float32, "float", (9, 512), 0.3, 64),
    ],
)
def test_kernel_matches_ref_interpreted(interpret, bits, dtype, out, shape, trust, block) -> None:
    x = _x(shape, dtype, seed=7)
    got = hq.hadamard_quantize_triton(x, bits, block, trust=trust, out=out)
    ref = hadamard_quantize_ref(x, bits, block, trust=trust, out=out)
    assert_kernel_matches_ref(got, ref, x, bits, out, block, trust)
    g = _x(shape, dtype, seed=8)
    dx = hq.masked_inverse_hadamard_triton(g, ref[2], block)
    assert dx.dtype == dtype and dx.shape == g.shape
    assert_grad_matches_ref(dx, g, ref[2], block)


@needs_triton
def test_kernel_noncontiguous_and_empty_interpreted(interpret) -> None:
    x = _x((256, 24)).t()  # (24, 256), rows strided
    assert_kernel_matches_ref(hq.hadamard_quantize_triton(x, 4), hadamard_quantize_ref(x, 4), x, 4, "fp8")
    x0 = torch.empty(0, 3, 128)
    c, s, m = hq.hadamard_quantize_triton(x0, 4)
    assert c.shape == (0, 3, 128) and s.shape == (0, 3) and m.shape == (0, 3, 16)
    assert hq.masked_inverse_hadamard_triton(x0, m).shape == x0.shape


@needs_triton
def test_kernel_zero_and_constant_rows_interpreted(interpret) -> None:
    x = torch.zeros(16, 256)
    x[1] = 1.0  # rotates to one spike per block: ties and clipping
    x[2, ::2] = 3.0
    assert_kernel_matches_ref(hq.hadamard_quantize_triton(x, 4), hadamard_quantize_ref(x, 4), x, 4, "fp8")


@needs_triton
def test_autograd_op_through_kernels_interpreted(interpret, monkeypatch) -> None:
    calls = []
    for name in ("_hadamard_quantize_triton", "masked_inverse_hadamard_triton"):
        fn = getattr(hq, name)
        monkeypatch.setattr(hq, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    monkeypatch.setenv(hq.FORCE_ENV, "1")  # backend="auto" takes the kernel on the CPU now
    x, g = _x((3, 256), torch.bfloat16), _x((3, 256), torch.bfloat16, seed=4)
    dx = _grad(lambda t: quest_fake_quant(t, 4), x, g)
    got = hadamard_quantize(x, 4, out="float")
    assert calls == ["_hadamard_quantize_triton", "masked_inverse_hadamard_triton", "_hadamard_quantize_triton"]
    assert torch.equal(quest_fake_quant(x, 4), got[0])
    assert_kernel_matches_ref(got, hadamard_quantize_ref(x, 4, out="float"), x, 4, "float")
    assert_grad_matches_ref(dx, g, got[2])  # the backward applies the forward's own mask


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The stored bytes of a tensor (float8 has no CPU comparison; bit equality is what is promised)."""
    return t.contiguous().view(torch.uint8)


#: Explicit launch configurations for the interpreter: K split in 1, 2, 3 and 8 (uneven: the last program of a
#: row tile gets fewer blocks), 16- and 32-row tiles.
CONFIGS = [{"BLOCK_M": 16, "K_SPLIT": 1}, {"BLOCK_M": 16, "K_SPLIT": 2}, {"BLOCK_M": 32, "K_SPLIT": 3},
           {"BLOCK_M": 16, "K_SPLIT": 8}]  # fmt: skip


@needs_triton
@pytest.mark.parametrize(("dtype", "out", "shape", "block"), [(torch.bfloat16, "fp8", (37, 640), 128),
                                                              (torch.float32, "int8", (50, 512), 64),
                                                              (torch.float16, "float", (3, 7, 384), 128)])
def test_kernel_configs_agree_interpreted(interpret, dtype, out, shape, block) -> None:
    """Every launch configuration gives the same codes, scales and masks bit for bit (σ is summed in one fixed
    order), and they match the reference."""
    x = _x(shape, dtype, seed=11)
    ref = hadamard_quantize_ref(x, 4, block, out=out)
    outs = [hq.hadamard_quantize_triton(x, 4, block, out=out, config=cfg) for cfg in CONFIGS]
    assert_kernel_matches_ref(outs[0], ref, x, 4, out, block)
    for cfg, got in zip(CONFIGS[1:], outs[1:], strict=True):
        for a, b in zip(got, outs[0], strict=True):
            assert torch.equal(_bits(a), _bits(b)), cfg


def test_launch_helpers() -> None:
    # programs per row tile: none idle (13 blocks in at most 8 programs: 7 of 2 blocks, not 8 with one empty)
    assert [hq._parts(16, s) for s in (1, 2, 4, 8, 32)] == [1, 2, 4, 8, 16]
    assert [hq._parts(13, s) for s in (2, 3, 8)] == [2, 3, 7]
    assert [hq._m_bucket(m) for m in (1, 300, 4096, 4097)] == [256, 512, 4096, 8192]


@needs_triton
def test_autotune_pruning() -> None:
    import triton

    configs = [triton.Config({"BLOCK_M": bm, "K_SPLIT": ks}, num_warps=w, num_stages=st)
               for bm, ks, w, st in hq.GPU_CONFIGS]  # fmt: skip

    def kept(m, k, split=1):
        return [(c.kwargs["BLOCK_M"], c.kwargs["K_SPLIT"]) for c in hq._prune(configs, {"M": m}, K=k, HB=128,
                                                                                   SPLIT=split)]  # fmt: skip

    assert len(kept(4096, 2048)) == len(configs)  # 16 blocks: every split distinct
    # one block: every split launches the unsplit grid; one config per (rows, warps, stages) is left
    one = hq._prune(configs, {"M": 4096}, K=128, HB=128, SPLIT=1)
    launches = [(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in one]
    assert len(launches) == len(set(launches)) == len({(bm, w, st) for bm, _, w, st in hq.GPU_CONFIGS})
    assert all(bm == 16 for bm, _ in kept(4096, 2048, split=3))  # float32 input: 16-row tiles only
    assert all(bm <= 16 for bm, _ in kept(8, 2048))  # 8 rows: no 32/64-row tiles


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fused multiply-add, emulated exactly: a·b is exact in float64; a·b + c is a float64 sum plus its
    exact error term (TwoSum), and the float32 rounding of the pair is that of the sum except on a float32
    midpoint, where the error's sign decides."""
    p = a.astype(np.float64) * b.astype(np.float64)
    c64 = c.astype(np.float64)
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    f = s.astype(np.float32)
    lo = np.where(f.astype(np.float64) <= s, f, np.nextafter(f, np.float32(-np.inf)))
    hi = np.nextafter(lo, np.float32(np.inf))
    at_mid = (s == (lo.astype(np.float64) + hi.astype(np.float64)) / 2) & (err != 0)
    return np.where(at_mid & (err > 0), hi, np.where(at_mid & (err < 0), lo, f))


def _div32(n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """IEEE float32 n / d (round half to even): the float64 quotient, and exact rational arithmetic for the few
    that land within float64 rounding of a float32 midpoint."""
    from fractions import Fraction

    q = n.astype(np.float64) / d.astype(np.float64)
    f = q.astype(np.float32)
    lo = np.where(f.astype(np.float64) <= q, f, np.nextafter(f, np.float32(-np.inf)))
    hi = np.nextafter(lo, np.float32(np.inf))
    mid = (lo.astype(np.float64) + hi.astype(np.float64)) / 2
    for i in np.nonzero(np.abs(q - mid) <= np.abs(mid) * 2**-50)[0]:
        exact, m = Fraction(float(n[i])) / Fraction(float(d[i])), Fraction(float(mid[i]))
        even = lo[i] if int(lo[i].view(np.int32)) % 2 == 0 else hi[i]
        f[i] = hi[i] if exact > m else lo[i] if exact < m else even
    return f


def test_fma_quotient_is_the_ieee_quotient() -> None:
    """The compiled kernel divides r / Δ as q = RN(r·y), e = r − Δ·q, q + e·y (three FMAs, y = RN(1/Δ) once per
    row: _quotient). Markstein's theorem says that is RN(r / Δ); checked here in exact float32 emulation on
    quotients of the quantizer's range, on half-integer quotients (the rounding ties of the codes) and their
    neighbours, and on divisors whose reciprocals round the farthest."""
    rng = np.random.default_rng(0)
    n_, cases = 100_000, []
    for kind in range(3):
        d = (rng.uniform(1, 2, n_) * 2.0 ** rng.integers(-20, 20, n_)).astype(np.float32)
        if kind == 2:  # mantissas next to 2 and to 1: 1/d just above / below a power of two
            m = np.where(rng.random(n_) < 0.5, 2 - rng.integers(1, 2**12, n_) * 2.0**-23,
                         1 + rng.integers(1, 2**12, n_) * 2.0**-23)  # fmt: skip
            d = (m * 2.0 ** rng.integers(-20, 20, n_)).astype(np.float32)
        quotient = rng.normal(0, 4, n_) if kind == 0 else rng.integers(-16, 16, n_) + 0.5
        r = (quotient * d.astype(np.float64)).astype(np.float32)
        if kind:
            r = np.where(rng.random(n_) < 0.5, np.nextafter(r, np.float32(np.inf)), r)
        cases.append((r, d))
    r, d = (np.concatenate(v) for v in zip(*cases, strict=True))
    y = _div32(np.ones_like(d), d)  # RN(1/Δ), as the kernel's div_rn
    q = _fma32(r, y, np.zeros_like(r))
    e = _fma32(-d, q, r)
    got = _fma32(e, y, q)
    want = _div32(r, d)
    assert (q != want).any()  # the first product alone is not the quotient: the correction matters
    assert np.array_equal(got, want)


def _compile_for_hopper(kernel, sig: dict, const: dict, num_warps: int = 4, num_stages: int = 1,
                        aligned: tuple[str, ...] = (), arch: int = 90) -> tuple[str, int]:
    """(PTX, bytes spilled) of ``kernel`` compiled ahead of time for sm_90a, or ``arch`` (no GPU needed: Triton
    ships ptxas).
    ``aligned``: arguments declared divisible by 16, as Triton specialises them at a launch where they are (data
    pointers, strides of rows that are multiples of 16): that is what lets it vectorise and pipeline the loads."""
    import subprocess
    import tempfile

    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    sig = sig | {name: "constexpr" for name in const}
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    c = triton_compile(ASTSource(kernel, sig, const, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": False})
    ptx = c.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        Path(d, "k.ptx").write_text(ptx)
        sm = "sm_90a" if arch == 90 else f"sm_{arch}"
        res = subprocess.run([get_ptxas(arch).path, "-v", f"-arch={sm}", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                             capture_output=True, text=True, check=True)  # fmt: skip
    return ptx, int(re.search(r"(\d+) bytes spill stores", res.stderr).group(1))


def _fwd_signature(xdt: str, cdt: str) -> dict:
    return {"x_ptr": f"*{xdt}", "codes_ptr": f"*{cdt}", "scale_ptr": "*fp32", "mask_ptr": "*u8", "M": "i32",
            "stride_x": "i32", "stride_c": "i32", "stride_m": "i32", "M_BUCKET": "i32"}  # fmt: skip


FWD_ALIGNED = ("x_ptr", "codes_ptr", "scale_ptr", "mask_ptr", "M", "stride_x", "stride_c", "stride_m", "M_BUCKET")


@needs_triton
@pytest.mark.parametrize("case", ["default_config_every_format", "every_gpu_config_bf16_fp8", "ampere_fp8_codes",
                                  "backward"])
def test_kernels_compile_for_hopper(case) -> None:
    """The compiled (GPU) path, which the interpreter does not run: it builds for sm_90a without spilling registers,
    multiplies on bf16 tensor cores (mma or Hopper's wgmma), pipelines its loads (cp.async), converts to FP8 in
    hardware, and keeps every elementwise step IEEE: round-to-nearest-even rint, div.rn and sqrt.rn per row, the
    per-element quotient as exactly three explicit FMAs (_quotient) and no other FMA (no contraction), no
    approximate division."""
    if hq._interpreting():
        pytest.skip("this process runs triton in interpreter mode")
    kern = hq._kernels()
    if case == "ampere_fp8_codes":  # no e4m3 type in Triton below sm_89: FP8 codes from integer ops there
        const = hq._fwd_constants(4, 128, None, None, "fp8", torch.bfloat16, True, False) | dict(K=512)
        ptx, _ = _compile_for_hopper(kern.fwd, _fwd_signature("bf16", "u8"), const | {"BLOCK_M": 16, "K_SPLIT": 2},
                                     8, 3, FWD_ALIGNED, arch=80)  # fmt: skip
        assert "e4m3" not in ptx and "mma" in ptx
        return
    if case == "backward":
        for gdt, split in (("bf16", 1), ("fp32", 3)):
            sig = {"g_ptr": f"*{gdt}", "mask_ptr": "*u8", "out_ptr": f"*{gdt}", "M": "i32", "K": "i32",
                   "stride_g": "i32", "stride_m": "i32", "stride_o": "i32", "inv_sqrt_b": "fp32"}  # fmt: skip
            const = dict(HB=128, BLOCK_M=16, BLOCKS_PER_PROG=8, SPLIT=split, DOT_BF16=True, RNE_BF16=False)
            ptx, _ = _compile_for_hopper(kern.bwd, sig, const)
            assert "mma" in ptx and ".bf16.bf16.f32" in ptx and "fma.rn.f32" not in ptx
        return
    if case == "default_config_every_format":
        configs = [hq.DEFAULT_GPU_CONFIG]
        formats = [(torch.bfloat16, "fp8", 4, 128, 1664, None), (torch.float32, "int8", 4, 64, 256, 0.5),
                   (torch.float16, "float", 8, 128, 384, None), (torch.float32, "fp8", 1.58, 128, 512, None)]
    else:
        configs = [hq._gpu_config(*c) for c in hq.GPU_CONFIGS]
        formats = [(torch.bfloat16, "fp8", 4, 128, 2048, None)]
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8"}
    for cfg in configs:
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        for dtype, out, bits, hb, k, trust in formats:
            const = hq._fwd_constants(bits, hb, trust, None, out, dtype, True, out == "fp8") | dict(K=k) | cfg
            cdt = {"fp8": "u8", "int8": "i8"}.get(out, names[dtype])
            ptx, spilled = _compile_for_hopper(kern.fwd, _fwd_signature(names[dtype], cdt), const, warps, stages,
                                               FWD_ALIGNED)  # fmt: skip
            where = f"{cfg}, {warps} warps, {stages} stages, {dtype} → {out}"
            assert spilled == 0, f"{where}: {spilled} bytes spilled"
            assert re.search(r"mma\S*\.(bf16\.bf16\.f32|f32\.bf16\.bf16)", ptx), where  # mma.sync or wgmma
            for needed in ("cvt.rni.f32.f32", "div.rn.f32", "sqrt.rn.f32", "cp.async"):
                assert needed in ptx, (where, needed)
            if out == "fp8":
                assert "cvt.rn.satfinite.e4m3x2.f32" in ptx, where
            for banned in ("div.full.f32", "div.approx.f32", "sqrt.approx.f32", "ld.local"):
                assert banned not in ptx, (where, banned)
            per_thread = cfg["BLOCK_M"] * hb // (32 * warps)  # sweep 2's elements per thread and block
            assert ptx.count("fma.rn.f32") == 3 * per_thread, where


# ----------------------------------------------------------------------------------------------------------
# CUDA: real shapes (run by the lead on the GPU machine)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def fp32_matmul():
    """The reference rotates with a float32 matmul: keep TF32 off while it runs."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@needs_triton
@pytest.mark.needs_cuda
@pytest.mark.parametrize(
    ("bits", "dtype", "out", "shape"),
    [
        (4, torch.bfloat16, "fp8", (4096, 4096)),
        (4, torch.bfloat16, "int8", (4096, 4096)),
        (4, torch.float32, "fp8", (4096, 4096)),
        (8, torch.bfloat16, "float", (4096, 4096)),
        (2, torch.bfloat16, "fp8", (8, 512, 1664)),  # QuEST 430M width, 13 blocks
        (1.58, torch.float16, "int8", (1000, 11008)),
        (4, torch.bfloat16, "fp8", (4096, 5632)),  # the 800m prefill's down projection: 44 blocks
    ],
)
def test_kernel_matches_ref_cuda(fp32_matmul, bits, dtype, out, shape) -> None:
    x = _x(shape, dtype, device="cuda")
    got = hadamard_quantize(x, bits, out=out)  # backend="auto" → the kernel on CUDA
    ref = hadamard_quantize_ref(x, bits, out=out)
    assert_kernel_matches_ref(got, ref, x, bits, out)
    g = _x(shape, dtype, seed=9, device="cuda")
    assert_grad_matches_ref(masked_inverse_hadamard(g, ref[2]), g, ref[2])


@needs_triton
@pytest.mark.needs_cuda
def test_autograd_and_compile_cuda(fp32_matmul) -> None:
    x = _x((2, 2048, 4096), torch.bfloat16, device="cuda")
    g = _x((2, 2048, 4096), torch.bfloat16, seed=3, device="cuda")
    got = hadamard_quantize(x, 4, out="float")
    assert_kernel_matches_ref(got, hadamard_quantize_ref(x, 4, out="float"), x, 4, "float")
    for fn in (quest_fake_quant, torch.compile(quest_fake_quant, fullgraph=True)):
        assert torch.equal(fn(x, 4), got[0])
        assert_grad_matches_ref(_grad(lambda t, f=fn: f(t, 4), x, g), g, got[2])
    # against lowbit's fake quantizer: a mask bit that differs at a rounding tie changes the 128 gradient entries
    # of its Hadamard block, so compare the fraction of entries within bf16 rounding
    want = _grad(lambda t: fake_quantize(t, quest_spec(4), rotated=True), x, g).float()
    dx = _grad(lambda t: quest_fake_quant(t, 4), x, g).float()
    assert ((dx - want).abs() <= want.abs() * 2**-7 + 1e-6).float().mean() > 1 - 1e-3


@needs_triton
@pytest.mark.needs_cuda
def test_kernel_under_autocast_cuda() -> None:
    x = _x((64, 512), torch.float32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = quest_fake_quant(x, 4)
    assert y.dtype == torch.float32
    assert math.isfinite(y.abs().sum().item())


WGMMA = pytest.mark.xfail(strict=False, reason="whether Hopper's warpgroup MMA (BLOCK_M = 64) rounds the rotation's "
                          "fp32 sums exactly as mma.sync does is measured here, not promised")
GPU_CONFIG_PARAMS = [pytest.param(c, marks=WGMMA if c[0] >= 64 else (), id="-".join(map(str, c)))
                     for c in hq.GPU_CONFIGS]  # fmt: skip


@needs_triton
@pytest.mark.needs_cuda
@pytest.mark.parametrize("config", GPU_CONFIG_PARAMS)
def test_every_gpu_config_gives_the_same_bits_cuda(config) -> None:
    """Each autotuned configuration gives the default configuration's codes, scales and masks bit for bit: σ is
    summed in one fixed order, and the rotation is the same sequence of k16 MMAs (mma.sync for BLOCK_M ≤ 32)."""
    x = _x((4096, 2048), torch.bfloat16, seed=5, device="cuda")
    want = hq.hadamard_quantize_triton(x, 4)  # LOWBIT_AUTOTUNE=0 (conftest): DEFAULT_GPU_CONFIG
    got = hq.hadamard_quantize_triton(x, 4, config=hq._gpu_config(*config))
    assert torch.equal(got[1], want[1])  # the scales, whatever the MMA
    for a, b in zip(got, want, strict=True):
        assert torch.equal(_bits(a), _bits(b))


@needs_triton
@pytest.mark.needs_cuda
@pytest.mark.parametrize(("dtype", "out", "shape"), [(torch.bfloat16, "fp8", (4096, 5632)),
                                                     (torch.float32, "int8", (1000, 1664))])
def test_autotuned_launch_cuda(fp32_matmul, monkeypatch, dtype, out, shape) -> None:
    """The autotuned launch (LOWBIT_AUTOTUNE=1): the reference's codes up to ties, and the default configuration's
    scales bit for bit (its codes too unless the autotuner picked a warpgroup-MMA tile: see the test above)."""
    x = _x(shape, dtype, seed=6, device="cuda")
    want = hq.hadamard_quantize_triton(x, 4, out=out)  # DEFAULT_GPU_CONFIG
    monkeypatch.setenv("LOWBIT_AUTOTUNE", "1")
    got = hadamard_quantize(x, 4, out=out)
    best = hq._kernels().fwd_tuned.best_config
    assert_kernel_matches_ref(got, hadamard_quantize_ref(x, 4, out=out), x, 4, out)
    assert torch.equal(got[1], want[1]), best
    if best.kwargs["BLOCK_M"] < 64:
        for a, b in zip(got, want, strict=True):
            assert torch.equal(_bits(a), _bits(b)), best


tl = _quotient = None  # _quotient_probe's names: bound in the jit namespace it is compiled in (the test below)


def _quotient_probe(n_ptr, d_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    n = tl.load(n_ptr + offs, mask=ok, other=1.0)
    d = tl.load(d_ptr + offs, mask=ok, other=1.0)
    q = _quotient(n, d, tl.math.div_rn(1.0, d), True)
    tl.store(out_ptr + offs, q, mask=ok)


@needs_triton
@pytest.mark.needs_cuda
def test_fma_quotient_is_the_ieee_quotient_cuda() -> None:
    """The kernel's per-element division (_quotient, three FMAs from RN(1/d)) against torch's IEEE division on the
    GPU, for 2^24 quotients of the quantizer's range, half-integer ties and their neighbours, and d = inf."""
    import triton
    import triton.language as tl

    from lowbit.kernels._triton import jit_namespace

    ns = jit_namespace(dict(vars(hq), _quotient_probe=_quotient_probe), ["_quotient", "_quotient_probe"],
                       dict(triton=triton, tl=tl))  # fmt: skip
    g = torch.Generator(device="cuda").manual_seed(0)
    n_ = 1 << 24
    d = torch.rand(n_, generator=g, device="cuda") + 1.0
    d = d * torch.exp2(torch.randint(-20, 20, (n_,), generator=g, device="cuda").float())
    half = torch.randint(-16, 16, (n_,), generator=g, device="cuda") + 0.5
    quotient = torch.where(torch.rand(n_, generator=g, device="cuda") < 0.5, half,
                           torch.randn(n_, generator=g, device="cuda") * 4)  # fmt: skip
    r = (quotient.double() * d.double()).float()
    r = torch.where(torch.rand(n_, generator=g, device="cuda") < 0.3, torch.nextafter(r, r + 1), r)
    d[:1000] = float("inf")
    out = torch.empty_like(r)
    ns["_quotient_probe"][(n_ // 1024,)](r, d, out, n_, BLOCK=1024, enable_fp_fusion=False)
    want = r / d
    assert torch.equal(out, want), f"{(out != want).sum().item()} of {n_} quotients differ"
