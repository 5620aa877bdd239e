"""Memory proof of direct quantized training: peak training memory per component and step time.

For each configuration — mixed-precision AdamW (``bf16``: fp32 master weights, bf16 autocast, fused AdamW),
BitNet QAT (``bitnet-b1.58``: the same plus a fake-quantized forward), and the DQT recipes (weights stored as
codes, lowbit.optim.DirectOptimizer) in their default setting (fp32 moments, gradients stashed until the step)
and their lean setting (8-bit blockwise moments, update applied inside backward) — one training step is
taken apart:

* **weights** — parameters and buffers (packed codes, scales), by tensor accounting (exact bytes);
* **grads** — ``.grad`` of the float parameters plus the DQT layers' stashed weight gradients, right after
  backward (the moment they are largest); with update-in-backward no DQT gradient outlives its layer's backward;
* **optimizer** — every tensor of optimizer state after the step (AdamW moments and step counters; DQT moments,
  8-bit codes and their absmax);
* **activations** — on CUDA the allocator's growth over the forward (what is saved for backward), on CPU the
  tensors saved for backward counted through ``saved_tensors_hooks``;
* **peak** — ``torch.cuda.max_memory_allocated`` over a whole step (forward, backward, clipping, optimizer),
  which includes the transients: a DQT update's float32 scratch of one tensor at a time, the dequantized
  weight of one layer at a time.

"Training state" = weights + grads + optimizer. It is reported per parameter for the block linears (the 7
projections of every block: what the recipes quantize), separately for embeddings + lm_head (float in every
row here, trained by AdamW), and for the whole model. Every row runs eagerly (no torch.compile), batches are
random tokens made on the device up front, the step is the trainer's (autocast bf16 on CUDA, clipping to 1.0,
``zero_grad(set_to_none=True)``), and step time is the median of ``--steps`` steps (CUDA events).

    PYTHONPATH=src python3 benchmarks/bench_memory.py --sizes 130m,1b --device cuda
    PYTHONPATH=src python3 benchmarks/bench_memory.py --sizes tiny --device cpu --steps 2      # smoke test

Writes ``benchmarks/results/bench_memory_<device>.md`` (machine, date, command, tables) and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.config import load_config
from lowbit.models.llama import Llama
from lowbit.nn.direct import direct_modules
from lowbit.runs import apply_recipe
from lowbit.train.memory import count_saved_activations
from lowbit.train.optim import build_optimizer, clip_gradients

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DQT_RECIPES = ("dqt-ternary", "dqt-int2", "dqt-int3", "dqt-int4", "dqt-int8")

# (label, recipe, DQT overrides). "lean" = 8-bit states + update inside backward.
LEAN = {"dqt.state_dtype": "8bit", "dqt.update_in_backward": True}
DEFAULT_ROWS: list[tuple[str, str, dict]] = (
    [("bf16 AdamW (mixed precision)", "bf16", {}), ("BitNet b1.58 QAT", "bitnet-b1.58", {})]
    + [(f"{r} (fp32 states, stashed grads)", r, {}) for r in DQT_RECIPES]
    + [(f"{r} (8-bit states, update in backward)", r, LEAN) for r in DQT_RECIPES]
    + [("dqt-quest-w4a4 (8-bit states, update in backward)", "dqt-quest-w4a4", LEAN),
       ("dqt-ternary (Adafactor, 8-bit m, update in backward)", "dqt-ternary", LEAN | {"dqt.optimizer": "adafactor"})]
)


@dataclass
class Row:
    label: str
    recipe: str
    size: str
    options: dict
    n_block: int
    n_emb: int
    n_total: int
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # component → group → bytes
    activations: int = 0
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    step_ms: list[float] = field(default_factory=list)
    phase_ms: dict[str, float] = field(default_factory=dict)
    loss: float = float("nan")

    def per_param(self, component: str, group: str) -> float:
        n = {"block": self.n_block, "emb": self.n_emb, "total": self.n_total}[group]
        b = self.bytes[component]
        v = sum(b.values()) if group == "total" else b.get(group, 0)
        return v / max(1, n)

    def state_per_param(self, group: str) -> float:
        return sum(self.per_param(c, group) for c in ("weights", "grads", "optimizer"))


def _group(name: str) -> str:
    if "embed_tokens" in name or "lm_head" in name:
        return "emb"
    last = name.rsplit(".", 2)
    if any(p in BLOCK_LINEARS for p in last):
        return "block"
    return "other"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def account(model: nn.Module, opt) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Weights, gradients and optimizer state in bytes, split into block linears / embeddings+lm_head / other."""
    w: dict[str, int] = {}
    g: dict[str, int] = {}
    o: dict[str, int] = {}
    names = {}
    for n, p in model.named_parameters():
        names[id(p)] = n
        w[_group(n)] = w.get(_group(n), 0) + _nbytes(p)
        if p.grad is not None:
            g[_group(n)] = g.get(_group(n), 0) + _nbytes(p.grad)
    for n, b in model.named_buffers():
        w[_group(n)] = w.get(_group(n), 0) + _nbytes(b)
    for n, m in direct_modules(model):
        if m.weight_grad is not None:
            g[_group(n)] = g.get(_group(n), 0) + _nbytes(m.weight_grad)
    for key, st in opt.state.items():
        name = key[4:] if isinstance(key, str) and key.startswith("dqt:") else names.get(id(key), "other")
        grp = _group(name if isinstance(key, str) else name)
        o[grp] = o.get(grp, 0) + sum(_nbytes(v) for v in st.values() if torch.is_tensor(v))
    return w, g, o


def counts(model: nn.Module) -> tuple[int, int, int]:
    block = emb = total = 0
    for n, p in model.named_parameters():
        total += p.numel()
        block += p.numel() if _group(n) == "block" else 0
        emb += p.numel() if _group(n) == "emb" else 0
    for n, m in direct_modules(model):
        total += m.weight_numel
        block += m.weight_numel if _group(n) == "block" else 0
        emb += m.weight_numel if _group(n) == "emb" else 0
    return block, emb, total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_row(label: str, recipe: str, opts: dict, args: argparse.Namespace, size: str,
            device: torch.device) -> Row:
    over = {"model.size": size, "model.vocab_size": args.vocab, "model.max_seq_len": args.seq,
            "train.seq_len": args.seq, "train.batch_size": args.batch, "quant.recipe": recipe,
            "train.lr": 1e-4, "train.grad_clip": 1.0} | opts
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in over.items()])
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(cfg.model)  # initialised on the device (fast); DQT layers become codes right here
    model = apply_recipe(model, cfg)
    model.train()
    opt = build_optimizer(model, cfg.train, device, dqt=cfg.dqt)
    nb, ne, nt = counts(model)
    row = Row(label, recipe, size, opts, nb, ne, nt)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device, generator=gen)
               for _ in range(3)]

    def step(i: int, measure: bool = False) -> float:
        b = batches[i % len(batches)]
        x, y = b[:, :-1], b[:, 1:]
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if measure and device.type == "cuda" else None
        t0 = time.perf_counter()
        if measure and device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            a0 = torch.cuda.memory_allocated(device)
        if ev:
            ev[0].record()
        counter = count_saved_activations(model) if measure and device.type != "cuda" else contextlib.nullcontext({})
        with counter as saved, amp:
            loss = model(x, y)
        if measure:
            if device.type == "cuda":
                row.activations = torch.cuda.memory_allocated(device) - a0
            else:
                row.activations = saved["bytes"]
        if ev:
            ev[1].record()
        t1 = time.perf_counter()
        loss.backward()
        if measure:
            row.bytes["weights"], row.bytes["grads"], _ = account(model, opt)
        if ev:
            ev[2].record()
        t2 = time.perf_counter()
        gnorm = clip_gradients(opt, model.parameters(), 1.0)
        loss_f = float(loss.detach())  # the trainer's one sync per step
        float(gnorm)
        opt.step()
        if ev:
            ev[3].record()
        if measure:
            _, _, row.bytes["optimizer"] = account(model, opt)
            if device.type == "cuda":
                sync(device)
                row.peak_allocated = torch.cuda.max_memory_allocated(device)
                row.peak_reserved = torch.cuda.max_memory_reserved(device)
                row.phase_ms = {"forward": ev[0].elapsed_time(ev[1]), "backward": ev[1].elapsed_time(ev[2]),
                                "clip+optimizer": ev[2].elapsed_time(ev[3])}
            else:
                t3 = time.perf_counter()
                row.phase_ms = {"forward": 1e3 * (t1 - t0), "backward": 1e3 * (t2 - t1),
                                "clip+optimizer": 1e3 * (t3 - t2)}
        opt.zero_grad(set_to_none=True)
        return loss_f

    for i in range(args.warmup):
        step(i)
    step(args.warmup, measure=True)
    times = []
    if device.type == "cuda":
        evs = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
        evs[0].record()
        for i in range(args.steps):
            row.loss = step(i)
            evs[i + 1].record()
        evs[-1].synchronize()
        times = [a.elapsed_time(b) for a, b in zip(evs[:-1], evs[1:], strict=True)]
    else:
        for i in range(args.steps):
            t0 = time.perf_counter()
            row.loss = step(i)
            times.append(1e3 * (time.perf_counter() - t0))
    row.step_ms = times
    return row  # model, optimizer and batches are freed with this frame


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, str]:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_threads": str(torch.get_num_threads())}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{p.name} ({p.total_memory / 2**30:.0f} GiB)"
        info["cuda"] = str(torch.version.cuda)
    return info


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def render(rows: list[Row], info: dict[str, str], cmd: str, when: str, args: argparse.Namespace,
           shapes: str) -> str:
    out = [
        f"# bench_memory: training memory per component ({info.get('gpu', 'CPU ' + info['cpu'])})",
        "",
        f"- date: {when}",
        f"- machine: {', '.join(f'{k} {v}' for k, v in info.items())}",
        f"- command: `{cmd}`",
        f"- {shapes}, vocab {args.vocab}; eager (no torch.compile); bf16 autocast on CUDA; "
        f"warmup {args.warmup} step(s), then 1 measured step, then {args.steps} timed steps (median)",
        "- training state = weights + grads + optimizer, bytes per parameter; *block linears* = the 7 projections "
        "of every block (what the recipes quantize); *emb+head* = embedding + lm_head (float AdamW in every row); "
        "grads are counted right after backward, optimizer state after the step; activations = what the "
        "forward leaves saved for backward; peak = allocator peak over one whole step (includes transients).",
    ]
    if "gpu" not in info:
        out.append("- CPU: no autocast, every row computes in float32 (the training-state bytes are the same as "
                   "under mixed precision: fp32 master weights, fp32 grads, fp32 moments); no allocator peak; "
                   "step times are single-threaded CPU times, for completeness only.")
    out.append("")
    for size in dict.fromkeys(r.size for r in rows):
        rs = [r for r in rows if r.size == size]
        r0 = rs[0]
        out += [f"## {size}: {r0.n_total / 1e6:.1f} M parameters ({r0.n_block / 1e6:.1f} M in block linears, "
                f"{r0.n_emb / 1e6:.1f} M embedding + lm_head)", ""]
        out += ["| configuration | block linears: weights / grads / optimizer = **state** (B/param) | "
                "emb+head state (B/param) | whole-model state (B/param) | activations (MiB) | peak alloc (MiB) | "
                "step (ms) |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in rs:
            blk = " / ".join(f"{r.per_param(c, 'block'):.3f}" for c in ("weights", "grads", "optimizer"))
            step = f"{statistics.median(r.step_ms):.1f}" if r.step_ms else "n/a"
            out.append(f"| {r.label} | {blk} = **{r.state_per_param('block'):.3f}** | "
                       f"{r.state_per_param('emb'):.2f} | {r.state_per_param('total'):.3f} | {_mib(r.activations)} | "
                       f"{_mib(r.peak_allocated)} | {step} |")
        out += ["", "Whole-model bytes (MiB) and the phases of the measured step (ms):", "",
                "| configuration | weights | grads | optimizer | activations | peak allocated | peak reserved | "
                "forward | backward | clip+optimizer | loss |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rs:
            tot = {c: sum(r.bytes[c].values()) for c in ("weights", "grads", "optimizer")}
            ph = r.phase_ms
            out.append(f"| {r.label} | {_mib(tot['weights'])} | {_mib(tot['grads'])} | {_mib(tot['optimizer'])} | "
                       f"{_mib(r.activations)} | {_mib(r.peak_allocated)} | {_mib(r.peak_reserved)} | "
                       f"{ph.get('forward', 0):.1f} | {ph.get('backward', 0):.1f} | {ph.get('clip+optimizer', 0):.1f} "
                       f"| {r.loss:.3f} |")
        out.append("")
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="130m,1b", help="comma-separated named sizes")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: 8, 1b: 4, cpu: 2)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024, cpu 64)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before the measured one")
    ap.add_argument("--rows", default="all", help="'all', or comma-separated row numbers (0-based) to run")
    ap.add_argument("--out", type=Path, default=None, help="markdown (default results/bench_memory_<device>.md)")
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    rows_spec = DEFAULT_ROWS if args.rows == "all" else [DEFAULT_ROWS[int(i)] for i in args.rows.split(",")]
    env = " ".join(f"{k}={os.environ[k]}" for k in ("PYTHONPATH",) if k in os.environ)
    cmd = (env + " " if env else "") + shlex.join(["python3", *sys.argv])
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = args.out or RESULTS_DIR / f"bench_memory_{device_slug(device)}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[Row] = []
    shapes = []
    md = ""
    for size in args.sizes.split(","):
        a = argparse.Namespace(**vars(args))
        a.seq = args.seq or (1024 if device.type == "cuda" else 64)
        a.batch = args.batch or ((4 if size == "1b" else 8) if device.type == "cuda" else 2)
        shapes.append(f"{size}: batch {a.batch} × seq {a.seq}")
        for label, recipe, opts in rows_spec:
            t0 = time.perf_counter()
            r = run_row(label, recipe, opts, a, size, device)
            results.append(r)
            print(f"[{size}] {label}: block state {r.state_per_param('block'):.3f} B/param, whole "
                  f"{r.state_per_param('total'):.3f}, step {statistics.median(r.step_ms):.1f} ms "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
            md = render(results, machine(device), cmd, when, args, "; ".join(shapes))
            out.write_text(md)  # after every row: a run cut short still leaves its numbers
            if args.json:
                args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    print(md)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

