"""Loss parity of the fused kernels: the same training run with ``quant.kernels=on`` and ``off``, side by side.

For each recipe, two models from the same seed (same init, same batches, same schedule) train ``--steps`` steps —
one through lowbit's fused ops (quest_linear for QuEST W·A; the exact INT8 GEMM for BitNet and DQT int grids),
one through the torch fake-quant path (the reference) — and the two loss curves are compared step by step. The
kernels compute the same function up to float32 rounding (their low-bit sums are exact), so the curves should
track each other; they drift apart only as far as rounding differences tip codes at rounding ties and AdamW
amplifies gradients of ~0 (tests/nn/test_kernel_dispatch.py). The check: max |Δloss| over the run and |Δ| of
the mean loss over the last 10 % of steps.

Data: token sequences drawn from a fixed random Markov chain over ``--vocab`` tokens (each token has 4 likely
successors), so the loss falls from ln V towards the chain's entropy without any dataset on disk. The step is the
trainer's (AdamW or DirectOptimizer, cosine schedule, clipping to 1.0, bf16 autocast on CUDA).

    PYTHONPATH=src python benchmarks/loss_parity.py --out $OUT/loss_parity            # GPU: 200 steps
    PYTHONPATH=src python benchmarks/loss_parity.py --device cpu --steps 5 --kernel-backend ref --out /tmp/lp

Writes ``<out>.json`` (both curves per recipe, the differences, machine, date, command), ``<out>.png`` (curves and
Δloss) and ``<out>.md`` (the table).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from lowbit.config import DQTConfig, ModelConfig, TrainConfig
from lowbit.models.llama import Llama
from lowbit.nn.linear import set_kernels
from lowbit.train.optim import build_optimizer, lr_at, set_lr


def markov_batches(vocab: int, batch: int, seq: int, steps: int, device: torch.device, seed: int = 0):
    """``steps`` batches (B, T+1) of a random Markov chain: 4 successors per token, probabilities ∝ (8, 4, 2, 1)."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 4), generator=g)
    probs = torch.tensor([8.0, 4.0, 2.0, 1.0]) / 15
    out = []
    for _ in range(steps):
        tok = torch.randint(0, vocab, (batch,), generator=g)
        seqs = [tok]
        for _ in range(seq):
            choice = torch.multinomial(probs, batch, replacement=True, generator=g)
            tok = succ[tok, choice]
            seqs.append(tok)
        out.append(torch.stack(seqs, 1).to(device))
    return out


def entropy_floor() -> float:
    p = torch.tensor([8.0, 4.0, 2.0, 1.0]) / 15
    return float(-(p * p.log()).sum())  # nats per token of the chain (when successors do not collide)


def train_curve(args: argparse.Namespace, recipe: str, kernels: str, batches: list,
                device: torch.device) -> list[float]:
    torch.manual_seed(args.seed)
    mcfg = ModelConfig(size=args.size, vocab_size=args.vocab, max_seq_len=args.seq)
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq, lr=args.lr, warmup=0.1)
    model = Llama(mcfg)
    if recipe != "bf16":
        from lowbit.nn import quantize_

        quantize_(model, recipe)
    model = model.to(device)
    backend = args.kernel_backend
    n = set_kernels(model, kernels, gemm_backend=backend, quant_backend=backend)
    if kernels == "on" and not n:
        raise SystemExit(f"{recipe}: no layer has a fused kernel; choose QuEST W·A, bitnet or dqt-int recipes")
    opt = build_optimizer(model, tcfg, device, DQTConfig())
    fwd = torch.compile(model) if args.compile else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for step, b in enumerate(batches):
        set_lr(opt, lr_at(step, tcfg))
        with amp:
            loss = fwd(b[:, :-1], b[:, 1:])
        loss.backward()
        if hasattr(opt, "clip_grad_norm_"):
            opt.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{recipe} kernels={kernels}: non-finite loss at step {step + 1}")
    del model, opt, fwd
    torch._dynamo.reset()
    return losses


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 6), squeeze=False, sharex=True)
    for i, name in enumerate(names):
        r = results[name]
        if "error" in r:
            axes[0][i].set_title(f"{name}: failed")
            continue
        steps = range(1, len(r["on"]) + 1)
        axes[0][i].plot(steps, r["off"], label="kernels off (torch reference)", lw=1.5)
        axes[0][i].plot(steps, r["on"], label="kernels on", lw=1, ls="--")
        axes[0][i].set_title(name)
        axes[0][i].set_ylabel("train loss")
        axes[0][i].legend(fontsize=7)
        axes[1][i].plot(steps, [a - b for a, b in zip(r["on"], r["off"], strict=True)], lw=1, color="C3")
        axes[1][i].axhline(0, color="k", lw=0.5)
        axes[1][i].set_ylabel("Δloss (on − off)")
        axes[1][i].set_xlabel("step")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default="quest-w4a4,quest-w8a8,bitnet-b1.58,dqt-int8,dqt-ternary")
    ap.add_argument("--size", default="tiny", help="model size (tiny: d=256, 4 layers; K multiples of 128)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (default eager)")
    ap.add_argument("--kernel-backend", default="auto", choices=["auto", "ref"],
                    help="ref: the kernels' torch reference backends (the kernel path on the CPU)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "loss_parity",
                    help="output stem: writes <out>.json, <out>.png, <out>.md")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    batches = markov_batches(args.vocab, args.batch, args.seq, args.steps, device, args.seed)
    cmd = "PYTHONPATH=src python " + shlex.join(["benchmarks/loss_parity.py", *sys.argv[1:]])
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}" if device.type == "cuda"
               else "CPU") + f", torch {torch.__version__}"
    results: dict[str, dict] = {}
    tail = max(1, args.steps // 10)
    for recipe in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        t0 = time.perf_counter()
        try:
            on = train_curve(args, recipe, "on", batches, device)
            off = train_curve(args, recipe, "off", batches, device)
        except Exception as e:  # report, keep going
            results[recipe] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"[loss_parity] {recipe}: failed: {results[recipe]['error']}", flush=True)
            continue
        diff = [abs(a - b) for a, b in zip(on, off, strict=True)]
        results[recipe] = {
            "on": on, "off": off, "max_abs_dloss": max(diff), "argmax_step": diff.index(max(diff)) + 1,
            "final_mean_on": sum(on[-tail:]) / tail, "final_mean_off": sum(off[-tail:]) / tail,
            "seconds": time.perf_counter() - t0,
        }
        r = results[recipe]
        print(f"[loss_parity] {recipe}: max |Δloss| {r['max_abs_dloss']:.4g} (step {r['argmax_step']}), final mean "
              f"on {r['final_mean_on']:.4f} / off {r['final_mean_off']:.4f}, {r['seconds']:.0f} s", flush=True)
        write(args, results, machine, when, cmd, tail)  # after every recipe: a cut run keeps what it has
    write(args, results, machine, when, cmd, tail)
    return results


def write(args, results, machine, when, cmd, tail) -> None:
    meta = {"machine": machine, "date": when, "command": cmd, "size": args.size, "steps": args.steps,
            "batch": args.batch, "seq": args.seq, "vocab": args.vocab, "lr": args.lr, "seed": args.seed,
            "entropy_floor_nats": entropy_floor()}
    args.out.with_suffix(".json").write_text(json.dumps(meta | {"results": results}, indent=1))
    lines = [f"# Loss parity: quant.kernels on vs off ({args.size}, {args.steps} steps)", "",
             f"- date: {when}", f"- machine: {machine}", f"- command: `{cmd}`",
             f"- batch {args.batch} × seq {args.seq}, Markov-chain tokens over {args.vocab} (floor ≈ "
             f"{entropy_floor():.3f} nats), lr {args.lr}, seed {args.seed}", "",
             f"| recipe | max abs Δloss (step) | mean loss, last {tail} steps: on / off | note |",
             "| --- | --- | --- | --- |"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | — | — | {r['error'].replace('|', '/')} |")
        else:
            lines.append(f"| {name} | {r['max_abs_dloss']:.4g} ({r['argmax_step']}) | {r['final_mean_on']:.4f} / "
                         f"{r['final_mean_off']:.4f} | |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        plot(results, args.out.with_suffix(".png"), f"{machine} — {cmd}")
    except Exception as e:  # a plot must never lose the numbers
        print(f"[loss_parity] could not plot: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
