"""Prefill GEMM for packed low-bit layers: activations quantized on the fly, one exact FP8 / INT8 tensor-core GEMM.

    prefill_kernel(layer, x)     y = layer(x) for a PackedLinear, through hadamard_quantize / quantize + scaled_mm
    supports(layer)              whether prefill_kernel computes that layer (else: layer.reference_forward)
    install_all(model)           one PackedLinear.kernel hook per layer: ≤ max_rows rows → lowbit_gemv (decode),
                                 more rows → prefill_kernel (prefill), anything unsupported → the torch path

**The reference** is :meth:`lowbit.export.packed.PackedLinear.reference_forward`; this module reuses the
existing kernels and writes none of its own:

* **QuEST W·A** (codes of W·H, shared rotation, activation spec = ``quest_spec(bits)`` with the weight's
  Hadamard block): x → :func:`lowbit.kernels.hadamard_quant.hadamard_quantize` (rotation + RMS·α step + centered
  grid, fused, one pass) → codes C_x and the step per token s_x; y = :func:`lowbit.kernels.scaled_mm.scaled_mm`
  (C_x, C_w, s_x, s_w). Code format as :func:`lowbit.kernels.quest_linear.code_format`: FP8 e4m3 for grids of
  ≤ 16 levels (≤ 4 bits: the values ±0.5 … ±7.5 are exact in e4m3), INT8 up to 128 levels (5–7 bits: odd
  integers 2(c + ½) with step Δ/2); an 8-bit centered grid fits neither and runs the torch path.
* **BitNet b1.58, DQT int/ternary, STE** (integer activation grid without offset, absmax per token or tensor,
  no rotation: :func:`lowbit.kernels.bitnet_linear.int8_operand`): x → :func:`lowbit.kernels.bitnet_linear.
  quantize_int8` (lowbit's quantizer: the fake-quant codes bit for bit) → int8 codes + step per row; weight
  codes in int8 (the code itself, or 2(c + ½) for a centered grid, step Δ/2); y = scaled_mm INT8.

Both sums are exact (scaled_mm's docstring: half-integer FP8 products in float32 for K ≤ 74 565, INT8 in int32),
so y equals the reference up to the rounding of the epilogue (the reference rounds each dequantized operand and
every partial sum of its float32 matmul; the GEMM only the final scaling, in the reference's order). With
``gemm_backend="torch"`` (torch's row-wise FP8 GEMM, faster on an H100) that no longer holds: scaled_mm's
docstring has the measured deviation.

**Weight operand cache.** The packed codes (0.25–1 byte/weight) are unpacked once into the GEMM's operand, FP8
or int8, **1 byte per weight on top of the packed buffers** (a 4-bit 800m model: 0.5 B/weight packed + 1 B/weight
cached ≈ 3× the packed block weights; still ¾ of bf16), plus 4 bytes per output row for the step. It is built on
a layer's first prefill and kept as a plain attribute (not a buffer: not saved, not moved by ``.to``); it is
rebuilt when the codes, the scale or the device change. ``cache_weights=False`` unpacks per call instead (no
extra memory; one unpack — a few elementwise passes over N·K — per layer per prefill).

Not supported (→ ``reference_forward``): weight-only layers (A16: nothing to quantize; the GEMV handles decode),
learned activation steps (LSQ/PACT), grouped weight steps, 8-bit centered grids, Hadamard blocks that do not
divide K, K not a multiple of 16, and QuEST activation specs other than ``quest_spec(bits)`` with the layer's
block, trust and α.

The GEMM is scaled_mm with its ``auto`` backend: the autotuned, exact Triton kernel on Hopper;
``gemm_backend="torch"`` takes torch's row-wise ``torch._scaled_mm`` instead (faster, not exact). The W4A4
activation quantizer (hadamard_quantize) is autotuned too. ``LOWBIT_AUTOTUNE=0`` (the kernel tests) runs both
Triton kernels with their one ``DEFAULT_GPU_CONFIG`` instead (:mod:`lowbit.kernels._triton`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["clear_cache", "combined_kernel", "install", "install_all", "prefill_kernel", "prefill_plan",
           "prefill_weight", "supports"]

#: Rows up to which the combined hook uses the GEMV (lowbit_gemv's own default).
MAX_GEMV_ROWS = 64
_CACHE_ATTR = "_prefill_weight_cache"
_FP8 = torch.float8_e4m3fn
_K_MULTIPLE = 16  # scaled_mm's


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    dt = x.device.type
    if dt in ("cpu", "cuda") and torch.is_autocast_enabled(dt):
        return torch.get_autocast_dtype(dt)
    return x.dtype


def _quest_plan(layer) -> dict[str, Any] | None:
    from lowbit.kernels.quest_linear import code_format
    from lowbit.quant import hadamard_block_size
    from lowbit.quant.recipes import quest_spec

    w, a = layer.weight_spec, layer.act_spec
    if not layer.shared_rotation or a.learned:
        return None
    k = layer.in_features
    block = a.hadamard_block
    if hadamard_block_size(k, block) != block or hadamard_block_size(k, w.hadamard_block) != block:
        return None  # fake_quantize would shrink the block; hadamard_quantize never does
    try:
        # what hadamard_quantize computes: QuEST's spec with this block, trust radius and α (the estimator only
        # shapes gradients)
        canon = quest_spec(a.bits).replace(hadamard_block=block, trust=a.trust, alpha=a.alpha, estimator=a.estimator)
    except Exception:  # an unsupported bit width
        return None
    if a != canon or w.granularity not in ("tensor", "row") or w.info.offset not in (0.0, 0.5):
        return None
    fmt = code_format(w.bits, a.bits)
    if fmt == "float":
        return None
    alpha = a.alpha if isinstance(a.alpha, str) else float(a.alpha)
    return {"kind": "quest", "fmt": fmt, "bits": a.bits, "block": block, "trust": a.trust, "alpha": alpha}


def _int8_plan(layer) -> dict[str, Any] | None:
    from lowbit.kernels.bitnet_linear import int8_operand

    w, a = layer.weight_spec, layer.act_spec
    if not int8_operand(a, estimator=False) or w.hadamard or w.granularity not in ("tensor", "row"):
        return None
    info = w.info
    if info.offset not in (0.0, 0.5):
        return None
    mul = 2 if info.offset else 1
    if (info.qmin + info.offset) * mul < -128 or (info.qmax + info.offset) * mul > 127:
        return None
    return {"kind": "int8", "fmt": "int8"}


def prefill_plan(layer) -> dict[str, Any] | None:
    """How :func:`prefill_kernel` computes ``layer`` — ``{"kind": "quest" | "int8", "fmt": "fp8" | "int8", …}``
    — or None when it does not (module docstring). Memoised on the layer, keyed by its specs."""
    wspec, aspec = layer.weight_spec, layer.act_spec
    key = (wspec, aspec, layer.shared_rotation, layer.in_features, getattr(layer, "storage", None))
    cached = layer.__dict__.get("_prefill_plan")
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = None
    if aspec is not None and key[4] is not None and layer.in_features % _K_MULTIPLE == 0 and not aspec.learned:
        plan = _quest_plan(layer) if wspec.hadamard else _int8_plan(layer)
    layer.__dict__["_prefill_plan"] = (key, plan)
    return plan


def supports(layer) -> bool:
    """Whether :func:`prefill_kernel` computes ``layer`` (a PackedLinear) with a quantized-activation GEMM."""
    return hasattr(layer, "weight_spec") and prefill_plan(layer) is not None


@torch.no_grad()
def _build_weight(layer, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    info = layer.weight_spec.info
    n = layer.out_features
    g = layer.weight_codes().float()
    if info.offset:
        g += info.offset
    step = layer.scale.float()
    step = step.reshape(1).expand(n) if step.dim() == 0 else step.reshape(n)
    if fmt == "fp8":
        w = g.to(_FP8)
    else:
        mul = 2 if info.offset else 1
        w = (g * mul).to(torch.int8)
        step = step / mul
    return w.contiguous(), step.contiguous()


def _version(t: torch.Tensor) -> int:
    """The in-place version counter of ``t``; inference tensors (made under torch.inference_mode, as a model
    loaded for generation may be) have none: -1, the data pointer alone keys them."""
    return -1 if t.is_inference() else t._version


def prefill_weight(layer, fmt: str, *, cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (N, K) in ``fmt`` — float8_e4m3fn grid values c + o, or int8 (c + o)·mul —, float32 step per row
    (N,)) of ``layer``'s weight, value = codes·step; cached on the layer with ``cache`` (module docstring)."""
    key = (fmt, layer.codes.device, layer.codes.data_ptr(), _version(layer.codes), layer.scale.data_ptr(),
           _version(layer.scale))
    hit = layer.__dict__.get(_CACHE_ATTR)
    if hit is not None and hit[0] == key:
        return hit[1]
    val = _build_weight(layer, fmt)
    if cache:
        layer.__dict__[_CACHE_ATTR] = (key, val)
    return val


def clear_cache(model: torch.nn.Module) -> None:
    """Drop every cached prefill weight operand of ``model`` (frees 1 byte per weight)."""
    for m in model.modules():
        m.__dict__.pop(_CACHE_ATTR, None)


def prefill_kernel(layer, x: torch.Tensor, *, gemm_backend: str = "auto", quant_backend: str = "auto",
                   cache_weights: bool = True, promote: int = 128) -> torch.Tensor:
    """``layer(x)`` for a PackedLinear through the quantized-activation GEMM (module docstring); layers that
    :func:`supports` rejects go to ``layer.reference_forward``. Output dtype: the autocast dtype when autocast is
    on, else x's (as F.linear). ``gemm_backend``: scaled_mm's (auto | triton | torch | ref); ``quant_backend``:
    hadamard_quantize's (auto | triton | ref); ``promote``: scaled_mm's FP8 promotion interval."""
    from lowbit.kernels.scaled_mm import scaled_mm

    plan = prefill_plan(layer)
    if plan is None:
        return layer.reference_forward(x)
    k = layer.in_features
    lead = x.shape[:-1]
    out_dtype = _out_dtype(x)
    x2 = x.reshape(-1, k)
    if x2.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        x2 = x2.float()
    if plan["kind"] == "quest":
        from lowbit.kernels.hadamard_quant import hadamard_quantize

        cx, sx, _ = hadamard_quantize(x2, plan["bits"], plan["block"], trust=plan["trust"], out=plan["fmt"],
                                      alpha=plan["alpha"], backend=quant_backend)
    else:
        from lowbit.kernels.bitnet_linear import quantize_int8

        with torch.no_grad():
            cx, sx = quantize_int8(x2, layer.act_spec)
        sx = sx.float().contiguous()
    cw, sw = prefill_weight(layer, plan["fmt"], cache=cache_weights)
    y = scaled_mm(cx, cw, sx, sw, layer.bias, out_dtype, backend=gemm_backend, promote=promote)
    return y.reshape(*lead, layer.out_features)


def install(model: torch.nn.Module, **kwargs) -> int:
    """Set :func:`prefill_kernel` (with ``kwargs``) as the ``kernel`` of every supported PackedLinear, for
    every input size; returns how many layers. Prefer :func:`install_all`, which keeps decode on the GEMV."""
    from lowbit.export.packed import set_kernel

    return set_kernel(model, supports, prefill_kernel, **kwargs)


def combined_kernel(layer, x: torch.Tensor, *, max_rows: int = MAX_GEMV_ROWS, deterministic: bool = False,
                    gemv_backend: str = "auto", gemm_backend: str = "auto", quant_backend: str = "auto",
                    cache_weights: bool = True) -> torch.Tensor:
    """One ``PackedLinear.kernel`` for both phases: ≤ ``max_rows`` rows of x → lowbit_gemv's
    ``packed_linear_kernel`` (decode), more → :func:`prefill_kernel`; each falls back to the torch path for a
    layer it does not support."""
    from lowbit.kernels import lowbit_gemv as lg

    rows = x.numel() // max(x.shape[-1], 1)
    if rows <= max_rows:
        if lg.supports(layer):
            return lg.packed_linear_kernel(layer, x, max_rows=max_rows, deterministic=deterministic,
                                           backend=gemv_backend)
        return layer.reference_forward(x)
    return prefill_kernel(layer, x, gemm_backend=gemm_backend, quant_backend=quant_backend,
                          cache_weights=cache_weights)


def install_all(model: torch.nn.Module, **kwargs) -> dict[str, int]:
    """Set :func:`combined_kernel` (with ``kwargs``: max_rows, deterministic, gemv_backend, gemm_backend,
    quant_backend, cache_weights) on every PackedLinear that the GEMV or the prefill GEMM supports. Returns
    ``{"gemv": layers decoding on the GEMV, "prefill": layers prefilling on the GEMM, "layers": hooked}``.
    ``uninstall``: ``layer.kernel = None`` (and :func:`clear_cache`)."""
    from lowbit.export.packed import packed_modules
    from lowbit.kernels import lowbit_gemv as lg

    counts = {"gemv": 0, "prefill": 0, "layers": 0}
    hook = functools.partial(combined_kernel, **kwargs) if kwargs else combined_kernel
    for _, layer in packed_modules(model):
        g, p = lg.supports(layer), supports(layer)
        if g or p:
            layer.kernel = hook
            counts["gemv"] += g
            counts["prefill"] += p
            counts["layers"] += 1
    return counts
