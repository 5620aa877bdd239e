"""Per-configuration timings of the decode GEMV (lowbit.kernels.lowbit_gemv) against bf16, on one CUDA GPU: the
table the kernel's configuration lists are tuned from.

    python benchmarks/sweep_gemv.py --out benchmarks/results/sweep_gemv.md           # ≈ 3 min on an H100

For each (K → N) shape, batch and format: bf16 ``torch.matmul``, then the word kernel at every entry of
``WORDS_FMA_CONFIGS`` (batch 1) or ``WORDS_DOT_CONFIGS`` (batch > 1), the autotuned launch (what ``lowbit_gemv``
runs) and, with ``--bytes``, the byte kernel autotuned (the kernel before the word kernel, for comparison). Each
timing is a CUDA graph of calls rotating over weight copies larger than ``--working-set-mb`` (the weights stream
from HBM, as in bench_decode.py), median of ``--reps`` replays. Writes markdown (machine, date, command, one table
per shape × batch × format, best first) after every row.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import FORMATS, _time_graph, gemv_weights, hbm_bytes_per_s  # noqa: E402

from lowbit.kernels import lowbit_gemv as lg  # noqa: E402


def sweep(args) -> list[dict]:
    rows: list[dict] = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    deadline = time.monotonic() + args.time_budget
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for b in (int(v) for v in args.batches.split(",")):
            x = torch.randn(b, k, device="cuda", dtype=torch.bfloat16)
            wb, _, _ = gemv_weights("bf16", n, k, args, gen)
            bf16 = _time_graph(lambda i, wb=wb, x=x: torch.matmul(x, wb[i % len(wb)].t()), max(len(wb), 24), args.reps)
            del wb
            rows.append(dict(shape=shape, batch=b, fmt="bf16", config="torch.matmul", us=bf16,
                             gbs=2 * n * k / bf16 / 1e3, speedup=1.0))
            for fmt in args.formats.split(","):
                storage = FORMATS[fmt][0]
                ws, zero, nbytes = gemv_weights(fmt, n, k, args, gen)
                table = lg.WORDS_DOT_CONFIGS if b > 1 else lg.WORDS_FMA_CONFIGS
                variants = [(f"words {c}", dict(config=dict(zip(("BLOCK_N", "BLOCK_W", "SPLIT_K", "num_warps",
                                                                  "num_stages"), c, strict=True)), kernel="words"))
                            for c in table]
                variants.append(("words autotuned", dict(kernel="words")))
                if args.bytes:
                    variants.append(("bytes autotuned", dict(kernel="bytes")))
                for name, kw in variants:
                    if time.monotonic() > deadline:
                        print("time budget spent", flush=True)
                        return rows

                    def fn(i, ws=ws, x=x, kw=kw, storage=storage, zero=zero):
                        c, s = ws[i % len(ws)]
                        lg._lowbit_gemv_triton(x, c, s, None, storage, zero, False, **kw)

                    try:
                        us = _time_graph(fn, max(len(ws), 24), args.reps)
                    except Exception as e:  # a configuration that does not compile (shared memory, registers)
                        print(f"{shape} b={b} {fmt} {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    if name.endswith("autotuned"):
                        tuned = lg._kernels(False).tuned_words(b > 1) if kw["kernel"] == "words" else None
                        if tuned is not None and tuned.best_config is not None:
                            c = tuned.best_config
                            name += f" → {c.kwargs} w{c.num_warps} s{c.num_stages}"
                    rows.append(dict(shape=shape, batch=b, fmt=fmt, config=name, us=us, gbs=nbytes / us / 1e3,
                                     speedup=bf16 / us))
                    print(f"{shape} b={b} {fmt:8s} {name:60s} {us:8.2f} us {nbytes / us / 1e3:6.0f} GB/s "
                          f"x{bf16 / us:.2f}", flush=True)
                    write(args, rows)
                del ws
                torch.cuda.empty_cache()
    return rows


def write(args, rows: list[dict]) -> None:
    import triton

    lines = ["# sweep_gemv: decode GEMV per configuration vs bf16", "",
             f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
             f"- machine: {torch.cuda.get_device_name()}, {platform.node()}; torch {torch.__version__} "
             f"(CUDA {torch.version.cuda}), triton {triton.__version__}",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- CUDA graphs, weights rotated over copies > {args.working_set_mb} MB; GB/s counts the packed "
             f"weights and steps; % of the {hbm_bytes_per_s() / 1e12:.1f} TB/s copy bandwidth", ""]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["batch"], r["fmt"]), []).append(r)
    for (shape, b, fmt), rs in groups.items():
        lines += [f"## {shape.replace('x', ' → ')}, batch {b}, {fmt}", "",
                  "| configuration | µs | GB/s | % | speed-up vs bf16 |", "|---|---|---|---|---|"]
        for r in sorted(rs, key=lambda r: r["us"]):
            lines.append(f"| {r['config']} | {r['us']:.2f} | {r['gbs']:.0f} | "
                         f"{100 * r['gbs'] * 1e9 / hbm_bytes_per_s():.0f} | {r['speedup']:.2f}× |")
        lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/sweep_gemv.md")
    p.add_argument("--shapes", default="4096x11008,11008x4096", help="comma list of KxN")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--formats", default="ternary,w4,w8")
    p.add_argument("--bytes", action="store_true", help="also the byte kernel, autotuned")
    p.add_argument("--working-set-mb", type=int, default=200)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--time-budget", type=float, default=400, help="seconds; rows past it are skipped")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep_gemv needs a CUDA GPU")
    sweep(args)
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
