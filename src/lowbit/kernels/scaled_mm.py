"""Exact low-bit GEMM on FP8 / INT8 tensor cores, row and column scales in the epilogue.

    scaled_mm(a, b, a_scale, b_scale, bias=None, out_dtype=torch.bfloat16)
        = (a · bᵀ) ⊙ a_scale[:, None] ⊙ b_scale[None, :] (+ bias)

``a`` (M, K) and ``b`` (N, K) hold the codes of two quantized operands — ``b`` in ``nn.Linear`` layout, the
weight — both ``float8_e4m3fn`` or both ``int8``; ``a_scale`` (M,) and ``b_scale`` (N,) are their float32 steps
Δ (one per token, one per output channel). The product is accumulated in float32 (FP8) or int32 (INT8); the
epilogue computes, in float32 and in this order, ``acc·a_scale·b_scale + bias`` and rounds once to
``out_dtype``.

**Why this is the fake-quant result, exactly** (METHODS.md §4). A centered grid of b ≤ 4 bits has the values
(k + ½)·Δ, k + ½ ∈ {±0.5, …, ±7.5}: each needs at most 4 significant bits, and e4m3 has 4 (3 stored + the
implicit one), so the codes are exact in FP8; so are ternary {−1, 0, 1}, every 8-bit integer grid in int8,
and the centered grids of 5–7 bits in int8 as odd integers 2k + 1 with step Δ/2.
A product of two half-integer codes is a multiple of ¼ of magnitude ≤ 56.25, so a sum of K of them is an
integer number of quarters below 56.25·4·K = 225·K, which is exact in float32 (24-bit significand) whenever
225·K < 2²⁴, i.e. K ≤ 74 565 — for any summation order. Hence Σ_k a_k·b_k is computed *exactly* by an
fp32-accumulating GEMM, and the only roundings are the epilogue's, the same ones the float32 reference
makes. INT8 products accumulate exactly in int32 for K < 2¹⁷ (|a·b| ≤ 2¹⁴).

**The reference** (:func:`scaled_mm_ref`) accumulates in float64, which is exact for *any* FP8 inputs up to
K = 2¹⁷ (a product of two e4m3 values has ≤ 8 significant bits and lies in [2⁻¹⁸, 448²]: 36 + 17 < 53 bits)
and for any INT8 inputs; it then rounds to float32 and applies the same epilogue. On the half-integer grid
the Triton kernel and the reference therefore agree bit for bit (without bias; with a bias the compiler may
fuse the last multiply-add into one FMA, a difference of at most one float32 rounding).

**Hopper's FP8 accumulation.** The H100's FP8 MMA adds products in a reduced-precision accumulator (about
14 significant bits: DeepSeek-V3 §3.3.2), so a long run of FP8 MMAs into one accumulator can drop the
quarters once partial sums pass ~2¹²; promoting the partial sum to a true float32 accumulator every N values
of K restores exactness (DeepSeek-V3 promotes every 128). ``promote`` sets N for the Triton kernel (Triton's
``max_num_imprecise_acc``): 128 (default: one promotion per K-block), 32 (every WGMMA instruction: a partial
sum is ≤ 32·56.25 = 1800 = 7200 quarters < 2¹⁴, exact under that model for any codes), or 0 (never: Hopper's
"fast accumulation", fastest, exact only while partial sums stay small). Even when fast accumulation drops
quarters, its error is below 2⁻¹³ of the running sum, under the bf16 output's own rounding (2⁻⁹). torch's
CUTLASS row-wise FP8 kernel (``use_fast_accum=False``) promotes every 4 MMAs, i.e. 128. Cost of promoting, read
off the sm_90a compile of this kernel (Triton 3.6, no GPU needed): ptxas injects a ``warpgroup.wait`` before the
promotion adds (C7517), so a warpgroup's MMAs no longer overlap its own adds, and only the 128×128 tile with 8
warps fits both accumulators in registers (larger tiles spill; the autotuner skips them when promoting).
Without promotion all configs compile spill-free; the SASS shows QGMMA (FP8) / IGMMA (INT8) and TMA
loads/stores (UTMALDG/UTMASTG).

Backends (``backend=``): ``"triton"`` (the persistent TMA kernel below), ``"torch"`` (``torch._scaled_mm``
with row-wise scales for FP8, ``torch._int_mm`` + a torch epilogue for INT8), ``"ref"``. ``"auto"`` picks triton
on a CUDA device of compute capability ≥ 9.0 with Triton installed, torch on other CUDA devices, and the
reference on CPU. torch's row-wise ``torch._scaled_mm`` is the faster FP8 GEMM on an H100 (prefill shapes of the
800m model, CUDA graphs: 1.48–1.68× bf16 against this kernel's 1.11–1.16×; benchmarks/results/h100-2026-11-23-s5/
bench_decode_prefill.md), but it is **not** the reference's result there: on 2026-11-23 its bf16 outputs
differed from the reference beyond one bf16 unit in 0.1–0.3 % of the elements (up to 0.076 at K = 4096 and
11008, and already at K = 768), where this kernel is exact. So auto keeps the exact kernel; ``backend="torch"``
is the opt-in for speed (torch 2.11 implements row-wise FP8 scaling on Ada, Hopper and B200). Under
``TRITON_INTERPRET=1`` the triton backend also runs on CPU tensors (tests). On a GPU the kernel is autotuned over
:data:`GPU_CONFIGS`; ``LOWBIT_AUTOTUNE=0`` (the kernel tests) runs :data:`DEFAULT_GPU_CONFIG` instead.

**The torch backend, and what is exact there.** FP8 with a bf16 output: ``torch._scaled_mm(a, b.t(),
scale_a=a_scale[:, None], scale_b=b_scale[None, :], out_dtype=bf16, use_fast_accum=(promote == 0))`` — ``b``
must be column-major, hence ``b.t()`` of the row-major (N, K) codes; scales float32 (M, 1) and (1, N); K and N
multiples of 16 (torch's check). torch 2.11 runs it as cuBLASLt's outer-vector-scaled FP8 GEMM on Hopper with
CUDA ≥ 12.9 (float32 outputs allowed there) and as its CUTLASS ``f8f8bf16_rowwise`` kernel on Ada, on Hopper with
an older cuBLAS, and on B200 (bf16 outputs only). ``use_fast_accum=False`` keeps the promotion to a float32
accumulator: CUTLASS every 4 WGMMAs (= 128 of K, as ``promote=128`` here); cuBLASLt at an interval it does not
document. The sum is then exact for the quantizer's codes exactly as in the Triton kernel with ``promote=128``
(the CUDA tests check it on QuEST codes), not for adversarial ones (the same caveat as above). The epilogue
multiplies by the two scales in float32 in an order of the library's choosing: the result may differ from the
reference's ``(acc·a_scale)·b_scale`` by one float32 rounding before the bf16 rounding, i.e. at most one bf16
unit in the last place (a bf16 bias is added in the same epilogue). Other output dtypes and float32 biases use
unit tensor-wise scales and a float32 result with the reference's epilogue in torch — exact, with two more passes
over the output. INT8: ``torch._int_mm`` (exact int32) and that epilogue.

**Layout and limits.** Row-major ``a`` (M, K), ``b`` (N, K); K must be a multiple of 16 (TMA rows are
16-byte aligned; FP8 MMAs take K in steps of 32, the kernel zero-fills the last block). M and N are free:
TMA loads zero-fill past the edges and the stores are bounded.

**FP8 backward GEMMs (usage notes; lowbit.kernels.quest_linear implements them as ``backward="fp8"``).**
For y = (C_x ⊙ s_x) (C_w ⊙ s_w)ᵀ with output gradient G (M, N):

* dX̂ = G · Ŵ = Σ_n G[m,n]·s_w[n]·C_w[n,k]: s_w lies along the contraction, so fold it into G first:
  ``q, s = rows_to_fp8(G * s_w)``; ``scaled_mm(q, C_w.t().contiguous(), s, ones(K))`` — (M, K).
* dŴ = Gᵀ · X̂ = Σ_m G[m,n]·s_x[m]·C_x[m,k]: ``q, s = rows_to_fp8((G * s_x[:, None]).t())``;
  ``scaled_mm(q, C_x.t().contiguous(), s, ones(K))`` — (N, K).

The codes stay exact (they are the forward's FP8 codes, transposed); only G is rounded to e4m3 per row,
a 2⁻⁴ relative error per element (QuEST keeps these GEMMs in BF16; so does lowbit by default). The
contraction dimensions (N, then M) must be multiples of 16: pad both operands with zero columns.

**Triton's interpreter** (``TRITON_INTERPRET=1``, the CPU tests) runs this kernel with two caveats of Triton
3.6: it truncates float32 → bf16 instead of rounding (bf16 outputs may be one unit in the last place off
there), and under numpy ≥ 2.3 it cannot turn a runtime loop bound into a Python int (the tests patch that
one conversion). The kernel avoids ``tl.cdiv``/``tl.zeros`` (jit functions of triton.language), so it also
runs when triton was imported before TRITON_INTERPRET was set.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lowbit.kernels._triton import custom_op, direct_call, has_triton, jit_namespace, launch_config, resolve_backend
from lowbit.kernels._triton import interpreting as _interpreting

__all__ = ["scaled_mm", "scaled_mm_ref", "has_triton", "CODE_DTYPES", "BACKENDS"]

#: Code dtypes the GEMM accepts (both operands the same).
CODE_DTYPES = (torch.float8_e4m3fn, torch.int8)
#: Output dtypes.
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BACKENDS = ("auto", "triton", "torch", "ref")
#: K granularity of the fast paths (TMA: 16-byte rows).
K_MULTIPLE = 16

triton = tl = None  # placeholders: the real modules live in _kernels()' per-mode namespaces




# ----------------------------------------------------------------------------------------------------------
# checks and the reference
# ----------------------------------------------------------------------------------------------------------


def _check(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"scaled_mm: a and b must be 2-D (M, K) and (N, K), got {tuple(a.shape)}, {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"scaled_mm: a is (M, K) = {tuple(a.shape)} and b must be (N, K) (nn.Linear layout), got {tuple(b.shape)}"
        )
    if a.dtype != b.dtype or a.dtype not in CODE_DTYPES:
        raise TypeError(f"scaled_mm: a and b must both be one of {CODE_DTYPES}, got {a.dtype} and {b.dtype}")
    m, n = a.shape[0], b.shape[0]
    for name, s, size in (("a_scale", a_scale, m), ("b_scale", b_scale, n)):
        if s.dtype != torch.float32 or s.shape != (size,):
            raise ValueError(f"scaled_mm: {name} must be float32 of shape ({size},), got {s.dtype} {tuple(s.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"scaled_mm: bias must have shape ({n},), got {tuple(bias.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"scaled_mm: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


def scaled_mm_ref(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Pure-torch reference: float64 accumulation (exact for any FP8/INT8 codes up to K = 2¹⁷), rounded to
    float32, then ``acc·a_scale[:, None]·b_scale[None, :] (+ bias)`` in float32, then ``out_dtype``."""
    _check(a, b, a_scale, b_scale, bias, out_dtype)
    acc = (a.double() @ b.double().t()).float()
    out = acc * a_scale[:, None] * b_scale[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------
# the Triton kernel: persistent, TMA loads, grouped tile order, scales + bias in the epilogue
# ----------------------------------------------------------------------------------------------------------

#: The one configuration used under TRITON_INTERPRET=1 (and when a test passes none): small tiles keep the
#: numpy interpreter fast, and a 2-program persistent grid exercises the tile loop.
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2, "SUBTILE": False, "NUM_SMS": 2}

#: H100 configurations: 128×128 or 128×256 tiles (and 256×128), BLOCK_K = 128 (128-byte swizzled FP8 rows),
#: 3–5 stages, 2 warpgroups. Shared memory per stage is (BM + BN)·BK bytes — 32 KB (128×128) or 48 KB
#: (128×256) — plus the epilogue's C tile; configs that do not fit are pruned by the autotuner when they fail
#: to compile. (BM, BN, BK, stages, warps, subtile)
GPU_CONFIGS = (
    (128, 128, 128, 4, 8, False),
    (128, 128, 128, 5, 8, False),
    (128, 256, 128, 3, 8, False),
    (128, 256, 128, 3, 8, True),
    (128, 256, 128, 4, 8, True),
    (256, 128, 128, 3, 8, False),
    (128, 128, 128, 4, 4, False),
)
#: The one GPU configuration with LOWBIT_AUTOTUNE=0: GPU_CONFIGS' first, 128×128×128, 4 stages, 8 warps, no
#: subtiling — the tile that :func:`_prune` keeps under FP8 promotion (the default), spill-free with and without
#: promotion, FP8 and INT8, and 4 × 32 KB of operand stages + a float32 C tile (64 KB) fit shared memory for
#: every output dtype (192 KB of 227 in the sm_90a compile).
DEFAULT_GPU_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "SUBTILE": False,
                      "num_stages": 4, "num_warps": 8}


# The Triton source: plain functions, turned into ``triton.jit`` functions by :func:`_kernels` once per interpret
# mode, each mode in a namespace of its own that holds ``tl`` and the jit versions of these helpers (``@triton.jit``
# decides between interpreter and compiler when it decorates, from TRITON_INTERPRET; the interpreter resolves
# helper calls through the kernel's globals, not closures). So importing this module imports no Triton, and both
# modes can coexist in one process. Annotations stay strings (``from __future__ import annotations``), which is
# how Triton recognises ``tl.constexpr`` here.


def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # grouped order: GROUP_M row tiles walk the column tiles together, so b's tiles are reused from L2
    group = GROUP_M * num_pid_n
    first_m = (tile_id // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % group) % group_m
    pid_n = (tile_id % group) // group_m
    return pid_m, pid_n


def _epilogue(acc, c, a_scale_ptr, b_scale_ptr, bias_ptr, off_m, off_n, M, N, stride_cm,
              HAS_BIAS: tl.constexpr, C_IS_DESC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    offs_m = off_m + tl.arange(0, BM)
    offs_n = off_n + tl.arange(0, BN)
    sa = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    sb = tl.load(b_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    out = acc.to(tl.float32) * sa[:, None] * sb[None, :]  # (acc·sa)·sb, as the reference
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if C_IS_DESC:
        c.store([off_m, off_n], out.to(c.dtype))  # TMA store, clipped at the tensor's edges
    else:
        ptrs = c + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        tl.store(ptrs, out.to(c.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _scaled_mm_kernel(
    a_desc, b_desc, c, a_scale_ptr, b_scale_ptr, bias_ptr,
    M, N, K, stride_cm,
    HAS_BIAS: tl.constexpr, C_IS_DESC: tl.constexpr, IS_INT: tl.constexpr, PROMOTE: tl.constexpr,
    OUT_BYTES: tl.constexpr,  # unused in the body: keys the autotuner (the C tile's shared memory)
    NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SUBTILE: tl.constexpr,
):  # fmt: skip
    # (integer division rather than tl.cdiv, tl.full rather than tl.zeros: the interpreter cannot call
    # triton.language's own jit functions when triton was imported before TRITON_INTERPRET was set — by
    # torch.compile earlier in a test run, say)
    start = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    k_tiles = (K + BLOCK_K - 1) // BLOCK_K
    num_tiles = num_pid_m * num_pid_n
    # a second tile counter for the epilogue keeps the flattened loop's prologue and epilogue independent
    tile_c = start - NUM_SMS
    for tile_id in tl.range(start, num_tiles, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if IS_INT:
            acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.int32)
        else:
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = a_desc.load([off_m, off_k])  # (BLOCK_M, BLOCK_K), zero-filled past M and K
            b = b_desc.load([off_n, off_k])  # (BLOCK_N, BLOCK_K): K-major, as FP8 WGMMA needs it
            if IS_INT:
                acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
            elif PROMOTE > 0:
                # partial sums leave the reduced-precision FP8 accumulator every PROMOTE values of K
                acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=PROMOTE)
            else:
                acc = tl.dot(a, b.T, acc)
        tile_c += NUM_SMS
        pid_m, pid_n = _tile_coords(tile_c, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if SUBTILE:  # two (BLOCK_M, BLOCK_N/2) halves: half the epilogue's registers and shared memory
            acc = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            acc0, acc1 = tl.split(acc)
            _epilogue(
                acc0,
                c,
                a_scale_ptr,
                b_scale_ptr,
                bias_ptr,
                off_m,
                off_n,
                M,
                N,
                stride_cm,
                HAS_BIAS,
                C_IS_DESC,
                BLOCK_M,
                BLOCK_N // 2,
            )
            _epilogue(
                acc1,
                c,
                a_scale_ptr,
                b_scale_ptr,
                bias_ptr,
                off_m,
                off_n + BLOCK_N // 2,
                M,
                N,
                stride_cm,
                HAS_BIAS,
                C_IS_DESC,
                BLOCK_M,
                BLOCK_N // 2,
            )
        else:
            _epilogue(
                acc,
                c,
                a_scale_ptr,
                b_scale_ptr,
                bias_ptr,
                off_m,
                off_n,
                M,
                N,
                stride_cm,
                HAS_BIAS,
                C_IS_DESC,
                BLOCK_M,
                BLOCK_N,
            )


_JIT_FUNCTIONS = ("_tile_coords", "_epilogue", "_scaled_mm_kernel")


def _set_block_shapes(nargs: dict) -> None:
    # autotune pre-hook (and the fixed-config launch): the host-side TMA descriptors take the block shape of the
    # config being run
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk]
    if nargs["C_IS_DESC"]:
        nargs["c"].block_shape = [bm, bn // 2 if nargs["SUBTILE"] else bn]


def _prune(configs: list, nargs: dict, **meta) -> list:
    # Promotion keeps a second (partial) accumulator: beyond a 128×128 tile per 8 warps the two no longer fit in
    # 255 registers (ptxas spills: checked for sm_90a with Triton 3.6), so those configs are not even compiled.
    if meta.get("PROMOTE", 0) and not meta.get("IS_INT", False):
        small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128 and c.num_warps == 8]
        return small or configs
    return configs


@dataclass(frozen=True)
class _Kernels:
    kernel: object  # the jitted kernel (explicit config)
    tuned: object  # the same, autotuned over GPU_CONFIGS (compiled mode)
    descriptor: type  # triton.tools.tensor_descriptor.TensorDescriptor
    triton: object  # the triton module


@functools.cache
def _kernels(interpret: bool) -> _Kernels:
    """Import Triton and jit the functions above into a namespace of their own (comment above)."""
    if not has_triton():
        raise ModuleNotFoundError(
            "scaled_mm backend='triton' needs Triton: pip install 'lowbit[triton]' "
            "(triton>=3.6), or use backend='torch'/'ref'"
        )
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    if interpret != _interpreting():
        raise RuntimeError("TRITON_INTERPRET changed while the kernels were being built")
    ns = jit_namespace(globals(), _JIT_FUNCTIONS, dict(triton=triton, tl=tl))
    kernel = ns["_scaled_mm_kernel"]
    configs = [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SUBTILE": sub},
            num_stages=st,
            num_warps=w,
            pre_hook=_set_block_shapes,
        )
        for bm, bn, bk, st, w, sub in GPU_CONFIGS
    ]
    key = ["M", "N", "K", "HAS_BIAS", "IS_INT", "PROMOTE", "OUT_BYTES"]
    tuned = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _prune})(kernel)
    return _Kernels(kernel, tuned, TensorDescriptor, triton)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _scaled_mm_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    promote: int,
    config: dict | None = None,
) -> torch.Tensor:
    """Launch the Triton kernel: autotuned over :data:`GPU_CONFIGS` on a GPU; with ``config`` (a dict of the
    kernel's meta-parameters plus optional ``num_warps``, ``num_stages``, ``NUM_SMS``), :data:`INTERPRET_CONFIG`
    under the interpreter, or :data:`DEFAULT_GPU_CONFIG` with ``LOWBIT_AUTOTUNE=0``, that one configuration."""
    interpret = _interpreting()
    if not interpret and not a.is_cuda:
        raise RuntimeError(
            "scaled_mm backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
            "interpreter); use backend='ref' on the CPU"
        )
    kern = _kernels(interpret)
    cdiv = kern.triton.cdiv
    a, b = a.contiguous(), b.contiguous()
    a_scale, b_scale = a_scale.contiguous(), b_scale.contiguous()
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0 or k == 0:  # TMA descriptors need positive sizes
        return scaled_mm_ref(a, b, a_scale, b_scale, bias, out_dtype)
    out = torch.empty((m, n), device=a.device, dtype=out_dtype)
    is_int = a.dtype == torch.int8
    desc = kern.descriptor
    # placeholder block shapes: the autotune pre-hook (or the fixed config below) sets the real ones
    a_desc, b_desc = desc.from_tensor(a, [16, 16]), desc.from_tensor(b, [16, 16])
    c_is_desc = (n * out.element_size()) % 16 == 0  # a TMA store needs 16-byte rows
    c = desc.from_tensor(out, [16, 16]) if c_is_desc else out
    bias_arg = bias.contiguous() if bias is not None else a_scale  # any pointer; never read without bias
    args = (a_desc, b_desc, c, a_scale, b_scale, bias_arg, m, n, k, out.stride(0))
    flags = dict(HAS_BIAS=bias is not None, C_IS_DESC=c_is_desc, IS_INT=is_int, OUT_BYTES=out.element_size())
    cfg = launch_config(config, interpret, INTERPRET_CONFIG, DEFAULT_GPU_CONFIG)
    sms = cfg.pop("NUM_SMS", None) if cfg is not None else None  # a persistent grid of this many programs
    if not sms:
        sms = _num_sms(a.device.index if a.device.index is not None else torch.cuda.current_device())
    if cfg is None:
        def grid(meta: dict) -> tuple[int]:
            return (min(sms, cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"])),)

        # Triton requires max_num_imprecise_acc ≤ the dot's K: every GPU config has BLOCK_K = 128
        kern.tuned[grid](*args, **flags, PROMOTE=0 if is_int else min(promote, 128), NUM_SMS=sms)
        return out
    num_warps, num_stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 3)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    _set_block_shapes(dict(cfg, a_desc=a_desc, b_desc=b_desc, c=c, C_IS_DESC=c_is_desc))
    grid = (min(sms, cdiv(m, bm) * cdiv(n, bn)),)
    kern.kernel[grid](
        *args,
        **flags,
        PROMOTE=0 if is_int else min(promote, bk),
        NUM_SMS=sms,
        **cfg,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


# ----------------------------------------------------------------------------------------------------------
# torch backend: torch._scaled_mm (FP8, row-wise scales) / torch._int_mm (INT8)
# ----------------------------------------------------------------------------------------------------------


def _scaled_mm_torch(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    promote: int = 128,
) -> torch.Tensor:
    """cuBLASLt/CUTLASS through torch (module docstring, "The torch backend"). FP8: ``torch._scaled_mm`` with
    row-wise scales (a_scale (M, 1), b_scale (1, N); b passed column-major as ``b.t()``; ``use_fast_accum`` only
    for ``promote=0``), one kernel for a bf16 output (a bf16 bias fused too); other output dtypes or biases: unit
    tensor-wise scales, a float32 result and the reference's epilogue in torch. INT8: ``torch._int_mm`` (int32)
    + that epilogue."""
    a = a.contiguous()
    bt = b.contiguous().t()  # (K, N) column-major: what cuBLASLt wants for the second operand
    if a.dtype == torch.int8:
        acc = torch._int_mm(a, bt).float()
    elif out_dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16):
        # (M, 1) and (1, N) views of the contiguous (M,) and (N,) scales are contiguous themselves
        return torch._scaled_mm(a, bt, scale_a=a_scale.contiguous().unsqueeze(1),
                                scale_b=b_scale.contiguous().unsqueeze(0), bias=bias, out_dtype=torch.bfloat16,
                                use_fast_accum=promote == 0)  # fmt: skip
    else:
        one = torch.ones((), device=a.device, dtype=torch.float32)
        acc = torch._scaled_mm(a, bt, scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=promote == 0)
    out = acc * a_scale[:, None] * b_scale[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------
# custom op (opaque to torch.compile, fake tensor for shapes) and the public entry point
# ----------------------------------------------------------------------------------------------------------

def _resolve_backend(backend: str, a: torch.Tensor) -> str:
    """``backend="auto"`` (module docstring, "Backends"): the reference on CPU; on CUDA the Triton kernel on Hopper
    (exact), torch's ops elsewhere."""
    return resolve_backend(backend, a.device, (9, 0))  # the persistent TMA kernel: Hopper


def _scaled_mm_impl(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    backend: str,
    promote: int,
) -> torch.Tensor:
    which = _resolve_backend(backend, a)
    if which == "triton":
        return _scaled_mm_triton(a, b, a_scale, b_scale, bias, out_dtype, promote)
    if which == "torch":
        return _scaled_mm_torch(a, b, a_scale, b_scale, bias, out_dtype, promote)
    return scaled_mm_ref(a, b, a_scale, b_scale, bias, out_dtype)


_scaled_mm_op = custom_op(
    "scaled_mm",
    "(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, Tensor? bias, ScalarType out_dtype, str backend, "
    "int promote) -> Tensor",
    _scaled_mm_impl,
)


@_scaled_mm_op.register_fake
def _(a, b, a_scale, b_scale, bias, out_dtype, backend, promote):
    _check(a, b, a_scale, b_scale, bias, out_dtype)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    backend: str = "auto",
    promote: int = 128,
) -> torch.Tensor:
    """(a·bᵀ) ⊙ a_scale[:, None] ⊙ b_scale[None, :] (+ bias) → (M, N) ``out_dtype`` (module docstring).

    ``a`` (M, K), ``b`` (N, K): both float8_e4m3fn or both int8. ``a_scale`` (M,), ``b_scale`` (N,): float32.
    ``bias`` (N,): any float dtype. K must be a multiple of 16 (and N too for the torch backend's FP8 GEMM).
    ``backend``: auto | triton | torch | ref.
    ``promote``: FP8 only. Triton backend: promote the partial sum to float32 every this many values of K
    (a multiple of 32, capped at the kernel's BLOCK_K = 128; 0 = never — Hopper's fast accumulation). Torch
    backend: 0 = ``use_fast_accum=True``, anything else = torch's own promotion (module docstring).
    No autograd: the training op (:mod:`lowbit.kernels.quest_linear`) owns the backward."""
    _check(a, b, a_scale, b_scale, bias, out_dtype)
    if backend not in BACKENDS:
        raise ValueError(f"scaled_mm: backend must be one of {BACKENDS}, got {backend!r}")
    if a.shape[1] % K_MULTIPLE:
        raise ValueError(
            f"scaled_mm: K = {a.shape[1]} must be a multiple of {K_MULTIPLE} (TMA rows are 16-byte "
            "aligned); pad both operands with zero columns"
        )
    if promote < 0 or promote % 32:
        raise ValueError(f"scaled_mm: promote must be 0 or a positive multiple of 32, got {promote}")
    fn = _scaled_mm_impl if direct_call(a) else _scaled_mm_op  # eager on CUDA: no dispatcher (_triton.direct_call)
    return fn(a, b, a_scale, b_scale, bias, out_dtype, backend, promote)
