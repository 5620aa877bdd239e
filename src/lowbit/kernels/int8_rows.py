"""Per-row absmax quantization to int8 codes in one kernel: the activation quantizer of the INT8 GEMM paths.

    codes, step = int8_rows(x, spec)      # = lowbit.quant.quantize(x.reshape(-1, K), spec), bit for bit

For the specs of BitNet b1.58's and the STE recipes' activations — an integer grid without offset of at most
256 levels, absmax per row, nearest rounding, no rotation (:func:`supports`) — lowbit's quantizer computes, in
float32,

    step = max(max|x_row|, eps) / top,    code = clamp(round_half_even(x / step), qmin, qmax)

as about eight torch kernels (cast, abs, amax, clamp, two divisions, round, clamp, cast). The Triton kernel
reads each row twice (the absmax sweep, then the codes) and writes the int8 codes and the float32 step: one
launch, the same float32 operations — IEEE division (``div_rn``), round half to even from ``floor`` (the DQT
step's helper) — so the codes and steps equal the reference's exactly (tests, Triton interpreter on CPU; on CUDA
see below).

**The step on CUDA.** The reference divides the row's clip by the Python number ``top``; on CUDA, torch computes
a tensor ÷ CPU scalar as a × float32(1/top) (a multiplication by the rounded reciprocal: up to one ulp away from
the IEEE quotient the CPU computes; aten's ``div_true_kernel_cuda``). The failing CUDA tests of 2026-11-23 (H100,
H200: steps one ulp apart at a few rows of 16384×768 and 8192×4608) are exactly that: each printed reference step
is amax × float32(1/127) and each kernel step the IEEE amax / 127 of one amax (checked offline). So the kernel
reproduces the arithmetic of the device it runs on: on CUDA ``step = max(amax, eps) × float32(1/top)``,
elsewhere (the interpreter) ``div_rn``. The codes are ``x ÷ step`` with a tensor divisor on both devices: IEEE
division, ``div_rn`` here. With this, the CUDA tests pass (H100, 2026-11-23: 16384×768, 8192×4608, 3×130, bf16
and fp32, bit for bit), so ``backend="auto"`` (:data:`AUTO_ON_CUDA`) runs the kernel on CUDA.

Dispatch: :func:`int8_rows` runs the kernel for CUDA tensors when Triton is installed and :data:`AUTO_ON_CUDA`,
the reference otherwise or for specs it does not support; ``backend="triton"`` forces the kernel (CPU tensors: under
``TRITON_INTERPRET=1``), ``"ref"`` the reference. A ``torch.library`` custom op (with a fake implementation) makes it
opaque to torch.compile; eager CUDA calls skip the dispatcher (:func:`lowbit.kernels._triton.direct_call`).
"""

from __future__ import annotations

import functools

import torch

from lowbit.kernels._triton import custom_op, direct_call, has_triton, interpreting, jit_namespace, on_device
from lowbit.kernels.dqt_step import _round_half_even  # ties to even with floor only (tested on the GPU there)
from lowbit.quant.core import quantize
from lowbit.quant.spec import QuantSpec

__all__ = ["int8_rows", "int8_rows_ref", "supports"]

BACKENDS = ("auto", "triton", "ref")
#: Whether backend="auto" picks the kernel for CUDA tensors (on: its CUDA tests pass, module docstring).
AUTO_ON_CUDA = True
#: Rows per program and columns per step of the two sweeps.
BLOCK_M, BLOCK_K = 4, 1024
triton = tl = None  # placeholders: the real modules live in _kernel()'s namespace


def supports(spec: QuantSpec) -> bool:
    """Whether the kernel computes ``quantize`` for ``spec`` (module docstring)."""
    info = spec.info
    return (spec.scale == "absmax" and spec.granularity == "row" and info.offset == 0 and info.levels <= 256
            and not spec.hadamard and spec.rounding == "nearest")


def int8_rows_ref(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: lowbit's quantizer on the rows of x (…, K) → (int8 codes (M, K), float32 step (M,))."""
    k = x.shape[-1]
    codes, step = quantize(x.reshape(-1, k), spec)
    return codes, step.reshape(-1)


# ----------------------------------------------------------------------------------------------------------
# the Triton kernel (a plain function, jitted on first use: importing this module imports no Triton)
# ----------------------------------------------------------------------------------------------------------


def _int8_rows_kernel(x_ptr, codes_ptr, step_ptr, M, K, stride_x, stride_c, top, inv_top, eps, qmin, qmax,
                      RECIP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ok = row_ok[:, None] & ((k0 + cols) < K)[None, :]
        v = tl.load(x_ptr + rows64[:, None] * stride_x + (k0 + cols)[None, :], mask=ok, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(v.to(tl.float32)), axis=1))
    if RECIP:  # torch on CUDA: a tensor ÷ a Python number is a × float32(1/number) (module docstring)
        step = tl.maximum(amax, eps) * inv_top
    else:
        step = tl.math.div_rn(tl.maximum(amax, eps), top)
    tl.store(step_ptr + rows64, step, mask=row_ok)
    lim = qmax + 4.0
    for k0 in range(0, K, BLOCK_K):
        ok = row_ok[:, None] & ((k0 + cols) < K)[None, :]
        v = tl.load(x_ptr + rows64[:, None] * stride_x + (k0 + cols)[None, :], mask=ok, other=0.0)
        y = tl.math.div_rn(v.to(tl.float32), step[:, None])
        y = tl.minimum(tl.maximum(y, -lim), lim)
        r = _round_half_even(y)
        c = tl.minimum(tl.maximum(r, qmin), qmax)
        tl.store(codes_ptr + rows64[:, None] * stride_c + (k0 + cols)[None, :], c.to(tl.int8), mask=ok)


@functools.cache
def _kernel(interpret: bool):
    import triton
    import triton.language as tl

    if interpret != interpreting():
        raise RuntimeError("TRITON_INTERPRET changed while the kernels were being built")
    return jit_namespace(globals(), ("_round_half_even", "_int8_rows_kernel"), dict(triton=triton, tl=tl),
                         nospec={"_int8_rows_kernel": ("M",)})["_int8_rows_kernel"]


def int8_rows_triton(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); same outputs as :func:`int8_rows_ref`."""
    interpret = interpreting()
    if not interpret and not x.is_cuda:
        raise RuntimeError("int8_rows backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); use backend='ref'")
    if not supports(spec):
        raise ValueError(f"int8_rows: the kernel does not compute {spec} (see supports()); use backend='ref'")
    k = x.shape[-1]
    if k == 0:  # no row to sweep: whatever lowbit's quantizer makes of it
        return int8_rows_ref(x, spec)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    codes = torch.empty((m, k), device=x.device, dtype=torch.int8)
    step = torch.empty((m,), device=x.device, dtype=torch.float32)
    if m:
        info = spec.info
        inv_top = (torch.ones((), dtype=torch.float32) / info.top).item()  # float32(1/top), as torch rounds it
        with on_device(x.device):
            _kernel(interpret)[(-(-m // BLOCK_M),)](
                x2, codes, step, m, k, x2.stride(0), codes.stride(0), float(info.top), inv_top, float(spec.eps),
                float(info.qmin), float(info.qmax), RECIP=x.is_cuda, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, num_warps=4)
    return codes, step


def _use_triton(x: torch.Tensor, spec: QuantSpec, backend: str) -> bool:
    if backend == "triton":
        return True
    if backend == "ref" or not supports(spec) or not has_triton():
        return False
    return x.is_cuda and AUTO_ON_CUDA  # CPU tensors take the kernel (interpreter) only when asked: backend="triton"


def _int8_rows_impl(x: torch.Tensor, bits: float, grid: str, eps: float, backend: str):
    spec = _spec(bits, grid, eps)
    return int8_rows_triton(x, spec) if _use_triton(x, spec, backend) else int8_rows_ref(x, spec)


@functools.cache
def _spec(bits: float, grid: str, eps: float) -> QuantSpec:
    # everything quantize reads for a spec of supports(): bits, grid, absmax per row, nearest, no rotation, eps
    return QuantSpec(bits=bits, grid=grid, scale="absmax", granularity="row", rounding="nearest", hadamard=False,
                     eps=eps)


_int8_rows_op = custom_op("int8_rows", "(Tensor x, float bits, str grid, float eps, str backend) -> (Tensor, Tensor)",
                          _int8_rows_impl)


@_int8_rows_op.register_fake
def _(x, bits, grid, eps, backend):
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    return x.new_empty((m, k), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32)


@torch.no_grad()  # a quantizer: no gradient, as lowbit.quant.quantize
def int8_rows(x: torch.Tensor, spec: QuantSpec, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` (…, K) → (int8 codes (M, K), float32 step (M,)) = lowbit's quantizer for a spec of
    :func:`supports` (others: the reference, any spec ``quantize`` takes). ``backend``: auto | triton | ref."""
    if backend not in BACKENDS:
        raise ValueError(f"int8_rows: backend must be one of {BACKENDS}, got {backend!r}")
    if not supports(spec):
        return int8_rows_ref(x, spec)
    fn = _int8_rows_impl if direct_call(x) else _int8_rows_op
    return fn(x, float(spec.bits), spec.grid, float(spec.eps), backend)
