"""Fused DQT optimizer step: AdamW + stochastic rounding onto the weight grid, one pass over memory.

:class:`lowbit.optim.DirectOptimizer` updates a direct-quantized tensor (DQT, METHODS.md §3) with a sequence of
about thirty torch ops per row chunk: unpack, dequantize, the AdamW moments, the step, the counter-based noise,
the rounding, pack. This module computes the same update in one Triton kernel that reads the codes, the
gradient and the optimizer states once and writes the new codes and states once, for many tensors in one
launch. Per element (``docs/dqt.md``, "The optimizer"):

    W   = (code + offset)·Δ                                       dequantize the stored code
    m   = lerp(m, g, 1 − β1),  v = β2·v + (1 − β2)·g²               AdamW moments (fp32, bf16 or 8-bit states)
    W  ← W·(1 − lr·wd) − lr/(1 − β1^t) · m / (√v/√(1 − β2^t) + ε)   decoupled weight decay, bias correction
    code = clamp(floor(W/Δ' + offset + u) − 2·offset, qmin, qmax)   stochastic rounding (nearest: round)

with u = :func:`lowbit.rng.counter_uniform` (seed, t, CRC-32 of ``<name>.weight``, element index) computed
in the kernel by the same integer hash (uint32 arithmetic), so kernel and torch draw identical noise bit for
bit. 8-bit states (:mod:`lowbit.optim.blockwise`) are decoded, updated and re-encoded in the kernel, with
their own streams (``<name>.exp_avg``, ``<name>.exp_avg_sq``) as the torch path does.

Files of this kind hold, in order (DESIGN.md principle 4): the **torch reference** with the launcher's
signature (:func:`dqt_adamw_step_reference`, the optimizer's own op sequence on whole tensors), the **Triton
kernel** (:func:`_dqt_tile`, called by a one-tensor and a grouped kernel), the **launcher**
(:func:`dqt_adamw_step_triton`), and the **custom op** ``torch.ops.lowbit.dqt_adamw_step``
(:func:`dqt_adamw_step`: Triton on CUDA when available, the reference otherwise; fake implementation for
tracing). There is no autograd: an optimizer step has no gradient.

**Float semantics.** Every operation rounds as the torch path *on CUDA* does, so the kernel agrees with it up
to the order of a few float operations: fp-contraction is off in the kernel and the fused multiply-adds are
written out where ATen's CUDA kernels have them (``lerp``: self + w·(end − self); ``addcmul``:
a + α·(b·c); ``addcdiv``: a + α·(b/c)); division by a host scalar is a multiply by its float32 reciprocal
(ATen's CUDA ``div`` by a CPU scalar); division by a tensor and sqrt are IEEE (``div_rn``, ``sqrt_rn``; Triton's
plain ``/`` is approximate). On CPU the torch ops differ in the last bit here and there (no fma in ``addcmul``,
true division), so a code can land on the other side of a rounding threshold — about once in 10^6 elements,
and then by one grid step; the tests bound both. The noise is bit-identical everywhere, and so are bf16
states rounded from equal float32 values (round to nearest even on the bits, as c10::BFloat16).

**Layout.** A program owns the bytes of ``TILES[state][0]`` consecutive elements of one tensor, a [bytes,
codes per byte] tile, so packed 2- and 4-bit codes are read and written as whole bytes (rows padded to a byte, as
:mod:`lowbit.quant.packing` stores them; odd K is handled). 8-bit states need K to be a multiple of the codes
per byte (every real layer), since their 256-value blocks must be whole inside a program;
:func:`supports` says which tensors the kernel takes. The grouped kernel reads each tensor's pointers,
sizes, noise keys and scalars from one int64 table copied to the device per launch (pinned, asynchronous: no
host sync) and finds its tensor by binary search over the tiles' prefix sums. Whole tiles of a tensor are
unmasked (16-byte vector loads and stores); only a tensor's last tile, and odd-K packed rows, are masked.

Launch count per optimizer step (stashed gradients): one table copy, one zero-fill for the flip counters and
one kernel per group of tensors sharing a grid spec (usually one group), instead of ~30 torch ops per
tensor chunk; with the update inside backward, one kernel per tensor (clip coefficient and NaN guard fused
in). :data:`LAUNCHES` counts kernel launches (the tests read it). Importing this module imports no Triton: the
kernels are built on first use, for the compiler or, under ``TRITON_INTERPRET=1``, the CPU interpreter.
"""

from __future__ import annotations

import functools
import math
import struct
import types
from collections import Counter
from typing import Any

import torch
from torch import Tensor

from lowbit.kernels._triton import has_triton, jit_namespace, on_device
from lowbit.kernels._triton import interpreting as _interpreting
from lowbit.optim import blockwise
from lowbit.quant import QuantSpec, dequantize, quantize
from lowbit.quant.packing import pack, storage_bits, unpack
from lowbit.rng import counter_key, counter_uniform

__all__ = [
    "LAUNCHES",
    "TILES",
    "available",
    "counter_uniform_triton",
    "dqt_adamw_step",
    "dqt_adamw_step_reference",
    "dqt_adamw_step_triton",
    "has_triton",
    "interpreted",
    "supports",
]

LAUNCHES: Counter[str] = Counter()
"""Kernel launches by kind ("tensor": the one-tensor kernel, "group": the grouped kernel), for tests and
benchmarks."""

TILES: dict[int, tuple[int, int]] = {0: (2048, 8), 1: (2048, 8), 2: (1024, 8)}
"""(elements per program, warps) by state kind (0 fp32, 1 bf16, 2 8-bit). Elements: a power of two and a
multiple of blockwise.BLOCK = 256. Chosen from the register counts of the sm_90 build (fp32 states: 79
registers at 2048/8; 8-bit states: 71 at 1024/8, 116 at 2048/8); ``benchmarks/bench_kernels.py --only
dqt_step --dqt-tiles …`` times others."""

INTERPRET_BLOCK: int | None = 16384
"""Elements per program under the Triton interpreter, whose cost is per program, not per element (None:
TILES). The result does not depend on the tiling."""

triton = tl = None  # placeholders: the real modules live in _kernels()' per-mode namespaces

_STATE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # by exp_avg's dtype
_SCALE_KINDS = {"tensor": 0, "row": 1, "group": 2}
_MAX_NUMEL = (1 << 31) - (1 << 20)  # int32 element indexing in the kernel, with room for a tile
_NF = 26  # int64 fields per tensor in the grouped kernel's table (see the launcher)


def _f32(x: float) -> float:
    """x rounded to float32 (to nearest even), as ATen converts a host scalar."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _i32(x: int) -> int:
    """A uint32 as the int32 of the same bits (fixed kernel argument types: no recompilation per key)."""
    return x - (1 << 32) if x >= 1 << 31 else x


INV_16129 = _f32(1.0 / 16129.0)  # ATen CUDA: absmax / 16129.0 = absmax · (1/16129 rounded to fp32)


def _spec(bits: float, grid: str, granularity: str, group_size: int, stochastic: bool) -> QuantSpec:
    """The spec of the stored codes (the scale rule is irrelevant: Δ is always passed in)."""
    rounding = "stochastic" if stochastic else "nearest"
    return QuantSpec(bits=bits, grid=grid, granularity=granularity, group_size=group_size, rounding=rounding)


@functools.lru_cache(maxsize=64)
def _hyper(lr: float, beta1: float, beta2: float, eps: float, t: int, wd: float) -> dict[str, float]:
    """One tensor's float32 scalars, rounded as ATen rounds the Python scalars of the torch path."""
    bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
    return {
        "decay": _f32(1.0 - lr * wd),  # w.mul_(1 − lr·wd)
        "neg_step": _f32(-lr / bc1),  # addcdiv_(value=−lr/bc1)
        "inv_sqrt_bc2": _f32(1.0 / _f32(math.sqrt(bc2))),  # .div_(√bc2) on CUDA: × the fp32 reciprocal
        "w1": _f32(1.0 - beta1), "b2": _f32(beta2), "w2": _f32(1.0 - beta2), "eps": _f32(eps),
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# torch reference: DirectOptimizer's op sequence for rule="adamw", on whole tensors
# ----------------------------------------------------------------------------------------------------------


def dqt_adamw_step_reference(
    codes: list[Tensor], grads: list[Tensor], exp_avg: list[Tensor], exp_avg_sq: list[Tensor],
    exp_avg_absmax: list[Tensor], exp_avg_sq_absmax: list[Tensor], scales: list[Tensor], new_scales: list[Tensor],
    grad_scales: list[Tensor], steps: list[int], weight_decays: list[float], streams: list[int],
    exp_avg_streams: list[int], exp_avg_sq_streams: list[int], lr: float, beta1: float, beta2: float, eps: float,
    seed: int, bits: float, grid: str, granularity: str, group_size: int, stochastic: bool, zero_nonfinite: bool,
    noise_offsets: list[int] | None = None,
) -> Tensor:  # fmt: skip
    """One DQT AdamW step of T tensors, in place; returns how many codes of each it changed (int64, (T,)).

    Per tensor i: ``codes[i]`` the stored (packed) codes; ``grads[i]`` its float32 gradient, of the weight's
    shape (K = the last dim); the moments ``exp_avg[i]``/``exp_avg_sq[i]``, float32/bfloat16 of the weight's
    shape, or 8-bit blockwise codes with ``exp_avg_absmax``/``exp_avg_sq_absmax`` (empty lists otherwise);
    ``scales[i]`` the step Δ the codes were written with and ``new_scales[i]`` the Δ' to round onto (the same
    tensor for a frozen grid; neither is written); ``grad_scales``: 0-dim clip coefficients the gradients are
    multiplied by first (empty: none); ``zero_nonfinite``: then NaN/±inf gradient values become 0 (the update
    inside backward); ``steps[i]`` the step number t of this update; ``weight_decays[i]``; the noise streams
    of the weight and of the 8-bit states (else unused). Hyper-parameters as :class:`lowbit.optim.DirectOptimizer`;
    the grid is ``QuantSpec(bits, grid, granularity=…, group_size=…)``, rounding stochastic or nearest. The ops
    are those of ``DirectOptimizer._update`` (rule adamw), tested equal to it bit for bit. ``noise_offsets[i]``
    (default 0): the global element index of tensor i's first element — an FSDP2 shard's row0·K — at which its
    stochastic-rounding noise (weight and 8-bit states) is drawn, so a shard's update writes the rows of the
    whole tensor's."""
    spec = _spec(bits, grid, granularity, group_size, stochastic)
    info = spec.info
    eight = bool(codes) and exp_avg[0].dtype == torch.int8
    offs = noise_offsets or [0] * len(codes)
    flips = []
    for i, (c_store, g_in) in enumerate(zip(codes, grads, strict=True)):
        t = steps[i]
        k = g_in.shape[-1]
        rows = g_in.numel() // k
        n_pad = -(-rows * k // blockwise.BLOCK) * blockwise.BLOCK
        g = g_in.reshape(rows, k).float()
        if grad_scales:
            g = g * grad_scales[i]
        if zero_nonfinite:
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        codes_old = unpack(c_store.view(rows, -1), info.qmin, info.levels, k)
        w = dequantize(codes_old, scales[i], spec)
        bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
        moments = []
        for state, absmax, stream, second in (
            (exp_avg, exp_avg_absmax, exp_avg_streams, False),
            (exp_avg_sq, exp_avg_sq_absmax, exp_avg_sq_streams, True),
        ):
            x_st = state[i]
            if eight:
                dec = blockwise.decode_second_moment if second else blockwise.decode_signed
                x = dec(x_st, absmax[i], (rows, k))
            else:
                x = x_st.view(rows, k) if x_st.dtype == torch.float32 else x_st.view(rows, k).float()
            if second:
                x.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            else:
                x.lerp_(g, 1.0 - beta1)
            if eight:
                enc = blockwise.encode_second_moment if second else blockwise.encode_signed
                q, a = enc(x, counter_uniform(seed, t, stream[i], (n_pad,), offset=offs[i], device=x.device))
                x_st.copy_(q)
                absmax[i].copy_(a)
            elif x_st.dtype != torch.float32:
                x_st.view(rows, k).copy_(x)
            moments.append(x)
        m, v = moments
        scratch = exp_avg_sq[i].dtype != torch.float32  # else v is the state itself: no in-place sqrt
        denom = (v.sqrt_() if scratch else v.sqrt()).div_(math.sqrt(bc2)).add_(eps)
        w.mul_(1.0 - lr * weight_decays[i]).addcdiv_(m, denom, value=-lr / bc1)
        noise = (counter_uniform(seed, t, streams[i], w.shape, offset=offs[i], device=w.device) if stochastic
                 else None)
        new, _ = quantize(w, spec, scale=new_scales[i], noise=noise)
        c_store.view(rows, -1).copy_(pack(new, info.qmin, info.levels, check=False))
        flips.append((new != codes_old).sum())
    return torch.stack(flips) if flips else torch.zeros(0, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------
# The Triton source: plain functions, turned into ``triton.jit`` functions by :func:`_kernels` once per mode
# (compiler or interpreter), each mode in a namespace of its own that holds ``tl`` and the jit versions of these
# helpers (``@triton.jit`` decides between the two when it decorates, from TRITON_INTERPRET; the pattern of
# lowbit.kernels.scaled_mm). So importing this module imports no Triton, and both modes coexist in a process.
# Reductions call ``tl.reduce`` with triton's own combine functions rather than ``tl.sum``/``tl.max``: those
# are jit functions that the interpreter cannot call when triton was imported before TRITON_INTERPRET was set.


def _pcg(v):
    """pcg_hash on uint32 (wrapping): lowbit.rng's H."""
    s = v * 747796405 + 2891336453
    w = ((s >> ((s >> 28) + 4)) ^ s) * 277803737
    return (w >> 22) ^ w


def _uniform(e, k1, k2):
    """lowbit.rng.counter_uniform at element indices ``e`` (int32 or int64, ≥ 0), keys (k1, k2) (uint32)."""
    idx = e.to(tl.int64)
    lo = (idx & 0xFFFFFFFF).to(tl.uint32)
    hi = (idx >> 32).to(tl.uint32)
    x = _pcg(_pcg(lo ^ k1) ^ hi ^ k2)
    return (x >> 8).to(tl.float32) * 5.9604644775390625e-08  # · 2^-24, exact


def _bf16_to_f32(x):
    """Exact widening, by bits (the interpreter's bf16 conversions are not IEEE)."""
    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


def _f32_to_bf16(x):
    """Round to nearest even by bits, exactly as torch (c10::BFloat16); NaN → the quiet NaN 0x7FC0."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(x != x, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


def _round_half_even(y):
    """torch.round (ties to even) with floor only (libdevice's rint is not available to the interpreter)."""
    r = tl.floor(y)
    d = y - r  # exact
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)


def _ld(ptrs, mask, other, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptrs, mask=mask, other=other)
    else:  # a whole tile: unmasked accesses vectorise
        return tl.load(ptrs)


def _st(ptrs, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, value, mask=mask)
    else:
        tl.store(ptrs, value)


def _dqt_tile(
    tile, codes_ptr, grad_ptr, m_ptr, v_ptr, ma_ptr, va_ptr, s_ptr, sn_ptr, coef_ptr, flips_ptr,
    n, K, KB, n_bytes, s_row, s_gs, wk1, wk2, mk1, mk2, vk1, vk2,
    decay, neg_step, inv_sqrt_bc2, w1, b2, w2, eps, qmin, qmax, goff, noff,
    P: tl.constexpr, SB: tl.constexpr, BYTES: tl.constexpr, ALIGNED: tl.constexpr, SCALE: tl.constexpr,
    STATE: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_COEF: tl.constexpr, ZERO_NONFINITE: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """The update of one tile of one tensor: BYTES stored bytes = [BYTES, P] codes. MASKED=False only for a
    whole tile of an ALIGNED tensor (every element valid)."""
    b = tile * BYTES + tl.arange(0, BYTES)  # byte index in the stored codes
    bmask = b < n_bytes
    slot = tl.arange(0, P)
    if ALIGNED:  # K % P == 0: no row padding inside the codes, element = P·byte + slot
        e = b[:, None] * P + slot[None, :]
        valid = e < n
        if SCALE != 0:
            r = e // K
            j = e - r * K
    else:  # rows padded to whole bytes (odd K with packed codes)
        r1 = b // KB
        j = (b - r1 * KB)[:, None] * P + slot[None, :]
        r = r1[:, None] + 0 * j
        valid = bmask[:, None] & (j < K)
        e = r * K + j

    # ---- read: codes, gradient, moments -------------------------------------------------------------------
    byte = _ld(codes_ptr + b, bmask, 0, MASKED)
    if P == 1:
        c_old = byte.to(tl.int32)[:, None]  # int8 codes, sign-extended
    else:
        sh = (slot * SB)[None, :]
        c_old = ((byte.to(tl.int32)[:, None] >> sh) & ((1 << SB) - 1)) + qmin
    g = _ld(grad_ptr + e, valid, 0.0, MASKED)
    if HAS_COEF:
        g = g * tl.load(coef_ptr)
    if ZERO_NONFINITE:
        g = tl.where(tl.abs(g) <= 3.4028234663852886e38, g, 0.0)  # NaN and ±inf → 0
    if STATE == 2:  # 8-bit blockwise (lowbit.optim.blockwise): decode
        blk = e // 256
        qm = _ld(m_ptr + e, valid, 0, MASKED).to(tl.float32)
        m = qm * tl.abs(qm) * (_ld(ma_ptr + blk, valid, 0.0, MASKED) * INV_16129)
        qv = (_ld(v_ptr + e, valid, 0, MASKED).to(tl.float32) + 1.0) * 0.00390625
        sv = qv * qv * _ld(va_ptr + blk, valid, 0.0, MASKED)
        v = sv * sv
    elif STATE == 1:
        m = _bf16_to_f32(_ld(m_ptr + e, valid, 0.0, MASKED))
        v = _bf16_to_f32(_ld(v_ptr + e, valid, 0.0, MASKED))
    else:
        m = _ld(m_ptr + e, valid, 0.0, MASKED)
        v = _ld(v_ptr + e, valid, 0.0, MASKED)

    # ---- AdamW moments (ATen CUDA: lerp = fma(w, end − self, self), addcmul = fma(α, b·c, a)) -------------
    small = w1 < 0.5
    m = tl.fma(tl.where(small, w1, w1 - 1.0), g - m, tl.where(small, m, g))
    v = tl.fma(w2, g * g, v * b2)
    if STATE == 0:
        _st(m_ptr + e, m, valid, MASKED)
        _st(v_ptr + e, v, valid, MASKED)
    elif STATE == 1:
        _st(m_ptr + e, _f32_to_bf16(m), valid, MASKED)
        _st(v_ptr + e, _f32_to_bf16(v), valid, MASKED)
    else:  # re-encode whole 256-value blocks, stochastic rounding in the code domain
        NB: tl.constexpr = BYTES * P // 256
        e2 = tile * (BYTES * P) + tl.arange(0, NB)[:, None] * 256 + tl.arange(0, 256)[None, :]
        pad_ok = e2 < (n + 255) // 256 * 256  # the last block's padding codes are written too (as 0)
        blk2 = tile * NB + tl.arange(0, NB)
        mz = tl.reshape(tl.where(valid, m, 0.0), (NB, 256))
        am = tl.maximum(tl.reduce(tl.abs(mz), 1, tl.standard._elementwise_max), 1e-30)
        rm = tl.math.div_rn(mz, am[:, None])
        sg = tl.where(rm > 0.0, 127.0, tl.where(rm < 0.0, -127.0, 0.0))
        qm2 = tl.floor(sg * tl.math.sqrt_rn(tl.abs(rm)) + _uniform(e2 + noff, mk1, mk2))
        _st(m_ptr + e2, qm2.to(tl.int8), pad_ok, MASKED)
        _st(ma_ptr + blk2, am, blk2 * 256 < n, MASKED)
        sz = tl.math.sqrt_rn(tl.maximum(tl.reshape(tl.where(valid, v, 0.0), (NB, 256)), 0.0))
        av = tl.maximum(tl.reduce(sz, 1, tl.standard._elementwise_max), 1e-30)
        qv2 = tl.floor(256.0 * tl.math.sqrt_rn(tl.math.div_rn(sz, av[:, None])) - 1.0 + _uniform(e2 + noff, vk1, vk2))
        _st(v_ptr + e2, tl.minimum(tl.maximum(qv2, 0.0), 255.0).to(tl.uint8), pad_ok, MASKED)
        _st(va_ptr + blk2, av, blk2 * 256 < n, MASKED)

    # ---- the weight: dequantize, decay, Adam step, round onto the grid ---------------------------------------
    if SCALE == 0:
        d_old = tl.load(s_ptr)
        d_new = tl.load(sn_ptr)
    else:
        si = r * s_row + j // s_gs
        d_old = tl.load(s_ptr + si, mask=valid, other=1.0)
        d_new = tl.load(sn_ptr + si, mask=valid, other=1.0)
    denom = tl.math.sqrt_rn(v) * inv_sqrt_bc2 + eps
    w = (c_old.to(tl.float32) + goff) * d_old
    w = w * decay
    w = tl.fma(neg_step, tl.math.div_rn(m, denom), w)
    y = tl.math.div_rn(w, d_new) + goff
    if STOCHASTIC:
        y = tl.floor(y + _uniform(e + noff, wk1, wk2))
    else:
        y = _round_half_even(y)
    y = y - (goff + goff)
    y = tl.where(y == y, y, 0.0)  # NaN → code 0 (what CUDA's float → int conversion gives)
    c_new = tl.minimum(tl.maximum(y, qmin.to(tl.float32)), qmax.to(tl.float32)).to(tl.int32)
    changed = tl.where(valid & (c_new != c_old), 1, 0)
    total = tl.reduce(tl.reduce(changed, 1, tl.standard._sum_combine), 0, tl.standard._sum_combine)
    tl.atomic_add(flips_ptr, total.to(tl.int64))
    if P == 1:
        _st(codes_ptr + b, tl.reshape(c_new, (BYTES,)).to(tl.int8), bmask, MASKED)
    else:
        u = tl.where(valid, c_new - qmin, 0) << sh
        _st(codes_ptr + b, tl.reduce(u, 1, tl.standard._sum_combine).to(tl.uint8), bmask, MASKED)


def _dqt_tile_any(
    tile, codes_ptr, grad_ptr, m_ptr, v_ptr, ma_ptr, va_ptr, s_ptr, sn_ptr, coef_ptr, flips_ptr,
    n, K, KB, n_bytes, s_row, s_gs, wk1, wk2, mk1, mk2, vk1, vk2,
    decay, neg_step, inv_sqrt_bc2, w1, b2, w2, eps, qmin, qmax, goff, noff,
    P: tl.constexpr, SB: tl.constexpr, BYTES: tl.constexpr, ALIGNED: tl.constexpr, SCALE: tl.constexpr,
    STATE: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_COEF: tl.constexpr, ZERO_NONFINITE: tl.constexpr,
):  # fmt: skip
    """_dqt_tile unmasked for the whole tiles of an aligned tensor (all but its last), masked otherwise."""
    full = False
    if ALIGNED:
        full = (tile + 1) * BYTES <= n_bytes
    if full:
        _dqt_tile(tile, codes_ptr, grad_ptr, m_ptr, v_ptr, ma_ptr, va_ptr, s_ptr, sn_ptr, coef_ptr, flips_ptr,
                  n, K, KB, n_bytes, s_row, s_gs, wk1, wk2, mk1, mk2, vk1, vk2,
                  decay, neg_step, inv_sqrt_bc2, w1, b2, w2, eps, qmin, qmax, goff, noff,
                  P, SB, BYTES, ALIGNED, SCALE, STATE, STOCHASTIC, HAS_COEF, ZERO_NONFINITE, False)  # fmt: skip
    else:
        _dqt_tile(tile, codes_ptr, grad_ptr, m_ptr, v_ptr, ma_ptr, va_ptr, s_ptr, sn_ptr, coef_ptr, flips_ptr,
                  n, K, KB, n_bytes, s_row, s_gs, wk1, wk2, mk1, mk2, vk1, vk2,
                  decay, neg_step, inv_sqrt_bc2, w1, b2, w2, eps, qmin, qmax, goff, noff,
                  P, SB, BYTES, ALIGNED, SCALE, STATE, STOCHASTIC, HAS_COEF, ZERO_NONFINITE, True)  # fmt: skip


def _dqt_step_kernel(
    codes_ptr, grad_ptr, m_ptr, v_ptr, ma_ptr, va_ptr, s_ptr, sn_ptr, coef_ptr, flips_ptr,
    n, K, KB, n_bytes, s_row, s_gs, wk1, wk2, mk1, mk2, vk1, vk2,
    decay, neg_step, inv_sqrt_bc2, w1, b2, w2, eps, qmin, qmax, goff, noff,
    P: tl.constexpr, SB: tl.constexpr, BYTES: tl.constexpr, ALIGNED: tl.constexpr, SCALE: tl.constexpr,
    STATE: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_COEF: tl.constexpr, ZERO_NONFINITE: tl.constexpr,
):  # fmt: skip
    """One tensor, everything passed as arguments (no table): the update-inside-backward path. The noise keys
    arrive as int32 of the same bits."""
    _dqt_tile_any(tl.program_id(0), codes_ptr, grad_ptr, m_ptr, v_ptr, ma_ptr, va_ptr, s_ptr, sn_ptr, coef_ptr,
                  flips_ptr, n, K, KB, n_bytes, s_row, s_gs,
                  wk1.to(tl.uint32, bitcast=True), wk2.to(tl.uint32, bitcast=True),
                  mk1.to(tl.uint32, bitcast=True), mk2.to(tl.uint32, bitcast=True),
                  vk1.to(tl.uint32, bitcast=True), vk2.to(tl.uint32, bitcast=True),
                  decay, neg_step, inv_sqrt_bc2, w1, b2, w2, eps, qmin, qmax, goff, noff,
                  P, SB, BYTES, ALIGNED, SCALE, STATE, STOCHASTIC, HAS_COEF, ZERO_NONFINITE)  # fmt: skip


def _field_ptr(row, f: tl.constexpr, ty: tl.constexpr, ALIGN16: tl.constexpr):
    p = tl.load(row + f).to(tl.pointer_type(ty))
    if ALIGN16:  # lets the unmasked tiles use 16-byte loads and stores
        p = tl.multiple_of(p, 16)
    return p


def _field_f32(row, f: tl.constexpr):
    return tl.load(row + f).to(tl.int32).to(tl.float32, bitcast=True)


def _dqt_step_group_kernel(
    tab_ptr, flips_ptr, n_tensors, w1, b2, w2, eps, qmin, qmax, goff,
    LOG_T: tl.constexpr, NF: tl.constexpr, ALIGN16: tl.constexpr,
    P: tl.constexpr, SB: tl.constexpr, BYTES: tl.constexpr, ALIGNED: tl.constexpr, SCALE: tl.constexpr,
    STATE: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_COEF: tl.constexpr, ZERO_NONFINITE: tl.constexpr,
):  # fmt: skip
    """Many tensors: a program finds its tensor by binary search over the first-tile column of the table (one
    row of NF int64 per tensor: pointers 0–8, noise offset 9, first tile 10, sizes 11–16, noise keys 17–22,
    float32 bits of the per-tensor scalars 23–25), then updates its tile."""
    pid = tl.program_id(0)
    lo = 0
    hi = n_tensors
    for _ in tl.static_range(LOG_T):  # invariant: first_tile[lo] ≤ pid, and pid < first_tile[hi] (or hi = T)
        mid = (lo + hi) // 2
        go = tl.load(tab_ptr + mid * NF + 10) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    row = tab_ptr + lo * NF
    if P == 1:
        codes_ptr = _field_ptr(row, 0, tl.int8, ALIGN16)
    else:
        codes_ptr = _field_ptr(row, 0, tl.uint8, ALIGN16)
    grad_ptr = _field_ptr(row, 1, tl.float32, ALIGN16)
    if STATE == 0:
        m_ptr = _field_ptr(row, 2, tl.float32, ALIGN16)
        v_ptr = _field_ptr(row, 3, tl.float32, ALIGN16)
    elif STATE == 1:
        m_ptr = _field_ptr(row, 2, tl.bfloat16, ALIGN16)
        v_ptr = _field_ptr(row, 3, tl.bfloat16, ALIGN16)
    else:
        m_ptr = _field_ptr(row, 2, tl.int8, ALIGN16)
        v_ptr = _field_ptr(row, 3, tl.uint8, ALIGN16)
    _dqt_tile_any(
        pid - tl.load(row + 10).to(tl.int32), codes_ptr, grad_ptr, m_ptr, v_ptr,
        _field_ptr(row, 4, tl.float32, ALIGN16), _field_ptr(row, 5, tl.float32, ALIGN16),
        _field_ptr(row, 6, tl.float32, False), _field_ptr(row, 7, tl.float32, False),
        _field_ptr(row, 8, tl.float32, False), flips_ptr + lo,
        tl.load(row + 11).to(tl.int32), tl.load(row + 12).to(tl.int32), tl.load(row + 13).to(tl.int32),
        tl.load(row + 14).to(tl.int32), tl.load(row + 15).to(tl.int32), tl.load(row + 16).to(tl.int32),
        tl.load(row + 17).to(tl.uint32), tl.load(row + 18).to(tl.uint32), tl.load(row + 19).to(tl.uint32),
        tl.load(row + 20).to(tl.uint32), tl.load(row + 21).to(tl.uint32), tl.load(row + 22).to(tl.uint32),
        _field_f32(row, 23), _field_f32(row, 24), _field_f32(row, 25), w1, b2, w2, eps, qmin, qmax, goff,
        tl.load(row + 9), P, SB, BYTES, ALIGNED, SCALE, STATE, STOCHASTIC, HAS_COEF, ZERO_NONFINITE,
    )  # fmt: skip


def _noise_kernel(idx_ptr, out_ptr, n, k1, k2, BLOCK: tl.constexpr):
    """counter_uniform at int64 indices (for tests: the kernel's noise, bit for bit)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    idx = tl.load(idx_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, _uniform(idx, k1.to(tl.uint32, bitcast=True), k2.to(tl.uint32, bitcast=True)), mask=mask)


_JIT_FUNCTIONS = ("_pcg", "_uniform", "_bf16_to_f32", "_f32_to_bf16", "_round_half_even", "_ld", "_st",
                  "_dqt_tile", "_dqt_tile_any", "_field_ptr", "_field_f32")  # fmt: skip
# runtime integers that would otherwise be specialised (== 1, % 16) or typed by value: one compilation each
_NOSPEC = {
    "_dqt_step_kernel": ["n", "K", "KB", "n_bytes", "s_row", "s_gs", "wk1", "wk2", "mk1", "mk2", "vk1", "vk2",
                         "qmin", "qmax"],
    "_dqt_step_group_kernel": ["n_tensors", "qmin", "qmax"],
    "_noise_kernel": ["n", "k1", "k2"],
}  # fmt: skip




@functools.cache
def _kernels(interpret: bool) -> types.SimpleNamespace:
    """Import Triton and jit the functions above into a namespace of their own (see the comment above)."""
    if not has_triton():
        raise ModuleNotFoundError("the fused DQT step needs Triton: pip install 'lowbit[triton]' (or dqt.fused=off)")
    import triton
    import triton.language as tl

    if interpret != _interpreting():
        raise RuntimeError("TRITON_INTERPRET changed while the kernels were being built")
    ns = jit_namespace(globals(), (*_JIT_FUNCTIONS, *_NOSPEC), dict(triton=triton, tl=tl,
                       INV_16129=tl.constexpr(INV_16129)), nospec=_NOSPEC)
    return types.SimpleNamespace(
        triton=triton, tensor=ns["_dqt_step_kernel"], group=ns["_dqt_step_group_kernel"], noise=ns["_noise_kernel"]
    )


# ----------------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------------


def interpreted() -> bool:
    """Whether kernels run in the Triton interpreter (``TRITON_INTERPRET=1``: CPU tensors, for tests)."""
    return _interpreting()


def available() -> bool:
    """Whether the fused step can run here: Triton installed and a CUDA device (or the interpreter)."""
    return has_triton() and (torch.cuda.is_available() or _interpreting())


def supports(shape: tuple[int, ...], levels: int, state_dtype: str) -> bool:
    """Whether the kernel takes a tensor of ``shape`` on a grid of ``levels`` with states ``state_dtype``
    (fp32, bf16, 8bit): fewer than 2^31 elements, and for 8-bit states K a multiple of the codes per byte (the
    256-value state blocks must not straddle a padded row end)."""
    if not shape or math.prod(shape) >= _MAX_NUMEL:
        return False
    return state_dtype != "8bit" or shape[-1] % (8 // storage_bits(levels)) == 0


def counter_uniform_triton(seed: int, step: int, stream: int, index: Tensor) -> Tensor:
    """:func:`lowbit.rng.counter_uniform` (``index=``) computed by the kernel's own hash: float32 uniforms at the
    int64 element indices ``index`` (≥ 0, any shape). Equal bit for bit (``tests/kernels/test_dqt_step.py``)."""
    interpret = _interpreting()
    if (index.device.type == "cuda") == interpret:
        raise ValueError(f"counter_uniform_triton: {index.device} tensor with the interpreter {interpret}")
    k1, k2 = counter_key(seed, step, stream)
    idx = index.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(idx.shape, dtype=torch.float32, device=idx.device)
    block = 1024
    with on_device(idx.device):
        _kernels(interpret).noise[(max(1, -(-idx.numel() // block)),)](idx, out, idx.numel(), _i32(k1), _i32(k2),
                                                                        BLOCK=block)  # fmt: skip
    return out.reshape(index.shape)


def dqt_adamw_step_triton(
    codes: list[Tensor], grads: list[Tensor], exp_avg: list[Tensor], exp_avg_sq: list[Tensor],
    exp_avg_absmax: list[Tensor], exp_avg_sq_absmax: list[Tensor], scales: list[Tensor], new_scales: list[Tensor],
    grad_scales: list[Tensor], steps: list[int], weight_decays: list[float], streams: list[int],
    exp_avg_streams: list[int], exp_avg_sq_streams: list[int], lr: float, beta1: float, beta2: float, eps: float,
    seed: int, bits: float, grid: str, granularity: str, group_size: int, stochastic: bool, zero_nonfinite: bool,
    noise_offsets: list[int] | None = None,
) -> Tensor:  # fmt: skip
    """:func:`dqt_adamw_step_reference` in one Triton launch: the one-tensor kernel when T = 1 (all arguments
    passed directly), else the grouped kernel (a table of per-tensor arguments, copied to the device from pinned
    memory without a host sync). Tensors contiguous, on one device; gradients float32; shapes as
    :func:`supports` says."""
    n_t = len(codes)
    if n_t == 0:
        return torch.zeros(0, dtype=torch.int64)
    offs = noise_offsets or [0] * n_t
    if len(offs) != n_t or min(offs) < 0:
        raise ValueError(f"noise_offsets: {n_t} element indices ≥ 0 expected, got {offs}")
    dev = codes[0].device
    interpret = _interpreting()
    if (dev.type == "cuda") == interpret:
        raise ValueError(
            f"the fused DQT step runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1); "
            f"got {dev} tensors with the interpreter {'on' if interpret else 'off'}"
        )
    kern = _kernels(interpret)
    info = _spec(bits, grid, granularity, group_size, stochastic).info
    sb = storage_bits(info.levels)
    per = 8 // sb
    state = _STATE_KINDS.get(exp_avg[0].dtype)
    if state is None:
        raise ValueError(f"exp_avg of dtype {exp_avg[0].dtype}: expected float32, bfloat16 or int8 (8-bit)")
    eight = state == 2
    scale_kind = _SCALE_KINDS[granularity]
    geo = []  # per tensor: n, K, KB, n_bytes, s_row, s_gs
    for i in range(n_t):
        g = grads[i]
        k = g.shape[-1]
        rows = g.numel() // k
        kb = -(-k // per)
        tensors = [codes[i], g, exp_avg[i], exp_avg_sq[i], scales[i], new_scales[i]]
        if not (
            all(t.is_contiguous() and t.device == dev for t in tensors)
            and g.dtype == torch.float32
            and codes[i].numel() == rows * kb
            and supports(tuple(g.shape), info.levels, "8bit" if eight else "")
        ):
            raise ValueError(f"tensor {i}: the fused DQT step needs contiguous tensors on {dev}, a float32 gradient "
                             f"and a shape it supports; got codes {tuple(codes[i].shape)}, gradient "
                             f"{tuple(g.shape)} {g.dtype}")  # fmt: skip
        s_row, s_gs = ((0, k), (1, k), (k // group_size, group_size))[scale_kind]
        geo.append((rows * k, k, kb, rows * kb, s_row, s_gs))
    block, warps = TILES[state]
    if interpret and INTERPRET_BLOCK:
        block = INTERPRET_BLOCK
    tile_bytes = block // per
    h = [_hyper(lr, beta1, beta2, eps, steps[i], weight_decays[i]) for i in range(n_t)]
    keys = []
    for i in range(n_t):
        k6 = counter_key(seed, steps[i], streams[i]) if stochastic else (0, 0)
        k6 += counter_key(seed, steps[i], exp_avg_streams[i]) if eight else (0, 0)
        k6 += counter_key(seed, steps[i], exp_avg_sq_streams[i]) if eight else (0, 0)
        keys.append(k6)
    dummy = scales[0]  # stands for the pointers a configuration does not read
    aux = [(exp_avg_absmax[i] if eight else dummy, exp_avg_sq_absmax[i] if eight else dummy,
            grad_scales[i] if grad_scales else dummy) for i in range(n_t)]  # fmt: skip
    common = dict(P=per, SB=sb, BYTES=tile_bytes, ALIGNED=all(g[1] % per == 0 for g in geo), SCALE=scale_kind,
                  STATE=state, STOCHASTIC=stochastic, HAS_COEF=bool(grad_scales), ZERO_NONFINITE=zero_nonfinite,
                  num_warps=warps, enable_fp_fusion=False)  # fmt: skip
    flips = torch.zeros(n_t, dtype=torch.int64, device=dev)
    h0, goff = h[0], float(info.offset)
    with on_device(dev):
        if n_t == 1:
            LAUNCHES["tensor"] += 1
            kern.tensor[(-(-geo[0][3] // tile_bytes),)](
                codes[0], grads[0], exp_avg[0], exp_avg_sq[0], aux[0][0], aux[0][1], scales[0], new_scales[0],
                aux[0][2], flips, *geo[0], *(_i32(x) for x in keys[0]),
                h0["decay"], h0["neg_step"], h0["inv_sqrt_bc2"], h0["w1"], h0["b2"], h0["w2"], h0["eps"],
                info.qmin, info.qmax, goff, offs[0], **common,
            )  # fmt: skip
            return flips
        table: list[int] = []
        first = 0
        align16 = True
        for i in range(n_t):
            ptrs = [codes[i], grads[i], exp_avg[i], exp_avg_sq[i], aux[i][0], aux[i][1], scales[i], new_scales[i],
                    aux[i][2]]  # fmt: skip
            align16 &= all(p.data_ptr() % 16 == 0 for p in ptrs[:6])
            table += [p.data_ptr() for p in ptrs] + [offs[i], first, *geo[i], *keys[i]]
            table += [_f32_bits(h[i]["decay"]), _f32_bits(h[i]["neg_step"]), _f32_bits(h[i]["inv_sqrt_bc2"])]
            first += -(-geo[i][3] // tile_bytes)
        tab = torch.tensor(table, dtype=torch.int64)
        if dev.type == "cuda":  # pinned + non_blocking: no host sync; the caching host allocator keeps the block
            tab = tab.pin_memory().to(dev, non_blocking=True)  # alive until the copy is done
        LAUNCHES["group"] += 1
        kern.group[(first,)](
            tab, flips, n_t, h0["w1"], h0["b2"], h0["w2"], h0["eps"], info.qmin, info.qmax, goff,
            LOG_T=n_t.bit_length(), NF=_NF, ALIGN16=align16, **common,
        )  # fmt: skip
    return flips


# ----------------------------------------------------------------------------------------------------------
# custom op
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "lowbit::dqt_adamw_step", mutates_args=("codes", "exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")
)
def dqt_adamw_step(
    codes: list[Tensor], grads: list[Tensor], exp_avg: list[Tensor], exp_avg_sq: list[Tensor],
    exp_avg_absmax: list[Tensor], exp_avg_sq_absmax: list[Tensor], scales: list[Tensor], new_scales: list[Tensor],
    grad_scales: list[Tensor], steps: list[int], weight_decays: list[float], streams: list[int],
    exp_avg_streams: list[int], exp_avg_sq_streams: list[int], lr: float, beta1: float, beta2: float, eps: float,
    seed: int, bits: float, grid: str, granularity: str, group_size: int, stochastic: bool, zero_nonfinite: bool,
    noise_offsets: list[int] | None = None,
) -> Tensor:  # fmt: skip
    """``torch.ops.lowbit.dqt_adamw_step``: the Triton kernel for CUDA tensors when Triton is installed (and
    the tensors are ones it takes), the torch reference otherwise; arguments and result as
    :func:`dqt_adamw_step_reference`."""
    args = (codes, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, scales, new_scales, grad_scales,
            steps, weight_decays, streams, exp_avg_streams, exp_avg_sq_streams, lr, beta1, beta2, eps, seed, bits,
            grid, granularity, group_size, stochastic, zero_nonfinite, noise_offsets)  # fmt: skip
    eight = bool(codes) and exp_avg[0].dtype == torch.int8
    levels = _spec(bits, grid, granularity, group_size, stochastic).info.levels
    if (codes and codes[0].is_cuda and has_triton() and not _interpreting()
            and all(supports(tuple(g.shape), levels, "8bit" if eight else "") for g in grads)):  # fmt: skip
        return dqt_adamw_step_triton(*args)
    return dqt_adamw_step_reference(*args)


@dqt_adamw_step.register_fake
def _(codes, grads, *args: Any) -> Tensor:
    return torch.empty(len(codes), dtype=torch.int64, device=codes[0].device if codes else "cpu")
