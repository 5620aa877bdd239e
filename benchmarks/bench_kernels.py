"""Kernel microbenchmarks: each registered bench times a kernel against its baseline in the same run.

    PYTHONPATH=src python benchmarks/bench_kernels.py                       # every bench, H100 shapes
    PYTHONPATH=src python benchmarks/bench_kernels.py --only gemm,quest_linear
    PYTHONPATH=src python benchmarks/bench_kernels.py --smoke --device cpu  # tiny shapes: the script runs

Writes ``benchmarks/results/bench_kernels_<device>.md`` (or ``--out``; machine, date, command, one table per
bench; rewritten after every bench, so a run cut short keeps the finished ones) and prints it.

Bounded run (the GPU session: every bench in about 2–3 minutes on an H100): ``--quick`` (5 warm-up + 20 timed
calls, the 130m and 430m "up" GEMM shapes, three hadamard_quant shapes, no torch.compile'd references),
``--max-configs 4`` (scaled_mm autotunes over the first 4 of its 7 H100 configs: both 128×128 configs that
promotion keeps, and the 128×256 ones) and ``--time-budget`` (skip the remaining benches after that many seconds).
A bench is a function ``(args) -> list[dict]`` registered with ``@bench("name")``; each dict is one
table row (same keys within a bench). Add a bench by writing one such function; ``--only`` picks by name.

Timing: CUDA events around each call after ``--warmup`` untimed calls (Triton autotuning happens there), median
of ``--iters``; on the CPU ``time.perf_counter``. TFLOP/s counts 2·M·N·K per GEMM (three GEMMs for a
forward + backward). The memory-bound hadamard_quant bench uses ``triton.testing.do_bench`` on CUDA instead
(median; L2 flushed before each call).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BENCHES: dict[str, Callable[[argparse.Namespace], list[dict]]] = {}


def bench(name: str) -> Callable:
    """Register a bench under ``name`` (the key ``--only`` takes)."""

    def deco(fn: Callable[[argparse.Namespace], list[dict]]) -> Callable[[argparse.Namespace], list[dict]]:
        BENCHES[name] = fn
        return fn

    return deco


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of one call of ``fn``."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends, strict=True):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# GEMM: exact low-bit scaled_mm (Triton, torch._scaled_mm / _int_mm) against bf16 torch.matmul
# ----------------------------------------------------------------------------------------------------------

#: (model, M tokens, K in, N out): the MLP projections of the 130m and 430m LLaMAs, 16 × 1024 tokens.
LLAMA_GEMMS = [
    ("130m up", 16 * 1024, 768, 2048),
    ("130m down", 16 * 1024, 2048, 768),
    ("430m up", 16 * 1024, 1664, 4608),
    ("430m down", 16 * 1024, 4608, 1664),
]
SMOKE_GEMMS = [("smoke", 64, 128, 96)]

#: GEMM variants: (name, code dtype or None for bf16, scaled_mm backend, promote)
GEMM_VARIANTS = {
    "bf16": (None, None, 0),
    "fp8-torch": (torch.float8_e4m3fn, "torch", 128),
    "fp8-triton": (torch.float8_e4m3fn, "triton", 128),
    "fp8-triton-fastacc": (torch.float8_e4m3fn, "triton", 0),
    "fp8-triton-promote32": (torch.float8_e4m3fn, "triton", 32),
    "int8-torch": (torch.int8, "torch", 0),
    "int8-triton": (torch.int8, "triton", 0),
}
DEFAULT_GEMM_VARIANTS = "bf16,fp8-torch,fp8-triton,fp8-triton-fastacc,int8-triton"


def _codes(rows: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.randint(-128, 128, (rows, k), device=device, dtype=torch.int8)
    return (torch.randint(-8, 8, (rows, k), device=device).float() + 0.5).to(dtype)  # 4-bit centered grid


@bench("gemm")
def bench_gemm(args: argparse.Namespace) -> list[dict]:
    """scaled_mm variants vs bf16 ``x @ w.T`` at LLaMA shapes, speed-up relative to bf16 in the same run.
    fp8 codes: the 4-bit centered grid; int8: the full range; triton = lowbit's kernel (promote = partial sums
    to float32 every 128 of K; fastacc = never; promote32 = every WGMMA), torch = torch._scaled_mm/_int_mm."""
    from lowbit.kernels.scaled_mm import scaled_mm

    device = torch.device(args.device)
    variants = [v.strip() for v in args.gemm_variants.split(",") if v.strip()]
    rows = []
    for label, m, k, n in _gemm_shapes(args):
        base_ms = None
        for name in variants:
            dtype, backend, promote = GEMM_VARIANTS[name]
            if dtype is None:
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
                fn = lambda x=x, w=w: x @ w.t()  # noqa: E731
            else:
                backend = backend if device.type == "cuda" else "ref"
                a, b = _codes(m, k, dtype, device), _codes(n, k, dtype, device)
                sa, sb = torch.rand(m, device=device), torch.rand(n, device=device)
                fn = lambda a=a, b=b, sa=sa, sb=sb, be=backend, p=promote: scaled_mm(  # noqa: E731
                    a, b, sa, sb, backend=be, promote=p
                )
            row = {"shape": label, "M×K→N": f"{m}×{k}→{n}", "variant": name}
            try:
                ms = time_ms(fn, device, args.warmup, args.iters)
            except Exception as e:  # a backend this machine lacks: report, keep going
                rows.append(row | {"ms": "—", "TFLOP/s": "—", "vs bf16": f"failed: {type(e).__name__}: {str(e)[:60]}"})
                continue
            base_ms = ms if name == "bf16" else base_ms
            speedup = f"{base_ms / ms:.2f}×" if base_ms else "—"
            rows.append(row | {"ms": f"{ms:.3f}", "TFLOP/s": f"{2 * m * n * k / ms / 1e9:.0f}", "vs bf16": speedup})
            _free()
    return rows


# ----------------------------------------------------------------------------------------------------------
# quest_linear forward + backward against a bf16 nn.Linear (and QuantLinear's fake quantization)
# ----------------------------------------------------------------------------------------------------------


@bench("quest_linear")
def bench_quest_linear(args: argparse.Namespace) -> list[dict]:
    """Training step of one layer (forward + backward, quantization included) at the GEMM shapes: bf16
    nn.Linear under autocast (fp32 master weight, as the trainer runs it), QuantLinear quest-w4a4 (fake quant),
    quest_linear W4A4 with the bf16 and the FP8 backward. Ratio to the bf16 layer in the same run."""
    rows = []
    for shape in _gemm_shapes(args):
        rows += _quest_linear_rows(args, *shape)
        _free()
    return rows


def _gemm_shapes(args: argparse.Namespace) -> list:
    if args.smoke:
        return SMOKE_GEMMS
    return [g for g in LLAMA_GEMMS if g[0].endswith("up")] if args.quick else LLAMA_GEMMS


@bench("bitnet_linear")
def bench_bitnet_linear(args: argparse.Namespace) -> list[dict]:
    """BitNet b1.58 layer training step (forward + backward, quantization included) at the GEMM shapes: bf16
    nn.Linear under autocast, QuantLinear bitnet-b1.58 (fake quant), bitnet_linear (int8 codes → exact INT8
    GEMM forward, bf16 STE backward). Ratio to the bf16 layer in the same run."""
    rows = []
    for shape in _gemm_shapes(args):
        rows += _bitnet_rows(args, *shape)
        _free()
    return rows


def _bitnet_rows(args: argparse.Namespace, label: str, m: int, k: int, n: int) -> list[dict]:
    from lowbit.kernels.bitnet_linear import bitnet_linear
    from lowbit.nn.linear import QuantLinear
    from lowbit.quant.recipes import BITNET_ACT, BITNET_WEIGHT

    device = torch.device(args.device)
    amp = torch.bfloat16
    torch.manual_seed(0)
    layer = QuantLinear(k, n, bias=False, weight_spec=BITNET_WEIGHT, act_spec=BITNET_ACT, device=device)
    layer.track_stats = False
    layer.kernels = "off"
    plain = torch.nn.Linear(k, n, bias=False, device=device)
    x = torch.randn(m, k, device=device, requires_grad=True)  # fp32, as the residual stream feeds the layers
    g = torch.randn(m, n, device=device, dtype=amp)
    gemm = "auto" if device.type == "cuda" else "ref"
    variants = {
        "bf16 nn.Linear": plain,
        "QuantLinear bitnet-b1.58 (fake quant)": layer,
        "bitnet_linear (INT8 GEMM fwd)": lambda t: bitnet_linear(t, layer.weight, gemm_backend=gemm),
    }
    return _layer_rows(args, device, amp, label, (m, k, n), variants, x, g, (plain, layer), tflops=False)


def _quest_linear_rows(args: argparse.Namespace, label: str, m: int, k: int, n: int) -> list[dict]:
    from lowbit.kernels.quest_linear import quest_linear
    from lowbit.nn.linear import QuantLinear
    from lowbit.quant.recipes import quest_spec

    device = torch.device(args.device)
    amp = torch.bfloat16
    torch.manual_seed(0)
    layer = QuantLinear(k, n, bias=False, weight_spec=quest_spec(4), act_spec=quest_spec(4), device=device)
    layer.track_stats = False
    layer.kernels = "off"  # the fake-quant path: QuantLinear would otherwise dispatch to quest_linear on a GPU
    plain = torch.nn.Linear(k, n, bias=False, device=device)
    x = torch.randn(m, k, device=device, dtype=amp, requires_grad=True)
    g = torch.randn(m, n, device=device, dtype=amp)
    variants = {
        "bf16 nn.Linear": plain,
        "QuantLinear quest-w4a4 (fake quant)": layer,
        "quest_linear W4A4, bf16 backward": lambda t: quest_linear(t, layer.weight, 4, 4),
        "quest_linear W4A4, fp8 backward": lambda t: quest_linear(t, layer.weight, 4, 4, backward="fp8"),
    }
    return _layer_rows(args, device, amp, label, (m, k, n), variants, x, g, (plain, layer), tflops=True)


def _layer_rows(args: argparse.Namespace, device: torch.device, amp: torch.dtype, label: str,
                mkn: tuple[int, int, int], variants: dict, x: torch.Tensor, g: torch.Tensor,
                modules: tuple[torch.nn.Module, ...], tflops: bool) -> list[dict]:
    """Forward + backward of each variant on (x, g) under autocast, timed; the first variant is the baseline of
    the "vs bf16" column. A variant that fails is reported and the others still run."""
    m, k, n = mkn
    rows, base_ms = [], None
    for name, mod in variants.items():

        def step(mod=mod):
            with torch.autocast(device.type, dtype=amp):
                y = mod(x)
            y.backward(g)
            x.grad = None

        row = {"shape": label, "M×K→N": f"{m}×{k}→{n}", "layer (fwd+bwd)": name}
        try:
            ms = time_ms(step, device, args.warmup, args.iters)
        except Exception as e:  # report, keep going
            rows.append(row | {"ms": "—"} | ({"TFLOP/s": "—"} if tflops else {})
                        | {"vs bf16": f"failed: {type(e).__name__}: {str(e)[:60]}"})
            continue
        base_ms = ms if base_ms is None else base_ms
        rate = {"TFLOP/s": f"{3 * 2 * m * n * k / ms / 1e9:.0f}"} if tflops else {}
        rows.append(row | {"ms": f"{ms:.3f}"} | rate | {"vs bf16": f"{base_ms / ms:.2f}×"})
        for module in modules:
            module.zero_grad(set_to_none=True)
    return rows


# ----------------------------------------------------------------------------------------------------------
# hadamard_quant: the fused QuEST quantizer and its backward against the torch reference (memory-bound ops)
# ----------------------------------------------------------------------------------------------------------

#: (label, rows M, K, dtype): activations of 16 × 1024 tokens at the 130m / 430m widths (bf16 under autocast) and
#: weights (fp32 master copies), plus the 4096² bf16 case of the kernel tests.
HQ_SHAPES = [
    ("4096² bf16", 4096, 4096, torch.bfloat16),
    ("130m acts", 16 * 1024, 768, torch.bfloat16),
    ("430m acts", 16 * 1024, 1664, torch.bfloat16),
    ("430m down acts", 16 * 1024, 4608, torch.bfloat16),
    ("430m up weight", 4608, 1664, torch.float32),
]
SMOKE_HQ = [("smoke", 48, 256, torch.bfloat16)]
#: Memory copy bandwidth measured on the H100 (DESIGN.md), the roofline of these single-pass kernels.
COPY_TBPS = 3.0
#: Backward launch configurations of --hq-sweep: (block_m, num_warps); the forward sweeps its GPU_CONFIGS.
HQ_SWEEP = [(16, 2), (16, 4), (16, 8), (32, 4), (32, 8), (64, 4), (64, 8)]


def bench_ms(fn: Callable[[], object], device: torch.device, args: argparse.Namespace) -> float:
    """Median ms: ``triton.testing.do_bench`` on CUDA (it flushes L2 before every call, so a memory-bound kernel
    is timed from DRAM, as in a training step), :func:`time_ms` elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    return time_ms(fn, device, args.warmup, args.iters)


@bench("hadamard_quant")
def bench_hadamard_quant(args: argparse.Namespace) -> list[dict]:
    """QuEST 4-bit quantizer (block-128 Hadamard, RMS·α, centered grid, packed trust mask) → FP8 codes, and its
    backward Hᵀ(mask ⊙ g): the fused Triton kernels against the torch reference (eager and torch.compile) and
    lowbit's fake_quantize (the QuantLinear path, forward only). GB/s counts the bytes the fused op must move:
    forward x + codes (1 B) + mask (1/8 B) + scales, backward g + mask + dx; "% copy" is that over the 3.0 TB/s
    memory copy; "vs ref" the speed-up over the eager reference; "fused kernel" is the autotuned forward.
    ``--hq-sweep`` adds every forward GPU config and the backward's (block_m, num_warps) launch variants."""
    shapes = SMOKE_HQ if args.smoke else HQ_SHAPES[1:4] if args.quick else HQ_SHAPES
    return _bandwidth_rows(args, shapes, _hq_variants)


@bench("int8_rows")
def bench_int8_rows(args: argparse.Namespace) -> list[dict]:
    """The per-row absmax int8 activation quantizer of the INT8 GEMM paths (BitNet b1.58's activations): the
    fused Triton kernel (lowbit.kernels.int8_rows) against lowbit's quantizer in eager torch, the same codes and
    steps. GB/s counts x + codes (1 B) + steps; the kernel reads x twice (absmax sweep, then codes)."""
    shapes = SMOKE_HQ if args.smoke else HQ_SHAPES[1:4]
    return _bandwidth_rows(args, shapes, _int8_rows_variants)


def _int8_rows_variants(args: argparse.Namespace, m: int, k: int, dtype: torch.dtype, device: torch.device) -> list:
    from lowbit.kernels import int8_rows as ir
    from lowbit.quant import get_recipe

    torch.manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype)
    spec = get_recipe("bitnet-b1.58").act
    nbytes = m * k * (x.element_size() + 1) + 4 * m
    return [("fwd", "reference (eager)", nbytes, lambda: ir.int8_rows_ref(x, spec)),
            ("fwd", "fused kernel", nbytes, lambda: ir.int8_rows_triton(x, spec))]


def _bandwidth_rows(args: argparse.Namespace, shapes: list, variants: Callable) -> list[dict]:
    """Time every (op, variant) of ``variants(args, m, k, dtype, device)`` at each shape of a memory-bound op:
    µs, GB/s of the bytes the op must move, % of the memory copy, speed-up over the op's first (reference)
    variant. A variant that fails (no GPU, no triton) is reported and the others still run."""
    device = torch.device(args.device)
    rows = []
    for label, m, k, dtype in shapes:
        ref_ms: dict[str, float] = {}
        for op, name, nbytes, fn in variants(args, m, k, dtype, device):
            row = {"shape": label, "M×K": f"{m}×{k}", "dtype": str(dtype).removeprefix("torch."), "op": op}
            row["variant"] = name
            try:
                with torch.no_grad():
                    ms = bench_ms(fn, device, args)
            except Exception as e:  # a backend this machine lacks (no GPU, no triton): report, keep going
                failed = f"failed: {type(e).__name__}: {str(e)[:60]}"
                rows.append(row | {"µs": "—", "GB/s": "—", "% copy": "—", "vs ref": failed})
                continue
            ref_ms.setdefault(op, ms)  # the eager reference comes first
            gbs = nbytes / ms / 1e6
            pct = f"{100 * gbs / (COPY_TBPS * 1e3):.0f}%"
            rows.append(row | {"µs": f"{ms * 1e3:.1f}", "GB/s": f"{gbs:.0f}", "% copy": pct,
                               "vs ref": f"{ref_ms[op] / ms:.2f}×"})  # fmt: skip
        _free()
    return rows


def _hq_variants(args: argparse.Namespace, m: int, k: int, dtype: torch.dtype, device: torch.device) -> list:
    """(op, variant, bytes moved, callable) for one shape, the eager reference first in each op."""
    from lowbit.kernels import hadamard_quant as hq
    from lowbit.quant import fake_quantize
    from lowbit.quant.recipes import quest_spec

    torch.manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype)
    g = torch.randn(m, k, device=device, dtype=dtype)
    mask = hq.hadamard_quantize_ref(x, 4)[2]
    spec = quest_spec(4)
    esz = x.element_size()
    fwd_bytes = m * k * (esz + 1) + m * k // 8 + 4 * m
    bwd_bytes = 2 * m * k * esz + m * k // 8
    compiled_fwd = torch.compile(hq.hadamard_quantize_ref)
    compiled_bwd = torch.compile(hq.masked_inverse_hadamard_ref)
    out = [
        ("fwd", "reference (eager)", fwd_bytes, lambda: hq.hadamard_quantize_ref(x, 4)),
        ("fwd", "reference (torch.compile)", fwd_bytes, lambda: compiled_fwd(x, 4)),
        ("fwd", "fake_quantize (QuantLinear)", fwd_bytes, lambda: fake_quantize(x, spec, rotated=True)),
        ("fwd", "fused kernel", fwd_bytes, lambda: hq.hadamard_quantize_triton(x, 4)),
        ("bwd", "reference (eager)", bwd_bytes, lambda: hq.masked_inverse_hadamard_ref(g, mask)),
        ("bwd", "reference (torch.compile)", bwd_bytes, lambda: compiled_bwd(g, mask)),
        ("bwd", "fused kernel", bwd_bytes, lambda: hq.masked_inverse_hadamard_triton(g, mask)),
    ]
    if args.quick:  # no torch.compile'd references: their compilation dominates a bounded run
        out = [v for v in out if "torch.compile" not in v[1]]
    for bm, ks, nw, st in hq.GPU_CONFIGS if args.hq_sweep else ():
        cfg = hq._gpu_config(bm, ks, nw, st)
        out.append(("fwd", f"kernel block_m={bm} k_split={ks} warps={nw} stages={st}", fwd_bytes,
                    lambda cfg=cfg: hq.hadamard_quantize_triton(x, 4, config=cfg)))  # fmt: skip
    for bm, nw in HQ_SWEEP if args.hq_sweep else ():
        out.append(("bwd", f"kernel block_m={bm} warps={nw}", bwd_bytes,
                    lambda bm=bm, nw=nw: hq.masked_inverse_hadamard_triton(g, mask, block_m=bm, num_warps=nw)))
    return sorted(out, key=lambda v: v[0] == "bwd")  # stable: forward rows, then backward rows


# ----------------------------------------------------------------------------------------------------------
# DQT optimizer step: the fused Triton kernel (lowbit.kernels.dqt_step) against DirectOptimizer's torch path
# ----------------------------------------------------------------------------------------------------------


def _llama_linears(size: str) -> list[tuple[int, int]]:
    """(N, K) of the 7 block projections of every layer of a model size (lowbit.models.llama.SIZES)."""
    from lowbit.config import ModelConfig

    cfg = ModelConfig(size=size)
    d, f, kv = cfg.dim, cfg.ffn_dim, cfg.n_kv_heads * (cfg.dim // cfg.n_heads)
    return [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)] * cfg.n_layers


#: state dtype → bytes per weight the step must move besides the codes: gradient read (4) + both moments read
#: and written (fp32 16, bf16 8, 8-bit 4 + the absmax of 256-value blocks).
DQT_STATE_BYTES = {"fp32": 4 + 16.0, "bf16": 4 + 8.0, "8bit": 4 + 4 + 4 * 4 / 256}


@bench("dqt_step")
def bench_dqt_step(args: argparse.Namespace) -> list[dict]:
    """One DQT AdamW optimizer step over the 91 block matrices of the 430m LLaMA (443 M weights; stashed
    gradients, per-tensor Δ, stochastic rounding): DirectOptimizer's torch path against the fused Triton kernel
    (one grouped launch), int8 and ternary codes, fp32/bf16/8-bit moments. GB/s counts the bytes the step must
    move: codes read and written (2 B int8, 0.5 B ternary), gradient read (4 B), moments read and written;
    "% copy" is that over the 3.0 TB/s memory copy. "kernels" counts CUDA kernels and copies of one step
    (torch.profiler). ``--dqt-tiles 2048x8,1024x4`` adds fused rows with those (elements per program, warps)."""
    from lowbit.kernels import dqt_step
    from lowbit.nn import DirectQuantLinear
    from lowbit.optim import DirectOptimizer
    from lowbit.quant import get_recipe

    device = torch.device(args.device)
    shapes = [(64, 96), (96, 64)] if args.smoke else _llama_linears("430m")
    n_weights = sum(n * k for n, k in shapes)
    fused_ok = dqt_step.available() and (device.type == "cuda") != dqt_step.interpreted()
    tiles = [tuple(int(v) for v in t.split("x")) for t in getattr(args, "dqt_tiles", "").split(",") if t.strip()]
    rows = []
    for recipe in ("dqt-int8", "dqt-ternary"):
        spec = get_recipe(recipe).weight
        code_bytes = 2 * (8 if spec.info.levels > 16 else 2) / 8
        torch.manual_seed(0)
        mods = []
        for i, (n, k) in enumerate(shapes):
            mods.append((f"layers.{i // 7}.p{i % 7}", DirectQuantLinear(torch.randn(n, k, device=device) * 0.02,
                                                                        weight_spec=spec)))  # fmt: skip
        for _, m in mods:
            m.weight_grad = torch.randn(m.weight_shape, device=device) * 1e-3
        for state in ("fp32", "bf16", "8bit"):
            nbytes = n_weights * (code_bytes + DQT_STATE_BYTES[state])
            variants = [("torch path", False, None)] + [("fused kernel", True, None)]
            variants += [(f"fused kernel {b}×{w}", True, (b, w)) for b, w in tiles]
            base_ms = None
            for name, fused, tile in variants:
                row = {"codes": recipe, "states": state, "path": name}
                if fused and not fused_ok:
                    rows.append(row | {"ms": "—", "GB/s": "—", "% copy": "—", "kernels": "—", "vs torch": "needs CUDA"})
                    continue
                opt = DirectOptimizer(mods, lr=1e-4, weight_decay=0.1, state_dtype=state, fused=fused)
                saved = dict(dqt_step.TILES)
                if tile:
                    dqt_step.TILES.update({k: tile for k in dqt_step.TILES})
                try:
                    opt.step()  # creates the states; compiles the kernel
                    kernels = _count_cuda_kernels(opt.step) if device.type == "cuda" else "—"
                    ms = time_ms(opt.step, device, min(args.warmup, 3), args.iters if fused else min(args.iters, 10))
                except Exception as e:  # report, keep going
                    rows.append(row | {"ms": "—", "GB/s": "—", "% copy": "—", "kernels": "—",
                                       "vs torch": f"failed: {type(e).__name__}: {str(e)[:60]}"})  # fmt: skip
                    continue
                finally:
                    dqt_step.TILES.update(saved)
                base_ms = ms if base_ms is None else base_ms
                gbs = nbytes / ms / 1e6
                pct = f"{100 * gbs / (COPY_TBPS * 1e3):.0f}%"
                rows.append(row | {"ms": f"{ms:.2f}", "GB/s": f"{gbs:.0f}", "% copy": pct, "kernels": kernels,
                                   "vs torch": f"{base_ms / ms:.1f}×"})  # fmt: skip
                del opt
                _free()
        del mods
        _free()
    return rows


def _count_cuda_kernels(fn: Callable[[], object]) -> int | str:
    """CUDA kernels and memory copies launched by one call of ``fn`` (torch.profiler); "—" if unavailable."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    except Exception:  # profiler unavailable (CUPTI): the column stays empty
        return "—"


# ----------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------


def _table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _machine(device: torch.device) -> str:
    parts = [f"torch {torch.__version__}", f"python {platform.python_version()}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("no triton")
    if device.type == "cuda":
        parts.insert(0, f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})")
    else:
        parts.insert(0, platform.processor() or platform.machine())
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help=f"comma-separated bench names (default all: {', '.join(BENCHES)})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (a check that the script runs)")
    p.add_argument("--gemm-variants", default=DEFAULT_GEMM_VARIANTS,
                   help=f"gemm bench: comma-separated of {', '.join(GEMM_VARIANTS)}")  # fmt: skip
    p.add_argument("--hq-sweep", action="store_true",
                   help="hadamard_quant bench: also time every forward GPU config, backward launches")  # fmt: skip
    p.add_argument("--dqt-tiles", default="", help="dqt_step bench: extra fused rows, e.g. 2048x8,1024x4 "
                   "(elements per program × warps)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="report path (default results/bench_kernels_<device>.md)")
    p.add_argument("--quick", action="store_true",
                   help="bounded run: fewer shapes, no torch.compile'd references (module docstring)")
    p.add_argument("--max-configs", type=int, default=0,
                   help="autotune scaled_mm over only the first N of its H100 configs (0 = all 7)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="skip the remaining benches after this many seconds (0 = no limit)")
    args = p.parse_args(argv)
    if args.quick and "--warmup" not in " ".join(sys.argv if argv is None else argv):
        args.warmup, args.iters = 5, 20
    if args.max_configs > 0:
        from lowbit.kernels import scaled_mm as sm

        sm._kernels.cache_clear()  # the autotuner is built from GPU_CONFIGS on first use
        sm.GPU_CONFIGS = sm.GPU_CONFIGS[: args.max_configs]
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"unknown bench {unknown}; choose from {list(BENCHES)}")
    device = torch.device(args.device)
    report = [
        "# Kernel microbenchmarks\n",
        f"- machine: {_machine(device)}",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `PYTHONPATH=src python {shlex.join(['benchmarks/bench_kernels.py', *sys.argv[1:]])}`",
        f"- timing: median of {args.iters} calls after {args.warmup} warm-up calls\n",
    ]
    out = args.out or RESULTS_DIR / f"bench_kernels_{'smoke_' if args.smoke else ''}{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    for i, name in enumerate(names):
        if args.time_budget and time.perf_counter() - t_start > args.time_budget:
            report.append(f"Not run (--time-budget {args.time_budget:.0f} s reached): {', '.join(names[i:])}\n")
            break
        t0 = time.perf_counter()
        try:
            rows = BENCHES[name](args)
        except Exception as e:  # one bench failing must not lose the others
            rows = [{"error": f"{type(e).__name__}: {str(e)[:200]}"}]
        doc = (BENCHES[name].__doc__ or "").strip().replace("\n", " ")
        report += [f"## {name}\n", " ".join(doc.split()) + "\n", _table(rows)]
        print(f"[bench_kernels] {name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        out.write_text("\n".join(report))  # after every bench: a run cut short keeps the finished ones
    text = "\n".join(report)
    out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
