"""QuEST's W·A-quantized linear layer as one autograd op: fused quantizer → exact low-bit GEMM → trust backward.

    y = quest_linear(x, weight, bits_w, bits_a, bias)       # = QuantLinear(quest-w{bits_w}a{bits_a})(x)

**Forward** (METHODS.md §4; the math of :class:`lowbit.nn.QuantLinear` with both operands rotated by the same
block Hadamard H, so (XH)(WH)ᵀ = XWᵀ): both operands are quantized row by row by
:func:`lowbit.kernels.hadamard_quant.hadamard_quantize` — codes C of Q(·H), per-row steps s, packed trust
masks — and multiplied by :func:`lowbit.kernels.scaled_mm.scaled_mm`:

    y = (C_x · C_wᵀ) ⊙ s_x[:, None] ⊙ s_w[None, :] + bias

Code format, chosen for the wider of the two grids: FP8 e4m3 (≤ 4 bits and ternary: the half-integer grid
values are exact, FP8 tensor cores), INT8 (5–7 bits: odd integers 2c+1 with step Δ/2, INT8 tensor cores),
or — 8-bit centered grids fit neither — the dequantized values in the activation dtype and a plain GEMM. In
the first two the GEMM's sum is exact (scaled_mm's docstring), so y equals the fake-quant product up to the
float32 rounding of the epilogue (scaled_mm's auto backend: the exact Triton kernel on Hopper; torch's
row-wise ``torch._scaled_mm``, faster but not exact, only with ``gemm_backend="torch"``).

**Backward** — with X̂ = C_x ⊙ s_x and Ŵ = C_w ⊙ s_w the rotated quantized operands and M_x, M_w the trust masks:

    dX̂ = G·Ŵ,   dx = Hᵀ(M_x ⊙ dX̂) = masked_inverse_hadamard(dX̂, M_x)
    dŴ = Gᵀ·X̂,  dW = Hᵀ(M_w ⊙ dŴ) = masked_inverse_hadamard(dŴ, M_w),   d bias = Σ_rows G

``backward="bf16"`` (default, as QuEST): the two GEMMs run in the output gradient's dtype (bf16 under autocast;
the dequantized operands are rounded to it once from float32, exactly as autocast rounds QuantLinear's
fake-quantized ones). ``backward="fp8"``: both on FP8 tensor cores through ``scaled_mm``: the codes are the
forward's (exact, transposed), the scale of the contraction side is folded into G, and G is rounded to e4m3
per row (a relative error of up to 2⁻⁴ per element; codes of ≤ 4 bits only).

**Memory**: the op saves the codes (1 byte per value in FP8/INT8), the per-row steps and the bit-packed masks
(1/8 byte per value) of both operands — not a bf16 copy of x or W (except at 8 bits, where the rotated values
themselves are kept, in the output dtype).

**Statistics** (``stats=``): the masked fractions of the trust masks the forward computes anyway — the share of
x's (``masked``) and W's (``weight_masked``) entries whose gradient the trust estimator zeroes, exactly what
``fake_quantize(..., stats=)`` reports as ``masked``. The op returns its packed masks as extra
(non-differentiable) outputs, so under torch.compile they are graph outputs, not a side effect, and
:func:`lowbit.kernels.hadamard_quant.masked_fraction` counts their bits without unpacking: 0-dim tensors, no
host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.kernels.scaled_mm import scaled_mm
from lowbit.quant.core import Stats
from lowbit.quant.grids import n_levels
from lowbit.quant.recipes import quest_spec
from lowbit.quant.spec import QuantSpec

__all__ = ["quest_linear", "quest_linear_args", "QuestLinearFunction", "code_format", "BACKWARDS"]

BACKWARDS = ("bf16", "fp8")
_FP8_MAX = 448.0  # largest finite float8_e4m3fn


def code_format(bits_w: float, bits_a: float) -> str:
    """The one code format both operands share: ``"fp8"`` when both grids have ≤ 16 levels (≤ 4 bits,
    ternary), ``"int8"`` when ≤ 128 (≤ 7 bits), else ``"float"`` (the 8-bit centered grid: ±255 half-steps)."""
    levels = max(n_levels(bits_w), n_levels(bits_a))
    return "fp8" if levels <= 16 else "int8" if levels <= 128 else "float"


def quest_linear_args(weight_spec: QuantSpec | None, act_spec: QuantSpec | None) -> dict | None:
    """Keyword arguments of :func:`quest_linear` (``bits_w``, ``bits_a``, ``block``, ``trust``, ``alpha``) that
    reproduce a ``QuantLinear`` with these specs, or None when this op does not compute that layer: both specs
    must be QuEST's (``quest_spec(bits)``: centered/ternary/binary grid, RMS·α per row, Hadamard, trust, nearest)
    with one block, trust radius and α between them (and K must be a multiple of the block, which
    ``fake_quantize`` would otherwise shrink). The check a module would make before dispatching here."""
    if weight_spec is None or act_spec is None:
        return None
    shared = ("hadamard_block", "trust", "alpha")
    if any(getattr(weight_spec, f) != getattr(act_spec, f) for f in shared):
        return None
    for spec in (weight_spec, act_spec):
        canon = quest_spec(spec.bits).replace(**{f: getattr(spec, f) for f in shared})
        if spec != canon:
            return None
    return dict(
        bits_w=weight_spec.bits,
        bits_a=act_spec.bits,
        block=weight_spec.hadamard_block,
        trust=weight_spec.trust,
        alpha=weight_spec.alpha,
    )


def _hq():
    # the fused quantizer, imported on first use (lowbit.kernels.hadamard_quant)
    from lowbit.kernels import hadamard_quant

    return hadamard_quant


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    dt = x.device.type
    if dt in ("cpu", "cuda") and torch.is_autocast_enabled(dt):
        return torch.get_autocast_dtype(dt)
    return x.dtype


def _dequant(codes: torch.Tensor, scale: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """X̂ = codes·scale computed in float32 and rounded once to ``dtype`` (the fake-quant value as autocast
    sees it). The "float" format already holds X̂."""
    if fmt == "float":
        return codes.to(dtype)
    return codes.float().mul_(scale[:, None]).to(dtype)


def _rows_to_fp8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax FP8: v (R, C) float → (q float8_e4m3fn (R, C), s float32 (R,)), v ≈ q·s[:, None]."""
    s = v.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / _FP8_MAX
    q = (v / s[:, None]).clamp_(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    return q, s


def _pad_k(t: torch.Tensor, k_multiple: int = 16) -> torch.Tensor:
    """Zero columns up to a multiple of ``k_multiple`` (the contraction dim of scaled_mm); zeros add nothing."""
    pad = -t.shape[1] % k_multiple
    return F.pad(t, (0, pad)) if pad else t


def _fp8_gemm_tn(g: torch.Tensor, codes: torch.Tensor, out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """g (R, C) float32 (the contraction-side scale already folded in) times codes (C, K) FP8 → (R, K):
    scaled_mm(rows_to_fp8(g), codesᵀ, s_g, 1)."""
    q, s = _rows_to_fp8(g)
    ct = codes.t().contiguous()  # (K, C): nn.Linear layout for the second operand
    ones = torch.ones(ct.shape[0], device=g.device, dtype=torch.float32)
    return scaled_mm(_pad_k(q), _pad_k(ct), s, ones, None, out_dtype, backend=backend)


class QuestLinearFunction(torch.autograd.Function):
    """The autograd op behind :func:`quest_linear` (module docstring). Arguments after ``bias`` are options.
    Returns (y, M_x, M_w): the output and the packed trust masks of x (rows of x flattened to 2-D) and W, which
    are non-differentiable (the statistics of ``quest_linear(stats=)``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, bits_w, bits_a, backward, block, trust, alpha, gemm_backend, quant_backend):
        hq = _hq()
        k = x.shape[-1]
        lead = x.shape[:-1]
        out_dtype = _out_dtype(x)
        fmt = code_format(bits_w, bits_a)
        if backward == "fp8" and fmt != "fp8":
            raise ValueError(
                f"quest_linear: backward='fp8' reuses the forward's FP8 codes, which exist for grids of "
                f"≤ 4 bits; got bits_w={bits_w}, bits_a={bits_a}: use backward='bf16'"
            )
        x2 = x.reshape(-1, k)
        opts = dict(trust=trust, out=fmt, alpha=alpha, backend=quant_backend)
        cx, sx, mx = hq.hadamard_quantize(x2, bits_a, block, **opts)
        cw, sw, mw = hq.hadamard_quantize(weight, bits_w, block, **opts)
        if fmt == "float":  # 8-bit centered grid: "codes" are the rotated values X̂, Ŵ, kept in the GEMM dtype
            cx, cw = cx.to(out_dtype), cw.to(out_dtype)
            y = F.linear(cx, cw, None if bias is None else bias.to(out_dtype))
        else:
            y = scaled_mm(cx, cw, sx, sw, bias, out_dtype, backend=gemm_backend)
        ctx.save_for_backward(cx, sx, mx, cw, sw, mw)
        ctx.fmt, ctx.block, ctx.backward, ctx.gemm_backend, ctx.quant_backend = (
            fmt,
            block,
            backward,
            gemm_backend,
            quant_backend,
        )
        ctx.b_dtype = None if bias is None else bias.dtype
        ctx.x_dtype, ctx.w_dtype, ctx.lead = x.dtype, weight.dtype, lead
        ctx.mark_non_differentiable(mx, mw)
        ctx.set_materialize_grads(False)  # no zero gradients for the masks
        return y.reshape(*lead, weight.shape[0]), mx, mw

    @staticmethod
    def backward(ctx, grad_out, _grad_mx=None, _grad_mw=None):
        if grad_out is None:
            return (None,) * 11
        cx, sx, mx, cw, sw, mw = ctx.saved_tensors
        hq = _hq()
        n = cw.shape[0]
        g = grad_out.reshape(-1, n)
        dt = g.dtype
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if ctx.backward == "fp8":
            if need_x:  # dX̂[m,k] = Σ_n G[m,n]·s_w[n]·C_w[n,k]
                gx = _fp8_gemm_tn(g.float() * sw[None, :], cw, dt, ctx.gemm_backend)
            if need_w:  # dŴ[n,k] = Σ_m G[m,n]·s_x[m]·C_x[m,k]
                gw = _fp8_gemm_tn((g.float() * sx[:, None]).t(), cx, dt, ctx.gemm_backend)
        else:
            if need_x:
                gx = g @ _dequant(cw, sw, ctx.fmt, dt)  # (M, N) @ (N, K)
            if need_w:
                gw = g.t() @ _dequant(cx, sx, ctx.fmt, dt)  # (N, M) @ (M, K)
        # the rotation back runs in the wider of the GEMM's and the input's dtype (an fp32 master weight gets
        # its gradient rotated in fp32 from the bf16 GEMM output, as autograd does for QuantLinear)
        if need_x:
            gx = gx.to(torch.promote_types(gx.dtype, ctx.x_dtype))
            grad_x = hq.masked_inverse_hadamard(gx, mx, ctx.block, backend=ctx.quant_backend)
            grad_x = grad_x.to(ctx.x_dtype).reshape(*ctx.lead, cx.shape[1])
        if need_w:
            gw = gw.to(torch.promote_types(gw.dtype, ctx.w_dtype))
            grad_w = hq.masked_inverse_hadamard(gw, mw, ctx.block, backend=ctx.quant_backend).to(ctx.w_dtype)
        if need_b and ctx.b_dtype is not None:
            grad_b = g.sum(0).to(ctx.b_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


def quest_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bits_w: float,
    bits_a: float,
    bias: torch.Tensor | None = None,
    backward: str = "bf16",
    *,
    block: int = 128,
    trust: float | None = None,
    alpha: str | float = "optimal",
    gemm_backend: str = "auto",
    quant_backend: str = "auto",
    stats: Stats | None = None,
) -> torch.Tensor:
    """QuEST linear layer: x (…, K) · Q(W)ᵀ with both operands quantized in the block-Hadamard domain (module
    docstring). Equals ``QuantLinear`` with the ``quest-w{bits_w}a{bits_a}`` recipe in value and gradient.

    ``weight`` (N, K), ``bias`` (N,). ``bits_w``, ``bits_a``: 1, 1.58, 2 … 8. ``backward``: "bf16" (GEMMs in the
    output gradient's dtype) or "fp8" (≤ 4-bit grids). ``block``: Hadamard block (K must be a multiple).
    ``trust``/``alpha``: as in ``QuantSpec`` (None = half a step; 'optimal' | 'reference' | a number).
    ``gemm_backend``: scaled_mm's (auto | triton | torch | ref); ``quant_backend``: hadamard_quantize's
    (auto | triton | ref). ``stats``: if given, filled with ``masked`` (fraction of x's entries whose gradient
    the trust mask zeroes — ``fake_quantize``'s statistic for the input, exactly) and ``weight_masked`` (the
    same for W): 0-dim float32 tensors counted from the packed masks, no grad, no host sync. Output dtype: the
    autocast dtype when autocast is on, else x's."""
    if backward not in BACKWARDS:
        raise ValueError(f"quest_linear: backward must be one of {BACKWARDS}, got {backward!r}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"quest_linear: weight must be (N, K) with K = x.shape[-1] = {x.shape[-1]}, got {tuple(weight.shape)}"
        )
    y, mx, mw = QuestLinearFunction.apply(
        x, weight, bias, float(bits_w), float(bits_a), backward, block, trust, alpha, gemm_backend, quant_backend
    )
    if stats is not None:
        hq = _hq()
        stats["masked"] = hq.masked_fraction(mx)
        stats["weight_masked"] = hq.masked_fraction(mw)
    return y
