"""The ``lowbit`` command: maps sub-commands and ``section.key=value`` overrides onto the typed config.

    lowbit train --config configs/tiny-cpu.toml train.steps=100      train (prepares data if needed)
    lowbit train --config ... --resume                                 continue a run exactly
    lowbit data --config ...                                           prepare the dataset only
    lowbit eval RUN                                                    loss / ppl / bits per byte
    lowbit eval RUN --tasks cloze,nextsent,task.jsonl [--limit N]      zero-shot task accuracy
    lowbit eval RUN --text FILE [--stride S]                           sliding-window ppl / bits per byte
    lowbit report RUN [RUN ...] --out DIR                              table + plots comparing runs
    lowbit convert RUN --ptq RECIPE                                    post-training quantization baseline
    lowbit convert RUN --to ternary                                    ternary inference from an (8-bit DQT) run
    lowbit sweep experiments/NAME.toml [--only GLOB]                   a grid of runs, resumable
    lowbit fit RUN [RUN ...] --out DIR                                 precision scaling law: eff(P) per recipe
    lowbit recipes | lowbit sizes | lowbit config --config ...         listings

Nothing else lives here: every command calls one library function.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _config(args):
    from lowbit.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args) -> int:
    from lowbit.eval.report import markdown_table, run_row
    from lowbit.train.trainer import Trainer

    cfg = _config(args)
    summary = Trainer(cfg, resume=args.resume, overwrite=args.overwrite).fit()
    init, final = summary.get("initial", {}), summary.get("final", {})
    print("\n## result\n")
    if init and final and "val_loss" in init:
        print(f"validation loss {init['val_loss']:.4f} (untrained) → {final['val_loss']:.4f} after "
              f"{summary['tokens_seen']:,} tokens;  bits/byte {init['val_bpb']:.4f} → {final['val_bpb']:.4f}")
        if "heldout_bpb" in final:
            print(f"held-out (out-of-domain) loss {final['heldout_loss']:.4f}, bits/byte {final['heldout_bpb']:.4f}")
    print()
    print(markdown_table([run_row(cfg.train.out_dir)]))
    print(f"run directory: {cfg.train.out_dir}  (loss curve: {Path(cfg.train.out_dir) / 'loss.png'})")
    return 0


def cmd_data(args) -> int:
    from lowbit.data import open_split, prepare_data

    cfg = _config(args)
    d = prepare_data(cfg.data, cfg.model.vocab_size, progress=True)
    for split in ("train", "val", "heldout"):
        s = open_split(d, split)
        if s is None:
            continue
        bpt = s.n_bytes / max(1, s.n_tokens)
        print(f"{split:8s} {s.n_tokens:>12,} tokens  {s.n_bytes:>13,} bytes  ({bpt:.2f} B/token)")
    print(f"dataset: {d}")
    return 0


def cmd_eval(args) -> int:
    from lowbit.data import open_split
    from lowbit.eval.evaluate import evaluate
    from lowbit.runs import autocast_dtype, load_run, resolve_device

    device = resolve_device(args.device)
    model, cfg, state = load_run(args.run, device)
    results = {"run": str(args.run), "step": state["step"], "recipe": cfg.quant.recipe}
    amp = autocast_dtype(cfg.train.precision, device)
    splits = [] if (args.tasks or args.text) and args.splits is None else (args.splits or "val,heldout").split(",")
    for split in splits:
        shard = open_split(Path(args.data or cfg.data.dir), split)
        if shard is None:
            print(f"skipping {split}: the dataset has no such split", file=sys.stderr)
            continue
        r = evaluate(model, shard, cfg.train.batch_size, cfg.train.seq_len, args.batches, device, amp)
        results[split] = r
        print(f"{split:8s} loss {r['loss']:.4f}  ppl {r['ppl']:.2f}  bits/byte {r['bpb']:.4f}  "
              f"({r['tokens']:,} tokens)")
    if args.tasks or args.text:
        from lowbit.data import load_tokenizer

        data_dir = Path(args.data or cfg.data.dir)
        tok = load_tokenizer(data_dir)
    if args.text:
        from lowbit.eval.tasks import text_perplexity

        r = text_perplexity(model, tok, Path(args.text).read_text(encoding="utf-8"), device, stride=args.stride,
                            amp_dtype=amp)
        results["text"] = {"file": str(args.text), **r}
        print(f"{Path(args.text).name}: loss {r['loss']:.4f}  ppl {r['ppl']:.2f}  bits/byte {r['bpb']:.4f}  "
              f"({r['tokens']:,} tokens, {r['windows']} windows of {r['max_len']}, stride {r['stride']})")
    if args.tasks:
        from lowbit.config import ConfigError
        from lowbit.eval.tasks import run_tasks

        try:
            tasks = run_tasks(model, tok, [t for t in args.tasks.split(",") if t], cfg.data.heldout, data_dir,
                              limit=args.limit, device=device, amp_dtype=amp)
        except ValueError as e:  # an unknown task shape or name: a usage error, not a crash
            raise ConfigError(f"--tasks: {e}") from None
        results["tasks"] = tasks
        for name, r in tasks.items():
            lo, hi = r["acc_ci95"]
            line = f"{name:12s} acc {r['acc']:.4f} [{lo:.3f}, {hi:.3f}]"
            if r["kind"] == "mc":
                lo, hi = r["acc_norm_ci95"]
                line += f"  acc_norm {r['acc_norm']:.4f} [{lo:.3f}, {hi:.3f}]  (chance {r['chance']:.3f})"
            else:
                line += f"  target log-lik {r['target_logprob']:.3f}  target ppl {r['target_ppl']:.2f}"
            print(line + f"  n={r['n']}")
        # kept next to the run for `lowbit report`, merged with the results of earlier task evaluations
        tj = Path(args.run) / "tasks.json"
        old = json.loads(tj.read_text()) if tj.is_file() else {}
        tj.write_text(json.dumps({**old, **{k: {**v, "step": state["step"]} for k, v in tasks.items()}},
                                 indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def cmd_report(args) -> int:
    from lowbit.eval.report import report

    print(report(args.runs, args.out))
    if args.out:
        pngs = ", ".join(p.name for p in sorted(Path(args.out).glob("*.png")))
        print(f"wrote {Path(args.out) / 'report.md'} ({pngs})")
    return 0


def cmd_fit(args) -> int:
    from lowbit.config import ConfigError
    from lowbit.eval.scaling import ScalingFitError, fit_runs

    try:
        fit = fit_runs(args.runs, metric=args.metric, out_dir=args.out, reference=args.reference,
                       fix_alpha=args.fix_alpha, fix_beta=args.fix_beta, fix_e=args.fix_e, tie=args.tie,
                       eff_mode=args.eff_mode, bootstrap=args.bootstrap, seed=args.seed)
    except ScalingFitError as e:  # no runs, no reference run, contradictory options: a usage error
        raise ConfigError(str(e)) from None
    for w in fit.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(fit.format())
    if args.out:
        print(f"wrote {Path(args.out) / 'fit.json'}, fit.png, eff_per_bit.png")
    return 0


def cmd_recipes(args) -> int:
    from lowbit.quant.recipes import get_recipe, list_recipes

    for name in list_recipes(include_direct=True):
        print(f"{name:24s} {get_recipe(name).description}")
    return 0


def cmd_sizes(args) -> int:
    import torch

    from lowbit.config import ModelConfig
    from lowbit.models.llama import SIZES, Llama, param_counts

    print(f"{'size':6s} {'layers':>6s} {'dim':>5s} {'heads':>5s} {'ffn':>6s} {'non-emb':>10s} (vocab {args.vocab})")
    for name in SIZES:
        c = ModelConfig(size=name, vocab_size=args.vocab)
        with torch.device("meta"):
            n = param_counts(Llama(c))["non_embedding"]
        print(f"{name:6s} {c.n_layers:6d} {c.dim:5d} {c.n_heads:5d} {c.ffn_dim:6d} {n / 1e6:9.1f}M")
    return 0


def cmd_config(args) -> int:
    print(_config(args).to_json())
    return 0


def cmd_convert(args) -> int:
    from lowbit.config import ConfigError
    from lowbit.convert import ptq_run

    if (args.ptq is None) == (args.to is None):
        raise ConfigError("lowbit convert needs exactly one of --ptq RECIPE or --to ternary")
    if args.to is not None:
        from lowbit.convert import ternary_run

        out = ternary_run(args.run, args.out, batches=args.batches, device=args.device)
        print(f"wrote {out}")
        return 0
    out = ptq_run(args.run, args.ptq, args.out, batches=args.batches, device=args.device)
    print(f"wrote {out}")
    return 0


def cmd_sweep(args) -> int:
    from lowbit import sweep

    exp = sweep.load_experiment(args.experiment)
    runs = sweep.plan(exp, extra=sweep.parse_set(args.set), only=args.only)
    if not runs:
        from lowbit.config import ConfigError

        raise ConfigError(f"no run of {args.experiment} matches --only {args.only}")
    print(f"experiment {exp.name}: {len(runs)} runs → {exp.out}")
    print(sweep.format_plan(runs))
    if args.dry_run:
        return 0
    runs = sweep.execute(exp, runs, parallel=args.parallel, progress=not args.no_progress,
                         time_limit=args.time_limit)
    failed = [r.name for r in runs if r.status == "failed"]
    unfinished = [r.name for r in runs if r.status not in ("done", "failed")]
    done = len(runs) - len(failed) - len(unfinished)
    print(f"sweep {exp.name}: {done}/{len(runs)} runs done" + (f"; failed: {', '.join(failed)}" if failed else "")
          + (f"; to resume: {', '.join(unfinished)}" if unfinished else ""))
    return 1 if failed else (3 if unfinished else 0)


def build_parser() -> argparse.ArgumentParser:
    from lowbit import __version__

    p = argparse.ArgumentParser(prog="lowbit", description="Train language models on 1–8-bit weights.")
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_config(sp):
        sp.add_argument("--config", "-c", help="TOML run recipe (configs/*.toml)")
        sp.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")

    t = sub.add_parser("train", help="train a model (prepares the data first if needed)")
    with_config(t)
    t.add_argument("--resume", action="store_true", help="continue the run in train.out_dir exactly")
    t.add_argument("--overwrite", action="store_true", help="delete an existing run in train.out_dir first")
    t.set_defaults(fn=cmd_train)

    d = sub.add_parser("data", help="prepare a dataset: tokenizer + token shards")
    with_config(d)
    d.set_defaults(fn=cmd_data)

    e = sub.add_parser("eval", help="evaluate a run's newest checkpoint")
    e.add_argument("run")
    e.add_argument("--splits", default=None, help="token splits to evaluate (default val,heldout; none when "
                   "--tasks or --text is given)")
    e.add_argument("--tasks", help="comma-separated: built-in cloze, nextsent (built from data.heldout) and/or "
                   "task .jsonl files (HellaSwag, PIQA, ARC, generic or cloze shape); scores go to RUN/tasks.json")
    e.add_argument("--limit", type=int, help="evaluate at most this many examples per task")
    e.add_argument("--text", help="sliding-window perplexity and bits/byte of this text file")
    e.add_argument("--stride", type=int, help="--text window stride in tokens (default max_seq_len // 2)")
    e.add_argument("--batches", type=int, default=50)
    e.add_argument("--device", default="auto")
    e.add_argument("--data", help="dataset directory (default: the run's data.dir)")
    e.add_argument("--json", help="also write the results to this JSON file")
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser("report", help="markdown table + plots comparing runs")
    r.add_argument("runs", nargs="+")
    r.add_argument("--out", help="directory for report.md and loss.png")
    r.set_defaults(fn=cmd_report)

    fi = sub.add_parser("fit", help="precision scaling law L = A/(N·eff(P))^α + B/D^β + E over finished runs: "
                        "eff(P) per recipe with bootstrap intervals")
    fi.add_argument("runs", nargs="+", help="run directories, or directories holding them (two levels deep)")
    fi.add_argument("--metric", choices=["val_loss", "heldout_loss"], default="val_loss")
    fi.add_argument("--out", help="directory for fit.json, fit.png and eff_per_bit.png")
    fi.add_argument("--fix-alpha", type=float, help="hold α at this value")
    fi.add_argument("--fix-beta", type=float, help="hold β at this value")
    fi.add_argument("--fix-e", type=float, help="hold E (the irreducible loss) at this value")
    fi.add_argument("--tie", action="store_true", help="β = α (one exponent; for runs at one tokens/param ratio)")
    fi.add_argument("--eff-mode", choices=["auto", "params", "path"], default="auto", help="eff scales N "
                    "(params) or N and D together (path); auto: path when every run has the same D/N")
    fi.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits for the 5–95 %% intervals (0: none)")
    fi.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    fi.add_argument("--reference", default="bf16", help="recipe with eff ≡ 1 (default bf16)")
    fi.set_defaults(fn=cmd_fit)

    c = sub.add_parser("convert", help="post-training quantization of a trained run (PTQ baseline)")
    c.add_argument("run")
    c.add_argument("--ptq", metavar="RECIPE", help="recipe whose quantizers to apply")
    c.add_argument("--to", choices=["ternary"], help="re-quantize the run's weights with BitNet's absmean "
                   "ternariser, no retraining (DQT: ternary inference from an 8-bit model)")
    c.add_argument("--out", help="output run directory (default: RUN-ptq-RECIPE)")
    c.add_argument("--batches", type=int, default=50)
    c.add_argument("--device", default="auto")
    c.set_defaults(fn=cmd_convert)

    sw = sub.add_parser("sweep", help="run an experiment grid (sizes × recipes × tokens) from one TOML file; "
                        "finished runs are skipped, interrupted ones resume")
    sw.add_argument("experiment", help="experiment file (experiments/*.toml)")
    sw.add_argument("--only", action="append", metavar="GLOB", help="only runs whose name (SIZE-tTPP/RECIPE) "
                    "matches; repeatable, e.g. --only 's3m-*/quest-*'")
    sw.add_argument("--parallel", type=int, help="training processes at once (default: the file's)")
    sw.add_argument("--set", action="append", metavar="section.key=value", help="override for every run "
                    "(e.g. --set train.device=cuda); repeatable")
    sw.add_argument("--time-limit", type=float, metavar="SECONDS", help="stop starting runs after this long and "
                    "interrupt the running ones with a checkpoint (the next sweep resumes them); exit code 3")
    sw.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    sw.add_argument("--no-progress", action="store_true")
    sw.set_defaults(fn=cmd_sweep)

    sub.add_parser("recipes", help="list the quantization recipes").set_defaults(fn=cmd_recipes)
    s = sub.add_parser("sizes", help="list the named model sizes")
    s.add_argument("--vocab", type=int, default=32000)
    s.set_defaults(fn=cmd_sizes)
    cf = sub.add_parser("config", help="print the resolved config")
    with_config(cf)
    cf.set_defaults(fn=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lowbit.config import ConfigError
    from lowbit.train.checkpoint import CheckpointError

    errors: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, FileNotFoundError)
    try:
        from lowbit.data import DataError

        errors += (DataError,)
    except ImportError:
        pass
    try:
        return args.fn(args)
    except errors as e:
        print(f"lowbit {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except RuntimeError as e:
        from lowbit.train.trainer import TrainingDiverged

        if isinstance(e, TrainingDiverged):
            print(f"lowbit {args.cmd}: training diverged: {e}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
