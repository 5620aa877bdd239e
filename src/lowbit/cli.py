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
    lowbit convert RUN --to packed [--ternary-format base3]            packed low-bit inference file
    lowbit generate RUN_OR_PACKED --prompt "..." [--temperature 0]     stream a continuation
    lowbit generate RUN_OR_PACKED --prompt "..." --num-samples 4       4 samples in one batched decode
    lowbit generate RUN_OR_PACKED --prompt-file prompts.txt            one prompt per line, batched
    lowbit chat RUN_OR_PACKED                                          interactive chat (stdin lines)
    lowbit export RUN --format hf|hf-bitnet|gguf [--out DIR]           Hugging Face / GGUF export
    lowbit train --init hf:PATH ...                                    start from a Hugging Face Llama checkpoint
    lowbit train --nproc N ... train.parallel=ddp|fsdp2                N processes (= torchrun -m lowbit.cli train)
    lowbit convert RUN --from-dcp                                      sharded checkpoint → single-file safetensors
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

    overrides = list(args.overrides)
    if getattr(args, "init", None):  # --init hf:PATH is model.init (architecture + tokenizer + weights)
        overrides.append(f"model.init={json.dumps(args.init)}")
    return load_config(args.config, overrides)


def cmd_train(args) -> int:
    from lowbit.eval.report import markdown_table, run_row
    from lowbit.train.trainer import Trainer

    if args.nproc:  # the same command on N processes through torchrun (docs/distributed.md)
        from lowbit.distributed.launch import launch

        return launch(args.nproc, args.argv)
    cfg = _config(args)
    summary = Trainer(cfg, resume=args.resume, overwrite=args.overwrite).fit()
    if summary.get("world_size", 1) > 1 and not _is_rank0():
        return 0  # rank 0 prints the result
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


def _is_rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


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

    if args.from_dcp:
        from lowbit.distributed.checkpoint import consolidate, is_dcp
        from lowbit.train.checkpoint import latest_checkpoint

        path = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(args.run)
        if path is None or not is_dcp(path):
            raise ConfigError(f"--from-dcp: {path or args.run} is not a sharded (DCP) checkpoint")
        print(f"wrote {consolidate(path)}/model.safetensors (+ optim.safetensors)")
        return 0
    if (args.ptq is None) == (args.to is None):
        raise ConfigError("lowbit convert needs exactly one of --ptq RECIPE or --to ternary|packed")
    if args.to == "packed":
        return _convert_packed(args)
    if args.to is not None:
        from lowbit.convert import ternary_run

        out = ternary_run(args.run, args.out, batches=args.batches, device=args.device)
        print(f"wrote {out}")
        return 0
    out = ptq_run(args.run, args.ptq, args.out, batches=args.batches, device=args.device)
    print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    from lowbit.export import export

    opts: dict = {}
    if args.format in ("hf", "hf-bitnet"):
        opts = {"strict": args.strict, "dtype": args.dtype}
        if args.format == "hf-bitnet":
            opts["linear_class"] = args.bitnet_linear
    else:  # gguf: lowbit.export.gguf.export_gguf prints its own summary, notes and warnings
        opts = {"allow_dequantized": args.allow_dequantized, "ternary_type": args.ternary_type,
                "weight_type": args.weight_type, "float_type": args.float_type, "tokenizer": args.tokenizer}
    out = args.out
    if args.format == "gguf" and out is None:
        out = str(args.run).rstrip("/") + ".gguf"
    r = export(args.run, args.format, out, **opts)
    if args.format == "gguf":  # the summary is printed by export_gguf
        return 0
    for w in r.warnings:
        print(f"lowbit export: warning: {w}", file=sys.stderr)
    d = r.logit_diff
    print(f"wrote {r.out} ({args.format}, {r.metadata['recipe']}, step {r.metadata['step']}): vs lowbit's model "
          f"max |Δlogit| {d['max_abs_logit_diff']:.4g}, mean {d['mean_abs_logit_diff']:.4g}, loss "
          f"{d['loss_lowbit']:.4f} → {d['loss_export']:.4f} ({d['tokens']} tokens, {d['source']})"
          + ("" if r.exact else "  [activations not reproduced: see the warning]"))
    return 0


def _convert_packed(args) -> int:
    from lowbit.export.packed import convert_packed

    r = convert_packed(args.run, args.out, ternary_format=args.ternary_format, float_dtype=args.float_dtype)
    mib = lambda n: f"{n / 2**20:.2f} MiB"
    line = f"wrote {r['file']}: {r['layers']} packed linears, {mib(r['bytes'])} on disk"
    line += f" vs {mib(r['bf16_bytes'])} as a bf16 checkpoint ({r['bf16_bytes'] / r['bytes']:.2f}× smaller)"
    if r["source_bytes"]:
        line += f"; the run's checkpoint weights: {mib(r['source_bytes'])}"
    print(line)
    if r["tokenizer"] is None:
        print("note: the run's dataset has no tokenizer to copy; pass --tokenizer to lowbit generate", file=sys.stderr)
    return 0


def _load_for_inference(args):
    """(model, tokenizer, device, autocast dtype) of ``args.model`` — a run directory or a packed model — for
    ``generate`` and ``chat``."""
    import torch

    from lowbit.config import ConfigError
    from lowbit.runs import resolve_device

    device = resolve_device(args.device)
    src = Path(args.model)
    amp = None
    if (src / "config.json").is_file():  # a training run: its fake-quant model
        from lowbit.runs import autocast_dtype, load_run

        model, cfg, _ = load_run(src, device)
        amp = autocast_dtype(cfg.train.precision, device)
        tok_src = args.tokenizer or cfg.data.dir
    else:
        from lowbit.export.packed import is_packed, load_packed

        if not is_packed(src):
            raise ConfigError(f"{src} is neither a run directory (config.json) nor a packed model "
                              f"(`lowbit convert RUN --to packed`)")
        model, meta = load_packed(src, device)
        amp = torch.bfloat16 if device.type == "cuda" else None
        if device.type == "cuda" and args.kernels:
            from lowbit.kernels import lowbit_gemv, packed_prefill

            if lowbit_gemv.has_triton():
                n = packed_prefill.install_all(model)
                print(f"kernels: {n['gemv']} packed layers decode on the Triton GEMV, {n['prefill']} prefill on "
                      f"the FP8/INT8 GEMM", file=sys.stderr)
        tok_src = args.tokenizer or (src / meta["tokenizer"] if meta.get("tokenizer") else None)
        if tok_src is None:
            raise ConfigError(f"{src} holds no tokenizer; pass --tokenizer FILE_OR_DATASET_DIR")
    from lowbit.models.llama import fuse_projections

    fuse_projections(model)  # q/k/v and gate/up as one layer each: the same outputs, fewer launches
    tok = _load_any_tokenizer(tok_src)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens, the model {model.cfg.vocab_size}")
    return model, tok, device, amp


def cmd_generate(args) -> int:
    from lowbit.config import ConfigError
    from lowbit.generate import generate, generate_batch

    if args.num_samples < 1 or args.batch_size < 1:
        raise ConfigError("--num-samples and --batch-size must be ≥ 1")
    if args.prompt_file is not None and args.prompt is not None:
        raise ConfigError("--prompt and --prompt-file exclude each other")
    prompts = None
    if args.prompt_file is not None:  # one prompt per non-blank line
        prompts = [ln for ln in Path(args.prompt_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not prompts:
            raise ConfigError(f"{args.prompt_file} holds no prompt (one per line)")
    model, tok, device, amp = _load_for_inference(args)
    cuda_graphs = device.type == "cuda" if args.cuda_graphs is None else args.cuda_graphs
    if prompts is None and args.prompt is None and not sys.stdin.isatty():
        args.prompt = sys.stdin.read()
    opts = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, device=device, amp_dtype=amp,
                cuda_graphs=cuda_graphs, compile=args.compile)
    try:
        if prompts is None and args.num_samples == 1:  # one continuation, streamed
            pieces = generate(model, tok, args.prompt or "", args.max_new_tokens, seed=args.seed, **opts)
            if args.echo:
                print(args.prompt or "", end="", flush=True)
            for piece in pieces:
                print(piece, end="", flush=True)
            print()
            return 0
        # batched: every (prompt, sample) row, --batch-size rows per decode; batch k is seeded with seed + k
        jobs = [(i, j, p) for i, p in enumerate(prompts or [args.prompt or ""]) for j in range(args.num_samples)]
        bs = args.batch_size
        for k in range(0, len(jobs), bs):
            chunk = jobs[k:k + bs]
            texts = generate_batch(model, tok, [p for _, _, p in chunk], args.max_new_tokens,
                                   seed=None if args.seed is None else args.seed + k // bs, **opts)
            for (i, j, p), text in zip(chunk, texts, strict=True):
                if prompts is None:
                    head = f"sample {j + 1}"
                else:
                    head = f"prompt {i + 1}" + (f", sample {j + 1}" if args.num_samples > 1 else "")
                print(f"--- {head} ---")
                print((p if args.echo else "") + text, flush=True)
    except ValueError as e:  # prompt too long, bad sampling option
        raise ConfigError(str(e)) from None
    return 0


def cmd_chat(args) -> int:
    from lowbit.chat import ChatSession, run_chat

    model, tok, device, amp = _load_for_inference(args)
    session = ChatSession(model, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, device=device, amp_dtype=amp)
    if sys.stdin.isatty():
        print(f"chat with {args.model} (max_seq_len {model.cfg.max_seq_len}; a base LM continuing 'User: …' / "
              f"'Assistant:' text). /reset, /temp X, /exit or Ctrl-D.", file=sys.stderr)
    run_chat(session, sys.stdin, sys.stdout, prompt="> " if sys.stdin.isatty() else None)
    return 0


def _load_any_tokenizer(path):
    """A prepared dataset directory (its checked tokenizer) or a tokenizer file / directory."""
    from lowbit.data import load_tokenizer
    from lowbit.data.tokenizer import Tokenizer

    p = Path(path)
    if (p / "manifest.json").is_file():
        return load_tokenizer(p)
    return Tokenizer.load(p)


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
                         time_limit=args.time_limit, gpus=sweep.visible_gpus(args.gpus))
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
        sp.add_argument("--init", metavar="hf:PATH", help="start from a local Hugging Face Llama checkpoint: "
                        "architecture, tokenizer and weights (= model.init=hf:PATH)")

    t = sub.add_parser("train", help="train a model (prepares the data first if needed)")
    with_config(t)
    t.add_argument("--resume", action="store_true", help="continue the run in train.out_dir exactly")
    t.add_argument("--overwrite", action="store_true", help="delete an existing run in train.out_dir first")
    t.add_argument("--nproc", type=int, metavar="N", help="train on N local processes (torchrun; set "
                   "train.parallel=ddp or fsdp2; train.batch_size is per process)")
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
    c.add_argument("--to", choices=["ternary", "packed"], help="ternary: re-quantize the run's weights with "
                   "BitNet's absmean ternariser, no retraining (DQT: ternary inference from an 8-bit model); "
                   "packed: the inference format, weights as packed codes + scales (docs/inference.md)")
    c.add_argument("--ternary-format", choices=["2bit", "base3"], default="2bit", help="--to packed: ternary "
                   "codes 4 per byte (2bit) or 5 per byte (base3, 1.6 bits/weight)")
    c.add_argument("--float-dtype", choices=["bf16", "fp32"], default="bf16", help="--to packed: dtype of "
                   "the embeddings, norms and lm_head")
    c.add_argument("--from-dcp", action="store_true", help="write a sharded (DCP) checkpoint of RUN (the newest, "
                   "or --checkpoint) as the single-file model.safetensors + optim.safetensors beside it")
    c.add_argument("--checkpoint", help="--from-dcp: the checkpoint directory (default: the newest)")
    c.add_argument("--out", help="output run directory (default: RUN-ptq-RECIPE)")
    c.add_argument("--batches", type=int, default=50)
    c.add_argument("--device", default="auto")
    c.set_defaults(fn=cmd_convert)

    ex = sub.add_parser("export", help="export a run: Hugging Face LlamaForCausalLM (dequantized), transformers' "
                        "BitNet packed ternary layout, or GGUF")
    ex.add_argument("run")
    ex.add_argument("--format", required=True, choices=["hf", "hf-bitnet", "gguf"])
    ex.add_argument("--out", help="output directory (hf: default RUN-hf) or file (gguf)")
    ex.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="hf/hf-bitnet: dtype of the dequantized weights (default bfloat16)")
    ex.add_argument("--strict", action="store_true", help="hf/hf-bitnet: refuse (exit 2) when the exported model "
                    "cannot reproduce lowbit's activation quantization, instead of warning")
    ex.add_argument("--bitnet-linear", default="bitlinear", choices=["bitlinear", "autobitlinear"],
                    help="hf-bitnet: transformers' layer class (BitLinear divides by weight_scale = 1/Δ, "
                    "AutoBitLinear multiplies by Δ)")
    ex.add_argument("--allow-dequantized", action="store_true", help="gguf: write weights with no exact GGUF form "
                    "(QuEST's Hadamard-domain grids) as float values instead of refusing")
    ex.add_argument("--ternary-type", default="TQ2_0", choices=["TQ2_0", "TQ1_0"],
                    help="gguf: block type of ternary weights (TQ1_0: 1.69 bits/weight, TQ2_0: 2.06, faster)")
    ex.add_argument("--weight-type", choices=["TQ2_0", "TQ1_0", "Q4_0", "Q4_1", "Q8_0", "F16", "F32"],
                    help="gguf: force this type for the quantized weights (refused where it cannot hold the grid "
                    "exactly); default: the smallest exact one per weight")
    ex.add_argument("--float-type", default="F16", choices=["F16", "F32"],
                    help="gguf: type of the weights lowbit keeps in high precision (embeddings, lm_head)")
    ex.add_argument("--tokenizer", help="gguf: tokenizer.json or dataset directory (default: the run's data.dir)")
    ex.set_defaults(fn=cmd_export)

    g = sub.add_parser("generate", help="generate text from a run directory or a packed model (KV cache, "
                       "streamed)")
    g.add_argument("model", metavar="RUN_OR_PACKED_DIR")
    g.add_argument("--prompt", help="text to continue (default: stdin when piped, else from the start of a "
                   "document)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50, help="0 = off")
    g.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--tokenizer", help="tokenizer file or prepared dataset directory (default: the run's "
                   "dataset, or the packed directory's tokenizer.json)")
    g.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, run the packed layers' matmuls with the Triton low-bit GEMV (default on)")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the decode step as a CUDA graph (default: on when running on CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (fuses the small "
                   "per-layer ops; the first token waits for compilation)")
    g.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    g.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="N continuations of the prompt in one batched decode, each after '--- sample i ---' "
                   "(streamed only when N = 1)")
    g.add_argument("--prompt-file", metavar="FILE", help="one prompt per line, generated in batches (left-padded); "
                   "each printed after '--- prompt i ---'")
    g.add_argument("--batch-size", type=int, default=8, help="rows per batched decode (--num-samples, "
                   "--prompt-file)")
    g.set_defaults(fn=cmd_generate)

    ch = sub.add_parser("chat", help="interactive chat with a run or packed model (base LM: plain 'User: …' / "
                        "'Assistant:' text; KV cache reused between turns)")
    ch.add_argument("model", metavar="RUN_OR_PACKED_DIR")
    ch.add_argument("--max-new-tokens", type=int, default=128, help="longest reply")
    ch.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (/temp X changes it)")
    ch.add_argument("--top-k", type=int, default=50, help="0 = off")
    ch.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--device", default="auto")
    ch.add_argument("--tokenizer", help="tokenizer file or prepared dataset directory")
    ch.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                    help="on CUDA, run the packed layers' matmuls with the Triton low-bit kernels")
    ch.set_defaults(fn=cmd_chat)

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
    sw.add_argument("--gpus", metavar="auto|0,1,...", help="spread the runs over these GPUs (each run sees one, "
                    "the least busy, through CUDA_VISIBLE_DEVICES); auto = every visible GPU")
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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # train --nproc relaunches the same command
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
