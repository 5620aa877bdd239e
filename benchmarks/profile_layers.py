"""Where the time of one quantized layer's training step goes: torch.profiler over forward + backward of each
layer variant at one GEMM shape, on CUDA (the CPU runs the same code with the reference backends).

    PYTHONPATH=src python benchmarks/profile_layers.py --shape 16384,768,2048 --out /tmp/out/profile_layers.md

For each variant: wall ms per step (host clock around synchronised steps), the summed device time of its
kernels per step, the launch count, and the top operators by host time and the top kernels by device time.
A variant whose wall time far exceeds its device time is bound by host work (Python, launches, syncs), not
by its kernels: that gap is what the table is for.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def variants(m: int, k: int, n: int, device: torch.device) -> tuple[dict[str, Callable], torch.Tensor]:
    from lowbit.kernels.bitnet_linear import bitnet_linear
    from lowbit.kernels.quest_linear import quest_linear
    from lowbit.nn.linear import QuantLinear
    from lowbit.quant import get_recipe

    torch.manual_seed(0)
    gpu = device.type == "cuda"
    back = {} if gpu else {"gemm_backend": "ref", "quant_backend": "ref"}
    gemm = {} if gpu else {"gemm_backend": "ref"}  # bitnet_linear takes the GEMM backend only
    plain = torch.nn.Linear(k, n, bias=False, device=device)
    qr = get_recipe("quest-w4a4")
    fq = QuantLinear(k, n, bias=False, weight_spec=qr.weight, act_spec=qr.act, device=device)
    fq.kernels, fq.track_stats = "off", False
    qk = QuantLinear(k, n, bias=False, weight_spec=qr.weight, act_spec=qr.act, device=device)
    qk.track_stats = False
    bw = torch.nn.Parameter(torch.randn(n, k, device=device) * k**-0.5)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
    return {
        "bf16 nn.Linear": plain,
        "QuantLinear quest-w4a4 (fake quant)": fq,
        "quest_linear W4A4 (kernels)": lambda t: quest_linear(t, qk.weight, 4, 4, **back),
        "QuantLinear quest-w4a4 kernels=on, stats on": _kernel_layer(qk, back),
        "bitnet_linear (INT8 GEMM fwd)": lambda t: bitnet_linear(t, bw, **gemm),
    }, x


def _kernel_layer(layer, backends: dict):
    """QuantLinear with the kernels forced on (``backends``: the CPU's reference ones) and its statistics tracked."""
    from lowbit.nn.linear import set_kernels

    layer.track_stats = True
    set_kernels(layer, "on", **backends)
    return layer


def profile_variant(fn: Callable, x: torch.Tensor, g: torch.Tensor, device: torch.device, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    amp = torch.bfloat16

    def step():
        with torch.autocast(device.type, dtype=amp):
            y = fn(x)
        y.backward(g)
        x.grad = None

    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall = (time.perf_counter() - t0) / steps * 1e3
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync()
    ev = prof.key_averages()
    dev_attr = "self_device_time_total" if hasattr(ev[0], "self_device_time_total") else "self_cuda_time_total"
    kernels = [e for e in ev if e.device_type.name == "CUDA"] if device.type == "cuda" else []
    dev_us = sum(getattr(e, dev_attr) for e in kernels) / steps
    launches = sum(e.count for e in kernels) / steps
    top_cpu = sorted((e for e in ev if e.device_type.name == "CPU"), key=lambda e: -e.self_cpu_time_total)[:10]
    top_dev = sorted(kernels, key=lambda e: -getattr(e, dev_attr))[:8]
    return {
        "wall_ms": wall,
        "device_ms": dev_us / 1e3,
        "launches": launches,
        "top_cpu": [(e.key, e.self_cpu_time_total / steps / 1e3, e.count / steps) for e in top_cpu],
        "top_dev": [(e.key, getattr(e, dev_attr) / steps / 1e3, e.count / steps) for e in top_dev],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="16384,768,2048", help="M,K,N (tokens, in, out)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="markdown report (printed too)")
    a = ap.parse_args(argv)
    m, k, n = (int(v) for v in a.shape.split(","))
    device = torch.device(a.device)
    vs, x = variants(m, k, n, device)
    g = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [
        f"# Layer profile: M×K→N = {m}×{k}→{n}, forward + backward under bf16 autocast",
        "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}; machine: {dev}, torch {torch.__version__}",
        f"- command: `PYTHONPATH=src python benchmarks/profile_layers.py {shlex.join(argv or sys.argv[1:])}`",
        "- wall = host clock per step (synchronised); device = summed kernel time per step; a wall ≫ device "
        "row is host-bound",
        "",
        "| variant | wall ms | device ms | kernels/step |",
        "|---|---|---|---|",
    ]
    details = []
    for name, fn in vs.items():
        try:
            r = profile_variant(fn, x, g, device, a.steps)
        except Exception as e:  # report, keep going
            lines.append(f"| {name} | failed: {type(e).__name__}: {str(e)[:120]} | | |")
            continue
        lines.append(f"| {name} | {r['wall_ms']:.3f} | {r['device_ms']:.3f} | {r['launches']:.0f} |")
        details += ["", f"## {name}", "", "| top host ops (self) | ms/step | calls/step |", "|---|---|---|"]
        details += [f"| `{key[:70]}` | {ms:.3f} | {c:.0f} |" for key, ms, c in r["top_cpu"]]
        if r["top_dev"]:
            details += ["", "| top kernels | ms/step | calls/step |", "|---|---|---|"]
            details += [f"| `{key[:70]}` | {ms:.3f} | {c:.0f} |" for key, ms, c in r["top_dev"]]
        print(lines[-1], flush=True)
    text = "\n".join(lines + details) + "\n"
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
