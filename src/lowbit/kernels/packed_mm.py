"""GEMMs straight from packed 2-/4-bit weight codes: DQT's forward and grad-x without a dequantized weight in HBM.

    packed_scaled_mm(a, b_packed, a_scale, b_scale, bias=None, out_dtype=torch.bfloat16, *, bits, qmin)
        = scaled_mm(a, unpack(b_packed), a_scale, b_scale, bias, out_dtype)          (forward, INT8, exact)
    packed_dequant_mm(g, b_packed, b_scale, *, bits, qmin, k)
        = g · ((unpack(b_packed) · b_scale[:, None]) as g.dtype)                     (grad_x = G·Ŵ)

``b_packed`` (N, ceil(K/p)) uint8 is the weight as :mod:`lowbit.quant.packing` stores it (``bits`` = 2: p = 4
codes per byte — ternary, 2-bit; ``bits`` = 4: p = 2 — 3-, 4-bit), each byte holding the unsigned digits
u = code − qmin, the first code in the least significant bits, rows padded with u = 0 to whole bytes.

**Forward** (:func:`packed_scaled_mm`). An INT8 GEMM whose B operand is loaded as packed bytes: a (BLOCK_N,
BLOCK_K/p) tile of bytes is unpacked in registers — ``u = (byte[:, :, None] >> bits·[0 … p−1]) & mask``,
reshaped row-major to (BLOCK_N, BLOCK_K), which puts digit j of byte b at code p·b + j exactly as packing does
— and ``u + qmin`` is the signed int8 code; ``tl.dot`` with the int8 activation codes accumulates exactly in
int32, and the epilogue is scaled_mm's own (the same jit function: acc·a_scale·b_scale + bias in float32,
rounded once). The result equals ``scaled_mm_ref(a, unpack(b_packed), …)`` bit for bit (without bias; with a
bias up to one float32 FMA rounding, as scaled_mm). The padding codes beyond K (u = 0, i.e. code = qmin ≠ 0)
meet activation columns that are masked to 0, so they add nothing: K is free (no multiple of p or 16 needed).
Weight bytes read per output tile: K/p instead of K — the packed tensor is the only copy of W the GEMM sees.

**Backward grad_x** (:func:`packed_dequant_mm`). G (M, N) · Ŵ (N, K), contraction over N: the B operand tile
(BLOCK_N, BLOCK_K) is unpacked the same way, turned into code·Δ[n] in float32 and rounded once to G's dtype —
the value ``lowbit.quant.dequantize(…).to(dtype)`` gives, so Ŵ is the torch path's Ŵ element for element — and
``tl.dot`` accumulates in float32 (bf16/fp16 tensor cores; float32 G: an IEEE float32 dot, no TF32). The
output (M, K) is G's dtype. Differences from the torch path are only the float32 summation order.

Both kernels use plain masked pointer loads (no TMA: packed rows of odd K are not 16-byte aligned) and
scaled_mm's grouped tile order, one program per output tile; on a GPU they are autotuned over
:data:`GPU_CONFIGS` — or, with ``LOWBIT_AUTOTUNE=0`` (the kernel tests), run :data:`DEFAULT_GPU_CONFIG` —, under
``TRITON_INTERPRET=1`` (CPU tests) run with :data:`INTERPRET_CONFIG`.

Backends (``backend=``): ``"triton"`` (these kernels), ``"torch"`` (unpack in torch, then scaled_mm's torch
backend / a torch matmul: the dequantized weight *is* materialised), ``"ref"`` (unpack + scaled_mm_ref /
float32 matmul), ``"auto"``: triton on CUDA devices of compute capability ≥ 8.0 with Triton installed, torch on
other CUDA devices, ref on the CPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lowbit.kernels._triton import has_triton, interpreting, jit_namespace, launch_config, resolve_backend
from lowbit.kernels.scaled_mm import OUT_DTYPES, _epilogue, _tile_coords, scaled_mm, scaled_mm_ref
from lowbit.quant.packing import unpack

__all__ = ["packed_scaled_mm", "packed_scaled_mm_ref", "packed_dequant_mm", "packed_dequant_mm_ref", "PACKED_BITS"]

#: Storage widths the kernels unpack (codes per byte: 4, 2).
PACKED_BITS = (2, 4)
BACKENDS = ("auto", "triton", "torch", "ref")
G_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

triton = tl = None  # placeholders: the real modules live in _kernels()' per-mode namespaces

#: The configuration under TRITON_INTERPRET=1: small tiles (BLOCK_K a multiple of 4 codes: whole bytes).
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}
#: H100 configurations (BM, BN, BK, stages, warps); BLOCK_K counts codes (BLOCK_K/p bytes per weight row).
GPU_CONFIGS = (
    (128, 128, 128, 4, 8),
    (128, 128, 128, 3, 4),
    (128, 256, 128, 3, 8),
    (64, 128, 128, 4, 4),
    (128, 64, 128, 4, 4),
    (128, 128, 64, 5, 4),
    (64, 64, 128, 4, 4),
)
#: The one GPU configuration with LOWBIT_AUTOTUNE=0: GPU_CONFIGS' (64, 128, 128, 4, 4), a middle tile whose
#: pipelined operands fit shared memory for both kernels and every G dtype (float32 G: 162 KB in the sm_90a
#: compile); (128, 128, 128, 4, 8) needs 258 KB there, over the H100's 227 KB, and only the autotuner skips it.
DEFAULT_GPU_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_stages": 4, "num_warps": 4}


def _check_packed(b_packed: torch.Tensor, k: int, bits: int, qmin: int, n_scale: torch.Tensor, name: str) -> None:
    if bits not in PACKED_BITS:
        raise ValueError(f"{name}: bits must be one of {PACKED_BITS}, got {bits}")
    levels = 1 << bits
    if not -levels < qmin <= 0:
        raise ValueError(f"{name}: qmin = {qmin} is not the lowest code of a {bits}-bit grid containing 0")
    per = 8 // bits
    if b_packed.dtype != torch.uint8 or b_packed.dim() != 2 or b_packed.shape[1] != -(-k // per):
        raise ValueError(f"{name}: b_packed must be uint8 (N, ceil(K/{per})) = (N, {-(-k // per)}) for K = {k}, got "
                         f"{b_packed.dtype} {tuple(b_packed.shape)}")
    n = b_packed.shape[0]
    if n_scale.dtype != torch.float32 or n_scale.shape != (n,):
        raise ValueError(f"{name}: b_scale must be float32 of shape ({n},), got {n_scale.dtype} {tuple(n_scale.shape)}")


def _check_fwd(a, b_packed, a_scale, b_scale, bias, out_dtype, bits, qmin) -> None:
    if a.dim() != 2 or a.dtype != torch.int8:
        raise TypeError(f"packed_scaled_mm: a must be int8 (M, K), got {a.dtype} {tuple(a.shape)}")
    _check_packed(b_packed, a.shape[1], bits, qmin, b_scale, "packed_scaled_mm")
    m, n = a.shape[0], b_packed.shape[0]
    if a_scale.dtype != torch.float32 or a_scale.shape != (m,):
        raise ValueError(f"packed_scaled_mm: a_scale must be float32 of shape ({m},), got {a_scale.dtype} "
                         f"{tuple(a_scale.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"packed_scaled_mm: bias must have shape ({n},), got {tuple(bias.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"packed_scaled_mm: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


def _check_bwd(g, b_packed, b_scale, bits, qmin, k) -> None:
    if g.dim() != 2 or g.dtype not in G_DTYPES:
        raise TypeError(f"packed_dequant_mm: g must be 2-D (M, N) of {G_DTYPES}, got {g.dtype} {tuple(g.shape)}")
    _check_packed(b_packed, k, bits, qmin, b_scale, "packed_dequant_mm")
    if g.shape[1] != b_packed.shape[0]:
        raise ValueError(f"packed_dequant_mm: g is (M, N) = {tuple(g.shape)}, b_packed has N = {b_packed.shape[0]}")


# ----------------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------------


def _unpack(b_packed: torch.Tensor, bits: int, qmin: int, k: int) -> torch.Tensor:
    return unpack(b_packed, qmin, 1 << bits, k)


def packed_scaled_mm_ref(a, b_packed, a_scale, b_scale, bias=None, out_dtype=torch.bfloat16, *, bits: int,
                         qmin: int) -> torch.Tensor:
    """Unpack with :func:`lowbit.quant.packing.unpack`, then :func:`lowbit.kernels.scaled_mm.scaled_mm_ref`."""
    _check_fwd(a, b_packed, a_scale, b_scale, bias, out_dtype, bits, qmin)
    return scaled_mm_ref(a, _unpack(b_packed, bits, qmin, a.shape[1]), a_scale, b_scale, bias, out_dtype)


def _dequant(b_packed, b_scale, bits, qmin, k, dtype) -> torch.Tensor:
    return _unpack(b_packed, bits, qmin, k).float().mul_(b_scale[:, None]).to(dtype)


def packed_dequant_mm_ref(g, b_packed, b_scale, *, bits: int, qmin: int, k: int) -> torch.Tensor:
    """Ŵ = (code·Δ in float32) as g.dtype, then g·Ŵ accumulated in float32 (float64 for float64 checks is the
    caller's business), rounded to g.dtype."""
    _check_bwd(g, b_packed, b_scale, bits, qmin, k)
    w = _dequant(b_packed, b_scale, bits, qmin, k, g.dtype)
    return (g.float() @ w.float()).to(g.dtype)


# ----------------------------------------------------------------------------------------------------------
# the Triton kernels (plain functions, jitted per interpret mode by _kernels(); see scaled_mm's comment)
# ----------------------------------------------------------------------------------------------------------


def _unpack_tile(byte, QMIN: tl.constexpr, BITS: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    # (ROWS, BLOCK_K / PER) bytes → (ROWS, BLOCK_K) int32 codes: digit j of byte b is code PER·b + j (row-major
    # reshape of (ROWS, BLOCK_K / PER, PER)), code = u + qmin
    PER: tl.constexpr = 8 // BITS
    shifts = tl.arange(0, PER) * BITS
    u = (byte.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(u, (ROWS, BLOCK_K)) + QMIN


def _packed_mm_kernel(
    a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
    M, N, K, KB, stride_am, stride_bn, stride_cm,
    QMIN: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    PER: tl.constexpr = 8 // BITS
    BLOCK_KB: tl.constexpr = BLOCK_K // PER
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kb = tl.arange(0, BLOCK_KB)
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    b_rows = b_ptr + offs_n[:, None].to(tl.int64) * stride_bn
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[:, None] < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ka = k0 + offs_k
        # activation columns past K are 0: they cancel the padding codes of the last byte (u = 0 → code qmin)
        a = tl.load(a_rows + ka[None, :], mask=m_ok & (ka[None, :] < K), other=0)
        kb = k0 // PER + offs_kb
        byte = tl.load(b_rows + kb[None, :], mask=n_ok & (kb[None, :] < KB), other=0)
        b = _unpack_tile(byte, QMIN, BITS, BLOCK_N, BLOCK_K).to(tl.int8)
        acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
    _epilogue(acc, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, off_m, off_n, M, N, stride_cm, HAS_BIAS, False,
              BLOCK_M, BLOCK_N)  # fmt: skip


def _packed_dequant_mm_kernel(
    g_ptr, b_ptr, c_ptr, b_scale_ptr,
    M, N, K, stride_gm, stride_bn, stride_cm,
    QMIN: tl.constexpr, BITS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # C (M, K) = G (M, N) · Ŵ (N, K): output tiles (BLOCK_M, BLOCK_K), contraction over N in steps of BLOCK_N
    PER: tl.constexpr = 8 // BITS
    BLOCK_KB: tl.constexpr = BLOCK_K // PER
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_k = (K + BLOCK_K - 1) // BLOCK_K
    pid_m, pid_k = _tile_coords(tl.program_id(0), num_pid_m, num_pid_k, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_kb = pid_k * BLOCK_KB + tl.arange(0, BLOCK_KB)
    offs_n = tl.arange(0, BLOCK_N)
    g_rows = g_ptr + offs_m[:, None].to(tl.int64) * stride_gm
    m_ok = offs_m[:, None] < M
    kb_ok = offs_kb[None, :] < (K + PER - 1) // PER
    acc = tl.full((BLOCK_M, BLOCK_K), 0.0, dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn = n0 + offs_n
        n_ok = nn < N
        g = tl.load(g_rows + nn[None, :], mask=m_ok & n_ok[None, :], other=0.0)
        byte = tl.load(b_ptr + nn[:, None].to(tl.int64) * stride_bn + offs_kb[None, :], mask=n_ok[:, None] & kb_ok,
                       other=0)
        s = tl.load(b_scale_ptr + nn, mask=n_ok, other=0.0)  # rows past N: Δ = 0 (and g = 0)
        w = _unpack_tile(byte, QMIN, BITS, BLOCK_N, BLOCK_K).to(tl.float32) * s[:, None]  # code·Δ, float32
        if DOT_F32:
            acc = tl.dot(g.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(g, w.to(g.dtype), acc)  # Ŵ rounded once to G's dtype, as dequantize(…).to(dtype)
    ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_k[None, :]
    tl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok & (offs_k[None, :] < K))


_JIT_FUNCTIONS = ("_tile_coords", "_epilogue", "_unpack_tile", "_packed_mm_kernel", "_packed_dequant_mm_kernel")


@dataclass(frozen=True)
class _Kernels:
    fwd: object
    fwd_tuned: object
    bwd: object
    bwd_tuned: object
    triton: object


@functools.cache
def _kernels(interpret: bool) -> _Kernels:
    if not has_triton():
        raise ModuleNotFoundError("packed_mm backend='triton' needs Triton: pip install 'lowbit[triton]' "
                                  "(triton>=3.6), or use backend='torch'/'ref'")
    import triton
    import triton.language as tl

    if interpret != interpreting():
        raise RuntimeError("TRITON_INTERPRET changed while the kernels were being built")
    ns = jit_namespace(globals(), _JIT_FUNCTIONS, dict(triton=triton, tl=tl))
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=st,
                             num_warps=w) for bm, bn, bk, st, w in GPU_CONFIGS]
    fwd, bwd = ns["_packed_mm_kernel"], ns["_packed_dequant_mm_kernel"]
    fwd_tuned = triton.autotune(configs=configs, key=["M", "N", "K", "QMIN", "BITS", "HAS_BIAS"])(fwd)
    bwd_tuned = triton.autotune(configs=configs, key=["M", "N", "K", "QMIN", "BITS", "DOT_F32"])(bwd)
    return _Kernels(fwd, fwd_tuned, bwd, bwd_tuned, triton)


def _launch(kern_fixed, kern_tuned, cdiv, rows: int, cols_key: str, cols: int, args: tuple, flags: dict,
            config: dict | None, interpret: bool) -> None:
    cfg = launch_config(config, interpret, INTERPRET_CONFIG, DEFAULT_GPU_CONFIG)
    if cfg is None:
        def grid(meta: dict) -> tuple[int]:
            return (cdiv(rows, meta["BLOCK_M"]) * cdiv(cols, meta[cols_key]),)

        kern_tuned[grid](*args, **flags)
        return
    num_warps, num_stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 3)
    grid = (cdiv(rows, cfg["BLOCK_M"]) * cdiv(cols, cfg[cols_key]),)
    kern_fixed[grid](*args, **flags, **cfg, num_warps=num_warps, num_stages=num_stages)


def _device_ok(t: torch.Tensor, name: str) -> bool:
    interpret = interpreting()
    if not interpret and not t.is_cuda:
        raise RuntimeError(f"{name} backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                           "interpreter); use backend='ref' on the CPU")
    return interpret


def _packed_scaled_mm_triton(a, b_packed, a_scale, b_scale, bias, out_dtype, bits, qmin, config=None):
    interpret = _device_ok(a, "packed_scaled_mm")
    kern = _kernels(interpret)
    a, b_packed = a.contiguous(), b_packed.contiguous()
    a_scale, b_scale = a_scale.contiguous(), b_scale.contiguous()
    (m, k), n = a.shape, b_packed.shape[0]
    out = torch.empty((m, n), device=a.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return packed_scaled_mm_ref(a, b_packed, a_scale, b_scale, bias, out_dtype, bits=bits, qmin=qmin)
    bias_arg = bias.contiguous() if bias is not None else a_scale  # any pointer; never read without bias
    args = (a, b_packed, out, a_scale, b_scale, bias_arg, m, n, k, b_packed.shape[1], a.stride(0),
            b_packed.stride(0), out.stride(0))
    flags = dict(QMIN=qmin, BITS=bits, HAS_BIAS=bias is not None)
    _launch(kern.fwd, kern.fwd_tuned, kern.triton.cdiv, m, "BLOCK_N", n, args, flags, config, interpret)
    return out


def _packed_dequant_mm_triton(g, b_packed, b_scale, bits, qmin, k, config=None):
    interpret = _device_ok(g, "packed_dequant_mm")
    kern = _kernels(interpret)
    g, b_packed, b_scale = g.contiguous(), b_packed.contiguous(), b_scale.contiguous()
    m, n = g.shape
    out = torch.empty((m, k), device=g.device, dtype=g.dtype)
    if m == 0 or k == 0:
        return out
    if n == 0:
        return out.zero_()
    # the interpreter's bf16/fp16 arithmetic truncates: there the dot runs in float32 on the rounded operands
    dot_f32 = g.dtype == torch.float32 or interpret
    args = (g, b_packed, out, b_scale, m, n, k, g.stride(0), b_packed.stride(0), out.stride(0))
    flags = dict(QMIN=qmin, BITS=bits, DOT_F32=dot_f32)
    _launch(kern.bwd, kern.bwd_tuned, kern.triton.cdiv, m, "BLOCK_K", k, args, flags, config, interpret)
    return out


# ----------------------------------------------------------------------------------------------------------
# custom ops and the public entry points
# ----------------------------------------------------------------------------------------------------------


def _resolve_backend(backend: str, device: torch.device) -> str:
    return resolve_backend(backend, device, (8, 0))


@torch.library.custom_op(
    "lowbit::packed_scaled_mm", mutates_args=(),
    schema="(Tensor a, Tensor b_packed, Tensor a_scale, Tensor b_scale, Tensor? bias, ScalarType out_dtype, "
    "int bits, int qmin, str backend) -> Tensor",
)  # fmt: skip
def _packed_scaled_mm_op(a, b_packed, a_scale, b_scale, bias, out_dtype, bits, qmin, backend):
    which = _resolve_backend(backend, a.device)
    if which == "triton":
        return _packed_scaled_mm_triton(a, b_packed, a_scale, b_scale, bias, out_dtype, bits, qmin)
    if which == "torch":
        b = _unpack(b_packed, bits, qmin, a.shape[1])
        return scaled_mm(a, b, a_scale, b_scale, bias, out_dtype, backend="torch")
    return packed_scaled_mm_ref(a, b_packed, a_scale, b_scale, bias, out_dtype, bits=bits, qmin=qmin)


@_packed_scaled_mm_op.register_fake
def _(a, b_packed, a_scale, b_scale, bias, out_dtype, bits, qmin, backend):
    _check_fwd(a, b_packed, a_scale, b_scale, bias, out_dtype, bits, qmin)
    return a.new_empty((a.shape[0], b_packed.shape[0]), dtype=out_dtype)


@torch.library.custom_op(
    "lowbit::packed_dequant_mm", mutates_args=(),
    schema="(Tensor g, Tensor b_packed, Tensor b_scale, int bits, int qmin, int k, str backend) -> Tensor",
)  # fmt: skip
def _packed_dequant_mm_op(g, b_packed, b_scale, bits, qmin, k, backend):
    which = _resolve_backend(backend, g.device)
    if which == "triton":
        return _packed_dequant_mm_triton(g, b_packed, b_scale, bits, qmin, k)
    if which == "torch":
        return g @ _dequant(b_packed, b_scale, bits, qmin, k, g.dtype)
    return packed_dequant_mm_ref(g, b_packed, b_scale, bits=bits, qmin=qmin, k=k)


@_packed_dequant_mm_op.register_fake
def _(g, b_packed, b_scale, bits, qmin, k, backend):
    _check_bwd(g, b_packed, b_scale, bits, qmin, k)
    return g.new_empty((g.shape[0], k))


def packed_scaled_mm(a: torch.Tensor, b_packed: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                     bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *, bits: int,
                     qmin: int, backend: str = "auto") -> torch.Tensor:
    """(a · unpack(b_packed)ᵀ) ⊙ a_scale[:, None] ⊙ b_scale[None, :] (+ bias) → (M, N) ``out_dtype``.

    ``a`` (M, K) int8 codes; ``b_packed`` (N, ceil(K·bits/8)) uint8, packing's layout of codes in
    [qmin, qmin + 2^bits); ``a_scale`` (M,), ``b_scale`` (N,) float32. Any K. ``backend``: auto | triton | torch
    | ref (module docstring). No autograd."""
    _check_fwd(a, b_packed, a_scale, b_scale, bias, out_dtype, bits, qmin)
    if backend not in BACKENDS:
        raise ValueError(f"packed_scaled_mm: backend must be one of {BACKENDS}, got {backend!r}")
    return _packed_scaled_mm_op(a, b_packed, a_scale, b_scale, bias, out_dtype, bits, qmin, backend)


def packed_dequant_mm(g: torch.Tensor, b_packed: torch.Tensor, b_scale: torch.Tensor, *, bits: int, qmin: int,
                      k: int, backend: str = "auto") -> torch.Tensor:
    """g (M, N) · Ŵ (N, K) with Ŵ = (code·b_scale[n] in float32) as g.dtype, unpacked from ``b_packed`` in the
    kernel's registers (never written to memory); float32 accumulation; (M, K) in g's dtype. No autograd."""
    _check_bwd(g, b_packed, b_scale, bits, qmin, k)
    if backend not in BACKENDS:
        raise ValueError(f"packed_dequant_mm: backend must be one of {BACKENDS}, got {backend!r}")
    return _packed_dequant_mm_op(g, b_packed, b_scale, bits, qmin, k, backend)
