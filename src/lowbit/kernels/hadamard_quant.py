"""Fused QuEST quantizer: block Walsh–Hadamard → per-row RMS·α clip → centered-grid rounding → trust mask.

    codes, scale, mask = hadamard_quantize(x, bits)          # x (…, K) → codes (…, K), scale (…,), mask (…, K/8)
    dx = masked_inverse_hadamard(grad, mask)                 # Hᵀ(mask ⊙ grad): the trust gradient, un-rotated
    y = quest_fake_quant(x, bits)                            # rotated Q(xH) with that backward (autograd op)

**The math is lowbit's QuEST quantizer** (:func:`lowbit.quant.fake_quantize` with
:func:`lowbit.quant.recipes.quest_spec`, METHODS.md §4), per row of K (a token of an activation, an output
row of a weight), in float32:

    r = x·H                          H = diag(H_b, …, H_b), H_b the orthonormal Sylvester block (b = 128)
    σ = √(mean_K r²)                 RMS of the whole rotated row (granularity "row", not per Hadamard block)
    Δ = max(σ, eps)·α_b / top        α_b Gaussian-MSE-optimal; top = (n−1)/2 centered, 1 ternary, ½ binary
    c = clamp(round(r/Δ + o) − 2o, qmin, qmax)        o = ½ (centered, binary) or 0 (ternary); round half even
    q = (c + o)·Δ                    the dequantized value, in the rotated domain
    M = 1[|q − r| ≤ T]               trust mask; T = Δ/2 (default: gradient flows for |r| ≤ s + Δ/2) or trust·σ

and the gradient of ``q`` with respect to ``x`` is the trust estimator's, g ↦ Hᵀ(M ⊙ g) (H is symmetric, so
Hᵀ = H). :func:`hadamard_quantize_ref` *is* that spec: it calls :func:`lowbit.quant.quantize` and
:func:`lowbit.quant.hadamard` and reproduces ``fake_quantize(x, quest_spec(bits), rotated=True)`` bit for bit.

**Outputs** (the invariant for every ``out``: dequantized value = ``codes * scale[..., None]``):

* ``out="fp8"``: ``codes`` float8_e4m3fn holding the grid value c + o in units of Δ — the half-integers
  ±0.5 … ±(2^(b−1) − ½) of a centered grid, {−1, 0, 1} ternary, ±0.5 binary — and ``scale`` = Δ. Exact in
  e4m3 for grids of at most 16 levels (≤ 4 bits); 5–8 bits raise ValueError (use int8 or float).
* ``out="int8"``: integer codes. Ternary: c itself, scale = Δ. Grids with o = ½ store 2(c + o) = 2c + 1 (odd
  integers ±1 … ±(2^b − 1)) with scale = Δ/2, so an int8 GEMM with row scales is exact; needs ≤ 7 bits (the
  8-bit centered grid needs ±255). For o = ½, lowbit's storage code (:func:`lowbit.quant.quantize`) is
  ``(codes - 1) // 2``.
* ``out="float"``: ``codes`` = q in the input dtype (exactly ``fake_quantize(..., rotated=True)``), scale = Δ.
* ``scale``: float32, shape x.shape[:-1]. ``mask``: uint8, shape (…, K/8), the trust mask bit-packed along K,
  little-endian within a byte as in :mod:`lowbit.quant.packing`: element j of a row is bit (j mod 8) of byte
  j // 8, i.e. ``keep[j] = (mask[j // 8] >> (j % 8)) & 1``. K must be a multiple of the Hadamard block
  (ValueError otherwise: unlike ``fake_quantize`` the block is never shrunk).

**The Triton kernels** (one program = BLOCK_M rows, whole K; the backward splits K over programs too):

* Forward, two sweeps over a row tile: (1) Σx² of the *un-rotated* row — H is orthonormal, so it equals Σr²
  (Parseval) up to float32 rounding, and costs no matmul; (2) per 128-block: load, rotate in registers, scale,
  round, clamp, trust mask, store codes + packed mask. The second sweep re-reads the tile the first one just
  pulled through L2 (BLOCK_M·K·2 bytes per program), so DRAM should see x about once (benchmarks/
  bench_kernels.py measures it). σ differs from the reference's by float32 rounding (~1e-7 relative): a code
  can differ only where r/Δ sits that close to a rounding tie (tested: < 1e-4 of codes, by one step, at ties).
* The rotation is a tensor-core matmul x_blk @ S with S the ±1 Sylvester matrix (built in registers from
  parity(i & j), no load) and the 1/√b applied after in float32. ±1 is exact in bf16, and so is x once split:
  bf16 input is one bf16 MMA; fp32 input is split exactly into three bf16 parts (hi + lo + lo2, 8 significant
  bits each = fp32's 24), fp16 into two — three (two) bf16 MMAs with fp32 accumulation give the rotation to
  float32 accuracy without TF32's 10-bit mantissa. Division and square root use IEEE ``div_rn``/``sqrt_rn``,
  rounding is round-half-even, FMA contraction is off: every elementwise step is the reference's float32 op.
* Backward (programs over BLOCK_M rows × up to 8 blocks of K): unpack the mask bits, g ⊙ M, the same
  bf16-split MMA, 1/√b, store in the gradient's dtype (rounded once, as the reference rounds its float32 result).
* Under ``TRITON_INTERPRET=1`` (CPU tests) Triton 3.6 computes bf16 MMAs wrongly and truncates float32 → bf16,
  so there the split parts are multiplied in float32 (``input_precision="ieee"``: exact products, same
  algorithm), bf16 outputs are rounded to nearest even on the bits first, and rounding uses the 1.5·2²³ trick
  instead of libdevice's ``rint``. FP8 codes are e4m3 bit patterns computed with integer ops (exact for the
  grids above) in both modes.

Dispatch (``backend=``): ``"triton"`` (the kernel: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``),
``"ref"`` (pure torch), ``"auto"`` (triton for CUDA tensors when Triton is installed; on CPU only when
``LOWBIT_FORCE_TRITON=1`` and ``TRITON_INTERPRET=1``; else ref). Triton is imported on first kernel use, not with
this module. ``TRITON_INTERPRET`` must be set before anything imports triton (torch.compile does): triton
decorates its own library for one mode at import.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass

import torch

from lowbit.kernels._triton import custom_op, direct_call, jit_namespace, on_device
from lowbit.kernels._triton import has_triton as _triton_available
from lowbit.kernels._triton import interpreting as _interpreting
from lowbit.quant.core import quantize
from lowbit.quant.gaussian import REFERENCE_ALPHA
from lowbit.quant.grids import n_levels
from lowbit.quant.hadamard import hadamard
from lowbit.quant.recipes import quest_spec
from lowbit.quant.spec import QuantSpec

__all__ = [
    "BACKENDS",
    "OUTS",
    "hadamard_quantize",
    "hadamard_quantize_ref",
    "hadamard_quantize_triton",
    "masked_fraction",
    "masked_inverse_hadamard",
    "masked_inverse_hadamard_ref",
    "masked_inverse_hadamard_triton",
    "pack_mask",
    "quest_fake_quant",
    "unpack_mask",
]

#: Code formats of :func:`hadamard_quantize`.
OUTS = ("fp8", "int8", "float")
#: Backends: the Triton kernel, the torch reference, or auto (module docstring).
BACKENDS = ("auto", "triton", "ref")
#: Input (and gradient) dtypes.
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: Hadamard blocks the kernel handles (tl.dot needs ≥ 16; 128 is QuEST's).
KERNEL_BLOCKS = (16, 32, 64, 128)
#: Largest grid whose values c + o are all exact in e4m3 (3 mantissa bits: half-integers up to 7.5).
FP8_MAX_LEVELS = 16
FORCE_ENV = "LOWBIT_FORCE_TRITON"


# ----------------------------------------------------------------------------------------------------------
# parameters and checks
# ----------------------------------------------------------------------------------------------------------


def _alpha_option(bits: float, alpha: str | float) -> float | None:
    """The custom ops take α as a number or None (= 'optimal', resolved inside, where dynamo does not trace
    the numerical optimisation); 'reference' is looked up here."""
    if alpha == "optimal":
        return None
    if alpha == "reference":
        levels = n_levels(bits)
        if levels not in REFERENCE_ALPHA:
            raise ValueError(f"the QuEST reference table has no entry for {levels} levels; use alpha='optimal'")
        return REFERENCE_ALPHA[levels]
    if isinstance(alpha, str):
        raise ValueError(f"alpha={alpha!r}: use 'optimal', 'reference' or a positive number")
    return float(alpha)


@functools.cache
def _spec(bits: float, block: int, trust: float | None, alpha: float | None) -> QuantSpec:
    """QuEST's spec (lowbit.quant.recipes.quest_spec) with this call's block, trust radius and α."""
    return quest_spec(bits).replace(hadamard_block=block, trust=trust, alpha="optimal" if alpha is None else alpha)


def _check(x: torch.Tensor, bits: float, block: int, out: str, trust: float | None) -> None:
    if x.dim() < 1:
        raise ValueError("hadamard_quantize: x needs a last dimension K")
    if x.dtype not in DTYPES:
        raise TypeError(f"hadamard_quantize: x must be one of {DTYPES}, got {x.dtype}")
    if block < 8 or block & (block - 1):
        raise ValueError(f"hadamard_quantize: block must be a power of two ≥ 8, got {block}")
    k = x.shape[-1]
    if k % block:
        raise ValueError(
            f"hadamard_quantize: K = {k} (last dim) must be a multiple of the Hadamard block {block}; "
            "pad K, or use lowbit.quant.fake_quantize, which shrinks the block to divide K"
        )
    if out not in OUTS:
        raise ValueError(f"hadamard_quantize: out must be one of {OUTS}, got {out!r}")
    if trust is not None and not trust > 0:
        raise ValueError(f"hadamard_quantize: trust must be > 0 or None, got {trust}")
    levels = n_levels(bits)  # raises for unsupported bit widths
    if out == "fp8" and levels > FP8_MAX_LEVELS:
        raise ValueError(
            f"hadamard_quantize: {bits}-bit grid values are not exact in float8_e4m3fn (≤ 4 bits "
            "are); use out='int8' (≤ 7 bits) or out='float'"
        )
    if out == "int8" and levels > 128:
        raise ValueError(
            f"hadamard_quantize: the {bits}-bit centered grid needs ±{levels - 1} in int8 units of "
            "Δ/2; use out='float' (or lowbit.quant.quantize for offset codes)"
        )


def _code_dtype(out: str, x_dtype: torch.dtype) -> torch.dtype:
    return {"fp8": torch.float8_e4m3fn, "int8": torch.int8}.get(out, x_dtype)


def _check_mask(t: torch.Tensor, mask_bits: torch.Tensor, block: int) -> None:
    if t.dtype not in DTYPES:
        raise TypeError(f"masked_inverse_hadamard: grad must be one of {DTYPES}, got {t.dtype}")
    if block < 8 or block & (block - 1):
        raise ValueError(f"masked_inverse_hadamard: block must be a power of two ≥ 8, got {block}")
    k = t.shape[-1]
    if k % block:
        raise ValueError(f"masked_inverse_hadamard: K = {k} must be a multiple of the Hadamard block {block}")
    if mask_bits.dtype != torch.uint8 or mask_bits.shape != (*t.shape[:-1], k // 8):
        raise ValueError(
            f"masked_inverse_hadamard: mask_bits must be uint8 of shape {(*t.shape[:-1], k // 8)}, "
            f"got {mask_bits.dtype} {tuple(mask_bits.shape)}"
        )


def _no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    dt = x.device.type
    if dt in ("cpu", "cuda") and torch.is_autocast_enabled(dt):
        return torch.autocast(dt, enabled=False)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------
# bit mask packing (pure)
# ----------------------------------------------------------------------------------------------------------


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """bool (…, K) → uint8 (…, K/8): element j is bit (j mod 8) of byte j // 8 (little-endian). K % 8 == 0."""
    k = keep.shape[-1]
    if k % 8:
        raise ValueError(f"pack_mask: K = {k} must be a multiple of 8")
    bits = keep.reshape(*keep.shape[:-1], k // 8, 8).to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=keep.device)
    return (bits * weights).sum(-1, dtype=torch.uint8)  # distinct powers of two: the sum is an OR


def unpack_mask(mask_bits: torch.Tensor) -> torch.Tensor:
    """uint8 (…, K/8) → bool (…, K), the inverse of :func:`pack_mask`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask_bits.device)
    keep = (mask_bits.unsqueeze(-1) >> shifts) & 1
    return keep.reshape(*mask_bits.shape[:-1], mask_bits.shape[-1] * 8).bool()


def masked_fraction(mask_bits: torch.Tensor) -> torch.Tensor:
    """Fraction of entries whose gradient the packed mask zeroes (QuantLinear's ``masked`` statistic), without
    unpacking: a SWAR popcount per byte (no lookup table: no constant to build on the device, nothing for
    torch.compile to lift). A 0-dim float32 tensor on the mask's device (no sync)."""
    v = mask_bits.to(torch.int32)
    v = v - ((v >> 1) & 0x55)
    v = (v & 0x33) + ((v >> 2) & 0x33)
    v = (v + (v >> 4)) & 0x0F
    return 1.0 - v.float().mean() / 8


# ----------------------------------------------------------------------------------------------------------
# the torch reference (the spec)
# ----------------------------------------------------------------------------------------------------------


def hadamard_quantize_ref(
    x: torch.Tensor,
    bits: float,
    block: int = 128,
    *,
    trust: float | None = None,
    out: str = "fp8",
    alpha: str | float = "optimal",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, mask) of QuEST's quantizer, from lowbit's own quantizer body (module docstring).

    ``x`` (…, K), K a multiple of ``block``; bf16/fp16/fp32. ``bits``: 1, 1.58, 2 … 8 (QuEST's grid at that
    width). ``trust``: trust radius in units of σ (None = half a step). ``out``: fp8 | int8 | float.
    ``alpha``: 'optimal', 'reference' or a number. No gradient."""
    _check(x, bits, block, out, trust)
    spec = _spec(bits, block, trust, _alpha_option(bits, alpha))
    info = spec.info
    with torch.no_grad(), _no_autocast(x):
        codes, step = quantize(x.detach(), spec)  # int8 codes in the Hadamard domain, step Δ (…, 1) float32
        xr = hadamard(x.detach().float(), block)
        g = codes.float() + info.offset  # grid value in units of Δ
        q = g * step  # exactly fake_quantize's value (same float32 ops)
        thr = step / 2 if trust is None else trust * xr.square().mean(-1, keepdim=True).sqrt()
        mask = pack_mask((q - xr).abs() <= thr)
        scale = step.squeeze(-1)
        if out == "float":
            return q.to(x.dtype), scale, mask
        if out == "fp8":
            return g.to(torch.float8_e4m3fn), scale, mask
        mul = 2 if info.offset else 1
        return (g * mul).to(torch.int8), scale / mul, mask


def masked_inverse_hadamard_ref(grad: torch.Tensor, mask_bits: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Hᵀ(M ⊙ grad) in float32, returned in grad's dtype: the trust estimator's gradient with respect to the
    un-rotated input, given the gradient of the rotated output (what ``fake_quantize(..., rotated=True)``'s
    backward computes). ``mask_bits`` as returned by :func:`hadamard_quantize`."""
    _check_mask(grad, mask_bits, block)
    with torch.no_grad(), _no_autocast(grad):
        g = grad.float() * unpack_mask(mask_bits)
        return hadamard(g, block).to(grad.dtype)  # H_b is symmetric: Hᵀ = H


# ----------------------------------------------------------------------------------------------------------
# Triton kernels (built on first use, once per interpret mode)
# ----------------------------------------------------------------------------------------------------------

# The Triton source: plain functions, jit-compiled by _kernels() on first use into a namespace of their own that
# also holds triton, tl and libdevice — so importing this module imports no triton, and the interpreter (which
# resolves names through a kernel's globals) finds them.
triton = tl = libdevice = None  # placeholders: the real modules live in the per-mode namespaces


def _sylvester(HB: tl.constexpr, DOT_BF16: tl.constexpr):
    # S[i, j] = (−1)^popcount(i & j): the unnormalised Sylvester–Hadamard matrix (lowbit.quant.hadamard)
    i = tl.arange(0, HB)
    p = i[:, None] & i[None, :]
    p = p ^ (p >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)  # bit 0 = parity of the low 8 bits (HB ≤ 128)
    s = 1.0 - 2.0 * (p & 1).to(tl.float32)
    if DOT_BF16:
        s = s.to(tl.bfloat16)
    return s


def _trunc_bf16(v):
    # keep the top 8 significant bits (bf16's) by truncation: v − trunc(v) is then exact in float32
    return (v.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)


def _mma(a, s, acc, DOT_BF16: tl.constexpr):
    if DOT_BF16:
        acc = tl.dot(a.to(tl.bfloat16), s, acc)
    else:
        acc = tl.dot(a.to(tl.float32), s, acc, input_precision="ieee")
    return acc


def _rotate(v, s, inv_sqrt_b, SPLIT: tl.constexpr, DOT_BF16: tl.constexpr):
    """v (BLOCK_M, HB), float32 or its storage dtype → v·S/√b in float32. SPLIT = number of bf16 parts that
    hold v exactly (1: bf16 values, 2: fp16, 3: fp32)."""
    acc = tl.zeros([v.shape[0], v.shape[1]], dtype=tl.float32)
    if SPLIT == 1:  # bf16: already exact in one part
        acc = _mma(v, s, acc, DOT_BF16)
    else:
        v = v.to(tl.float32)
        hi = _trunc_bf16(v)
        rest = v - hi
        if SPLIT == 3:
            lo = _trunc_bf16(rest)
            acc = _mma(rest - lo, s, acc, DOT_BF16)  # smallest part first
            acc = _mma(lo, s, acc, DOT_BF16)
        else:
            acc = _mma(rest, s, acc, DOT_BF16)
        acc = _mma(hi, s, acc, DOT_BF16)
    return acc * inv_sqrt_b


def _cast(v, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    # float32 → dtype. The interpreter truncates float32 → bf16 (Triton 3.6), so there the rounding to nearest
    # even is done on the bits first, leaving a value the truncation keeps exactly; compiled code converts RNE
    if RNE_BF16 and dtype == tl.bfloat16:
        b = v.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        v = b.to(tl.float32, bitcast=True)
    return v.to(dtype)


def _round_half_even(y, USE_RINT: tl.constexpr):
    if USE_RINT:
        r = libdevice.rint(y)
    else:  # |y| < 2^22: adding 1.5·2^23 leaves no fraction bits, so the float32 add rounds half to even
        r = (y + 12582912.0) - 12582912.0
    return r


def _fp8_bits(g):
    # e4m3fn bit pattern of g, exact when g has ≤ 4 significant bits and 2^−6 ≤ |g| < 16, or g = 0
    b = g.to(tl.int32, bitcast=True)
    sign = (b >> 24) & 0x80
    exp = ((b >> 23) & 0xFF) - 120  # float32 bias 127 → e4m3 bias 7
    man = (b >> 20) & 0x7
    bits = tl.where(g == 0.0, 0, sign | (exp << 3) | man)
    return bits.to(tl.uint8)


def _hq_fwd_kernel(
    x_ptr, codes_ptr, scale_ptr, mask_ptr,
    M, stride_x, stride_c, stride_m,
    k_float, inv_sqrt_b, alpha, top, eps, trust, offset, qmin, qmax, code_mul,
    K: tl.constexpr, HB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K1: tl.constexpr, SPLIT: tl.constexpr,
    DOT_BF16: tl.constexpr, USE_RINT: tl.constexpr, RNE_BF16: tl.constexpr, OUT: tl.constexpr,
    TRUST_SIGMA: tl.constexpr,
):  # fmt: skip
    # K is a compile-time constant: a model has a few distinct K, the loops get static trip counts, and Triton
    # 3.6's interpreter cannot loop to a runtime bound under numpy 2.4 (int() of a 1-element array is an error)
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    x_rows = x_ptr + rows64[:, None] * stride_x

    # sweep 1: σ² = mean of the squares of the row (un-rotated: H is orthonormal)
    ck = tl.arange(0, BLOCK_K1)
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K1):
        cols = k0 + ck
        v = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
        v = v.to(tl.float32)
        ss += tl.sum(v * v, axis=1)
    sigma = tl.sqrt_rn(tl.math.div_rn(ss, k_float))
    step = tl.math.div_rn(tl.maximum(sigma, eps) * alpha, top)  # clip_range / top, as lowbit.quant.core
    if TRUST_SIGMA:
        thr = trust * sigma
    else:
        thr = step * 0.5
    tl.store(scale_ptr + rows64, tl.math.div_rn(step, code_mul), mask=row_ok)

    # sweep 2: rotate, quantize, mask, per Hadamard block
    s = _sylvester(HB, DOT_BF16)
    cb = tl.arange(0, HB)
    cm = tl.arange(0, HB // 8)
    lim = qmax - qmin + 4.0  # |y| beyond the grid by more than a step: clamps the same way, rounds safely
    for k0 in range(0, K, HB):
        v = tl.load(x_rows + (k0 + cb)[None, :], mask=row_ok[:, None], other=0.0)
        r = _rotate(v, s, inv_sqrt_b, SPLIT, DOT_BF16)
        y = tl.math.div_rn(r, step[:, None]) + offset
        y = tl.minimum(tl.maximum(y, -lim), lim)
        c = _round_half_even(y, USE_RINT) - 2.0 * offset
        c = tl.minimum(tl.maximum(c, qmin), qmax)
        g = c + offset  # grid value in units of Δ
        q = g * step[:, None]
        keep = (tl.abs(q - r) <= thr[:, None]).to(tl.int32)

        c_ptrs = codes_ptr + rows64[:, None] * stride_c + (k0 + cb)[None, :]
        if OUT == 0:  # fp8 e4m3 bit patterns into a uint8 view
            tl.store(c_ptrs, _fp8_bits(g), mask=row_ok[:, None])
        elif OUT == 1:
            tl.store(c_ptrs, (g * code_mul).to(tl.int8), mask=row_ok[:, None])
        else:
            tl.store(c_ptrs, _cast(q, codes_ptr.dtype.element_ty, RNE_BF16), mask=row_ok[:, None])

        # pack: byte j of the block = Σ_i keep[8j + i]·2^i (little-endian within the byte)
        k3 = tl.reshape(keep, [BLOCK_M, HB // 8, 8])
        packed = tl.sum(k3 << tl.arange(0, 8)[None, None, :], axis=2)
        m_ptrs = mask_ptr + rows64[:, None] * stride_m + (k0 // 8 + cm)[None, :]
        tl.store(m_ptrs, packed.to(tl.uint8), mask=row_ok[:, None])


def _mih_bwd_kernel(
    g_ptr, mask_ptr, out_ptr,
    M, K, stride_g, stride_m, stride_o, inv_sqrt_b,
    HB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr, SPLIT: tl.constexpr,
    DOT_BF16: tl.constexpr, RNE_BF16: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    s = _sylvester(HB, DOT_BF16)
    cb = tl.arange(0, HB)
    for i in range(BLOCKS_PER_PROG):
        k0 = (pid_k * BLOCKS_PER_PROG + i) * HB
        cols = k0 + cb
        ok = row_ok[:, None] & (cols < K)[None, :]
        gv = tl.load(g_ptr + rows64[:, None] * stride_g + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        # unpack: element j of the row is bit j % 8 of byte j // 8 (each byte is read by its 8 lanes)
        byte = tl.load(mask_ptr + rows64[:, None] * stride_m + (cols // 8)[None, :], mask=ok, other=0)
        keep = ((byte.to(tl.int32) >> (cols % 8)[None, :]) & 1) != 0
        gv = tl.where(keep, gv, 0.0)  # still exact in SPLIT bf16 parts: masking only zeroes entries
        r = _rotate(gv, s, inv_sqrt_b, SPLIT, DOT_BF16)
        out = _cast(r, out_ptr.dtype.element_ty, RNE_BF16)
        tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :], out, mask=ok)


_JIT_FUNCTIONS = (
    "_sylvester",
    "_trunc_bf16",
    "_mma",
    "_rotate",
    "_cast",
    "_round_half_even",
    "_fp8_bits",
    "_hq_fwd_kernel",
    "_mih_bwd_kernel",
)




@dataclass(frozen=True)
class _Kernels:
    fwd: object
    bwd: object
    interpret: bool


@functools.cache
def _kernels() -> _Kernels:
    """Import triton and jit the functions above (module comment above). Interpreter or compiler is fixed when
    triton is first imported (its own library is jit-decorated then), so TRITON_INTERPRET must be set before."""
    if not _triton_available():
        raise ModuleNotFoundError(
            "the Triton kernels need triton: pip install 'lowbit[triton]' (triton>=3.6), or use backend='ref'"
        )
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    interpret = _interpreting()
    if _imported_interpreted(tl) != interpret:
        raise RuntimeError(_MODE_ERROR)
    ns = jit_namespace(globals(), _JIT_FUNCTIONS, dict(triton=triton, tl=tl, libdevice=libdevice))
    return _Kernels(ns["_hq_fwd_kernel"], ns["_mih_bwd_kernel"], interpret)


_MODE_ERROR = (
    "TRITON_INTERPRET must be set (or unset) before triton is first imported — by anything: torch.compile "
    "imports it too — and stay so: triton jit-decorates its own library at import, for one mode"
)


def _imported_interpreted(tl) -> bool:
    """Whether triton's library was decorated for the interpreter (tl.zeros is a jit function of it)."""
    return type(tl.zeros).__name__ == "InterpretedFunction"


_SPLIT = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


def _launch_kernels(t: torch.Tensor, block: int) -> _Kernels:
    interpret = _interpreting()
    if not interpret and not t.is_cuda:
        raise RuntimeError(
            "the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
            "use backend='ref' on the CPU"
        )
    if block not in KERNEL_BLOCKS:
        raise ValueError(f"the Triton kernel handles Hadamard blocks {KERNEL_BLOCKS}, got {block}; use backend='ref'")
    kern = _kernels()
    if kern.interpret != interpret:
        raise RuntimeError(_MODE_ERROR)
    return kern



def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def hadamard_quantize_triton(
    x: torch.Tensor,
    bits: float,
    block: int = 128,
    *,
    trust: float | None = None,
    out: str = "fp8",
    alpha: str | float = "optimal",
    block_m: int = 16,
    num_warps: int = 4,
    block_k1: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused kernel: same signature and outputs as :func:`hadamard_quantize_ref` (plus launch knobs:
    ``block_m`` rows per program (≥ 16, a power of two), ``num_warps``, ``block_k1`` columns per step of the
    Σx² sweep)."""
    _check(x, bits, block, out, trust)
    kern = _launch_kernels(x, block)
    spec = _spec(bits, block, trust, _alpha_option(bits, alpha))
    info = spec.info
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2 = _rows(x.detach())
    m = x2.shape[0]
    codes = torch.empty((m, k), dtype=_code_dtype(out, x.dtype), device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    mask = torch.empty((m, k // 8), dtype=torch.uint8, device=x.device)
    if m:
        code_mul = 2.0 if (out == "int8" and info.offset) else 1.0
        # K is a constexpr: one compilation per (K, dtype, format, …), a handful per model
        bk1 = max(block, min(block_k1, 1 << (k - 1).bit_length()))
        with on_device(x.device):
            kern.fwd[(-(-m // block_m),)](
                x2, codes.view(torch.uint8) if out == "fp8" else codes, scale, mask,
                m, x2.stride(0), codes.stride(0), mask.stride(0),
                float(k), 1.0 / math.sqrt(block), spec.alpha_value, float(info.top), float(spec.eps),
                float(trust or 0.0), float(info.offset), float(info.qmin), float(info.qmax), code_mul,
                K=k, HB=block, BLOCK_M=block_m, BLOCK_K1=bk1, SPLIT=_SPLIT[x.dtype], DOT_BF16=not kern.interpret,
                USE_RINT=not kern.interpret, RNE_BF16=kern.interpret, OUT=OUTS.index(out),
                TRUST_SIGMA=trust is not None, num_warps=num_warps, enable_fp_fusion=False,
            )  # fmt: skip
    return codes.reshape(x.shape), scale.reshape(lead), mask.reshape(*lead, k // 8)


def masked_inverse_hadamard_triton(
    grad: torch.Tensor,
    mask_bits: torch.Tensor,
    block: int = 128,
    *,
    block_m: int = 16,
    num_warps: int = 4,
    blocks_per_prog: int = 8,
) -> torch.Tensor:
    """The fused backward kernel: same signature and output as :func:`masked_inverse_hadamard_ref` (plus launch
    knobs; ``blocks_per_prog``: at most this many Hadamard blocks of K per program, balanced so that no program
    loops over blocks past K — each program builds S once, so more blocks per program amortise it)."""
    _check_mask(grad, mask_bits, block)
    kern = _launch_kernels(grad, block)
    k = grad.shape[-1]
    g2 = _rows(grad.detach())
    m2 = _rows(mask_bits)
    m = g2.shape[0]
    out = torch.empty((m, k), dtype=grad.dtype, device=grad.device)
    if m:
        nb = k // block
        progs_k = -(-nb // blocks_per_prog)
        bpp = -(-nb // progs_k)  # e.g. 13 blocks, at most 8 → 2 programs of 7 (one masked block), not 8 + 5
        grid = (-(-m // block_m), progs_k)
        with on_device(grad.device):
            kern.bwd[grid](
                g2, m2, out, m, k, g2.stride(0), m2.stride(0), out.stride(0), 1.0 / math.sqrt(block),
                HB=block, BLOCK_M=block_m, BLOCKS_PER_PROG=bpp, SPLIT=_SPLIT[grad.dtype],
                DOT_BF16=not kern.interpret, RNE_BF16=kern.interpret, num_warps=num_warps, enable_fp_fusion=False,
            )  # fmt: skip
    return out.reshape(grad.shape)


# ----------------------------------------------------------------------------------------------------------
# custom ops (opaque to torch.compile; fake implementations give shapes) and autograd
# ----------------------------------------------------------------------------------------------------------


def _use_triton(t: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend == "triton"
    if not _triton_available():
        return False
    if t.is_cuda:
        return True
    return os.environ.get(FORCE_ENV, "0") == "1" and _interpreting()


def _hadamard_quantize_impl(x, bits, block, trust, out, alpha, backend):
    alpha = "optimal" if alpha is None else alpha
    fn = hadamard_quantize_triton if _use_triton(x, backend) else hadamard_quantize_ref
    return fn(x, bits, block, trust=trust, out=out, alpha=alpha)


_hadamard_quantize_op = custom_op(
    "hadamard_quantize",
    "(Tensor x, float bits, int block, float? trust, str out, float? alpha, str backend) -> (Tensor, Tensor, Tensor)",
    _hadamard_quantize_impl,
)


@_hadamard_quantize_op.register_fake
def _(x, bits, block, trust, out, alpha, backend):
    _check(x, bits, block, out, trust)
    k = x.shape[-1]
    return (
        x.new_empty(x.shape, dtype=_code_dtype(out, x.dtype)),
        x.new_empty(x.shape[:-1], dtype=torch.float32),
        x.new_empty((*x.shape[:-1], k // 8), dtype=torch.uint8),
    )


def _masked_inverse_hadamard_impl(grad, mask_bits, block, backend):
    if _use_triton(grad, backend):
        return masked_inverse_hadamard_triton(grad, mask_bits, block)
    return masked_inverse_hadamard_ref(grad, mask_bits, block)


_masked_inverse_hadamard_op = custom_op(
    "masked_inverse_hadamard", "(Tensor grad, Tensor mask_bits, int block, str backend) -> Tensor",
    _masked_inverse_hadamard_impl,
)


@_masked_inverse_hadamard_op.register_fake
def _(grad, mask_bits, block, backend):
    _check_mask(grad, mask_bits, block)
    return grad.new_empty(grad.shape)  # contiguous, as both implementations return


@torch.library.custom_op(
    "lowbit::quest_fake_quant",
    mutates_args=(),
    schema="(Tensor x, float bits, int block, float? trust, float? alpha, str backend) -> (Tensor, Tensor)",
)
def _quest_fake_quant_op(x, bits, block, trust, alpha, backend):
    q, _, mask = _hadamard_quantize_op(x, bits, block, trust, "float", alpha, backend)
    return q, mask


@_quest_fake_quant_op.register_fake
def _(x, bits, block, trust, alpha, backend):
    _check(x, bits, block, "float", trust)
    return x.new_empty(x.shape), x.new_empty((*x.shape[:-1], x.shape[-1] // 8), dtype=torch.uint8)


def _qfq_setup_context(ctx, inputs, output) -> None:
    _, _, block, _, _, backend = inputs
    ctx.block, ctx.backend = block, backend
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _qfq_backward(ctx, grad_q, grad_mask):
    (mask,) = ctx.saved_tensors
    dx = _masked_inverse_hadamard_op(grad_q.contiguous(), mask, ctx.block, ctx.backend)
    return dx, None, None, None, None, None


_quest_fake_quant_op.register_autograd(_qfq_backward, setup_context=_qfq_setup_context)

#: The autograd op behind :func:`quest_fake_quant` (forward: rotated Q(xH) and the packed trust mask;
#: backward: Hᵀ(M ⊙ g)). Call it through the function.
QuestQuantize = _quest_fake_quant_op


# ----------------------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------------------


def hadamard_quantize(
    x: torch.Tensor,
    bits: float,
    block: int = 128,
    *,
    trust: float | None = None,
    out: str = "fp8",
    alpha: str | float = "optimal",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QuEST-quantize the rows of ``x`` (…, K) in the block-Hadamard domain → (codes, scale, mask); see the
    module docstring for the formats (dequantized = ``codes * scale[..., None]``; mask bit-packed along K,
    little-endian). No gradient (use :func:`quest_fake_quant`). ``backend``: auto | triton | ref."""
    _check(x, bits, block, out, trust)
    fn = _hadamard_quantize_impl if direct_call(x) else _hadamard_quantize_op
    return fn(x, float(bits), block, trust, out, _alpha_option(bits, alpha), backend)


def masked_inverse_hadamard(
    grad: torch.Tensor, mask_bits: torch.Tensor, block: int = 128, *, backend: str = "auto"
) -> torch.Tensor:
    """Hᵀ(M ⊙ grad) (…, K) in grad's dtype: the QuEST trust gradient with respect to the un-rotated input,
    from the gradient of the rotated quantized tensor and the packed mask of :func:`hadamard_quantize`."""
    _check_mask(grad, mask_bits, block)
    fn = _masked_inverse_hadamard_impl if direct_call(grad) else _masked_inverse_hadamard_op
    return fn(grad, mask_bits, block, backend)


def quest_fake_quant(
    x: torch.Tensor,
    bits: float,
    block: int = 128,
    *,
    trust: float | None = None,
    alpha: str | float = "optimal",
    backend: str = "auto",
) -> torch.Tensor:
    """Q(x·H) in the rotated domain, x's dtype — equal to ``fake_quantize(x, quest_spec(bits), rotated=True)``
    (what a GEMM in the Hadamard domain consumes) — with the trust gradient g ↦ Hᵀ(M ⊙ g), fused in one
    kernel each way on CUDA."""
    _check(x, bits, block, "float", trust)
    return _quest_fake_quant_op(x, float(bits), block, trust, _alpha_option(bits, alpha), backend)[0]
