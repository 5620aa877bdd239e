"""Decode GEMV / small-batch GEMM straight from packed low-bit weights (W1.58, W2, W4, W8 × A16).

    lowbit_gemv(x, codes, scale, bias=None, *, storage, zero, deterministic=False, backend="auto")
        y[b, n] = Σ_k x[b, k] · (u[n, k] − zero) · Δ[n, k // g]  (+ bias[n])

``x`` (…, K) bf16 / fp16 / fp32; ``codes`` the weight (N, K) as :mod:`lowbit.quant.packing` stores it, row by
row along K: ``storage`` ``"1bit"`` (8 per byte), ``"2bit"`` (4 per byte: ternary, 2-bit), ``"4bit"`` (2 per
byte), ``"int8"`` (the signed code itself) or ``"base3"`` (5 ternary digits per byte); ``u`` is the stored
digit (the unsigned code ``code − qmin`` of the packed storages, the signed code for int8). ``zero`` maps the
digit onto the grid: a value (code + offset)·Δ is (u − zero)·Δ with ``zero = −(qmin + offset)`` for packed
storages and ``zero = −offset`` for int8 (:func:`grid_zero`). ``scale`` Δ is float32 of shape () (per
tensor), (N, 1) (per row) or (N, K/g) (per group of g along K). Output: (…, N) in x's dtype.

**The reference** (:func:`lowbit_gemv_ref`, same signature) unpacks with :mod:`lowbit.quant.packing`,
dequantizes (u − zero)·Δ and multiplies in float32 (float64 for float64 x: the exactness tests).

**The word kernel** (``_gemv_words_kernel``; every bit storage with per-tensor or per-row steps whose rows are a
whole number of 4-byte words — what lowbit's packed models hold): the rows are read as little-endian int32 words,
whose digits are consecutive codes, and each digit becomes a float where it lies in the word (one LOP3 and one FMA
per code, exact; the kernel's comment has the bit arithmetic). Batch 1 accumulates with FMAs against x's chunk,
loaded once and split into digit planes in registers; batch 2–16 runs one tensor-core dot per digit plane. The
next chunk's words are prefetched into registers. Configurations: :data:`WORDS_FMA_CONFIGS` /
:data:`WORDS_DOT_CONFIGS` (from ``benchmarks/sweep_gemv.py`` on an H100), autotuned as CUDA graphs.

**The byte kernel** (``_lowbit_gemv_kernel``: base-3 codes, per-group steps, ragged rows). One program owns BLOCK_N
output rows × one K slice (split-K: SPLIT_K slices, so that a batch-1 GEMV with few row tiles still fills 132 SMs),
for a tile of up to 16 rows of x. It streams the packed bytes of its rows, BLOCK_K codes at a time, and unpacks
them in registers *digit plane by digit plane*: for digit p of every byte, ``u = (byte >> bits·p) & mask`` (base 3:
repeated ``// 3``, ``% 3``) belongs to code k = PER·byte + p, so it meets the strided activations x[:, PER·j + p] —
no reshuffling of registers, and x (≤ 16 × K × 2 bytes) stays in L1/L2. The digit becomes a float without an
int→float conversion: the bits of (2u) OR-ed into 2²² read as the float 2²² + u, and subtracting 2²² + zero gives u
− zero exactly (zero is a multiple of ½, and 2²² has ulp ½). Accumulation is float32:

* batch 1 (``USE_DOT=False``): fp32 FMAs into a (BLOCK_N, BLOCK_KB) accumulator, reduced once at the end;
* batch 2–16 (``USE_DOT=True``): ``tl.dot`` of the x tile (16 rows, zero-padded) with the dequantized digit
  plane in x's dtype (bf16/fp16: every (u − zero) of a ≤ 8-bit grid is exact there; fp32 x: an IEEE fp32
  dot, no TF32) — tensor cores do the multiply-adds, the ALUs only unpack.

Δ per row is applied once to the finished sum, Δ per group to each weight before the multiply (a gather;
grouped weights are the slow path — lowbit's recipes use per-tensor or per-row steps). Split-K partial sums
go either into a zeroed float32 buffer with ``atomic_add`` (default: order-dependent in the last bits), or,
with ``deterministic=True``, into one slice per split summed afterwards in a fixed order (two passes).
Bias is added in float32 in the epilogue (SPLIT_K = 1) or after the reduction.

**Configurations.** On a GPU the kernel is autotuned over :data:`GPU_CONFIGS` (BLOCK_N 64–256, BLOCK_K
128–512 codes, SPLIT_K 1–16, 4–8 warps, 2–4 stages; H100-oriented, see the benchmark
``benchmarks/bench_decode.py``); keyed by (B, N, K, layout), and by dtypes; ``LOWBIT_AUTOTUNE=0`` (the kernel
tests) runs :data:`DEFAULT_GPU_CONFIG` instead. Under ``TRITON_INTERPRET=1`` (the CPU tests) it runs
:data:`INTERPRET_CONFIG`, small blocks with SPLIT_K = 2. The interpreter's bf16 arithmetic
is wrong (it truncates), so there the dot runs in float32 on the loaded-and-converted operands; the compiled
kernel's bf16/fp16 dot is checked by the ``needs_cuda`` tests.

**In a model.** :func:`packed_linear_kernel` is a ``PackedLinear.kernel`` hook (:func:`install` sets it on
every supported layer). It computes ``layer.prepare_input(x)`` first — identity for weight-only layers,
the online Hadamard rotation for QuEST weight-only, and **as a stopgap** the layer's torch activation
fake-quantizer for activation-quantized layers (BitNet / DQT A8, QuEST W·A): those then run the GEMV on
dequantized activations in bf16/fp32, which is what the torch path computes, but not yet an integer
A8 kernel. Inputs of more than ``max_rows`` rows (prefill) go to ``layer.reference_forward``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lowbit.kernels._triton import has_triton, interpreting, jit_namespace, launch_config
from lowbit.quant.packing import unpack, unpack_base3

__all__ = [
    "STORAGES",
    "grid_zero",
    "install",
    "lowbit_gemv",
    "lowbit_gemv_ref",
    "packed_linear_kernel",
    "supports",
]

#: Weight storages the kernel reads (the names of :data:`lowbit.export.packed.STORAGES`).
STORAGES = ("1bit", "2bit", "4bit", "int8", "base3")
#: Activation (and output) dtypes.
X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BACKENDS = ("auto", "triton", "ref")
#: Rows of x one program handles (the dot's M; tl.dot needs ≥ 16).
BLOCK_B = 16
#: Largest SPLIT_K of any configuration (the deterministic workspace has this many slices).
SPLIT_MAX = 16

triton = tl = None  # placeholders: the real modules live in _kernels()' namespace

_BITS = {"1bit": 1, "2bit": 2, "4bit": 4, "int8": 8, "base3": 0}


def grid_zero(storage: str, qmin: int, offset: float) -> float:
    """``zero`` such that (u − zero)·Δ = (code + offset)·Δ for digits u stored in ``storage``."""
    if storage not in STORAGES:
        raise ValueError(f"lowbit_gemv: storage must be one of {STORAGES}, got {storage!r}")
    return -float(offset) if storage == "int8" else -(float(qmin) + float(offset))


def _per_byte(storage: str) -> int:
    return 5 if storage == "base3" else 8 // _BITS[storage]


def _check(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, storage: str,
           zero: float) -> tuple[int, int, int]:
    """(N, K, groups) after validating shapes and dtypes."""
    if storage not in STORAGES:
        raise ValueError(f"lowbit_gemv: storage must be one of {STORAGES}, got {storage!r}")
    if x.dim() != 2:
        raise ValueError(f"lowbit_gemv: x must be 2-D (B, K) here, got {tuple(x.shape)}")
    k = x.shape[1]
    if codes.dim() != 2:
        raise ValueError(f"lowbit_gemv: codes must be 2-D (N, K/p), got {tuple(codes.shape)}")
    want = torch.int8 if storage == "int8" else torch.uint8
    if codes.dtype != want:
        raise TypeError(f"lowbit_gemv: {storage} codes are {want}, got {codes.dtype}")
    n = codes.shape[0]
    kb = -(-k // _per_byte(storage))
    if codes.shape[1] != kb:
        raise ValueError(f"lowbit_gemv: {storage} codes of K={k} have {kb} bytes per row, got {codes.shape[1]}")
    if scale.dtype != torch.float32:
        raise TypeError(f"lowbit_gemv: scale must be float32, got {scale.dtype}")
    if scale.dim() == 0:
        groups = 1
    elif scale.dim() == 2 and scale.shape[0] == n and scale.shape[1] >= 1 and k % scale.shape[1] == 0:
        groups = scale.shape[1]
    else:
        raise ValueError(f"lowbit_gemv: scale must be (), ({n}, 1) or ({n}, K/g) with g dividing K={k}, "
                         f"got {tuple(scale.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"lowbit_gemv: bias must have shape ({n},), got {tuple(bias.shape)}")
    if zero * 2 != round(zero * 2) or abs(zero) > 256:
        raise ValueError(f"lowbit_gemv: zero must be a multiple of 1/2 in [-256, 256], got {zero}")
    return n, k, groups


def _row_scale(scale: torch.Tensor, n: int) -> torch.Tensor:
    """Δ as (N, G) float32 (a per-tensor step broadcast, without a copy)."""
    return scale.reshape(1, 1).expand(n, 1) if scale.dim() == 0 else scale


def lowbit_gemv_ref(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                    storage: str, zero: float, deterministic: bool = False, backend: str = "ref") -> torch.Tensor:
    """Pure torch: unpack with :mod:`lowbit.quant.packing`, W = (u − zero)·Δ, y = x·Wᵀ (+ bias), computed in
    float32 (float64 when x is float64), returned in x's dtype. ``deterministic``/``backend``: ignored (same
    signature as :func:`lowbit_gemv`)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    n, k, groups = _check(x2, codes, scale, bias, storage, zero)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if storage == "base3":
        u = unpack_base3(codes, k, qmin=0)
    elif storage == "int8":
        u = unpack(codes, -128, 256, k)  # the signed code itself
    else:
        u = unpack(codes, 0, 1 << _BITS[storage], k)  # the digits u = code − qmin, 0 ≤ u < 2^bits
    s = _row_scale(scale, n).to(acc)
    w = (u.to(acc) - zero).reshape(n, groups, k // groups) * s[:, :, None]  # (N, G, g)
    y = x2.to(acc) @ w.reshape(n, k).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).reshape(*lead, n)


# ----------------------------------------------------------------------------------------------------------
# the Triton kernel (plain functions, jitted on first use into a namespace of their own: importing this
# module imports no Triton; see lowbit.kernels._triton)
# ----------------------------------------------------------------------------------------------------------

#: The one configuration under TRITON_INTERPRET=1: small blocks, two K slices (exercises split-K).
INTERPRET_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2, "num_warps": 4, "num_stages": 2}

#: H100 decode configurations (BLOCK_N, BLOCK_K codes, SPLIT_K, num_warps, num_stages). A batch-1 GEMV of
#: 4096×11008 ternary weights is ~11 MB: ~4 µs at 3 TB/s, so the kernel is bound by the issue rate of the
#: unpack as much as by memory; larger BLOCK_K amortises the per-chunk address math, SPLIT_K fills the SMs
#: when N/BLOCK_N row tiles are fewer than ~2×132.
GPU_CONFIGS = (
    (64, 256, 1, 4, 3),
    (64, 256, 2, 4, 3),
    (64, 512, 4, 4, 2),
    (64, 128, 8, 4, 4),
    (128, 256, 1, 8, 3),
    (128, 256, 2, 4, 3),
    (128, 512, 4, 8, 2),
    (128, 128, 16, 4, 4),
    (256, 128, 2, 8, 3),
    (256, 256, 1, 8, 2),
    # one kernel, no split-K workspace (see _workspace): narrow row tiles give 344–688 programs at N = 11008
    (32, 512, 1, 4, 3),
    (16, 512, 1, 4, 3),
    (32, 1024, 1, 8, 2),
)
#: The one GPU configuration with LOWBIT_AUTOTUNE=0: GPU_CONFIGS' (64, 128, 8, 4, 4), small blocks that fill the
#: SMs at any N through split-K (and exercise its reduction); of the middle entries it leaves shared memory the
#: most room (≤ 158 KB of 227 for every storage, dtype, batch and grouping in the sm_90a compile; (64, 256, 2)
#: needs 224 KB for grouped int8 × fp32).
DEFAULT_GPU_CONFIG = {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 8, "num_warps": 4, "num_stages": 4}

#: The word kernel (bit storages 1/2/4/8 with per-tensor or per-row steps, rows a whole number of int32 words):
#: (BLOCK_N, BLOCK_W words, SPLIT_K, num_warps, num_stages). Batch 1 (FMA): few rows per program, a long stretch
#: of each row — many programs (N / BLOCK_N) and 16-byte loads, no split-K pass where N fills the SMs.
WORDS_FMA_CONFIGS = (
    (8, 256, 1, 4, 1),  # 2-bit (H100 sweep: 11.6–11.8 µs at 4096 → 11008 and 11008 → 4096)
    (8, 128, 1, 2, 1),
    (16, 128, 1, 4, 1),
    (16, 64, 1, 2, 1),
    (32, 64, 1, 4, 1),  # 4- and 8-bit (13.3 and 19.4 µs at 4096 → 11008)
    (32, 32, 1, 2, 1),
    (4, 256, 1, 2, 1),
    (8, 64, 1, 1, 1),
    (16, 64, 2, 2, 1),  # split-K for few rows
    (32, 64, 2, 4, 1),
)
#: Batch 2–16 (tensor cores, one dot per digit plane: the batch is the dot's N = 16; BLOCK_N ≥ 64 gives
#: Hopper's warpgroup MMA).
WORDS_DOT_CONFIGS = (
    (16, 32, 1, 2, 1),  # few rows per program, no split-K: enough programs at N = 2048 without the split-K pass
    (32, 32, 1, 2, 1),
    (32, 16, 1, 4, 1),
    (64, 16, 1, 4, 1),
    (64, 32, 1, 4, 1),
    (128, 16, 1, 8, 1),
    (128, 32, 1, 8, 1),
    (64, 16, 2, 4, 1),
    (64, 32, 2, 4, 1),
    (64, 16, 4, 4, 1),
    (128, 32, 4, 8, 1),
)
WORDS_INTERPRET_CONFIG = {"BLOCK_N": 16, "BLOCK_W": 4, "SPLIT_K": 2, "num_warps": 4, "num_stages": 2}
WORDS_DEFAULT_GPU_CONFIG = {"BLOCK_N": 64, "BLOCK_W": 16, "SPLIT_K": 2, "num_warps": 4, "num_stages": 1}


def _to_float(u, zero):
    # u (int32, 0 ≤ u < 2²¹) → float32 u − zero, exactly: the bits 0x4A800000 | 2u are the float 2²² + u
    # (ulp ½ at 2²²), and 2²² + zero is exact for zero a multiple of ½ — no int→float conversion instruction
    f = ((u << 1) | 0x4A800000).to(tl.float32, bitcast=True)
    return f - (4194304.0 + zero)


def _k_slice(L, pid_k, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    # [lo, hi) of a row of L units that K slice pid_k of SPLIT_K reads: whole chunks of BLOCK
    per = ((L + SPLIT_K - 1) // SPLIT_K + BLOCK - 1) // BLOCK * BLOCK
    lo = pid_k * per
    return lo, min(lo + per, L)


def _epilogue(y, offs_b, offs_n, b_ok, n_ok, bias_ptr, out_ptr, ws_ptr, pid_k, N, stride_ob, stride_ws,
              HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, ATOMIC: tl.constexpr):  # fmt: skip
    # y (rows of x, BLOCK_N) float32, steps applied: + bias and the output (SPLIT_K = 1), or this K slice's
    # partial sums into the workspace (added atomically, or one slice each for the fixed-order sum)
    ok = b_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        o = out_ptr + offs_b[:, None].to(tl.int64) * stride_ob + offs_n[None, :]
        tl.store(o, y.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        wsp = ws_ptr + pid_k * stride_ws + offs_b[:, None].to(tl.int64) * N + offs_n[None, :]
        if ATOMIC:
            tl.atomic_add(wsp, y, mask=ok)
        else:
            tl.store(wsp, y, mask=ok)


def _lowbit_gemv_kernel(
    x_ptr, codes_ptr, scale_ptr, bias_ptr, out_ptr, ws_ptr,
    B, N, K, KB, GROUP, zero,
    stride_xb, stride_cn, stride_sn, stride_sg, stride_ob, stride_ws,
    BITS: tl.constexpr, BASE3: tl.constexpr, PER: tl.constexpr, SIGNED: tl.constexpr,
    GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_F32: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2)
    # PER digits per byte; a chunk is BLOCK_KB = BLOCK_K / KB_DIV bytes (the launcher divides; a power of two:
    # base 3 has KB_DIV = 4, so its chunk holds 5/4·BLOCK_K codes). MASK: one bit-packed digit.
    MASK = (1 << BITS) - 1

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    n_ok = offs_n < N
    b_ok = offs_b < B
    # this program's slice of the packed row: whole chunks, [kb_lo, kb_hi)
    kb_lo, kb_hi = _k_slice(KB, pid_k, SPLIT_K, BLOCK_KB)
    c_rows = codes_ptr + offs_n[:, None].to(tl.int64) * stride_cn
    x_rows = x_ptr + offs_b[:, None].to(tl.int64) * stride_xb
    if USE_DOT:
        acc = tl.full((BLOCK_B, BLOCK_N), 0.0, dtype=tl.float32)
    else:
        acc2 = tl.full((BLOCK_N, BLOCK_KB), 0.0, dtype=tl.float32)
    for kb0 in range(kb_lo, kb_hi, BLOCK_KB):
        offs_kb = kb0 + tl.arange(0, BLOCK_KB)
        byte = tl.load(c_rows + offs_kb[None, :], mask=n_ok[:, None] & (offs_kb[None, :] < kb_hi), other=0)
        byte = byte.to(tl.int32)  # uint8 → 0…255; int8 storage: the signed code c → c + 128 (zero shifted to match)
        if SIGNED:
            byte = byte + 128
        for p in tl.static_range(PER):
            if BASE3:
                u = byte % 3
                byte = byte // 3
            else:
                u = (byte >> (BITS * p)) & MASK
            w = _to_float(u, zero)  # (BLOCK_N, BLOCK_KB) = u − zero
            offs_k = offs_kb * PER + p  # the code index of digit p of each byte
            if GROUPED:
                s = tl.load(scale_ptr + offs_n[:, None] * stride_sn + (offs_k[None, :] // GROUP) * stride_sg,
                            mask=n_ok[:, None] & (offs_k[None, :] < K), other=0.0)
                w = w * s
            if USE_DOT:
                xv = tl.load(x_rows + offs_k[None, :], mask=b_ok[:, None] & (offs_k[None, :] < K), other=0.0)
                if DOT_F32:
                    acc = tl.dot(xv.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xv, tl.trans(w.to(xv.dtype)), acc)
            else:
                xv = tl.load(x_ptr + pid_b * BLOCK_B * stride_xb + offs_k, mask=offs_k < K, other=0.0)
                acc2 += w * xv.to(tl.float32)[None, :]
    if USE_DOT:
        y = acc
    else:
        y = tl.sum(acc2, axis=1)[None, :]  # (1, BLOCK_N): batch row pid_b
        offs_b = pid_b * BLOCK_B + tl.arange(0, 1)
        b_ok = offs_b < B
    if not GROUPED:
        y = y * tl.load(scale_ptr + offs_n * stride_sn, mask=n_ok, other=0.0)[None, :]
    _epilogue(y, offs_b, offs_n, b_ok, n_ok, bias_ptr, out_ptr, ws_ptr, pid_k, N, stride_ob, stride_ws,
              HAS_BIAS, SPLIT_K, ATOMIC)


def _digit(word, Q: tl.constexpr, BITS: tl.constexpr, magic, zero):
    # u − zero of digit Q of every int32 word, float32, exactly (the word kernel's comment says how)
    DH: tl.constexpr = 16 // BITS
    J: tl.constexpr = Q % DH
    if Q < DH:
        half = word << 1
    else:
        half = word >> 15
    f = ((half & (((1 << BITS) - 1) << (BITS * J + 1))) | magic).to(tl.float32, bitcast=True)
    return f * (1.0 / (1 << (BITS * J + 1))) - ((4194304.0 / (1 << (BITS * J))) + zero)


def _plane(x, Q: tl.constexpr, D: tl.constexpr):
    # x (R, W, D) → its plane q = Q, (R, W): halves the last dimension by splitting even/odd entries, Q's bits
    # from the lowest (each split is a register renaming when the last dimension lies within a thread)
    if D == 1:
        return tl.reshape(x, (x.shape[0], x.shape[1]))
    else:
        even, odd = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], D // 2, 2)))
        if Q % 2 == 0:
            return _plane(even, Q // 2, D // 2)
        else:
            return _plane(odd, Q // 2, D // 2)


def _gemv_words_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, ws_ptr,
    B, N, K, KW, zero, magic,
    stride_xb, stride_wn, stride_sn, stride_ob, stride_ws,
    BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_F32: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    # The packed rows read as little-endian int32 words: digit q of word w (bits [BITS·q, BITS·q + BITS)) is code
    # D·w + q, D = 32 / BITS — packing's bit order makes a word's digits consecutive codes. A word is unpacked in
    # two 16-bit halves, each moved up one bit (word << 1, word >> 15); digit j of a half then sits at bits
    # sh = BITS·j + 1 … and is turned into a float *where it lies*: (half & (MASK << sh)) | magic, magic = bits of
    # 2²³ (a runtime argument, so that the AND and the OR are one LOP3), is the float 2²³ + 2^sh·u, and
    # 2^-sh·that − (2^(22 − BITS·j) + zero) is u − zero, exactly (one FMA; every term a multiple of ½ below 2²³).
    # The activations of a chunk are one contiguous (rows, BLOCK_W, D) load, split into the D digit planes in
    # registers (SPLIT_X); the next chunk's words are loaded before this chunk is unpacked (a register prefetch).
    D: tl.constexpr = 32 // BITS
    XR: tl.constexpr = BLOCK_B if USE_DOT else 1  # rows of x per program
    # x's chunk loaded whole and split into planes in registers (the FMA path; with dots only for 2-bit codes: at
    # 4 and 8 planes Triton 3.6 fails to lower the split planes as dot operands), else one strided load per plane
    SPLIT_X: tl.constexpr = (not USE_DOT) or D == 16
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = pid_b * XR + tl.arange(0, XR)
    n_ok = offs_n < N
    b_ok = offs_b < B
    kw_lo, kw_hi = _k_slice(KW, pid_k, SPLIT_K, BLOCK_W)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    x_rows = x_ptr + offs_b.to(tl.int64) * stride_xb
    offs_d = tl.arange(0, D)
    if USE_DOT:
        acc = tl.full((BLOCK_N, XR), 0.0, dtype=tl.float32)
    else:
        acc2 = tl.full((BLOCK_N, BLOCK_W), 0.0, dtype=tl.float32)
    offs_w = kw_lo + tl.arange(0, BLOCK_W)
    nxt = tl.load(w_rows + offs_w[None, :], mask=n_ok[:, None] & (offs_w[None, :] < kw_hi), other=0)
    for w0 in range(kw_lo, kw_hi, BLOCK_W):
        word = nxt
        offs_w = w0 + tl.arange(0, BLOCK_W)
        nxt = tl.load(w_rows + BLOCK_W + offs_w[None, :], mask=n_ok[:, None] & (offs_w[None, :] + BLOCK_W < kw_hi),
                      other=0)
        if SPLIT_X:
            offs_k = offs_w[:, None] * D + offs_d[None, :]  # (BLOCK_W, D) code indices of the chunk
            x3 = tl.load(x_rows[:, None, None] + offs_k[None, :, :],
                         mask=b_ok[:, None, None] & (offs_k < K)[None, :, :], other=0.0)  # (XR, BLOCK_W, D)
        if SIGNED:  # int8 storage: the signed code c → the digit c + 128 (flip each byte's top bit)
            word = word ^ -2139062144  # 0x80808080 as int32
        for q in tl.static_range(D):  # digit plane by digit plane: u − zero of code D·w + q meets x's plane q
            wq = _digit(word, q, BITS, magic, zero)  # (BLOCK_N, BLOCK_W)
            if SPLIT_X:
                xq = _plane(x3, q, D)  # (XR, BLOCK_W)
            else:
                offs_q = offs_w * D + q
                xq = tl.load(x_rows[:, None] + offs_q[None, :], mask=b_ok[:, None] & (offs_q < K)[None, :], other=0.0)
            if USE_DOT:
                if DOT_F32:
                    acc = tl.dot(wq, tl.trans(xq.to(tl.float32)), acc, input_precision="ieee")
                else:
                    acc = tl.dot(wq.to(xq.dtype), tl.trans(xq), acc)
            else:
                acc2 += wq * xq.to(tl.float32)
    if USE_DOT:
        y = acc  # (BLOCK_N, XR)
    else:
        y = tl.sum(acc2, axis=1)[:, None]  # (BLOCK_N, 1): batch row pid_b
    y = y * tl.load(scale_ptr + offs_n * stride_sn, mask=n_ok, other=0.0)[:, None]
    _epilogue(tl.trans(y), offs_b, offs_n, b_ok, n_ok, bias_ptr, out_ptr, ws_ptr, pid_k, N, stride_ob, stride_ws,
              HAS_BIAS, SPLIT_K, ATOMIC)


_JIT_FUNCTIONS = ("_to_float", "_k_slice", "_epilogue", "_lowbit_gemv_kernel", "_digit", "_plane", "_gemv_words_kernel")


def _split_k_hook(nargs: dict) -> None:
    """Pre-hook of the autotuned split-K configurations (SPLIT_K > 1): zero the atomic workspace — and while
    configurations are being timed (``_TUNING``), also run the pass the launcher adds after a split-K kernel
    (partials → output), so that the autotuner compares what a call costs in all, not the kernel alone (timed
    alone, split-K configurations looked ≈ 2 µs cheaper than they are: the memset and the conversion are two
    more kernels per call)."""
    ws, out = nargs["ws_ptr"], nargs["out_ptr"]
    if nargs["ATOMIC"]:
        ws.zero_()
    if _TUNING:
        y = ws if nargs["ATOMIC"] else ws[: nargs["SPLIT_K"]].sum(0)
        if nargs["HAS_BIAS"]:
            y = y + nargs["bias_ptr"].float()
        out.copy_(y.view(out.shape))


def _graph_bench(kernel_call, quantiles):
    """The autotuner's timing: each configuration replayed as a CUDA graph (timed launch by launch, a µs-scale
    kernel measures its launch; what triton.autotune's deprecated ``use_cuda_graph=True`` did)."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(kernel_call, rep=100, quantiles=quantiles)


@dataclass(frozen=True)
class _Kernels:
    kernel: object  # jitted, explicit config
    words: object  # the word kernel, jitted
    triton: object

    @functools.cache  # noqa: B019 — one per (mode, bytes-per-chunk divisor); the instance lives forever
    def tuned(self, kb_div: int) -> object:
        """The kernel autotuned over GPU_CONFIGS, BLOCK_K codes → BLOCK_KB = BLOCK_K / kb_div bytes."""
        configs = [self.triton.Config({"BLOCK_N": bn, "BLOCK_KB": max(16, bk // kb_div), "SPLIT_K": sk},
                                      num_warps=w, num_stages=st, pre_hook=_split_k_hook if sk > 1 else None)
                   for bn, bk, sk, w, st in GPU_CONFIGS]
        key = ["B", "N", "K", "GROUP", "BITS", "BASE3", "GROUPED", "HAS_BIAS", "USE_DOT", "ATOMIC"]
        tune = self.triton.autotune(configs=configs, key=key, do_bench=_graph_bench)
        return tune(self.kernel)

    @functools.cache  # noqa: B019
    def tuned_words(self, use_dot: bool) -> object:
        """The word kernel autotuned over WORDS_DOT_CONFIGS (batch > 1) or WORDS_FMA_CONFIGS (batch 1)."""
        table = WORDS_DOT_CONFIGS if use_dot else WORDS_FMA_CONFIGS
        configs = [self.triton.Config({"BLOCK_N": bn, "BLOCK_W": bw, "SPLIT_K": sk}, num_warps=w, num_stages=st,
                                      pre_hook=_split_k_hook if sk > 1 else None)
                   for bn, bw, sk, w, st in table]
        key = ["B", "N", "K", "BITS", "HAS_BIAS", "USE_DOT", "ATOMIC"]
        tune = self.triton.autotune(configs=configs, key=key, do_bench=_graph_bench)
        return tune(self.words)


@functools.cache
def _kernels(interpret: bool) -> _Kernels:
    if not has_triton():
        raise ModuleNotFoundError("lowbit_gemv backend='triton' needs Triton: pip install 'lowbit[triton]' "
                                  "(triton>=3.6), or use backend='ref'")
    import triton
    import triton.language as tl

    if interpret != interpreting():
        raise RuntimeError("TRITON_INTERPRET changed while the kernels were being built")
    ns = jit_namespace(globals(), _JIT_FUNCTIONS, dict(triton=triton, tl=tl),
                       nospec={"_lowbit_gemv_kernel": ("zero",), "_gemv_words_kernel": ("zero", "magic")})
    return _Kernels(ns["_lowbit_gemv_kernel"], ns["_gemv_words_kernel"], triton)


#: SPLIT_K of the autotuner's choice per launch signature, recorded after the first autotuned launch (the
#: autotuner keeps its choice for the process): a signature tuned to SPLIT_K = 1 gets no zeroed workspace.
_TUNED_SPLIT: dict[tuple, int] = {}
#: True during an autotuned launch whose signature has not been tuned yet (see :func:`_split_k_hook`).
_TUNING = False


def _workspace(b: int, n: int, atomic: bool, device: torch.device, split: int | None, zero: bool) -> torch.Tensor:
    """The split-K partial sums' buffer: none (a 1-element placeholder) when the launch is known to run SPLIT_K = 1
    — the kernel then writes the output itself, and the zeroing memset is one kernel fewer per call, which counts
    at decode sizes (~20 µs calls); (b, n) for atomic adds, zeroed here when ``zero`` (an explicit configuration;
    the autotuned split-K configurations zero it in their pre-hook); one (b, n) slice per split otherwise
    (deterministic: summed in a fixed order). ``split`` None: not known before the autotuner runs."""
    if split == 1:
        return torch.empty(1, device=device, dtype=torch.float32)
    if atomic:
        return (torch.zeros if zero else torch.empty)((b, n), device=device, dtype=torch.float32)
    return torch.empty((SPLIT_MAX, b, n), device=device, dtype=torch.float32)


def _word_view(codes: torch.Tensor, storage: str, groups: int) -> torch.Tensor | None:
    """The packed rows as int32 words for the word kernel, or None where it does not apply: base-3 storage,
    per-group steps, rows that are not a whole number of words, or storage not 4-byte aligned."""
    if storage == "base3" or groups > 1 or codes.shape[1] % 4 or codes.stride(1) != 1 or codes.stride(0) % 4:
        return None
    if codes.storage_offset() % 4 or codes.data_ptr() % 4:
        return None
    return codes.view(torch.int32)


def _lowbit_gemv_triton(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                        storage: str, zero: float, deterministic: bool, config: dict | None = None,
                        kernel: str = "auto") -> torch.Tensor:
    """Launch on x (B, K): autotuned on a GPU; ``config`` (BLOCK_N, BLOCK_K or BLOCK_W, SPLIT_K, num_warps,
    num_stages), the INTERPRET_CONFIGs under the interpreter, or the DEFAULT_GPU_CONFIGs with
    ``LOWBIT_AUTOTUNE=0``. ``kernel``: "auto" (the word kernel wherever :func:`_word_view` allows, else the byte
    kernel), "words" or "bytes" (tests and benchmarks)."""
    interpret = interpreting()
    if not interpret and not x.is_cuda:
        raise RuntimeError("lowbit_gemv backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                           "interpreter); use backend='ref' on the CPU")
    n, k, groups = _check(x, codes, scale, bias, storage, zero)
    b = x.shape[0]
    out = torch.empty((b, n), device=x.device, dtype=x.dtype)
    if b == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.to(out.dtype).expand(b, n))
    kern = _kernels(interpret)
    x = x.contiguous()
    codes = codes.contiguous()
    if storage == "int8":  # the kernels read the signed code c as the digit c + 128: shift zero to match
        zero = zero + 128.0
    s = _row_scale(scale, n)
    words = None if kernel == "bytes" else _word_view(codes, storage, groups)
    if kernel == "words" and words is None:
        raise ValueError(f"lowbit_gemv: the word kernel does not take {storage} codes of shape {tuple(codes.shape)} "
                         f"with {groups} scale groups")
    grouped = groups > 1
    use_dot = b > 1
    atomic = not deterministic
    dot_f32 = interpret or x.dtype == torch.float32 or grouped
    if words is not None:
        cfg = launch_config(config, interpret, WORDS_INTERPRET_CONFIG, WORDS_DEFAULT_GPU_CONFIG)
    else:
        cfg = launch_config(config, interpret, INTERPRET_CONFIG, DEFAULT_GPU_CONFIG)
    sig = (words is not None, b, n, k, groups, storage, bias is not None, use_dot, atomic, x.dtype, x.device)
    ws = _workspace(b, n, atomic, x.device, cfg["SPLIT_K"] if cfg is not None else _TUNED_SPLIT.get(sig),
                    zero=cfg is not None)
    bias_arg = bias if bias is not None else s
    block_b = BLOCK_B if use_dot else 1
    nb = -(-b // block_b)
    if words is not None:
        args = (x, words, s, bias_arg, out, ws, b, n, k, words.shape[1], zero, 0x4B000000,
                x.stride(0), words.stride(0), s.stride(0), out.stride(0), 0 if atomic else b * n)
        flags = dict(BITS=_BITS[storage], SIGNED=storage == "int8", HAS_BIAS=bias is not None, USE_DOT=use_dot,
                     DOT_F32=dot_f32, ATOMIC=atomic, BLOCK_B=block_b)
        plain, tuned = kern.words, (kern.tuned_words(use_dot) if cfg is None else None)
    else:
        args = (x, codes, s, bias_arg, out, ws, b, n, k, codes.shape[1], k // groups, zero,
                x.stride(0), codes.stride(0), s.stride(0), s.stride(1), out.stride(0), 0 if atomic else b * n)
        per = _per_byte(storage)
        kb_div = 4 if per == 5 else per
        flags = dict(BITS=_BITS[storage] or 2, BASE3=storage == "base3", PER=per, SIGNED=storage == "int8",
                     GROUPED=grouped, HAS_BIAS=bias is not None, USE_DOT=use_dot, DOT_F32=dot_f32, ATOMIC=atomic,
                     BLOCK_B=block_b)
        plain, tuned = kern.kernel, (kern.tuned(kb_div) if cfg is None else None)
        if cfg is not None:
            cfg["BLOCK_KB"] = max(16, cfg.pop("BLOCK_K") // kb_div)  # tl.dot takes K ≥ 16 (1-bit: 128 codes)
    if cfg is None:
        def grid(meta: dict) -> tuple[int, int, int]:
            return (-(-n // meta["BLOCK_N"]), meta["SPLIT_K"], nb)

        global _TUNING
        _TUNING = sig not in _TUNED_SPLIT
        try:
            tuned[grid](*args, **flags)
        finally:
            _TUNING = False
        split = _TUNED_SPLIT[sig] = tuned.best_config.kwargs["SPLIT_K"]
    else:
        nw, ns = cfg.pop("num_warps", 4), cfg.pop("num_stages", 2)
        split = cfg["SPLIT_K"]
        if split > SPLIT_MAX:
            raise ValueError(f"SPLIT_K={split} > {SPLIT_MAX}")
        plain[(-(-n // cfg["BLOCK_N"]), split, nb)](*args, **flags, **cfg, num_warps=nw, num_stages=ns)
    if split == 1:
        return out
    y = ws if atomic else ws[:split].sum(0)
    if bias is not None:
        y = y + bias.float()
    return out.copy_(y)


# ----------------------------------------------------------------------------------------------------------
# custom op and the public entry point
# ----------------------------------------------------------------------------------------------------------


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend != "auto":
        return backend
    if interpreting() and has_triton():
        return "triton"
    return "triton" if device.type == "cuda" and has_triton() else "ref"


@torch.library.custom_op(
    "lowbit::lowbit_gemv", mutates_args=(),
    schema="(Tensor x, Tensor codes, Tensor scale, Tensor? bias, str storage, float zero, bool deterministic, "
           "str backend) -> Tensor",
)
def _lowbit_gemv_op(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                    storage: str, zero: float, deterministic: bool, backend: str) -> torch.Tensor:
    if _resolve_backend(backend, x.device) == "triton":
        return _lowbit_gemv_triton(x, codes, scale, bias, storage, zero, deterministic)
    return lowbit_gemv_ref(x, codes, scale, bias, storage=storage, zero=zero)


@_lowbit_gemv_op.register_fake
def _(x, codes, scale, bias, storage, zero, deterministic, backend):
    n, _, _ = _check(x, codes, scale, bias, storage, zero)
    return x.new_empty((x.shape[0], n))


def lowbit_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                storage: str, zero: float, deterministic: bool = False, backend: str = "auto") -> torch.Tensor:
    """y = x · ((u − zero)·Δ)ᵀ (+ bias) for packed weights (module docstring). ``x`` (…, K) bf16/fp16/fp32;
    ``codes`` (N, ceil(K/p)) as ``storage`` packs them; ``scale`` float32 (), (N, 1) or (N, K/g); ``bias``
    (N,) or None. Returns (…, N) in x's dtype. ``deterministic``: split-K partials summed in a fixed order
    instead of atomically. ``backend``: auto (triton on CUDA or under TRITON_INTERPRET=1, else ref) | triton |
    ref. Inference only (no autograd)."""
    if backend not in BACKENDS:
        raise ValueError(f"lowbit_gemv: backend must be one of {BACKENDS}, got {backend!r}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"lowbit_gemv: x must be one of {X_DTYPES}, got {x.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    _check(x2, codes, scale, bias, storage, zero)
    y = _lowbit_gemv_op(x2, codes, scale, bias, storage, float(zero), bool(deterministic), backend)
    return y.reshape(*lead, y.shape[-1])


# ----------------------------------------------------------------------------------------------------------
# the PackedLinear hook
# ----------------------------------------------------------------------------------------------------------


def supports(layer) -> bool:
    """Whether :func:`packed_linear_kernel` can run ``layer`` (a PackedLinear): every storage of the packed
    format, any scale granularity, with or without bias."""
    return getattr(layer, "storage", None) in STORAGES


def packed_linear_kernel(layer, x: torch.Tensor, *, max_rows: int = 64, deterministic: bool = False,
                         backend: str = "auto") -> torch.Tensor:
    """``PackedLinear.kernel``: the layer's forward through :func:`lowbit_gemv`.

    x goes through ``layer.prepare_input`` first: identity (weight-only, A16), the online Hadamard rotation
    (QuEST weight-only), or — STOPGAP for activation-quantized layers (BitNet/DQT A8, QuEST W·A) — the layer's
    torch activation fake-quantizer, after which the GEMV multiplies the dequantized activations in x's dtype
    (the torch path's arithmetic; an integer-activation kernel is still to come). Under autocast x is cast to
    the autocast dtype first (as F.linear would be). More than ``max_rows`` rows of x (a prefill) go to
    ``layer.reference_forward``. Raises NotImplementedError for a layer :func:`supports` rejects."""
    if not supports(layer):
        raise NotImplementedError(f"lowbit_gemv: no kernel for weight storage {getattr(layer, 'storage', None)!r}")
    rows = x.numel() // max(x.shape[-1], 1)
    if rows > max_rows:
        return layer.reference_forward(x)
    dev = x.device.type
    xq = layer.prepare_input(x)
    if torch.is_autocast_enabled(dev):
        xq = xq.to(torch.get_autocast_dtype(dev))
    if xq.dtype not in X_DTYPES:
        xq = xq.float()
    info = layer.weight_spec.info
    zero = grid_zero(layer.storage, info.qmin, info.offset)
    return lowbit_gemv(xq, layer.codes, layer.scale, layer.bias, storage=layer.storage, zero=zero,
                       deterministic=deterministic, backend=backend)


def install(model: torch.nn.Module, **kwargs) -> int:
    """Set :func:`packed_linear_kernel` (with ``kwargs``: max_rows, deterministic, backend) as the ``kernel`` of
    every supported PackedLinear of ``model``; returns how many. ``uninstall``: set ``layer.kernel = None``."""
    from lowbit.export.packed import set_kernel

    return set_kernel(model, supports, packed_linear_kernel, **kwargs)
