"""Training-step throughput: tokens/s, step time, MFU and peak memory of one size/recipe on CPU or CUDA.

The step is the trainer's own (``lowbit.train.trainer.Trainer._train_step``): fp32 master weights, bf16
autocast on CUDA, fused AdamW from :func:`lowbit.train.optim.build_optimizer`, global-norm gradient clipping
to 1.0, ``zero_grad(set_to_none=True)``, one host sync per step (the trainer reads the loss and grad norm
for its NaN check), and ``torch.compile`` when compiled: of the whole model (``--compile-scope model``, the
default) or of each transformer block on its own (``--compile-scope block``: the trainer's
``train.compile_scope=block``, ``lowbit.distributed.parallel.compile_model``). Batches are synthetic random
tokens, generated on the device up front and rotated, so no data loading is timed.

Timing: ``--warmup`` steps first (compilation happens there, and the optimizer state is created), then
``--steps`` steps with a CUDA event at every step boundary and one host wait after the last (host clock on
CPU); the median step time is reported. MFU = :func:`lowbit.models.llama.flops_per_token` (6·N + 12·L·d·T)
× tokens/s ÷ the device's dense BF16 peak; quantized recipes are counted with the same dense FLOPs.

    PYTHONPATH=src python benchmarks/bench_train.py --size 130m --batch 32 --seq 1024 --vocab 32000
    PYTHONPATH=src python benchmarks/bench_train.py --size tiny --batch 4 --seq 128 --steps 3 --device cpu

A markdown report (machine, date, exact command, numbers; the kernel breakdown with ``--profile``) is written
to ``--out`` (default ``benchmarks/results/bench_train_<size>_<recipe>_<cpu or GPU name>.md``).

**Side by side** (``--recipes``): one process measures every (size, recipe, ``quant.kernels``) combination in turn
— step time, tokens/s, ratio to the bf16 step of the same size, peak memory — and writes one markdown table
(rewritten after every row, so a run cut short keeps what it measured) plus a JSON file next to it. ``--kernels
on,off`` runs each quantized recipe with the fused kernels (``lowbit.nn.linear.set_kernels``: quest_linear for
QuEST W·A, the INT8 GEMM for bitnet / DQT int) and with the torch fake-quant path; recipes without a kernel run
once. Between rows the model is freed and torch.compile's caches are reset (``torch._dynamo.reset()``: dynamo
would otherwise stop recompiling the shared block code after 8 models and silently run it eagerly).
``--time-budget`` skips the remaining rows once that many seconds have passed.

    PYTHONPATH=src python benchmarks/bench_train.py --recipes bf16,quest-w4a4,quest-w8a8,bitnet-b1.58,dqt-int8,\
        dqt-ternary --sizes 130m --batch 16 --seq 1024 --kernels on,off --out $OUT/bench_train_130m.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.config import ModelConfig, QuantConfig, TrainConfig
from lowbit.distributed.parallel import compile_model
from lowbit.models.llama import Llama, flops_per_token, param_counts
from lowbit.nn import set_track_stats
from lowbit.train.optim import build_optimizer, clip_gradients

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Dense (no sparsity) BF16 tensor-core peaks in FLOP/s, from the vendors' datasheets; the first match on the
# device name wins. H100 SXM: 989.4 TFLOP/s (the PCIe card is slower: 756).
PEAK_BF16: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("4090", 165e12),
]

SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


@dataclass
class Result:
    size: str
    recipe: str
    device: str
    batch: int
    seq: int
    grad_accum: int
    vocab: int
    compile: bool
    compile_mode: str
    compile_scope: str
    sdpa: str
    params: dict[str, int]
    flops_per_token: float
    tokens_per_step: int
    step_ms_median: float
    step_ms_min: float
    step_ms_max: float
    tokens_per_s: float
    achieved_tflops: float
    mfu: float | None
    peak_tflops: float | None
    first_step_s: float
    max_allocated_gb: float | None
    max_reserved_gb: float | None
    loss: float
    step_ms: list[float] = field(default_factory=list)
    profile: dict | None = None


# ----------------------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------------------


def apply_recipe(model: nn.Module, recipe: str) -> nn.Module:
    """bf16 is the plain model; any other name goes through ``lowbit.quant.recipes`` / ``lowbit.nn``."""
    if recipe == "bf16":
        return model
    try:
        from lowbit.nn import quantize_
        from lowbit.quant import recipes
    except ImportError as e:
        raise SystemExit(
            f"--recipe {recipe}: quantized recipes need lowbit.quant.recipes.get_recipe and "
            f"lowbit.nn.quantize_, which this checkout does not provide ({e}). Use --recipe bf16."
        ) from None
    try:
        spec = recipes.get_recipe(recipe)
    except (KeyError, ValueError) as e:
        raise SystemExit(f"--recipe {recipe}: {str(e).strip(chr(39) + chr(34))}") from None
    q = QuantConfig(recipe=recipe)
    return quantize_(model, spec, targets=q.targets, skip=q.skip)


def set_kernels_of(model: nn.Module, mode: str, backend: str = "auto") -> list[str]:
    """``quant.kernels`` for the model's quantized layers (lowbit.nn.linear.set_kernels); [] for bf16.
    ``backend`` != auto forces the kernels' GEMM and quantizer backends (``ref``: the kernel path on the CPU)."""
    try:
        from lowbit.nn.linear import set_kernels
    except ImportError:
        return []
    return set_kernels(model, mode, gemm_backend=backend, quant_backend=backend)


def has_kernels(recipe: str) -> bool:
    """Whether a recipe's layers have a fused op (QuEST W·A, integer-grid STE / BitNet, DQT int grids)."""
    if recipe == "bf16":
        return False
    from lowbit.kernels.bitnet_linear import bitnet_linear_args, int8_operand
    from lowbit.kernels.quest_linear import quest_linear_args
    from lowbit.quant.recipes import get_recipe

    r = get_recipe(recipe)
    if r.direct:
        return int8_operand(r.weight, estimator=False) and int8_operand(r.act)
    return quest_linear_args(r.weight, r.act) is not None or bitnet_linear_args(r.weight, r.act) is not None


def set_sdpa_backend(name: str) -> None:
    """Restrict scaled_dot_product_attention to one backend (global flags, which torch.compile reads)."""
    if name == "auto":
        return
    b = torch.backends.cuda
    b.enable_flash_sdp(name == "flash")
    b.enable_cudnn_sdp(name == "cudnn")
    b.enable_mem_efficient_sdp(name == "efficient")
    b.enable_math_sdp(name == "math")


def device_slug(device: torch.device) -> str:
    """``cpu``, or the GPU's name in lowercase words joined by '-' (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p for key, p in PEAK_BF16 if key in name), None)


def machine_info(device: torch.device) -> dict[str, str]:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": str(torch.get_num_threads()),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)"
        info["cuda"] = str(torch.version.cuda)
        with contextlib.suppress(ImportError):
            import triton

            info["triton"] = triton.__version__
    return info


# ----------------------------------------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------------------------------------


def make_step(args: argparse.Namespace, device: torch.device, size: str | None = None, recipe: str | None = None,
              kernels: str = "auto") -> tuple[Callable[[], float], nn.Module, Llama]:
    """The trainer's step for one (size, recipe, quant.kernels); DQT recipes get the trainer's DirectOptimizer."""
    mcfg = ModelConfig(size=size or args.size, vocab_size=args.vocab, max_seq_len=args.seq)
    tcfg = TrainConfig(batch_size=args.batch, seq_len=args.seq, grad_accum=args.grad_accum,
                       compile=args.compile)
    torch.manual_seed(0)
    model = apply_recipe(Llama(mcfg), recipe or args.recipe).to(device)
    set_kernels_of(model, kernels, getattr(args, "kernel_backend", "auto"))
    set_track_stats(model, False)  # as the trainer steps: statistics are recorded only when reported
    model.train()
    opt = build_optimizer(model, tcfg, device)
    if args.compile:  # the trainer's helper: the whole model, or each block in place (--compile-scope)
        mode = None if args.compile_mode == "default" else args.compile_mode
        fwd: nn.Module = compile_model(model, args.compile_scope, mode=mode)
    else:
        fwd = model
    # the trainer's precision "auto": bf16 autocast over fp32 master weights on CUDA, plain fp32 on CPU
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda"
           else contextlib.nullcontext())
    params = [p for p in model.parameters() if p.requires_grad]

    # synthetic batches, made once on the device and rotated (no data loading in the timed region)
    g = torch.Generator(device=device).manual_seed(0)
    n_rot = 4
    batches = [
        torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device, generator=g)
        for _ in range(n_rot * args.grad_accum)
    ]
    it: Iterator[int] = iter(range(sys.maxsize))

    def step() -> float:
        total = torch.zeros((), device=device)
        for _ in range(args.grad_accum):
            b = batches[next(it) % len(batches)]
            x, y = b[:, :-1], b[:, 1:]
            with amp:
                loss = fwd(x, y) / args.grad_accum
            loss.backward()
            total += loss.detach()
        gnorm = clip_gradients(opt, params, tcfg.grad_clip)
        loss_f, gnorm_f = float(total), float(gnorm)  # the trainer's one sync per step (NaN check)
        if not (math.isfinite(loss_f) and math.isfinite(gnorm_f)):
            raise RuntimeError(f"non-finite loss {loss_f} / grad norm {gnorm_f}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss_f

    return step, fwd, model


def time_steps(step: Callable[[], float], n: int, device: torch.device) -> tuple[list[float], float]:
    """Per-step milliseconds and the last loss. On CUDA an event is recorded at every step boundary and the
    host waits only once, after the last step, so the loop runs exactly as the trainer's does (its own one
    sync per step included, and the next step's launch overlapping the optimizer's kernels)."""
    loss = float("nan")
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        events[0].record()
        for i in range(n):
            loss = step()
            events[i + 1].record()
        events[-1].synchronize()
        return [a.elapsed_time(b) for a, b in zip(events[:-1], events[1:], strict=True)], loss
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        loss = step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times, loss


# ----------------------------------------------------------------------------------------------------------
# profile: where the GPU time of one step goes
# ----------------------------------------------------------------------------------------------------------

# (category, substrings of the kernel name), first match wins; names as cuBLAS/cuDNN/flash/inductor emit them
KERNEL_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("attention (SDPA)", ("flash", "fmha", "attention", "cudnn", "sdpa")),
    ("matmul (cuBLAS/CUTLASS)",
     ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "triton_tem", "triton_mm")),
    ("inductor fused reductions (norms, loss, casts)", ("triton_per", "triton_red")),
    ("inductor fused pointwise", ("triton_poi",)),
    ("optimizer (fused AdamW)", ("adam",)),
    ("grad clip (foreach norm/scale)", ("multi_tensor", "foreach")),
    ("eager cross-entropy", ("log_softmax", "nll_loss", "cross_entropy")),
    ("embedding", ("embedding", "index")),
    ("memset/memcpy", ("memset", "memcpy", "fill")),
    ("other eager elementwise", ("elementwise", "vectorized", "reduce_kernel", "unrolled")),
]


def categorize(name: str) -> str:
    low = name.lower()
    for cat, keys in KERNEL_CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_step(step: Callable[[], float], device: torch.device) -> dict:
    """Profile one step: kernel (on CPU: op) times by category, the top entries, and the profiler's own
    table (top 40 by self device time)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall_ms = (time.perf_counter() - t0) * 1e3
    avgs = prof.key_averages()
    kernels: list[tuple[str, float, int]] = []  # (name, self µs, calls): GPU kernels, or CPU ops on CPU
    for e in avgs:
        if getattr(e, "is_user_annotation", False):  # ranges such as Optimizer.step: not kernels
            continue
        if device.type == "cuda":
            if not str(getattr(e, "device_type", "")).endswith("CUDA"):
                continue
            us = float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
        else:
            us = float(e.self_cpu_time_total)
        if us > 0:
            kernels.append((e.key, us, e.count))
    kernels.sort(key=lambda k: -k[1])
    gpu_ms = sum(k[1] for k in kernels) / 1e3
    cats: dict[str, float] = {}
    for name, us, _ in kernels:
        c = categorize(name)
        cats[c] = cats.get(c, 0.0) + us / 1e3
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = avgs.table(sort_by=sort_key, row_limit=40, max_name_column_width=90)
    except (AttributeError, KeyError, ValueError):
        table = avgs.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90)
    return {
        "table": table,
        "wall_ms": wall_ms,
        "kernel_ms": gpu_ms,
        "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top_kernels": [(n[:120], us / 1e3, c) for n, us, c in kernels[:25]],
    }


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------


def command_line() -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in ("PYTHONPATH",) if k in os.environ)
    return (env + " " if env else "") + shlex.join(["python", *sys.argv])


def render_markdown(r: Result, info: dict[str, str], when: str, cmd: str) -> str:
    gb = lambda v: "n/a" if v is None else f"{v:.2f}"
    mfu = "n/a (no peak for this device; pass --peak-tflops)" if r.mfu is None else f"{100 * r.mfu:.1f} %"
    lines = [
        f"# bench_train: {r.size} / {r.recipe} on {info.get('gpu', 'CPU ' + info['cpu'])}",
        "",
        f"- date: {when}",
        f"- machine: {', '.join(f'{k} {v}' for k, v in info.items())}",
        f"- command: `{cmd}`",
        f"- config: batch {r.batch} × seq {r.seq} × grad_accum {r.grad_accum} = {r.tokens_per_step} "
        f"tokens/step, vocab {r.vocab}, compile {r.compile} (mode {r.compile_mode}, scope {r.compile_scope}), "
        f"SDPA backend {r.sdpa}",
        f"- params: {r.params['total'] / 1e6:.1f} M total, "
        f"{r.params['non_embedding'] / 1e6:.1f} M non-embedding; "
        f"{r.flops_per_token / 1e9:.3f} GFLOP/token (6·N + 12·L·d·T)",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| step time, median of {len(r.step_ms)} (min / max) | {r.step_ms_median:.2f} ms "
        f"({r.step_ms_min:.2f} / {r.step_ms_max:.2f}) |",
        f"| tokens/s | {r.tokens_per_s:,.0f} |",
        f"| achieved | {r.achieved_tflops:.1f} TFLOP/s |",
        f"| MFU (peak {'n/a' if r.peak_tflops is None else f'{r.peak_tflops:.0f}'} TFLOP/s) | {mfu} |",
        f"| peak memory allocated / reserved | {gb(r.max_allocated_gb)} / {gb(r.max_reserved_gb)} GB |",
        f"| first step (compile included) | {r.first_step_s:.1f} s |",
        f"| loss after timing (random tokens: ≈ ln V = {math.log(r.vocab):.2f}) | {r.loss:.3f} |",
    ]
    if r.profile:
        p = r.profile
        lines += [
            "",
            f"## Where one step's time goes (torch.profiler, one step: {p['kernel_ms']:.1f} ms in "
            f"{'GPU kernels' if r.device.startswith('cuda') else 'CPU ops'} of {p['wall_ms']:.1f} ms wall "
            f"under the profiler)",
            "",
        ]
        if r.device.startswith("cuda"):
            lines += [f"The timed steps' median ({r.step_ms_median:.1f} ms) less the kernel time leaves "
                      f"≈ {r.step_ms_median - p['kernel_ms']:.1f} ms per step with the GPU idle: kernel-"
                      f"launch gaps and the host sync before the optimizer step.", ""]
        lines += ["| category | ms | share of kernel time |", "| --- | --- | --- |"]
        total = p["kernel_ms"] or 1.0
        lines += [f"| {c} | {ms:.2f} | {100 * ms / total:.1f} % |" for c, ms in p["categories_ms"].items()]
        lines += ["", "Top entries by self time:", "", "| kernel / op | ms | calls |", "| --- | --- | --- |"]
        lines += [f"| `{n}` | {ms:.2f} | {c} |" for n, ms, c in p["top_kernels"]]
        lines += ["", "<details><summary>torch.profiler table (top 40 by self time)</summary>", "", "```",
                  p["table"].rstrip(), "```", "", "</details>"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# side by side: sizes × recipes × quant.kernels in one process
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    size: str
    recipe: str
    kernels: str
    kernel_layers: int = 0
    step_ms: float | None = None
    step_ms_min: float | None = None
    step_ms_max: float | None = None
    tokens_per_s: float | None = None
    vs_bf16: float | None = None
    max_allocated_gb: float | None = None
    max_reserved_gb: float | None = None
    first_step_s: float | None = None
    loss: float | None = None
    error: str = ""


def _release(device: torch.device) -> None:
    import gc

    torch._dynamo.reset()  # drop the compiled code (and the models it holds); also resets the recompile limits
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure_row(args: argparse.Namespace, device: torch.device, size: str, recipe: str, kernels: str) -> Row:
    """Build, compile, warm up and time one configuration; the model is freed before returning."""
    row = Row(size, recipe, kernels)
    try:
        step, _, model = make_step(args, device, size, recipe, kernels)
        row.kernel_layers = len(set_kernels_of(model, kernels, args.kernel_backend)) if kernels != "off" else 0
        t0 = time.perf_counter()
        step()
        row.first_step_s = time.perf_counter() - t0
        for _ in range(max(0, args.warmup - 1)):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times, row.loss = time_steps(step, args.steps, device)
        if device.type == "cuda":
            row.max_allocated_gb = torch.cuda.max_memory_allocated(device) / 1e9
            row.max_reserved_gb = torch.cuda.max_memory_reserved(device) / 1e9
        row.step_ms, row.step_ms_min, row.step_ms_max = statistics.median(times), min(times), max(times)
        row.tokens_per_s = args.batch * args.seq * args.grad_accum / (row.step_ms / 1e3)
        del step, model
    except Exception as e:  # report the row, keep going
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(f"[bench_train] {size} {recipe} kernels={kernels} failed: {row.error}", file=sys.stderr, flush=True)
        traceback.print_exc(limit=-12, file=sys.stderr)  # the innermost frames: where it failed, for the log
    _release(device)
    return row


def render_matrix(rows: list[Row], args: argparse.Namespace, info: dict[str, str], when: str, cmd: str,
                  skipped: list[str]) -> str:
    f = lambda v, fmt: "—" if v is None else format(v, fmt)  # noqa: E731
    lines = [
        f"# bench_train: recipes side by side on {info.get('gpu', 'CPU ' + info['cpu'])}",
        "",
        f"- date: {when}",
        f"- machine: {', '.join(f'{k} {v}' for k, v in info.items())}",
        f"- command: `{cmd}`",
        f"- config: batch {args.batch} × seq {args.seq} × grad_accum {args.grad_accum}, vocab {args.vocab}, "
        f"compile {args.compile} (mode {args.compile_mode}, scope {args.compile_scope}), {args.warmup} warm-up + "
        f"{args.steps} timed steps (median), the trainer's step (bf16 autocast over fp32 master weights on CUDA)",
        "- kernels: `on` = lowbit's fused ops in the quantized layers (quest_linear for QuEST W·A, the exact INT8 "
        "GEMM for BitNet and DQT int grids), `off` = the torch fake-quant path (the reference); "
        "× bf16 = step time over the bf16 step of the same size (lower is faster)",
        "",
        "| size | recipe | kernels | kernel layers | step ms (min–max) | tokens/s | × bf16 step | peak alloc / "
        "reserved GB | first step s | loss | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        step = "—" if r.step_ms is None else f"{r.step_ms:.2f} ({r.step_ms_min:.2f}–{r.step_ms_max:.2f})"
        lines.append(f"| {r.size} | {r.recipe} | {r.kernels} | {r.kernel_layers} | {step} | "
                     f"{f(r.tokens_per_s, ',.0f')} | {f(r.vs_bf16, '.2f')} | {f(r.max_allocated_gb, '.2f')} / "
                     f"{f(r.max_reserved_gb, '.2f')} | {f(r.first_step_s, '.1f')} | {f(r.loss, '.3f')} | "
                     f"{r.error.replace('|', '/')} |")
    if skipped:
        lines += ["", f"Not run (--time-budget {args.time_budget:.0f} s reached): {', '.join(skipped)}"]
    return "\n".join(lines) + "\n"


def run_matrix(args: argparse.Namespace, device: torch.device) -> list[Row]:
    sizes = [v.strip() for v in args.sizes.split(",") if v.strip()]
    recipes = [v.strip() for v in args.recipes.split(",") if v.strip()]
    modes = [v.strip() for v in args.kernels.split(",") if v.strip()]
    for m in modes:
        if m not in ("auto", "on", "off"):
            raise SystemExit(f"--kernels: {m!r} is not one of auto, on, off")
    plan = []
    for size in sizes:
        for recipe in recipes:
            if recipe != "bf16":  # unknown names fail now, before anything is timed
                from lowbit.quant.recipes import get_recipe

                try:
                    get_recipe(recipe)
                except ValueError as e:
                    raise SystemExit(f"--recipes: {e}") from None
            for mode in (modes if has_kernels(recipe) else modes[:1]):
                plan.append((size, recipe, mode if has_kernels(recipe) else "—"))
    out = args.out or RESULTS_DIR / f"bench_train_matrix_{'_'.join(sizes)}_{device_slug(device)}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    info = machine_info(device)
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cmd = command_line()
    rows: list[Row] = []
    skipped: list[str] = []
    t_start = time.perf_counter()
    for i, (size, recipe, mode) in enumerate(plan):
        if args.time_budget and time.perf_counter() - t_start > args.time_budget:
            skipped = [f"{s} {r} kernels={m}" for s, r, m in plan[i:]]
            break
        row = measure_row(args, device, size, recipe, "off" if mode == "—" else mode)
        row.kernels = mode
        base = next((r for r in rows if r.size == size and r.recipe == "bf16" and r.step_ms), None)
        if base is not None and row.step_ms:
            row.vs_bf16 = row.step_ms / base.step_ms
        rows.append(row)
        print(f"[bench_train] {size} {recipe} kernels={mode}: "
              + (f"{row.step_ms:.2f} ms/step, {row.tokens_per_s:,.0f} tok/s, x{row.vs_bf16 or float('nan'):.2f} "
                 f"bf16, peak {row.max_allocated_gb or 0:.2f} GB, first step {row.first_step_s:.1f} s"
                 if row.step_ms else row.error), flush=True)
        out.write_text(render_matrix(rows, args, info, when, cmd, skipped))  # after every row: a cut run keeps it
        out.with_suffix(".json").write_text(json.dumps(
            {"machine": info, "date": when, "command": cmd, "compile": args.compile, "compile_mode": args.compile_mode,
             "compile_scope": args.compile_scope, "rows": [asdict(r) for r in rows]}, indent=1))
    out.write_text(render_matrix(rows, args, info, when, cmd, skipped))
    print(out.read_text())
    return rows


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--size", default="tiny", help="named size (lowbit.models.llama.SIZES)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size (lm_head width)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the model, as --compile-scope says (default: on for CUDA, off for CPU)")
    ap.add_argument("--compile-mode", default="default",
                    choices=["default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"])
    ap.add_argument("--compile-scope", default="model", choices=["model", "block"],
                    help="with --compile: the whole model in one graph (model), or each transformer block on its "
                    "own, one graph reused by all blocks (block: regional compilation, the trainer's "
                    "train.compile_scope=block; shorter compile, no fusion across blocks, eager head)")
    ap.add_argument("--recipe", default="bf16", help="bf16, or a name from lowbit.quant.recipes")
    ap.add_argument("--recipes", default=None,
                    help="side by side: comma-separated recipes (e.g. bf16,quest-w4a4,bitnet-b1.58,dqt-int8), each "
                    "at every --sizes and --kernels; one table")
    ap.add_argument("--sizes", default=None, help="side by side: comma-separated sizes (default --size)")
    ap.add_argument("--kernels", default=None,
                    help="quant.kernels of the quantized layers: auto | on | off, or a list with --recipes "
                    "(default: auto; with --recipes on,off)")
    ap.add_argument("--kernel-backend", default="auto", choices=["auto", "ref"],
                    help="ref: the kernels' torch reference backends (runs the kernel path on the CPU)")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="side by side: skip the remaining rows after this many seconds (0 = no limit)")
    ap.add_argument("--sdpa", default="auto", choices=SDPA_BACKENDS, help="restrict SDPA to one backend")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense BF16 peak for MFU (default: from the GPU name; H100 SXM = 989)")
    ap.add_argument("--profile", action="store_true", help="profile one step after timing (kernel breakdown)")
    ap.add_argument("--out", type=Path, default=None, help="markdown report (default: results/...)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    for k in ("batch", "seq", "grad_accum", "vocab", "steps"):
        if getattr(args, k) <= 0:
            ap.error(f"--{k.replace('_', '-')} must be > 0")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if args.kernels is None:
        args.kernels = "on,off" if args.recipes else "auto"
    if args.sizes is None:
        args.sizes = args.size
    if not args.recipes and "," in args.kernels:
        ap.error("--kernels takes one value without --recipes")
    return args


def main(argv: list[str] | None = None) -> Result:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA GPU is available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.compile is None:
        args.compile = device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        set_sdpa_backend(args.sdpa)
    if args.recipes:
        return run_matrix(args, device)  # type: ignore[return-value]

    step, _, model = make_step(args, device, kernels=args.kernels)
    cfg = model.cfg
    t0 = time.perf_counter()
    step()
    first_step_s = time.perf_counter() - t0
    for _ in range(max(0, args.warmup - 1)):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = time_steps(step, args.steps, device)
    max_alloc = max_res = None
    if device.type == "cuda":
        max_alloc = torch.cuda.max_memory_allocated(device) / 1e9
        max_res = torch.cuda.max_memory_reserved(device) / 1e9

    tokens = args.batch * args.seq * args.grad_accum
    med = statistics.median(times)
    tps = tokens / (med / 1e3)
    fpt = flops_per_token(cfg, args.seq)
    peak = peak_flops(device, args.peak_tflops)
    res = Result(
        size=args.size, recipe=args.recipe, device=str(device), batch=args.batch, seq=args.seq,
        grad_accum=args.grad_accum, vocab=args.vocab, compile=args.compile, compile_mode=args.compile_mode,
        compile_scope=args.compile_scope, sdpa=args.sdpa, params=param_counts(model), flops_per_token=fpt,
        tokens_per_step=tokens,
        step_ms_median=med, step_ms_min=min(times), step_ms_max=max(times), tokens_per_s=tps,
        achieved_tflops=fpt * tps / 1e12, mfu=None if peak is None else fpt * tps / peak,
        peak_tflops=None if peak is None else peak / 1e12, first_step_s=first_step_s,
        max_allocated_gb=max_alloc, max_reserved_gb=max_res, loss=loss, step_ms=times,
    )
    out = args.out or RESULTS_DIR / f"bench_train_{args.size}_{args.recipe}_{device_slug(device)}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.profile:
        res.profile = profile_step(step, device)
        print("profile (ms):", ", ".join(f"{c} {ms:.2f}" for c, ms in res.profile["categories_ms"].items()),
              f"| kernels {res.profile['kernel_ms']:.1f} of {res.profile['wall_ms']:.1f} wall")

    info = machine_info(device)
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out.write_text(render_markdown(res, info, when, command_line()))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"machine": info, "date": when, "command": command_line(), **asdict(res)}
        args.json.write_text(json.dumps(record, indent=1))
    mfu = "n/a" if res.mfu is None else f"{100 * res.mfu:.1f}%"
    print(f"{args.size} {args.recipe} b{args.batch}x{args.seq}x{args.grad_accum} compile={args.compile}"
          f"({args.compile_mode}, {args.compile_scope}) sdpa={args.sdpa}: {med:.2f} ms/step, {tps:,.0f} tok/s, "
          f"{res.achieved_tflops:.1f} TFLOP/s, MFU {mfu}, peak {max_alloc or 0:.2f}/{max_res or 0:.2f} GB "
          f"alloc/reserved, first step {first_step_s:.1f} s, loss {loss:.3f} -> {out}")
    return res


if __name__ == "__main__":
    main()
