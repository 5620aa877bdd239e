"""Decode speed of packed low-bit weights (lowbit.kernels.lowbit_gemv) against bf16, on one CUDA GPU.

    python benchmarks/bench_decode.py --out benchmarks/results/bench_decode_h100.md      # ≤ 4 min on an H100

1. GEMV: (K → N) = 4096 → 11008 and 11008 → 4096, batch 1 and 8: bf16 ``torch.matmul`` vs the kernel on
   ternary (2-bit and base-3), W2, W4 and W8 codes. Each row is timed as a CUDA graph of calls that rotate over
   enough weight copies that the working set exceeds 200 MB (the H100's L2 is 50 MB: every call streams its
   weights from HBM). Reported: µs per call, GB/s (weights + scales + x + y) and % of 3.0 TB/s, speed-up vs
   bf16. Goals (issue): batch 1 ternary ≥ 5×, W4 ≥ 3×, W8 ≥ 1.8×; batch 8 ternary ≥ 4×, W4 ≥ 2.5×.
2. End to end: decode tokens/s of the ``800m`` model (vocab 32000, random weights) — bf16 vs packed layers with
   the kernel hook — through lowbit.generate's CUDA-graph decode step (``_GraphedStep``, the step
   ``generate_ids(cuda_graphs=True)`` replays), batch 1 and 8, bf16 autocast. Embeddings, norms and lm_head
   stay bf16 (lm_head alone is 131 MB, which bounds the end-to-end gain). ``bitnet-b1.58`` rows run the
   8-bit activation quantizer in torch before the GEMV (the stopgap of packed_linear_kernel).

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

HBM = 3.0e12  # bytes/s: DESIGN.md's measured copy bandwidth
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


def bench_gemv(args, rows: list) -> None:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    for k, n in ((4096, 11008), (11008, 4096)):
        for b in (1, 8):
            x = torch.randn(b, k, device=dev, dtype=torch.bfloat16)
            base = None
            for name in ["bf16", *FORMATS]:
                if name == "bf16":
                    w_bytes = 2 * n * k
                    copies = max(2, -(-int(args.working_set_mb * 2**20) // w_bytes) + 1)
                    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(copies)]
                    out = torch.empty(b, n, device=dev, dtype=torch.bfloat16)

                    def fn(i, ws=ws, out=out, x=x):
                        torch.matmul(x, ws[i % len(ws)].t(), out=out)
                else:
                    storage, qmin, levels, offset = FORMATS[name]
                    codes = torch.randint(qmin, qmin + levels, (n, k), device=dev, generator=gen, dtype=torch.int8)
                    packed = pack_base3(codes, qmin) if storage == "base3" else pack(codes, qmin, levels)
                    del codes
                    w_bytes = packed.numel() + 4 * n
                    copies = max(2, -(-int(args.working_set_mb * 2**20) // w_bytes) + 1)
                    ws = [(packed.clone(), torch.rand(n, 1, device=dev, generator=gen) * 0.02) for _ in range(copies)]
                    zero = lg.grid_zero(storage, qmin, offset)

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
                                 pct=100 * moved / us * 1e6 / HBM, speedup=base / us, copies=len(ws),
                                 goal=goal, met=None if goal is None else base / us >= goal))
                print(f"gemv {k}->{n} b={b} {name:10s} {us:8.2f} us  {moved / us / 1e3:7.0f} GB/s  "
                      f"x{base / us:.2f}", flush=True)
                del ws
                torch.cuda.empty_cache()


def _packed_800m(recipe: str | None, weight_only: bool, vocab: int):
    """The 800m Llama on the GPU, bf16, random weights; with ``recipe`` its seven projections per block become
    PackedLinear layers of random codes on the recipe's weight grid (act spec dropped when ``weight_only``)."""
    from lowbit.config import ModelConfig
    from lowbit.export.packed import PackedLinear
    from lowbit.models.llama import SIZES, Llama
    from lowbit.nn.convert import DEFAULT_TARGETS
    from lowbit.quant.core import scale_shape
    from lowbit.quant.recipes import get_recipe

    cfg = ModelConfig(vocab_size=vocab, max_seq_len=512, **SIZES["800m"])
    with torch.device("cuda"):
        model = Llama(cfg).to(torch.bfloat16)
    if recipe is None:
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
    return model.eval()


@torch.inference_mode()
def bench_e2e(args, rows: list) -> None:
    from lowbit.generate import KVCache, _GraphedStep

    dev = torch.device("cuda")
    variants = [("bf16", None, True), ("ternary A16", "bitnet-b1.58", True),
                ("bitnet-b1.58 (A8 stopgap)", "bitnet-b1.58", False), ("w4 A16 (quest-w4 grid, no rotation)",
                                                                        "quest-w4", True)]
    base = {}
    for label, recipe, weight_only in variants:
        if time.monotonic() > args.deadline:
            print(f"e2e {label}: skipped (time budget)", flush=True)
            continue
        model = _packed_800m(recipe, weight_only, args.vocab)
        if recipe == "quest-w4":  # no online Hadamard: the GEMV alone (quest-w4 proper rotates x in torch)
            for m in model.modules():
                if hasattr(m, "weight_spec") and m.weight_spec.hadamard:
                    m.weight_spec = m.weight_spec.replace(hadamard=False)
        for b in (1, 8):
            prompt = torch.randint(0, args.vocab, (b, args.prompt), device=dev)
            cache = KVCache.for_model(model, b, args.prompt + args.steps + 4, dtype=torch.bfloat16, device=dev)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(prompt, cache=cache, pos=0)[:, -1]
            tok = logits.argmax(-1)
            step = _GraphedStep(model, cache, b, args.prompt, dev, torch.bfloat16)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(args.steps):
                tok = step(tok, args.prompt + i).argmax(-1)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            tps = b * args.steps / dt
            if recipe is None:
                base[b] = tps
            rows.append(dict(model=label, batch=b, ms=1e3 * dt / args.steps, tps=tps, speedup=tps / base[b]))
            print(f"e2e {label} b={b}: {1e3 * dt / args.steps:.2f} ms/step {tps:.0f} tok/s", flush=True)
            del step, cache
        del model
        torch.cuda.empty_cache()


def write(args, gemv: list, e2e: list) -> None:
    import triton

    lines = [
        "# bench_decode: packed low-bit decode (lowbit_gemv) vs bf16",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
        f"- machine: {torch.cuda.get_device_name()}, {platform.node()}; torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), triton {triton.__version__}, python {platform.python_version()}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- GEMV: CUDA graphs, weights rotated over copies > {args.working_set_mb} MB (L2 50 MB); GB/s counts "
        "weights + scales + x + y; % of 3.0 TB/s",
        "",
        "## GEMV",
        "",
        "| K → N | batch | format | µs | GB/s | % of 3.0 TB/s | speed-up vs bf16 | goal | copies |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in gemv:
        goal = "" if r["goal"] is None else f"≥ {r['goal']}× {'✓' if r['met'] else '✗'}"
        lines.append(f"| {r['shape']} | {r['batch']} | {r['fmt']} | {r['us']:.2f} | {r['gbs']:.0f} | {r['pct']:.0f} "
                     f"| {r['speedup']:.2f}× | {goal} | {r['copies']} |")
    lines += ["", f"## End-to-end decode, 800m (vocab {args.vocab}, random weights), {args.steps} graphed steps "
              f"after a {args.prompt}-token prompt", "",
              "| model | batch | ms / step | tokens/s | speed-up vs bf16 |", "|---|---|---|---|---|"]
    for r in e2e:
        lines.append(f"| {r['model']} | {r['batch']} | {r['ms']:.2f} | {r['tps']:.0f} | {r['speedup']:.2f}× |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/bench_decode.md")
    p.add_argument("--working-set-mb", type=int, default=200)
    p.add_argument("--reps", type=int, default=20, help="graph replays per GEMV row (median)")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per end-to-end row")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--skip-gemv", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--time-budget", type=float, default=220, help="seconds; end-to-end rows past it are skipped")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode needs a CUDA GPU")
    args.deadline = time.monotonic() + args.time_budget
    gemv, e2e = [], []
    if not args.skip_gemv:
        bench_gemv(args, gemv)
        write(args, gemv, e2e)
    if not args.skip_e2e:
        bench_e2e(args, e2e)
    write(args, gemv, e2e)
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
