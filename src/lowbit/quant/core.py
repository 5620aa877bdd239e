"""The one quantizer body: scale → round → clamp → (de)quantize, and its gradient estimators.

Pure functions of (tensor, :class:`QuantSpec`). Granularity is a block shape, not a code path: every spec
views its input as (R, G, g) — R rows, G groups per row, g values per group — and reduces the scale over the
last axis (tensor: (1, 1, numel); row: (rows, 1, K); group: (rows, K/g, g)).

Forward (METHODS.md §1, §4): with clip half-range s from the scale rule and the grid's ``top``,

    Δ = s / top,    code = clamp(round(x/Δ + offset) − 2·offset, qmin, qmax),    Q(x) = (code + offset)·Δ.

For the centered grid (offset ½, top = (n−1)/2) this is QuEST's Δ = 2s/(n−1), x_c = clamp(x, −s, s),
Q(x) = (round(x_c/Δ + ½) − ½)·Δ term for term (the clamp on codes equals the clamp on x because the code
bounds are integers); for offset 0 it is BitNet's clip(round(x/Δ), qmin, qmax)·Δ. Arithmetic runs in float32
(autocast off): 8-bit codes need more mantissa than bf16's 8 bits to round correctly.

Gradients (the "detach trick", so the value is exactly Q(x) and autograd does the rest):

    out = Q(x) + M ⊙ (x − x̄) [+ ∂Q/∂Δ ⊙ (Δ − Δ̄) for learned scales],      x̄ = x.detach()

x − x̄ is exactly zero in value and the identity in gradient, so dL/dx = M ⊙ g with M = 1 (STE),
1[lo ≤ x ≤ hi] (clipped STE), 1[|Q(x) − x| ≤ T·σ] (QuEST trust), 0 (none). Data-derived scales (absmax,
absmean, rms) are constants for the gradient, as in the reference codes. Learned scales get
LSQ's ∂Q/∂Δ = (code + offset) − 1[inside]·x/Δ scaled by 1/√(numel·q_max), or PACT's gradient to the clip
from the clipped entries only (METHODS.md §5).
"""

from __future__ import annotations

import contextlib
import math

import torch

from lowbit.quant.gaussian import optimal_alpha
from lowbit.quant.hadamard import hadamard
from lowbit.quant.spec import QuantSpec

Stats = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# granularity and scale
# ----------------------------------------------------------------------------------------------------------


def _groups(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View x as (R, G, g): one scale per (R, G)."""
    if spec.granularity == "tensor":
        return x.reshape(1, 1, -1)
    k = x.shape[-1]
    if spec.granularity == "row":
        return x.reshape(-1, 1, k)
    g = spec.group_size
    if k % g:
        raise ValueError(f"group_size={g} does not divide the last dimension K={k}")
    return x.reshape(-1, k // g, g)


def scale_shape(shape: torch.Size | tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    """Shape of the scale :func:`quantize` returns for an input of ``shape``: () per tensor,
    (…, 1) per row, (…, K/g) per group."""
    if spec.granularity == "tensor":
        return ()
    k = shape[-1]
    return (*shape[:-1], 1 if spec.granularity == "row" else k // spec.group_size)


def clip_range(xg: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The one scale formula: clip half-range s per group of ``xg`` (R, G, g) → (R, G, 1).

    absmax: s = max|x| (STE baseline, BitNet activations: m = max(max|x|, 1e-5), METHODS.md §2, §5);
    absmean: s = mean|x| (BitNet weights, DQT); rms: s = α_b·RMS(x) (QuEST §4, no mean subtraction).
    The statistic is floored at ``spec.eps`` so an all-zero group stays finite."""
    if spec.scale == "absmax":
        stat = xg.abs().amax(-1, keepdim=True)
    elif spec.scale == "absmean":
        stat = xg.abs().mean(-1, keepdim=True)
    elif spec.scale == "rms":
        stat = xg.square().mean(-1, keepdim=True).sqrt()
    else:
        raise ValueError(f"scale={spec.scale!r} is learned: pass the layer's parameter as scale=")
    stat = stat.clamp_min(spec.eps)
    return stat * spec.alpha_value if spec.scale == "rms" else stat


def _step(xg: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None) -> torch.Tensor:
    """Step Δ per group, (R, G, 1), detached."""
    if scale is None:
        return clip_range(xg, spec) / spec.info.top
    s = scale.detach().float()
    return s.reshape(1, 1, 1) if s.numel() == 1 else s.reshape(xg.shape[0], xg.shape[1], 1)


def learned_step(spec: QuantSpec, param: torch.Tensor) -> torch.Tensor:
    """Step Δ from a learned parameter: LSQ learns Δ itself; PACT learns the clip s, so Δ = s/top."""
    if spec.scale == "lsq":
        return param
    if spec.scale == "pact":
        return param / spec.info.top
    raise ValueError(f"scale={spec.scale!r} is not learned")


@torch.no_grad()
def init_learned_scale(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Initial value (shape (1,)) of a learned scale, from the first tensor it will quantize.

    LSQ: Δ = 2·mean|x|/√q_max (Esser et al.; METHODS.md §5), q_max = top, the largest grid value in steps
    (7.5 for the 4-bit centered grid). PACT: s = α·RMS(x), the Gaussian-MSE-optimal clip for the grid's
    level count — a data-free guess that PACT then learns away from."""
    with _no_autocast(x):
        xr = _rotate(x.float(), spec)
        if spec.scale == "lsq":
            v = 2.0 * xr.abs().mean() / math.sqrt(spec.info.top)
        elif spec.scale == "pact":
            v = optimal_alpha(spec.info.levels) * xr.square().mean().sqrt()
        else:
            raise ValueError(f"scale={spec.scale!r} is not learned")
        return v.clamp_min(spec.eps).reshape(1)


# ----------------------------------------------------------------------------------------------------------
# the body
# ----------------------------------------------------------------------------------------------------------


def _no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    dt = x.device.type
    if dt in ("cpu", "cuda") and torch.is_autocast_enabled(dt):
        return torch.autocast(dt, enabled=False)
    return contextlib.nullcontext()


def _rotate(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return hadamard(x, spec.hadamard_block) if spec.hadamard else x


def _codes(
    xg: torch.Tensor,
    step: torch.Tensor,
    spec: QuantSpec,
    generator: torch.Generator | None,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """Float codes in [qmin, qmax] (R, G, g). Nearest: round(y); stochastic: floor(y + u), u ~ U[0,1),
    so E[code] = y exactly inside the range (unbiased). y = x/Δ + offset; subtracting 2·offset after the
    rounding reproduces QuEST's round(x/Δ + ½) − ½ for the centered grid."""
    info = spec.info
    y = xg / step + info.offset
    if spec.rounding == "nearest":
        r = torch.round(y)
    else:
        if noise is None:
            u = torch.rand(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        else:
            u = _groups(noise.to(device=y.device, dtype=y.dtype), spec)
        r = torch.floor(y + u)
    return (r - 2 * info.offset).clamp_(info.qmin, info.qmax)


def quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    scale: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x → (codes, step). ``codes``: int8, shape of x, in the Hadamard domain when ``spec.hadamard``;
    value = (code + spec.info.offset)·step. ``step``: float32 Δ of shape :func:`scale_shape`.

    ``scale``: a fixed step Δ to use instead of the spec's rule (e.g. a frozen per-tensor DQT scale, or
    ``learned_step(spec, param)`` for LSQ/PACT, which have no rule of their own). ``generator``/``noise``:
    the random stream of stochastic rounding (``noise`` = explicit uniforms in [0,1), shape of x)."""
    if scale is None and spec.learned:
        raise ValueError(f"scale={spec.scale!r} is learned: pass scale=learned_step(spec, param)")
    with torch.no_grad(), _no_autocast(x):
        xr = _rotate(x.float(), spec)
        xg = _groups(xr, spec)
        step = _step(xg, spec, scale)
        codes = _codes(xg, step, spec, generator, noise)
        step = step.expand(xg.shape[0], xg.shape[1], 1) if scale is not None else step
        return codes.to(torch.int8).reshape(x.shape), step.reshape(scale_shape(x.shape, spec))


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, spec: QuantSpec, *, rotated: bool = False
) -> torch.Tensor:
    """(codes, step) → float32 values (code + offset)·Δ, rotated back out of the Hadamard domain unless
    ``rotated`` (H is its own inverse)."""
    cg = _groups(codes.float(), spec)
    v = ((cg + spec.info.offset) * _step(cg, spec, scale)).reshape(codes.shape)
    return v if rotated or not spec.hadamard else hadamard(v, spec.hadamard_block)


def fake_quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    scale: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    stats: Stats | None = None,
    rotated: bool = False,
) -> torch.Tensor:
    """Q(x) in value (= dequantize(*quantize(x))), with the spec's gradient estimator. Same shape and dtype
    as x.

    ``scale``: as in :func:`quantize`; for LSQ/PACT pass ``learned_step(spec, param)`` with ``param``
    requiring grad and it receives the method's gradient. ``stats``: if given, filled (no grad, no sync)
    with ``masked`` (fraction of entries whose gradient the estimator zeroes), ``signal`` = Σx² and
    ``noise`` = Σ(Q(x) − x)² in the quantization domain. ``rotated``: return the result in the Hadamard
    domain (QuantLinear uses it when both operands share one rotation: (XH)(WH)ᵀ = XWᵀ)."""
    if scale is None and spec.learned:
        raise ValueError(f"scale={spec.scale!r} is learned: pass scale=learned_step(spec, param)")
    info = spec.info
    with _no_autocast(x):
        xr = _rotate(x.float(), spec)
        xg = _groups(xr, spec)
        with torch.no_grad():
            xd = xg.detach()
            step = _step(xd, spec, scale)
            codes = _codes(xd, step, spec, generator, noise)
            q = (codes + info.offset) * step
            inside = None
            if spec.estimator == "clipped_ste" or spec.learned:
                inside = (xd >= (info.qmin + info.offset) * step) & (xd <= info.top * step)
            if spec.estimator == "ste":
                mask = None
            elif spec.estimator == "clipped_ste":
                mask = inside
            elif spec.estimator == "trust":
                # QuEST trust estimator (METHODS.md §4): computed here, i.e. in the Hadamard domain
                if spec.trust is None:
                    thr = step / 2
                else:
                    thr = spec.trust * xd.square().mean(-1, keepdim=True).sqrt()
                mask = (q - xd).abs() <= thr
            else:  # "none"
                mask = torch.zeros_like(xd, dtype=torch.bool)
            if stats is not None:
                stats["masked"] = (
                    torch.zeros((), device=xd.device) if mask is None else 1.0 - mask.float().mean()
                )
                stats["signal"] = xd.square().sum()
                stats["noise"] = (q - xd).square().sum()

        learn = spec.learned and scale is not None and scale.requires_grad
        if not torch.is_grad_enabled() or not (xg.requires_grad or learn):
            out = q
        else:
            delta = xg - xd  # exactly 0 in value, identity in gradient
            out = q + (delta if mask is None else delta * mask.to(delta.dtype))
            if learn:
                live = scale.float()
                live = live.reshape(1, 1, 1) if live.numel() == 1 else live.reshape(step.shape)
                with torch.no_grad():
                    if spec.scale == "lsq":
                        # LSQ (Esser et al. 2020): ∂Q/∂Δ = code+off − x/Δ inside, code+off (clamp value)
                        # outside; gradient scaled by 1/√(numel·q_max) (METHODS.md §5)
                        dq = codes + info.offset - inside.float() * (xd / step)
                        g = 1.0 / math.sqrt(x.numel() * info.top)
                    else:
                        # PACT: only clipped entries move the clip; rounding is straight-through
                        dq = (codes + info.offset) * (~inside).float()
                        g = 1.0
                out = out + (dq * g) * (live - live.detach())  # 0 in value; gradient g·Σ dq ⊙ upstream
        out = out.reshape(xr.shape)
        if spec.hadamard and not rotated:
            out = hadamard(out, spec.hadamard_block)
        return out.to(x.dtype)


def snr_db(signal: torch.Tensor | float, noise: torch.Tensor | float) -> float:
    """10·log10(Σx² / Σ(Q(x)−x)²), capped at 300 dB when the error is zero (keeps logs finite)."""
    s, n = float(signal), float(noise)
    if s <= 0:
        return 0.0
    return 10.0 * math.log10(s / max(n, s * 1e-30))
