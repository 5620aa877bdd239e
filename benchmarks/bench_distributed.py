"""Data-parallel scaling of the recipes: step time, tokens/s and peak memory per GPU under DDP and FSDP2, and the
bytes each step moves (docs/distributed.md).

For every (parallel mode, recipe) the model is built as the trainer builds it (``lowbit.runs.build_model``),
wrapped by ``lowbit.distributed.parallelize`` and trained for ``--steps`` timed steps after ``--warmup`` untimed
ones on random tokens made up front: the trainer's step (autocast bf16 on CUDA, clipping to 1.0, the recipe's
optimizer, DQT gradients averaged by ``sync_direct_grads``). Reported per rank: median step time, tokens/s of the
whole job, peak allocated memory (CUDA), and per step the bytes of

* **all-gather** (FSDP2): the block linears' weights in the dtype they travel in (bf16 with the mixed-precision
  policy, fp32 without), gathered twice a step (forward, and again in backward: reshard_after_forward) — for
  DQT the int8/packed codes as FSDP2 shards and gathers them (computed from the tensors,
  ``allgather_block_linears_MB``), and ``allgather_blocks_measured_MB``: the bytes each rank received from the
  block units' all-gathers in one step, counted in a wrapper of FSDP2's all-gather calls
  (``lowbit.distributed.parallel.count_all_gathers``; block linears plus their norm gains);
* **gradient reduction**: all-reduce (DDP) / reduce-scatter (FSDP2) of every trained tensor's gradient (fp32).

Run it under torchrun on the GPU machine, once per world size (1 then 2) for the scaling:

    torchrun --standalone --nproc-per-node 1 benchmarks/bench_distributed.py --size 430m --batch 8 --seq 1024 \\
        --vocab 32000 --recipes bf16,quest-w4a4,dqt-int8 --parallel ddp,fsdp2 --compile
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_distributed.py ... (the same)

or as a CPU smoke test (gloo, 2 processes spawned here, a tiny model):

    PYTHONPATH=src python benchmarks/bench_distributed.py --spawn 2 --size tiny --vocab 320 --batch 2 --seq 32 \\
        --steps 2 --warmup 1 --out /tmp/bench_distributed.md

Writes ``benchmarks/results/bench_distributed_<device>_w<world>.md`` (or ``--out``) on rank 0 after every row
(a run stopped by a time limit keeps what it measured), the rows also as JSON beside it (``.json``), and prints
it. The scaling table from two such runs (1 → N ranks: tokens/s ratio, efficiency = ratio / N, bytes, memory):

    python benchmarks/bench_distributed.py --compare w1.json w2.json --out scaling.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _config(args, recipe: str, parallel: str):
    from lowbit.config import load_config

    over = {"model.size": args.size, "model.vocab_size": args.vocab, "model.max_seq_len": args.seq,
            "train.batch_size": args.batch, "train.seq_len": args.seq, "train.parallel": parallel,
            "train.compile": args.compile, "train.activation_checkpointing": args.ac, "train.device": args.device,
            "quant.recipe": recipe, "train.progress": False}
    if args.dim:
        over |= {"model.dim": args.dim, "model.n_layers": args.layers, "model.n_heads": args.heads,
                 "model.ffn_dim": args.ffn}
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in over.items()])


def traffic(model, cfg, world: int, device: torch.device) -> dict[str, float]:
    """Bytes per step per rank: FSDP2 all-gather of the block linears (received), gradient reduction."""
    from lowbit.nn.direct import direct_modules
    from lowbit.runs import autocast_dtype

    frac = (world - 1) / world if world > 1 else 0.0
    bf16 = device.type == "cuda" and autocast_dtype(cfg.train.precision, device) is torch.bfloat16
    gather = 0.0
    grads = 0.0
    for name, p in model.named_parameters():
        if p.requires_grad:
            grads += p.numel() * 4
        if name.rsplit(".", 2)[-2] in BLOCK_LINEARS and name.endswith(".weight"):
            gather += p.numel() * (2 if bf16 else p.element_size())
    for name, m in direct_modules(model):
        grads += m.weight_numel * 4
        if name.rsplit(".", 1)[-1] in BLOCK_LINEARS:  # codes as stored (scales stay replicated buffers)
            gather += m.weight_codes.numel() * m.weight_codes.element_size()
    out = {"grad_reduce_MB": grads * (2 * frac if cfg.train.parallel == "ddp" else frac) / 1e6}
    if cfg.train.parallel == "fsdp2":
        out["allgather_block_linears_MB"] = 2 * gather * frac / 1e6  # forward + backward re-gather
    return out


def bench_one(args, recipe: str, parallel: str, info, device: torch.device) -> dict:
    from lowbit import distributed as D
    from lowbit.nn import set_track_stats
    from lowbit.runs import autocast_dtype, build_model
    from lowbit.train.optim import build_optimizer, clip_gradients

    cfg = _config(args, recipe, parallel)
    torch.manual_seed(0)
    model = build_model(cfg, device)
    model.train()
    set_track_stats(model, False)  # as the trainer's steps: no per-layer statistics
    proj = traffic(model, cfg, info.world_size, device)
    fwd = D.parallelize(model, cfg.train, info, device)
    opt = build_optimizer(model, cfg.train, device, dqt=cfg.dqt)
    D.wrap_direct_grad_hooks(model, info)
    amp = autocast_dtype(cfg.train.precision, device)
    g = torch.Generator().manual_seed(1 + info.rank)
    batches = [torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
               for _ in range(4)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    measured: list = []
    for i in range(args.warmup + args.steps):
        b = batches[i % len(batches)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()

        def fwd_bwd(b=b, fwd=fwd):
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = fwd(b[:, :-1], b[:, 1:])
            loss.backward()
            return loss

        if i == 0 and parallel == "fsdp2":  # a warm-up step: count what FSDP2 actually all-gathers
            measured.append(D.parallel.block_all_gather_bytes(model, lambda: measured.append(fwd_bwd())))
            loss = measured.pop(0)
        else:
            loss = fwd_bwd()
        D.sync_direct_grads(model, info)
        clip_gradients(opt, model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    row = {"recipe": recipe, "parallel": parallel, "step_ms": step * 1e3,
           "tok_per_s": info.world_size * args.batch * args.seq / step} | {k: v for k, v in proj.items()}
    if measured:  # bytes each rank received from the block units' all-gathers (linears + norm gains), measured
        row["allgather_blocks_measured_MB"] = measured[0] / 1e6
    if device.type == "cuda":
        row["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, fwd, opt
    return row


def run(rank: int, world: int, args) -> None:
    from lowbit import distributed as D
    from lowbit.config import TrainConfig

    info = D.init_distributed(TrainConfig(parallel="ddp", device=args.device))
    device = D.parallel.local_device(TrainConfig(device=args.device), info) or torch.device(
        "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    rows = []
    for p in args.parallel.split(","):
        for r in args.recipes.split(","):
            rows.append(bench_one(args, r, p, info, device))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if info.is_main:
                report(args, rows, info.world_size, device)
    D.shutdown(info)


def report(args, rows: list[dict], world: int, device: torch.device) -> None:
    keys = ["parallel", "recipe", "step_ms", "tok_per_s", "peak_GiB", "allgather_block_linears_MB",
            "allgather_blocks_measured_MB", "grad_reduce_MB",
            "skipped"]
    keys = [k for k in keys if any(k in r for r in rows)]

    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    lines = [f"# bench_distributed: {args.size}, {world} rank(s), {device.type}", "",
             f"- machine: {name}; torch {torch.__version__}; {dt.datetime.now().isoformat(timespec='seconds')}",
             f"- command: `{shlex.join([sys.argv[0], *sys.argv[1:]])}`",
             f"- per rank: batch {args.batch} × {args.seq} tokens; median of {args.steps} steps after {args.warmup}",
             "", "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    out = Path(args.out) if args.out else RESULTS_DIR / f"bench_distributed_{device.type}_w{world}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    meta = {"world": world, "machine": name, "torch": torch.__version__, "size": args.size, "batch": args.batch,
            "seq": args.seq, "command": shlex.join([sys.argv[0], *sys.argv[1:]]),
            "date": dt.datetime.now().isoformat(timespec="seconds")}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(text, flush=True)


def compare(paths: list[str], out: str | None) -> str:
    """Scaling table of bench_distributed JSON reports: every report's rows against the smallest world's."""
    reports = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda r: r["meta"]["world"])
    if len(reports) < 2:
        raise SystemExit("--compare needs two or more reports (the .json files bench_distributed writes)")
    base = reports[0]
    w0 = base["meta"]["world"]
    index = {(r["parallel"], r["recipe"]): r for r in base["rows"]}
    lines = [f"# bench_distributed: scaling from {w0} to " + ", ".join(str(r["meta"]["world"]) for r in reports[1:])
             + " rank(s)", ""]
    for r in reports:
        m = r["meta"]
        lines.append(f"- world {m['world']}: {m['machine']}; torch {m['torch']}; {m['date']}; `{m['command']}`")
    lines += ["", "tokens/s are the whole job's; per-rank batch fixed (weak scaling: the global batch grows with the "
              "world); efficiency = (tokens/s at N ÷ tokens/s at the base world) ÷ (N ÷ base world).", "",
              "| parallel | recipe | world | step ms | tokens/s | speed-up | efficiency | peak GiB/rank | "
              "all-gather MB/step (block linears) | measured (blocks) | grad reduce MB/step |",
              "|" + " --- |" * 11]

    def f(v, nd=2):
        return "" if v is None else f"{v:.{nd}f}"

    for rep in reports[1:]:
        w = rep["meta"]["world"]
        for row in rep["rows"]:
            b = index.get((row["parallel"], row["recipe"]))
            if b is None:
                continue
            speed = row["tok_per_s"] / b["tok_per_s"]
            for world, r, sp, eff in ((w0, b, None, None), (w, row, speed, speed / (w / w0))):
                lines.append(f"| {r['parallel']} | {r['recipe']} | {world} | {f(r['step_ms'], 1)} | "
                             f"{f(r['tok_per_s'], 0)} | {f(sp)} | {f(eff)} | {f(r.get('peak_GiB'))} | "
                             f"{f(r.get('allgather_block_linears_MB'), 1)} | "
                             f"{f(r.get('allgather_blocks_measured_MB'), 1)} | {f(r.get('grad_reduce_MB'), 1)} |")
    gathers = {(r["recipe"]): r.get("allgather_blocks_measured_MB") for rep in reports[1:] for r in rep["rows"]
               if r["parallel"] == "fsdp2"}
    if gathers.get("bf16"):
        lines += ["", "FSDP2 all-gather bytes of the blocks per step ÷ bf16's (measured): " + ", ".join(
            f"{k} {v / gathers['bf16']:.2f}×" for k, v in gathers.items() if v is not None)]
    text = "\n".join(lines) + "\n"
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="430m")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dim", type=int, help="tiny overrides: dim (with --layers --heads --ffn)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="sequences per rank")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--recipes", default="bf16,quest-w4a4,dqt-int8")
    p.add_argument("--parallel", default="ddp,fsdp2")
    p.add_argument("--compile", action="store_true", help="torch.compile per block")
    p.add_argument("--ac", action="store_true", help="activation checkpointing per block")
    p.add_argument("--device", default="auto")
    p.add_argument("--spawn", type=int, default=0, help="spawn N local processes (gloo on CPU) instead of torchrun")
    p.add_argument("--out", help="report path")
    p.add_argument("--compare", nargs="+", metavar="JSON", help="no benchmark: the scaling table of these reports")
    args = p.parse_args(argv)
    if args.compare:
        compare(args.compare, args.out)
    elif args.spawn:
        from lowbit.distributed.spawn import spawn

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        spawn(_spawned, args.spawn, args, backend="nccl" if args.device == "cuda" else "gloo")
    else:
        from lowbit.distributed.parallel import env_world

        rank, world, _ = env_world()
        run(rank, world, args)
    return 0


def _spawned(rank: int, world: int, args) -> None:
    run(rank, world, args)


if __name__ == "__main__":
    sys.exit(main())
