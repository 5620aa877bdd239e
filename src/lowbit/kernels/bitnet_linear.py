"""BitNet b1.58's W·A linear layer as one autograd op: int8 codes of both operands → exact INT8 GEMM → STE backward.

    y = bitnet_linear(x, weight, bias)        # = QuantLinear(bitnet-b1.58)(x), forward on INT8 tensor cores

**Forward** (METHODS.md §2). BitNet b1.58 quantizes the weight to the ternary grid with one absmean step per
tensor, W ≈ C_w·s_w with C_w ∈ {−1, 0, 1}, and each token's activation to 8 bits with its absmax step,
x ≈ C_x·s_x with C_x ∈ {−128 … 127} (lowbit's ``int_asym`` grid; absmax scaling never reaches −128). Both code
sets are int8, so the product is one INT8 GEMM with a row and a column scale,

    y = (C_x · C_wᵀ) ⊙ s_x[:, None] ⊙ s_w[None, :] + bias          (:func:`lowbit.kernels.scaled_mm.scaled_mm`)

and the integer sum is exact in int32 (|C_x·C_w| ≤ 2¹⁴, K < 2¹⁷), so y equals the fake-quant product up to
the float32 rounding of the epilogue — more exactly than QuantLinear under bf16 autocast, whose GEMM sees
bf16-rounded operands. The codes come from lowbit's one quantizer (:func:`lowbit.quant.quantize`), so they are
QuantLinear's codes bit for bit. The same op computes every recipe whose two specs are integer grids of at
most 256 levels without offset, rounded to nearest, per tensor or per row, no rotation, plain STE
(:func:`bitnet_linear_args`: ``bitnet-b1.58`` and ``ste-wXaY`` for X, Y ∈ {1.58, 2 … 8}).

**Backward** — STE, exactly as :class:`lowbit.nn.QuantLinear` differentiates these recipes: with X̂ = C_x ⊙ s_x
and Ŵ = C_w ⊙ s_w the dequantized operands,

    dx = G·Ŵ,    dW = Gᵀ·X̂,    d bias = Σ_rows G

in the output gradient's dtype (bf16 under autocast; Ŵ and X̂ are computed in float32 and rounded once to it, as
autocast rounds QuantLinear's fake-quantized operands), then cast to the dtypes of x and W.

**Memory**: the op saves the int8 codes (1 byte per value) and the float32 steps of both operands, not a copy
of x̂ or Ŵ in the compute dtype.

Backends (``gemm_backend``, scaled_mm's): ``auto`` (the Triton kernel on Hopper, torch._int_mm on other GPUs,
the float64 reference on CPU), ``triton``, ``torch``, ``ref``. The activation quantizer is the fused per-row
kernel of :mod:`lowbit.kernels.int8_rows` on CUDA (lowbit's quantizer elsewhere); the weight's per-tensor
absmean quantizer is torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.kernels.int8_rows import int8_rows
from lowbit.kernels.int8_rows import supports as int8_rows_supports
from lowbit.kernels.scaled_mm import K_MULTIPLE, scaled_mm
from lowbit.quant.core import Stats, fake_quantize, quantize
from lowbit.quant.recipes import BITNET_ACT, BITNET_WEIGHT
from lowbit.quant.spec import QuantSpec

__all__ = ["BitNetLinearFunction", "bitnet_linear", "bitnet_linear_args", "bitnet_linear_ref",
           "bitnet_linear_stats", "int8_operand", "quantize_int8"]


def int8_operand(spec: QuantSpec | None, *, estimator: bool = True) -> bool:
    """Whether ``spec``'s codes can enter an exact INT8 GEMM with one scale per row (token / output channel)
    or per tensor: an integer grid without offset (ternary, int, int_asym) of at most 256 levels, nearest
    rounding, no Hadamard rotation, a rule-based scale, and — with ``estimator`` — the plain STE (the only
    estimator whose backward needs no mask)."""
    if spec is None:
        return False
    info = spec.info
    return (info.offset == 0 and info.levels <= 256 and not spec.hadamard and spec.rounding == "nearest"
            and not spec.learned and spec.granularity in ("tensor", "row")
            and (not estimator or spec.estimator == "ste"))


def bitnet_linear_args(weight_spec: QuantSpec | None, act_spec: QuantSpec | None) -> dict | None:
    """Keyword arguments of :func:`bitnet_linear` (``weight_spec``, ``act_spec``) that reproduce a ``QuantLinear``
    with these specs, or None when this op does not compute that layer (module docstring). K must also be a
    multiple of 16 (scaled_mm's TMA rows): the caller checks it, it depends on the layer."""
    if not (int8_operand(weight_spec) and int8_operand(act_spec)):
        return None
    return dict(weight_spec=weight_spec, act_spec=act_spec)


def quantize_int8(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` (…, K) → (int8 codes (M, K), float32 step per row (M,)), M = x.numel() / K; a per-tensor
    step is repeated for every row. lowbit's quantizer (no gradient), so value = code·step exactly as in
    ``fake_quantize``. Per-row absmax specs (the activations) go through :mod:`lowbit.kernels.int8_rows`, whose
    one-launch kernel is off by default until its CUDA tests pass (see there); the reference otherwise."""
    if int8_rows_supports(spec):
        return int8_rows(x, spec)
    k = x.shape[-1]
    codes, step = quantize(x.reshape(-1, k), spec)
    rows = codes.shape[0]
    step = step.reshape(-1)
    return codes, (step.expand(rows) if step.numel() == 1 else step)


@torch.no_grad()
def bitnet_linear_stats(x: torch.Tensor, cx: torch.Tensor, sx: torch.Tensor) -> Stats:
    """``fake_quantize``'s statistics of x from its codes: ``masked`` = 0 (STE), ``signal`` = Σx², ``noise`` =
    Σ(code·step − x)² (0-dim tensors, no sync)."""
    xf = x.detach().reshape(cx.shape).float()
    return {"masked": torch.zeros((), device=x.device), "signal": xf.square().sum(),
            "noise": (cx.float() * sx[:, None] - xf).square().sum()}


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    dt = x.device.type
    if dt in ("cpu", "cuda") and torch.is_autocast_enabled(dt):
        return torch.get_autocast_dtype(dt)
    return x.dtype


def _dequant(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """code·step in float32, rounded once to ``dtype`` (the fake-quantized value as autocast sees it)."""
    return codes.float().mul_(scale[:, None]).to(dtype)


class BitNetLinearFunction(torch.autograd.Function):
    """y = scaled_mm(C_x, C_w, s_x, s_w, bias) with the STE backward (module docstring). ``x`` and ``weight`` are
    passed for their gradients only; their codes and steps come quantized (:func:`quantize_int8`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, cx, sx, cw, sw, gemm_backend):
        out_dtype = _out_dtype(x)
        y = scaled_mm(cx, cw, sx, sw, bias, out_dtype, backend=gemm_backend)
        ctx.save_for_backward(cx, sx, cw, sw)
        ctx.x_dtype, ctx.w_dtype, ctx.lead = x.dtype, weight.dtype, x.shape[:-1]
        ctx.b_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], cw.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        cx, sx, cw, sw = ctx.saved_tensors
        g = grad_out.reshape(-1, cw.shape[0])
        dt = g.dtype
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ _dequant(cw, sw, dt)).to(ctx.x_dtype).reshape(*ctx.lead, cx.shape[1])  # (M, N) @ (N, K)
        if ctx.needs_input_grad[1]:
            grad_w = (g.t() @ _dequant(cx, sx, dt)).to(ctx.w_dtype)  # (N, M) @ (M, K)
        if ctx.needs_input_grad[2] and ctx.b_dtype is not None:
            grad_b = g.sum(0).to(ctx.b_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def bitnet_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    weight_spec: QuantSpec = BITNET_WEIGHT,
    act_spec: QuantSpec = BITNET_ACT,
    gemm_backend: str = "auto",
    stats: Stats | None = None,
) -> torch.Tensor:
    """BitNet b1.58 linear layer: x (…, K) · Q(W)ᵀ on INT8 tensor cores with the STE backward (module docstring).
    Equals ``QuantLinear`` with the same specs (default: the ``bitnet-b1.58`` recipe) in value and gradient.

    ``weight`` (N, K), ``bias`` (N,); K a multiple of 16. ``gemm_backend``: scaled_mm's (auto | triton | torch |
    ref). ``stats``: if given, filled as ``fake_quantize`` fills it for the input (``masked`` = 0 for the STE,
    ``signal`` = Σx², ``noise`` = Σ(Q(x) − x)²; no grad, no sync). Output dtype: the autocast dtype when autocast
    is on, else x's."""
    if bitnet_linear_args(weight_spec, act_spec) is None:
        raise ValueError(f"bitnet_linear: specs [{weight_spec.short()}] × [{act_spec.short()}] are not integer "
                         "grids (≤ 256 levels, no offset, nearest, per tensor/row, no Hadamard, STE)")
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"bitnet_linear: weight must be (N, K) with K = x.shape[-1] = {k}, got {tuple(weight.shape)}")
    if k % K_MULTIPLE:
        raise ValueError(f"bitnet_linear: K = {k} must be a multiple of {K_MULTIPLE} (scaled_mm); use QuantLinear")
    cx, sx = quantize_int8(x, act_spec)
    cw, sw = quantize_int8(weight, weight_spec)
    if stats is not None:
        stats.update(bitnet_linear_stats(x, cx, sx))
    return BitNetLinearFunction.apply(x, weight, bias, cx, sx, cw, sw, gemm_backend)


def bitnet_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    weight_spec: QuantSpec = BITNET_WEIGHT,
    act_spec: QuantSpec = BITNET_ACT,
) -> torch.Tensor:
    """The torch reference: ``QuantLinear``'s fake-quant computation, F.linear(Q(x), Q(W), bias)."""
    return F.linear(fake_quantize(x, act_spec), fake_quantize(weight, weight_spec), bias)
