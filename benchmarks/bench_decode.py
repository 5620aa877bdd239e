"""Decode speed of packed low-bit weights (lowbit.kernels.lowbit_gemv) against bf16, on one CUDA GPU.

    python benchmarks/bench_decode.py --out benchmarks/results/bench_decode_h100.md      # ≤ 4 min on an H100

1. GEMV: (K → N) = 4096 → 11008 and 11008 → 4096, batch 1 and 8: bf16 ``torch.matmul`` vs the kernel on
   ternary (2-bit and base-3), W2, W4 and W8 codes. Each row is timed as a CUDA graph of calls that rotate over
   enough weight copies that the working set exceeds 200 MB (the H100's L2 is 50 MB: every call streams its
   weights from HBM). Reported: µs per call, GB/s (weights + scales + x + y) and % of the GPU's copy bandwidth
   (3.0 TB/s H100, 4.3 H200), speed-up vs
   bf16. Goals (issue): batch 1 ternary ≥ 5×, W4 ≥ 3×, W8 ≥ 1.8×; batch 8 ternary ≥ 4×, W4 ≥ 2.5×.
2. End to end: decode tokens/s of the ``800m`` model (vocab 32000, random weights) — bf16 vs packed layers with
   the kernel hook — through lowbit.generate's CUDA-graph decode step (``DecodeStep``, the step
   ``generate_ids(cuda_graphs=True)`` replays), batch 1 and 8, bf16 autocast. Embeddings, norms and lm_head
   stay bf16 (lm_head alone is 131 MB, which bounds the end-to-end gain). ``bitnet-b1.58`` rows run the
   8-bit activation quantizer in torch before the GEMV (the stopgap of packed_linear_kernel). ``--compile``
   adds rows whose step is ``torch.compile``d before capture (inductor fuses the per-layer small ops; the GEMV
   stays the custom op); ``--e2e-variants bf16,bitnet-b1.58`` limits the models. ``--fuse on`` (default; what
   ``lowbit generate`` runs) concatenates q/k/v and gate/up into one layer each, in the bf16 model as in the
   packed ones; ``--fuse both`` adds the unfused rows beside them.

3. Prefill (``--only prefill``; lowbit.kernels.packed_prefill): per layer, 4096 tokens × the ``800m`` shapes
   (K → N = 2048 → 2048, 2048 → 5632, 5632 → 2048): bf16 ``torch.matmul`` vs W4A4 (quest-w4a4: fused Hadamard +
   activation quantization → FP8 scaled_mm, the quantization included in the time; with scaled_mm's auto backend
   and with its Triton kernel) and BitNet b1.58 (8-bit per-token codes → INT8 scaled_mm), weight operand cached;
   alone: the W4A4 quantizer (GB/s and % of the copy bandwidth), the FP8 GEMM per backend (torch._scaled_mm,
   Triton), the INT8 GEMM per backend (Triton, torch._int_mm). Each row eager (host time included) and as a CUDA
   graph (device time), inputs rotated over copies larger than the L2. Goal: W4A4 ≥ 1.6× bf16. End to end: one
   forward of a 512-token prompt into the KV cache (what ``generate_ids`` prefills), batch 1 and 8, 800m, bf16
   autocast, bf16 vs packed quest-w4a4 / bitnet-b1.58 with ``install_all``. Goal: W4A4 ≥ 1.4× at batch 8. CUDA
   events, median of ``--reps``.

Writes markdown (machine, date, command, tables) to ``--out`` after every section.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lowbit.kernels import lowbit_gemv as lg  # noqa: E402
from lowbit.quant.packing import pack, pack_base3  # noqa: E402

HBM = 3.0e12  # B/s: the device-to-device copy measured on the H100 (counting bytes read and written)
#: measured copy bandwidth by GPU name (the device tool's machine notes): an H200 copies at about 4.3 TB/s
COPY_TBS = {"H200": 4.3, "H100": 3.0}


def hbm_bytes_per_s() -> float:
    """The copy bandwidth the % column is measured against, for the GPU in use (3.0 TB/s when unknown)."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in COPY_TBS.items() if k in name), HBM / 1e12) * 1e12
FORMATS = {  # name → (storage, qmin, levels, offset)
    "ternary": ("2bit", -1, 3, 0.0),
    "ternary-b3": ("base3", -1, 3, 0.0),
    "w2": ("2bit", -2, 4, 0.5),
    "w4": ("4bit", -8, 16, 0.5),
    "w8": ("int8", -128, 256, 0.0),
}
GOALS = {("ternary", 1): 5.0, ("w4", 1): 3.0, ("w8", 1): 1.8, ("ternary", 8): 4.0, ("w4", 8): 2.5}


def _time_graph(fn, calls: int, reps: int) -> float:
    """µs per call of ``fn(i)`` for i in range(calls), captured as one CUDA graph, median of ``reps`` replays."""
    for i in range(min(calls, 3)):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def gemv_weights(fmt: str, n: int, k: int, args, gen) -> tuple[list, float | None, int]:
    """Copies of one (N, K) GEMV weight for a timed loop to rotate over, one more than a working set of
    ``--working-set-mb`` needs (the L2 is 50 MB: every call streams its weights from HBM): bf16 matrices for
    ``fmt`` "bf16", else (packed codes, per-row float32 steps) pairs of ``FORMATS[fmt]``. Returns (copies, zero of
    the grid — None for bf16 —, bytes of one copy)."""
    if fmt == "bf16":
        w_bytes = 2 * n * k
        copies = max(2, -(-int(args.working_set_mb * 2**20) // w_bytes) + 1)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(copies)]
        return ws, None, w_bytes
    storage, qmin, levels, offset = FORMATS[fmt]
    codes = torch.randint(qmin, qmin + levels, (n, k), device="cuda", generator=gen, dtype=torch.int8)
    packed = pack_base3(codes, qmin) if storage == "base3" else pack(codes, qmin, levels)
    del codes
    w_bytes = packed.numel() + 4 * n
    copies = max(2, -(-int(args.working_set_mb * 2**20) // w_bytes) + 1)
    ws = [(packed.clone(), torch.rand(n, 1, device="cuda", generator=gen) * 0.02) for _ in range(copies)]
    return ws, lg.grid_zero(storage, qmin, offset), w_bytes


def bench_gemv(args, rows: list) -> None:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    for k, n in ((4096, 11008), (11008, 4096)):
        for b in (1, 8):
            x = torch.randn(b, k, device=dev, dtype=torch.bfloat16)
            base = None
            for name in ["bf16", *FORMATS]:
                ws, zero, w_bytes = gemv_weights(name, n, k, args, gen)
                if name == "bf16":
                    out = torch.empty(b, n, device=dev, dtype=torch.bfloat16)

                    def fn(i, ws=ws, out=out, x=x):
                        torch.matmul(x, ws[i % len(ws)].t(), out=out)
                else:
                    storage = FORMATS[name][0]

                    def fn(i, ws=ws, storage=storage, zero=zero, x=x):
                        c, s = ws[i % len(ws)]
                        lg.lowbit_gemv(x, c, s, storage=storage, zero=zero, backend="triton")
                calls = max(len(ws), 24)
                us = _time_graph(fn, calls, args.reps)
                moved = w_bytes + 2 * b * (k + n)
                if name == "bf16":
                    base = us
                goal = GOALS.get((name, b))
                rows.append(dict(shape=f"{k}→{n}", batch=b, fmt=name, us=us, gbs=moved / us / 1e3,
                                 pct=100 * moved / us * 1e6 / hbm_bytes_per_s(), speedup=base / us, copies=len(ws),
                                 goal=goal, met=None if goal is None else base / us >= goal))
                print(f"gemv {k}->{n} b={b} {name:10s} {us:8.2f} us  {moved / us / 1e3:7.0f} GB/s  "
                      f"x{base / us:.2f}", flush=True)
                del ws
                torch.cuda.empty_cache()


def _packed_800m(recipe: str | None, weight_only: bool, vocab: int, max_seq_len: int = 512, fuse: bool = False):
    """The 800m Llama on the GPU, bf16, random weights; with ``recipe`` its seven projections per block become
    PackedLinear layers of random codes on the recipe's weight grid (act spec dropped when ``weight_only``).
    ``fuse``: q/k/v and gate/up concatenated into one layer each (:func:`lowbit.models.llama.fuse_projections`,
    what ``lowbit generate`` runs), bf16 and packed alike."""
    from lowbit.config import ModelConfig
    from lowbit.export.packed import PackedLinear
    from lowbit.models.llama import SIZES, Llama, fuse_projections
    from lowbit.nn.convert import DEFAULT_TARGETS
    from lowbit.quant.core import scale_shape
    from lowbit.quant.recipes import get_recipe

    cfg = ModelConfig(size="800m", vocab_size=vocab, max_seq_len=max_seq_len, **SIZES["800m"])
    with torch.device("cuda"):
        model = Llama(cfg).to(torch.bfloat16)
    if recipe is None:
        if fuse:
            fuse_projections(model)
        return model.eval()
    rec = get_recipe(recipe)
    wspec, aspec = rec.weight, (None if weight_only else rec.act)
    info = wspec.info
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, torch.nn.Linear) or name.rsplit(".", 1)[-1] not in DEFAULT_TARGETS:
            continue
        new = PackedLinear(mod.in_features, mod.out_features, weight_spec=wspec, act_spec=aspec, device="cuda")
        codes = torch.randint(info.qmin, info.qmax + 1, (mod.out_features, mod.in_features), device="cuda",
                              dtype=torch.int8)
        new.set_codes(codes, torch.full(scale_shape(codes.shape, wspec), 0.02))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    lg.install(model)
    if fuse:
        fuse_projections(model)
    return model.eval()


@torch.inference_mode()
def bench_e2e(args, rows: list) -> None:
    from lowbit.generate import DecodeStep, KVCache

    dev = torch.device("cuda")
    variants = [("bf16", None, True), ("ternary A16", "bitnet-b1.58", True),
                ("bitnet-b1.58 (A8 stopgap)", "bitnet-b1.58", False), ("w4 A16 (quest-w4 grid, no rotation)",
                                                                        "quest-w4", True)]
    if args.e2e_variants:
        keep = {v.strip() for v in args.e2e_variants.split(",")}
        name_of = lambda recipe, weight_only: "bf16" if recipe is None else (recipe if weight_only else "a8")  # noqa: E731
        variants = [v for v in variants if name_of(v[1], v[2]) in keep]
    modes = [False] + ([True] if args.compile else [])  # torch.compile the step (then captured) or not
    base = {}
    for (label, recipe, weight_only), fuse in ((v, f) for v in variants for f in FUSE_MODES[args.fuse]):
        label = label + (", fused q/k/v + gate/up" if fuse and args.fuse == "both" else "")
        if time.monotonic() > args.deadline:
            print(f"e2e {label}: skipped (time budget)", flush=True)
            continue
        model = _packed_800m(recipe, weight_only, args.vocab, fuse=fuse)
        if recipe == "quest-w4":  # no online Hadamard: the GEMV alone (quest-w4 proper rotates x in torch)
            for m in model.modules():
                if hasattr(m, "weight_spec") and m.weight_spec.hadamard:
                    m.weight_spec = m.weight_spec.replace(hadamard=False)
        for b, compiled in ((b, c) for b in (1, 8) for c in modes):
            if time.monotonic() > args.deadline:
                print(f"e2e {label} b={b}: skipped (time budget)", flush=True)
                continue
            prompt = torch.randint(0, args.vocab, (b, args.prompt), device=dev)
            cache = KVCache.for_model(model, b, args.prompt + args.steps + 4, dtype=torch.bfloat16, device=dev)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(prompt, cache=cache, pos=0)[:, -1]
            tok = logits.argmax(-1)
            t_c = time.perf_counter()
            torch._dynamo.reset()
            step = DecodeStep(model, cache, b, args.prompt, dev, torch.bfloat16, cuda_graphs=True, compile=compiled)
            torch.cuda.synchronize()
            t_c = time.perf_counter() - t_c
            t0 = time.perf_counter()
            for i in range(args.steps):
                tok = step(tok, args.prompt + i).argmax(-1)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            tps = b * args.steps / dt
            key = (b, compiled, fuse)
            if recipe is None:
                base[key] = tps
            name = label + (", compiled" if compiled else "")
            rows.append(dict(model=name, batch=b, ms=1e3 * dt / args.steps, tps=tps,
                             speedup=tps / base[key] if key in base else float("nan"), setup_s=t_c,
                             profile=profile_step(step) if args.profile and compiled else None))
            print(f"e2e {name} b={b}: {1e3 * dt / args.steps:.2f} ms/step {tps:.0f} tok/s (setup {t_c:.1f} s)",
                  flush=True)
            del step, cache
        del model
        torch.cuda.empty_cache()


def profile_step(step, calls: int = 5, top: int = 14) -> list[tuple[str, float, float]]:
    """Where a decode step's device time goes: ``calls`` runs of the step's function outside its CUDA graph (the
    same kernels; replays hide them from the profiler), kernels grouped by name → (name, µs per step, launches per
    step), the ``top`` largest plus an "(all kernels)" total."""
    from torch.profiler import ProfilerActivity, profile

    step._fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step._fn()
        torch.cuda.synchronize()
    per: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = per.setdefault(e.name, [0.0, 0.0])
            t[0] += e.time_range.elapsed_us() / calls
            t[1] += 1 / calls
    ranked = sorted(per.items(), key=lambda kv: -kv[1][0])
    total = (sum(v[0] for v in per.values()), sum(v[1] for v in per.values()))
    return [("(all kernels)", *total)] + [(n[:90], us, k) for n, (us, k) in ranked[:top]]


# ---- prefill (lowbit.kernels.packed_prefill) -----------------------------------------------------------------

FUSE_MODES = {"on": (True,), "off": (False,), "both": (False, True)}
PREFILL_SHAPES = ((2048, 2048), (2048, 5632), (5632, 2048))  # 800m: attention projections, gate/up, down
PREFILL_GOALS = {"quest-w4a4": 1.6}
PREFILL_E2E_GOALS = {("quest-w4a4", 8): 1.4}


def _time_events(fn, iters: int, reps: int) -> float:
    """µs per call of ``fn(i)``, eager, calls i = 0 … iters − 1 between two CUDA events, median of ``reps``: the
    time a caller sees, host overhead included whenever the host is the slower side."""
    for i in range(3):
        fn(i)  # warm-up: autotuning, weight-operand cache
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(iters):
            fn(i)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / iters)
    return sorted(times)[len(times) // 2]


def _copies(nbytes: int, args) -> int:
    """Input copies a timed loop rotates over so that its working set exceeds ``--working-set-mb`` (the L2 is
    50 MB: every call then reads its operands from HBM, as in a model's forward)."""
    return max(2, -(-int(args.working_set_mb * 2**20) // max(nbytes, 1)))


def _prefill_layer(recipe: str, n: int, k: int, dev):
    from lowbit.export.packed import PackedLinear
    from lowbit.quant.core import scale_shape
    from lowbit.quant.recipes import get_recipe

    rec = get_recipe(recipe)
    layer = PackedLinear(k, n, weight_spec=rec.weight, act_spec=rec.act, device=dev)
    info = layer.weight_spec.info
    codes = torch.randint(info.qmin, info.qmax + 1, (n, k), device=dev, dtype=torch.int8)
    layer.set_codes(codes, torch.full(scale_shape(codes.shape, layer.weight_spec), 0.02))
    return layer


def prefill_layer_row(shape: str, tokens: int, variant: str, us: float, graph_us: float | None, flops: float,
                      base: tuple[float, float | None] | None, moved: float = 0.0) -> dict:
    """One per-layer row: µs eager and as a CUDA graph (device time), TFLOP/s (2·M·N·K whatever the operand format;
    device time), GB/s and % of the copy bandwidth for the memory-bound quantizer (``moved`` bytes), speed-up vs
    bf16 (eager and graph), goal (on both)."""
    graph = graph_us if graph_us is not None else us
    sp = None if base is None else base[0] / us
    sp_graph = None if base is None or base[1] is None or graph_us is None else base[1] / graph_us
    goal = PREFILL_GOALS.get(variant)
    return dict(shape=shape, tokens=tokens, variant=variant, us=us, graph_us=graph_us, tflops=flops / graph / 1e6,
                gbs=moved / graph / 1e3, pct=100 * moved / graph * 1e6 / hbm_bytes_per_s() if moved else 0.0,
                speedup=sp, speedup_graph=sp_graph, goal=goal,
                met=None if goal is None or sp is None else sp >= goal,
                met_graph=None if goal is None or sp_graph is None else sp_graph >= goal)


@torch.inference_mode()
def bench_prefill_layers(args, rows: list) -> None:
    """Per layer, M = ``--prefill-tokens`` rows at each 800m shape: bf16, quest-w4a4 (auto GEMM backend and the
    Triton GEMM), the W4A4 quantizer alone, the FP8 GEMM alone per backend, BitNet b1.58 and its INT8 GEMM per
    backend. Each row is timed eagerly and as a CUDA graph of ``--prefill-iters`` calls; every variant rotates over
    input copies larger than the L2 (_copies). A variant that fails is reported and the others still run."""
    for k, n in PREFILL_SHAPES:
        first = len(rows)
        _prefill_shape(args, k, n, rows)
        for r in rows[first:]:
            if "failed" in r:
                print(f"prefill {r['shape']} {r['variant']}: failed: {r['failed']}", flush=True)
                continue
            sp = "" if r["speedup"] is None else f"x{r['speedup']:.2f} eager"
            sp += "" if r["speedup_graph"] is None else f", x{r['speedup_graph']:.2f} graph"
            graph = "" if r["graph_us"] is None else f"graph {r['graph_us']:8.1f} us "
            bw = f" {r['gbs']:6.0f} GB/s {r['pct']:3.0f}%" if r["gbs"] else ""
            print(f"prefill {r['shape']} M={r['tokens']} {r['variant']:36s} {r['us']:8.1f} us {graph}"
                  f"{r['tflops']:6.0f} TFLOP/s{bw} {sp}", flush=True)
        torch.cuda.empty_cache()


def _prefill_shape(args, k: int, n: int, rows: list) -> None:
    from lowbit.kernels import packed_prefill as pp
    from lowbit.kernels.bitnet_linear import quantize_int8
    from lowbit.kernels.hadamard_quant import hadamard_quantize
    from lowbit.kernels.scaled_mm import scaled_mm

    dev = torch.device("cuda")
    m = args.prefill_tokens
    shape, flops = f"{k}→{n}", 2.0 * m * n * k
    xs = [torch.randn(m, k, device=dev, dtype=torch.bfloat16) for _ in range(_copies(2 * m * k, args))]
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
    quest, bitnet = _prefill_layer("quest-w4a4", n, k, dev), _prefill_layer("bitnet-b1.58", n, k, dev)
    plan = pp.prefill_plan(quest)
    cw, sw = pp.prefill_weight(quest, plan["fmt"])
    bw, bsw = pp.prefill_weight(bitnet, "int8")
    q8 = [hadamard_quantize(x, plan["bits"], plan["block"], out=plan["fmt"])[:2] for x in xs]
    i8 = [(c, s.float().reshape(-1).contiguous()) for c, s in (quantize_int8(x, bitnet.act_spec) for x in xs)]
    quant_bytes = m * k * (2 + 1 + 1 / 8) + 4 * m  # x read; FP8 codes, packed mask, scales written

    def quantizer(i):
        return hadamard_quantize(xs[i % len(xs)], plan["bits"], plan["block"], out=plan["fmt"])

    def gemm(ops, wc, ws, backend):  # the GEMM alone on pre-quantized activations, rotated like x
        return lambda i: scaled_mm(ops[i % len(ops)][0], wc, ops[i % len(ops)][1], ws, backend=backend)

    def layer(lay, **kw):
        return lambda i: pp.prefill_kernel(lay, xs[i % len(xs)], **kw)

    variants = [  # (name, callable of the call index, bytes moved for the GB/s column or 0)
        ("bf16", lambda i: torch.matmul(xs[i % len(xs)], w.t(), out=out), 0),
        ("quest-w4a4", layer(quest), 0),
        ("quest-w4a4, torch._scaled_mm GEMM (not exact)", layer(quest, gemm_backend="torch"), 0),
        ("  quantizer only (W4A4)", quantizer, quant_bytes),
        ("  FP8 GEMM only, torch._scaled_mm", gemm(q8, cw, sw, "torch"), 0),
        ("  FP8 GEMM only, Triton", gemm(q8, cw, sw, "triton"), 0),
        ("bitnet-b1.58", layer(bitnet), 0),
        ("  INT8 GEMM only, Triton", gemm(i8, bw, bsw, "triton"), 0),
        ("  INT8 GEMM only, torch._int_mm", gemm(i8, bw, bsw, "torch"), 0),
    ]
    base = None
    for name, fn, moved in variants:
        try:
            us = _time_events(fn, args.prefill_iters, args.reps)
        except Exception as e:  # a backend this machine or torch lacks: report, keep going
            msg = f"{type(e).__name__}: {str(e)[:80]}".replace("|", "/").replace("\n", " ")
            rows.append(dict(shape=shape, tokens=m, variant=name, failed=msg))
            continue
        try:
            graph_us = _time_graph(fn, args.prefill_iters, args.reps)
        except Exception as e:  # not capturable: the eager time stands alone
            print(f"prefill {shape} {name}: no CUDA graph ({type(e).__name__}: {str(e)[:80]})", flush=True)
            graph_us = None
        base = (us, graph_us) if name == "bf16" else base
        is_gemm = "quantizer" not in name
        rows.append(prefill_layer_row(shape, m, name, us, graph_us, flops if is_gemm else 0.0,
                                      base if is_gemm else None, moved))  # fmt: skip


@torch.inference_mode()
def bench_prefill_e2e(args, rows: list) -> None:
    from lowbit.generate import KVCache
    from lowbit.kernels import packed_prefill as pp

    dev = torch.device("cuda")
    seq = args.prefill_seq
    base = {}
    for label, recipe in (("bf16", None), ("quest-w4a4", "quest-w4a4"), ("bitnet-b1.58", "bitnet-b1.58")):
        if time.monotonic() > args.deadline:
            print(f"prefill e2e {label}: skipped (time budget)", flush=True)
            continue
        model = _packed_800m(recipe, False, args.vocab, max_seq_len=seq + 8, fuse=FUSE_MODES[args.fuse][-1])
        if recipe is not None:
            pp.install_all(model)
        for b in (1, 8):
            prompt = torch.randint(0, args.vocab, (b, seq), device=dev)
            cache = KVCache.for_model(model, b, seq + 8, dtype=torch.bfloat16, device=dev)

            def fwd(_, model=model, prompt=prompt, cache=cache):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    model(prompt, cache=cache, pos=0)

            us = _time_events(fwd, 1, args.reps)
            if recipe is None:
                base[b] = us
            speedup = base[b] / us if b in base else None
            goal = PREFILL_E2E_GOALS.get((label, b))
            rows.append(dict(model=label, batch=b, seq=seq, ms=us / 1e3, tps=b * seq / us * 1e6, speedup=speedup,
                             goal=goal, met=None if goal is None or speedup is None else speedup >= goal))
            print(f"prefill e2e {label} b={b} seq={seq}: {us / 1e3:.2f} ms {b * seq / us * 1e6:.0f} tok/s", flush=True)
            del cache
        del model
        torch.cuda.empty_cache()


def prefill_lines(args, layers: list, e2e: list) -> list[str]:
    """The markdown of the prefill section (pure: no GPU needed)."""
    def mark(ok):
        return "✓" if ok else "✗"

    def fmt_sp(r, key="speedup"):
        return "" if r.get(key) is None else f"{r[key]:.2f}×"

    copy = hbm_bytes_per_s() / 1e12
    lines = ["", f"## Prefill GEMM per layer, {args.prefill_tokens} tokens, 800m shapes (quantization included)", "",
             "Eager: the time a caller sees (host overhead included when the host is the slower side); graph: the "
             f"same {args.prefill_iters} calls replayed as a CUDA graph (device time). Inputs rotate over copies "
             f"> {args.working_set_mb} MB (HBM, not L2). TFLOP/s from the graph time; GB/s (x read, FP8 codes, "
             f"packed mask and scales written) and % of the {copy:.1f} TB/s copy bandwidth for the quantizer.", "",
             "| K → N | variant | µs eager | µs graph | TFLOP/s | GB/s | % copy | × bf16 eager | × bf16 graph | goal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in layers:
        if "failed" in r:
            lines.append(f"| {r['shape']} | {r['variant']} | failed: {r['failed']} |  |  |  |  |  |  |  |")
            continue
        graph = "" if r["graph_us"] is None else f"{r['graph_us']:.1f}"
        tf = f"{r['tflops']:.0f}" if r["tflops"] else ""
        bw = (f"{r['gbs']:.0f} | {r['pct']:.0f}%") if r["gbs"] else " | "
        goal = "" if r["goal"] is None else (f"≥ {r['goal']}×: eager {mark(r['met'])}"
                                             + ("" if r["met_graph"] is None else f", graph {mark(r['met_graph'])}"))
        lines.append(f"| {r['shape']} | {r['variant']} | {r['us']:.1f} | {graph} | {tf} | {bw} | {fmt_sp(r)} | "
                     f"{fmt_sp(r, 'speedup_graph')} | {goal} |")
    lines += ["", f"## End-to-end prefill, 800m (vocab {args.vocab}, random weights), {args.prefill_seq}-token "
              "prompt into the KV cache, bf16 autocast", "",
              "| model | batch | ms | tokens/s | speed-up vs bf16 | goal |", "|---|---|---|---|---|---|"]
    for r in e2e:
        goal = "" if r["goal"] is None else f"≥ {r['goal']}× {mark(r['met'])}"
        lines.append(f"| {r['model']} | {r['batch']} | {r['ms']:.2f} | {r['tps']:.0f} | {fmt_sp(r)} | {goal} |")
    return lines


def write(args, gemv: list, e2e: list, prefill: tuple[list, list] = ((), ())) -> None:
    import triton

    lines = [
        "# bench_decode: packed low-bit decode (lowbit_gemv) vs bf16",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
        f"- machine: {torch.cuda.get_device_name()}, {platform.node()}; torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), triton {triton.__version__}, python {platform.python_version()}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- GEMV: CUDA graphs, weights rotated over copies > {args.working_set_mb} MB (L2 50 MB); GB/s counts "
        f"weights + scales + x + y; % of the {hbm_bytes_per_s() / 1e12:.1f} TB/s copy bandwidth",
        "",
        "## GEMV",
        "",
        f"| K → N | batch | format | µs | GB/s | % of {hbm_bytes_per_s() / 1e12:.1f} TB/s | speed-up vs bf16 | goal | "
        "copies |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in gemv:
        goal = "" if r["goal"] is None else f"≥ {r['goal']}× {'✓' if r['met'] else '✗'}"
        lines.append(f"| {r['shape']} | {r['batch']} | {r['fmt']} | {r['us']:.2f} | {r['gbs']:.0f} | {r['pct']:.0f} "
                     f"| {r['speedup']:.2f}× | {goal} | {r['copies']} |")
    lines += ["", f"## End-to-end decode, 800m (vocab {args.vocab}, random weights), {args.steps} graphed steps "
              f"after a {args.prompt}-token prompt", "",
              "| model | batch | ms / step | tokens/s | speed-up vs bf16 (same mode) | setup s (compile + capture) |",
              "|---|---|---|---|---|---|"]
    for r in e2e:
        lines.append(f"| {r['model']} | {r['batch']} | {r['ms']:.2f} | {r['tps']:.0f} | {r['speedup']:.2f}× "
                     f"| {r['setup_s']:.1f} |")
    for r in (r for r in e2e if r.get("profile")):
        lines += ["", f"### Kernels of one step: {r['model']}, batch {r['batch']} (compiled step run outside its "
                  "graph under torch.profiler)", "", "| kernel | µs / step | launches / step |", "|---|---|---|"]
        lines += [f"| `{n}` | {us:.1f} | {k:.0f} |" for n, us, k in r["profile"]]
    if any(prefill):
        lines += prefill_lines(args, *prefill)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/bench_decode.md")
    p.add_argument("--working-set-mb", type=int, default=200)
    p.add_argument("--reps", type=int, default=20, help="graph replays per GEMV row (median)")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per end-to-end row")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--compile", action="store_true",
                   help="end-to-end decode: also torch.compile each decode step (lowbit.generate.DecodeStep) "
                   "before capturing it; speed-ups are against bf16 in the same mode")
    p.add_argument("--e2e-variants", default="", help="comma list of end-to-end models to run: bf16, "
                   "bitnet-b1.58 (ternary A16), a8 (BitNet's A8 stopgap), quest-w4; default all")
    p.add_argument("--fuse", choices=tuple(FUSE_MODES), default="on",
                   help="end-to-end models with q/k/v and gate/up fused into one layer each (what `lowbit generate` "
                        "runs; on), as separate layers (off), or both side by side (both); bf16 and packed alike")
    p.add_argument("--profile", action="store_true",
                   help="end-to-end: profile each compiled step's kernels (device µs per step, by kernel name)")
    p.add_argument("--skip-gemv", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--time-budget", type=float, default=220, help="seconds; end-to-end rows past it are skipped")
    p.add_argument("--only", choices=("all", "decode", "gemv", "e2e", "prefill"), default="all",
                   help="sections: all (default), decode (GEMV + e2e decode), gemv, e2e, prefill")
    p.add_argument("--prefill-tokens", type=int, default=4096, help="rows of x in the per-layer prefill rows")
    p.add_argument("--prefill-seq", type=int, default=512, help="prompt length of the end-to-end prefill rows")
    p.add_argument("--prefill-iters", type=int, default=10, help="calls per timed per-layer prefill sample")
    return p


def sections(args) -> set[str]:
    """Which of gemv, e2e, prefill run (``--only``, then ``--skip-gemv``/``--skip-e2e``)."""
    chosen = {"all": {"gemv", "e2e", "prefill"}, "decode": {"gemv", "e2e"}}.get(args.only, {args.only})
    skipped = {name for name, skip in (("gemv", args.skip_gemv), ("e2e", args.skip_e2e)) if skip}
    return chosen - skipped


def main() -> None:
    args = build_parser().parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode needs a CUDA GPU")
    args.deadline = time.monotonic() + args.time_budget
    run = sections(args)
    gemv, e2e, pf_layers, pf_e2e = [], [], [], []
    if "gemv" in run:
        bench_gemv(args, gemv)
        write(args, gemv, e2e)
    if "e2e" in run:
        bench_e2e(args, e2e)
        write(args, gemv, e2e)
    if "prefill" in run:
        bench_prefill_layers(args, pf_layers)
        write(args, gemv, e2e, (pf_layers, pf_e2e))
        bench_prefill_e2e(args, pf_e2e)
    write(args, gemv, e2e, (pf_layers, pf_e2e))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
