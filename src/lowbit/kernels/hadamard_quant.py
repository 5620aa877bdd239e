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

**The Triton kernels.** Forward: a program quantizes BLOCK_M rows × a share of their Hadamard blocks; the
K_SPLIT programs of a row tile (adjacent in the grid, so they run together) split the row's blocks between them.

* Sweep 1, Σx² of the *un-rotated* row — H is orthonormal, so it equals Σr² (Parseval) up to float32 rounding,
  and costs no matmul — over the whole row in every program of the tile, in one fixed order: column j of a
  256-wide window accumulates j, j + 256, … in turn, then a pairwise tree adds the window. The order depends on
  no launch parameter, so all programs of a tile, every configuration the autotuner may pick and the
  interpreter compute the same σ and scales bit for bit. The rotation is the same chain of k16 MMAs in every
  configuration too, so the codes and masks do not depend on the autotuner's pick either — checked on the GPU
  for every config; whether Hopper's warpgroup MMA (the 64-row tiles) rounds its fp32 sums exactly as mma.sync
  does is measured there rather than promised. Loads are marked evict_last: sweep 2 wants them again.
* Sweep 2, per Hadamard block of the program's share: load (cp.async, pipelined over ``num_stages``), rotate on
  tensor cores, divide by Δ, round, clamp, trust mask, store FP8/int8/float codes and the packed mask. The
  re-read of x comes from L2 while the rows in flight fit there; K_SPLIT > 1 keeps that footprint small at
  large K (each SM holds fewer whole rows at a time), at the price of re-reading the row from L2 once per
  program for σ.
* σ differs from the reference's by float32 rounding (~1e-7 relative): a code can differ from the reference
  only where r/Δ sits that close to a rounding tie (tested: < 1e-4 of codes, by one step, at ties).
* The rotation is a tensor-core matmul x_blk @ S with S the ±1 Sylvester matrix (built in registers from
  parity(i & j), no load) and the 1/√b applied after in float32. ±1 is exact in bf16, and so is x once split:
  bf16 input is one bf16 MMA; fp32 input is split exactly into three bf16 parts (hi + lo + lo2, 8 significant
  bits each = fp32's 24), fp16 into two — three (two) bf16 MMAs with fp32 accumulation give the rotation to
  float32 accuracy without TF32's 10-bit mantissa. BLOCK_M = 64 runs it on Hopper's warpgroup MMA.
* Every elementwise step is the reference's float32 operation, rounded the same way: ``sqrt_rn``/``div_rn`` per
  row (σ, Δ, and RN(1/Δ)), round-half-even, no FMA contraction (``enable_fp_fusion=False``). The per-element
  r/Δ is computed as q = RN(r·y), e = r − Δ·q (exact, one FMA), RN(q + e·y) with y = RN(1/Δ): by Markstein's
  theorem (P. Markstein, IBM J. Res. Dev. 34(1), 1990; J.-M. Muller et al., Handbook of Floating-Point
  Arithmetic, §4.7) that is the IEEE quotient RN(r/Δ) whenever nothing underflows — three FMAs where
  ``div_rn`` costs a subroutine call, a range check and a convergence barrier per element (tested in exact
  emulation and on the GPU against torch's division). Here 2⁻²⁰ < Δ < 2⁶⁷ (Δ ≥ eps·α/top with QuEST's eps =
  1e-5; a finite Σx² bounds σ by 2⁶⁴), so nothing underflows unless |r/Δ| < 2⁻⁷⁰ — and such a quotient rounds
  like 0 in y = r/Δ + o, leaving the code the reference's; Δ = +inf (Σx² overflowed) gives q = 0 = r/inf. FP8
  codes: the hardware conversion (``cvt.rn.satfinite.e4m3x2``, sm_89+; integer ops on the bits before), exact
  for the grid values.
* Backward (programs over BLOCK_M rows × up to 8 blocks of K): unpack the mask bits, g ⊙ M, the same
  bf16-split MMA, 1/√b, store in the gradient's dtype (rounded once, as the reference rounds its float32 result).
* Under ``TRITON_INTERPRET=1`` (CPU tests) Triton 3.6 computes bf16 MMAs wrongly, truncates float32 → bf16 and
  rounds ``tl.fma`` twice, so there the split parts are multiplied in float32 (``input_precision="ieee"``: exact
  products, same algorithm), bf16 outputs are rounded to nearest even on the bits first, rounding uses the
  1.5·2²³ trick instead of libdevice's ``rint``, r/Δ is ``div_rn``, and FP8 codes are e4m3 bit patterns built
  with integer ops (numpy has no float8): the same values by other means (the kernel's ``COMPILED`` flag).

**Launch** (forward). On a GPU the kernel is autotuned (Triton's autotuner: every new key compiles and times
every config once) over :data:`GPU_CONFIGS` — BLOCK_M ∈ {16, 32, 64}, K_SPLIT ∈ {1, 2, 4, 8}, 4 or 8 warps, 2–3
stages — keyed by the rows rounded up to a power of two, K, the block, the input dtype and the output format;
``LOWBIT_AUTOTUNE=0`` (the kernel tests) runs :data:`DEFAULT_GPU_CONFIG`, the interpreter
:data:`INTERPRET_CONFIG`, and ``hadamard_quantize_triton(config=…)`` one given configuration. K, the block and
the spec's numbers are compile-time constants (a model has a handful of them): a launch passes 9 runtime
arguments, and the argument checks and constants are cached per (dtype, K, spec), so the host time of a call is
the allocations and the launch — it counts in an eager prefill, where a 4096-token layer is ~50–130 µs of GPU.

Why the first kernel (16-row programs over the whole K, 4 warps, one fixed launch) was slow: a 4096-row prefill is
only 256 programs for 132 SMs — two programs, 8 warps, per SM, 2 per scheduler — so the latencies of its long
dependent chains (MUFU, shared-memory loads of S, the MMA, stores) stood exposed; and each element cost ~52
instructions in its sm_90a SASS — ``div_rn``'s per-element subroutine and convergence barrier (~10), the integer
FP8 encoding (~8), a clamp that ``rint`` makes redundant — ~15 µs of issue for 4096 × 2048 even at full
occupancy. Now 22–30 instructions per element (by tile; sweep 1 adds ~5), and K_SPLIT and the row tiles give the
autotuner 64–2048 programs to choose from at M = 4096. Its eager times barely depended on K (101–129 µs for
4096 × 2048 and 4096 × 5632 on an H200), so host time — two argument checks, 22 runtime arguments, reshapes —
was a large part of what was measured; benchmarks/bench_decode.py now reports the CUDA-graph (device) time
beside the eager one.

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

from lowbit.kernels._triton import custom_op, direct_call, jit_namespace, launch_config, on_device
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
    k = x.shape[-1]
    # a model checks a handful of (dtype, K, spec) combinations: in eager mode, after the first, a lookup (traced,
    # K may be symbolic, which is not hashable, and dynamo would trace through the cache anyway: checked in full)
    cached = type(k) is int and not torch.compiler.is_compiling()
    (_check_args_cached if cached else _check_args)(x.dtype, k, bits, block, out, trust)


def _check_args(dtype: torch.dtype, k: int, bits: float, block: int, out: str, trust: float | None) -> None:
    if dtype not in DTYPES:
        raise TypeError(f"hadamard_quantize: x must be one of {DTYPES}, got {dtype}")
    if block < 8 or block & (block - 1):
        raise ValueError(f"hadamard_quantize: block must be a power of two ≥ 8, got {block}")
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


_check_args_cached = functools.cache(_check_args)


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

#: Columns of x per step of the forward's sweep 1 (Σx²), the same in every launch configuration: it fixes the
#: order of the sum (the kernel's comment). The kernels see it, and its log2, as constexprs (_kernels).
SWEEP1_W = 256
SWEEP1_LEVELS = SWEEP1_W.bit_length() - 1


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


def _fp8_bits(g, FP8_CVT: tl.constexpr):
    # e4m3fn bit pattern of g, exact when g has ≤ 4 significant bits and 2^−6 ≤ |g| < 16, or g = +0 (the kernel's
    # grid values always are: any correct conversion gives these bits). FP8_CVT (compiled for sm_89+): the hardware
    # conversion, one cvt per two values; else (the interpreter — numpy has no float8 — and older GPUs, where
    # Triton has no e4m3 type): integer ops on the float32 bits.
    if FP8_CVT:
        bits = g.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        b = g.to(tl.int32, bitcast=True)
        sign = (b >> 24) & 0x80
        exp = ((b >> 23) & 0xFF) - 120  # float32 bias 127 → e4m3 bias 7
        man = (b >> 20) & 0x7
        bits = tl.where(g == 0.0, 0, sign | (exp << 3) | man).to(tl.uint8)
    return bits


def _pairwise_sum(acc, ROWS: tl.constexpr, LEVELS: tl.constexpr):
    # Σ over the columns of acc (ROWS, 2^LEVELS) as a balanced binary tree: each level adds neighbouring pairs, and
    # a sum of two numbers does not depend on how the compiler lays out or orders the reduction
    for _ in tl.static_range(LEVELS):
        acc = tl.sum(tl.reshape(acc, [ROWS, acc.shape[1] // 2, 2]), axis=2)
    return tl.reshape(acc, [ROWS])


def _quotient(r, d, inv, COMPILED: tl.constexpr):
    # r / d rounded to nearest even, for d > 0 (finite or +inf) with inv = RN(1/d). Compiled: q = RN(r·inv), the
    # remainder r − d·q (exact in one FMA), q + remainder·inv rounded once — Markstein's theorem: with a correctly
    # rounded reciprocal this is the IEEE quotient unless the remainder underflows (module docstring) — three FMAs
    # instead of div.rn's subroutine per element. d = +inf: the remainder uses FLT_MAX, so q = 0 = r/inf exactly.
    # The interpreter rounds tl.fma twice (numpy), so there: div_rn.
    if COMPILED:
        q = tl.fma(r, inv, 0.0)
        e = tl.fma(-tl.minimum(d, 3.4028234663852886e38), q, r)
        q = tl.fma(e, inv, q)
    else:
        q = tl.math.div_rn(r, d)
    return q


def _hq_fwd_kernel(
    x_ptr, codes_ptr, scale_ptr, mask_ptr,
    M, stride_x, stride_c, stride_m,
    M_BUCKET,  # unused in the body: keys the autotuner (rows rounded up to a power of two)
    K: tl.constexpr, HB: tl.constexpr, SPLIT: tl.constexpr, OUT: tl.constexpr, TRUST_SIGMA: tl.constexpr,
    INV_SQRT_B: tl.constexpr, ALPHA: tl.constexpr, TOP: tl.constexpr, EPS: tl.constexpr, TRUST: tl.constexpr,
    OFFSET: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, CODE_MUL: tl.constexpr, COMPILED: tl.constexpr,
    FP8_CVT: tl.constexpr, BLOCK_M: tl.constexpr, K_SPLIT: tl.constexpr,
):  # fmt: skip
    # K and the spec's numbers are compile-time constants: a model has a few distinct (K, spec), the loops get
    # static trip counts, a launch passes 9 runtime arguments, and Triton 3.6's interpreter cannot loop to a
    # runtime bound under numpy 2.4 (int() of a 1-element array is an error). A float constant is rounded to
    # float32 where it meets a float32 tensor, exactly as a float32 argument would be.
    NB: tl.constexpr = K // HB  # Hadamard blocks per row
    PER: tl.constexpr = (NB + K_SPLIT - 1) // K_SPLIT  # blocks quantized per program
    PARTS: tl.constexpr = (NB + PER - 1) // PER  # programs per row tile: K_SPLIT, less any that would idle
    pid = tl.program_id(0)
    tile = pid // PARTS  # the PARTS programs of a row tile are adjacent: they run together and share x in L2
    part = pid % PARTS
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    x_rows = x_ptr + rows64[:, None] * stride_x

    # sweep 1: σ² = mean of the squares of the row, un-rotated (H is orthonormal), summed in one fixed order
    # whatever the launch configuration (and in the interpreter too): column j of a SWEEP1_W-wide window
    # accumulates the squares at j, j + SWEEP1_W, … in turn, then the window is added up as a pairwise tree
    # (_pairwise_sum). Every program of a row tile computes the same σ bit for bit, and so does every autotuned
    # configuration: the codes do not depend on which one the autotuner picked.
    cw = tl.arange(0, SWEEP1_W)
    acc = tl.zeros([BLOCK_M, SWEEP1_W], dtype=tl.float32)
    for k0 in tl.range(0, K, SWEEP1_W):
        cols = k0 + cw
        # evict_last: sweep 2 (this program's and its siblings') reads x again, from L2 if it is still there
        v = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0,
                    eviction_policy="evict_last")
        v = v.to(tl.float32)
        acc += v * v
    ss = _pairwise_sum(acc, BLOCK_M, SWEEP1_LEVELS)
    sigma = tl.sqrt_rn(tl.math.div_rn(ss, K * 1.0))
    step = tl.math.div_rn(tl.maximum(sigma, EPS) * ALPHA, TOP)  # clip_range / top, as lowbit.quant.core
    inv = tl.math.div_rn(1.0, step)  # RN(1/Δ), once per row: the divisions below are FMAs (_quotient)
    if TRUST_SIGMA:
        thr = TRUST * sigma
    else:
        thr = step * 0.5
    # the stored scale: Δ, or Δ/2 for odd int8 codes (CODE_MUL is 1 or 2: the product is exact)
    tl.store(scale_ptr + rows64, step * (1.0 / CODE_MUL), mask=row_ok & (part == 0))

    # sweep 2 (this program's PER blocks): rotate, quantize, mask, per Hadamard block
    s = _sylvester(HB, COMPILED)
    cb = tl.arange(0, HB)
    cm = tl.arange(0, HB // 8)
    lim = QMAX - QMIN + 4.0  # |y| beyond the grid by more than a step: clamps the same way, rounds safely
    for i in tl.range(0, PER):
        blk = part * PER + i
        k0 = blk * HB
        if PER * PARTS == NB:
            ok = row_ok[:, None]
        else:
            ok = row_ok[:, None] & (blk < NB)  # the last part holds fewer blocks
        v = tl.load(x_rows + (k0 + cb)[None, :], mask=ok, other=0.0)  # cp.async-pipelined (num_stages)
        r = _rotate(v, s, INV_SQRT_B, SPLIT, COMPILED)
        y = _quotient(r, step[:, None], inv[:, None], COMPILED)
        if OFFSET != 0.0:
            y = y + OFFSET
        if not COMPILED:  # the 1.5·2²³ rounding needs |y| < 2²²; rint rounds any y, and the clamp below decides
            y = tl.minimum(tl.maximum(y, -lim), lim)
        # g = clamp(round(y) − 2o, qmin, qmax) + o, the grid value in units of Δ, computed as one subtraction and
        # a clamp to the shifted bounds (exact: small integers and half-integers); o = 0 adds +0.0 instead, so that
        # a zero code is +0.0 as in the reference (rint gives −0.0 for small negative y)
        if OFFSET != 0.0:
            g = tl.minimum(tl.maximum(_round_half_even(y, COMPILED) - OFFSET, QMIN + OFFSET), QMAX + OFFSET)
        else:
            g = tl.minimum(tl.maximum(_round_half_even(y, COMPILED), QMIN), QMAX) + 0.0
        q = g * step[:, None]
        keep = (tl.abs(q - r) <= thr[:, None]).to(tl.int32)

        c_ptrs = codes_ptr + rows64[:, None] * stride_c + (k0 + cb)[None, :]
        if OUT == 0:  # fp8 e4m3 bit patterns into a uint8 view
            tl.store(c_ptrs, _fp8_bits(g, FP8_CVT), mask=ok)
        elif OUT == 1:
            tl.store(c_ptrs, (g * CODE_MUL).to(tl.int8), mask=ok)
        else:
            tl.store(c_ptrs, _cast(q, codes_ptr.dtype.element_ty, not COMPILED), mask=ok)

        # pack: byte j of the block = Σ_i keep[8j + i]·2^i (little-endian within the byte)
        k3 = tl.reshape(keep, [BLOCK_M, HB // 8, 8])
        packed = tl.sum(k3 << tl.arange(0, 8)[None, None, :], axis=2)
        m_ptrs = mask_ptr + rows64[:, None] * stride_m + (blk * (HB // 8) + cm)[None, :]
        tl.store(m_ptrs, packed.to(tl.uint8), mask=ok)


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
    "_pairwise_sum",
    "_quotient",
    "_hq_fwd_kernel",
    "_mih_bwd_kernel",
)




# ----------------------------------------------------------------------------------------------------------
# launch configurations of the forward kernel (module docstring, "Launch")
# ----------------------------------------------------------------------------------------------------------

#: Forward launch configurations autotuned on a GPU: (BLOCK_M rows per program, K_SPLIT programs per row tile,
#: num_warps, num_stages). In the sm_90a compile (bf16 → FP8, K = 2048) they take 59–128 registers and 38–72 KiB of
#: shared memory (S alone is 32 KiB), so 2–5 programs share an SM, and none spills for bf16 or fp16 input (fp32
#: input: the 32-row ones spill, _prune drops them). K_SPLIT multiplies the programs of an M = 4096 prefill (256 row
#: tiles of 16 for 132 SMs) and shrinks the rows an SM holds in flight, so that sweep 2's re-read of x stays in L2
#: at large K; BLOCK_M = 64 runs the rotation on Hopper's warpgroup MMA, which reads S from shared memory itself
#: (smaller tiles use mma.sync and reload S into registers every block). num_stages pipelines sweep 2's loads.
GPU_CONFIGS = (
    (16, 1, 8, 3),
    (16, 2, 8, 3),
    (16, 4, 8, 3),
    (16, 8, 8, 2),
    (16, 1, 4, 2),
    (16, 2, 4, 2),
    (32, 1, 8, 2),
    (32, 2, 8, 2),
    (32, 4, 8, 2),
    (64, 1, 8, 2),
    (64, 2, 8, 2),
    (64, 4, 8, 2),
)
#: The one GPU configuration with LOWBIT_AUTOTUNE=0 (the kernel tests): 16-row tiles, two programs per tile, 8 warps.
DEFAULT_GPU_CONFIG = {"BLOCK_M": 16, "K_SPLIT": 2, "num_warps": 8, "num_stages": 3}
#: Under TRITON_INTERPRET=1: 16-row tiles, and K split in two so that the tests exercise the split.
INTERPRET_CONFIG = {"BLOCK_M": 16, "K_SPLIT": 2, "num_warps": 4, "num_stages": 1}


def _parts(blocks: int, k_split: int) -> int:
    """Programs per row tile: ``k_split`` at most, each with ⌈blocks / k_split⌉ Hadamard blocks, none idle (the
    kernel's PARTS)."""
    per = -(-blocks // k_split)
    return -(-blocks // per)


def _m_bucket(m: int) -> int:
    """The autotuner's row key: M rounded up to a power of two, at least 256."""
    return max(256, 1 << (m - 1).bit_length())


def _gpu_config(bm: int, ks: int, warps: int, stages: int) -> dict:
    return {"BLOCK_M": bm, "K_SPLIT": ks, "num_warps": warps, "num_stages": stages}


def _prune(configs: list, nargs: dict, **meta) -> list:
    """Autotune pre-pruning: configs that launch the same programs as an earlier one (K_SPLIT beyond the blocks of
    a row), row tiles far taller than M, and for float32 input (three MMAs per block) row tiles above 16 (the
    32-row ones spill registers in the sm_90a compile) are dropped."""
    blocks = meta["K"] // meta["HB"]
    kept, seen = [], set()
    for c in configs:
        kw = c.kwargs
        bm = kw["BLOCK_M"]
        key = (bm, _parts(blocks, kw["K_SPLIT"]), c.num_warps, c.num_stages)
        if key in seen or (bm > 16 and (bm > 2 * nargs["M"] or meta["SPLIT"] == 3)):
            continue
        seen.add(key)
        kept.append(c)
    return kept or configs[:1]


@dataclass(frozen=True)
class _Kernels:
    fwd: object  # the jitted forward kernel (one explicit configuration)
    fwd_tuned: object  # the same, autotuned over GPU_CONFIGS (compiled mode only)
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
    extra = dict(triton=triton, tl=tl, libdevice=libdevice, SWEEP1_W=tl.constexpr(SWEEP1_W),
                 SWEEP1_LEVELS=tl.constexpr(SWEEP1_LEVELS))
    ns = jit_namespace(globals(), _JIT_FUNCTIONS, extra)
    fwd = ns["_hq_fwd_kernel"]
    tuned = None
    if not interpret:
        configs = [triton.Config({"BLOCK_M": bm, "K_SPLIT": ks}, num_warps=w, num_stages=st)
                   for bm, ks, w, st in GPU_CONFIGS]
        key = ["M_BUCKET", "K", "HB", "SPLIT", "OUT", "TRUST_SIGMA"]  # + the pointers' dtypes (Triton adds them)
        tuned = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _prune})(fwd)
    return _Kernels(fwd, tuned, ns["_mih_bwd_kernel"], interpret)


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


@functools.cache
def _fp8_cvt(index: int) -> bool:
    """Whether CUDA device ``index`` converts to e4m3 in hardware (sm_89+; Triton has no e4m3 type below)."""
    return torch.cuda.get_device_capability(index) >= (8, 9)


@functools.cache
def _fwd_constants(bits: float, block: int, trust: float | None, alpha: float | None, out: str,
                   dtype: torch.dtype, compiled: bool, fp8_cvt: bool) -> dict:
    """The forward kernel's compile-time constants for one (spec, format, dtype) — built once, then a dict lookup
    per call (the launch's host time is part of every eager prefill)."""
    spec = _spec(bits, block, trust, alpha)
    info = spec.info
    return dict(
        HB=block, SPLIT=_SPLIT[dtype], OUT=OUTS.index(out), TRUST_SIGMA=trust is not None,
        INV_SQRT_B=1.0 / math.sqrt(block), ALPHA=float(spec.alpha_value), TOP=float(info.top), EPS=float(spec.eps),
        TRUST=float(trust or 0.0), OFFSET=float(info.offset), QMIN=float(info.qmin), QMAX=float(info.qmax),
        CODE_MUL=2.0 if (out == "int8" and info.offset) else 1.0, COMPILED=compiled, FP8_CVT=fp8_cvt,
    )  # fmt: skip


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
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused kernel: same signature and outputs as :func:`hadamard_quantize_ref`, plus ``config``: one launch
    configuration (``BLOCK_M`` ≥ 16 a power of two, ``K_SPLIT`` ≥ 1, optional ``num_warps``, ``num_stages``)
    instead of the autotuner (module docstring, "Launch")."""
    _check(x, bits, block, out, trust)
    return _hadamard_quantize_triton(x, float(bits), block, trust, out, _alpha_option(bits, alpha), config)


def _hadamard_quantize_triton(x, bits, block, trust, out, alpha, config=None):
    kern = _launch_kernels(x, block)
    compiled = not kern.interpret
    dev = x.device
    fp8_cvt = compiled and out == "fp8" and _fp8_cvt(torch.cuda.current_device() if dev.index is None else dev.index)
    const = _fwd_constants(bits, block, trust, alpha, out, x.dtype, compiled, fp8_cvt)
    k = x.shape[-1]
    flat = x.dim() == 2 and x.stride(1) == 1  # the GEMM callers' case: no reshapes (host time, see "Launch")
    x2 = x if flat else _rows(x)
    m = x2.shape[0]
    codes = torch.empty((m, k), dtype=_code_dtype(out, x.dtype), device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    mask = torch.empty((m, k // 8), dtype=torch.uint8, device=x.device)
    if m:
        args = (x2, codes.view(torch.uint8) if out == "fp8" else codes, scale, mask, m, x2.stride(0),
                codes.stride(0), mask.stride(0), _m_bucket(m))  # fmt: skip
        blocks = k // block
        cfg = launch_config(config, kern.interpret, INTERPRET_CONFIG, DEFAULT_GPU_CONFIG)
        with on_device(x.device):
            if cfg is None:  # autotuned (K is a constexpr: one compilation per K, dtype, format, spec)

                def grid(meta: dict) -> tuple[int]:
                    return (-(-m // meta["BLOCK_M"]) * _parts(blocks, meta["K_SPLIT"]),)

                kern.fwd_tuned[grid](*args, K=k, **const, enable_fp_fusion=False)
            else:
                warps, stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 1)
                grid = (-(-m // cfg["BLOCK_M"]) * _parts(blocks, cfg["K_SPLIT"]),)
                kern.fwd[grid](*args, K=k, **const, **cfg, num_warps=warps, num_stages=stages,
                               enable_fp_fusion=False)  # fmt: skip
    if flat:
        return codes, scale, mask
    lead = x.shape[:-1]
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
    if _use_triton(x, backend):  # (the public entry point has checked the arguments)
        return _hadamard_quantize_triton(x, bits, block, trust, out, alpha)
    return hadamard_quantize_ref(x, bits, block, trust=trust, out=out, alpha="optimal" if alpha is None else alpha)


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
