"""Compare runs: a markdown table and PNG plots (training loss, validation loss against tokens).

``lowbit report RUN...`` reads each run directory's ``config.json``, ``log.jsonl``, ``summary.json`` and, when
``lowbit eval RUN --tasks ...`` wrote one, ``tasks.json``; no model is loaded, so a report of many runs is
instant. Plots: ``loss.png`` (curves), ``pareto.png`` (final loss against the weight memory of the quantized
layers, non-embedding parameters × weight bits of the recipe) and, when the logs hold them,
``diagnostics.png`` (DQT flip rate, QuEST trust-estimator masked fractions against the step).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowbit.train.logger import read_log


def run_row(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    evals = read_log(run_dir, "eval")
    final = summary.get("final") or (evals[-1] if evals else {})
    mem = summary.get("memory", {})
    recipe = cfg.get("quant", {}).get("recipe", "?")
    return {
        "run": run_dir.name,
        "recipe": cfg.get("quant", {}).get("recipe", "?"),
        "size": cfg.get("model", {}).get("size", "?"),
        "non_emb_params": summary.get("params", {}).get("non_embedding"),
        "steps": final.get("step"),
        "tokens": final.get("tokens"),
        "val_loss": final.get("val_loss"),
        "val_bpb": final.get("val_bpb"),
        "heldout_loss": final.get("heldout_loss"),
        "heldout_bpb": final.get("heldout_bpb"),
        "tok_per_s": summary.get("tok_per_s"),
        "train_state_B_per_param": (mem.get("bytes_per_param", {}).get("weights", 0)
                                    + mem.get("bytes_per_param", {}).get("grads", 0)
                                    + mem.get("bytes_per_param", {}).get("optimizer", 0)) if mem else None,
        "w_bits": weight_bits(recipe),
        **task_cells(run_dir),
    }


def weight_bits(recipe: str) -> float | None:
    """Bits per weight of ``recipe``'s quantized linears (16 for bf16 or a recipe that leaves weights alone)."""
    if recipe == "bf16":
        return 16.0
    try:
        from lowbit.quant.recipes import get_recipe

        w = get_recipe(recipe).weight
    except (KeyError, ValueError):
        return None
    return 16.0 if w is None else float(w.bits)


def task_cells(run_dir: str | Path) -> dict[str, Any]:
    """``{"<task> acc_norm": …}`` (multiple choice) / ``{"<task> acc": …}`` (cloze) from ``RUN/tasks.json``."""
    p = Path(run_dir) / "tasks.json"
    if not p.is_file():
        return {}
    out = {}
    for name, r in sorted(json.loads(p.read_text()).items()):
        key = "acc_norm" if r.get("kind", "mc") == "mc" and "acc_norm" in r else "acc"
        if key in r:
            out[f"{name} {key}"] = r[key]
    return out


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(c for r in rows for c in r))  # union: runs may have different task scores
    head = "| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|\n"
    return head + "".join("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |\n" for r in rows)


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (imported on first use: plotting is optional work)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write as a 120-dpi PNG (cropped to what is drawn: a legend beside the axes included) and close
    ``fig``."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return path


def _run_styles(n: int) -> list[dict[str, Any]]:
    """One distinct (color, line style) per run: matplotlib's 10-color cycle repeats after 10 runs, so larger
    comparisons (a recipe grid) take tab20's 20 colors, then dashed lines."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    k = cmap.N
    return [{"color": cmap(i % k), "linestyle": ("-", "--", ":")[(i // k) % 3]} for i in range(n)]


def plot_runs(runs: list[str | Path], path: str | Path, smooth: int = 5) -> Path:
    """Training loss (moving average over ``smooth`` points) and validation loss of each run, vs tokens.

    The training panel's y range starts after the first 10 % of the tokens (the steep start would flatten the
    differences between runs: it is in the log); more than six runs share one legend beside the panels."""
    plt = pyplot()

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    tails: list[float] = []
    for r, style in zip(runs, _run_styles(len(runs)), strict=True):
        label = _label(Path(r))
        tr = read_log(r, "train")
        if tr:
            xs = [p["tokens"] for p in tr]
            ys = [p["loss"] for p in tr]
            k = max(1, min(smooth, len(ys)))
            sm = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
            a.plot(xs, sm, label=label, lw=1.2, **style)
            tails += [y for x, y in zip(xs, sm, strict=True) if x >= 0.1 * xs[-1]]
        # the untrained point (tokens = 0) would dwarf the rest of the curve: it is in the table instead
        ev = [p for p in read_log(r, "eval") if "val_loss" in p and p.get("tokens", 0) > 0]
        if ev:
            b.plot([p["tokens"] for p in ev], [p["val_loss"] for p in ev], marker="o", ms=3, label=label, **style)
    if tails:
        lo, hi = min(tails), max(tails)
        a.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    a.set(title="training loss", xlabel="tokens", ylabel="loss (nats)")
    b.set(title="validation loss", xlabel="tokens", ylabel="loss (nats)")
    from matplotlib.ticker import EngFormatter

    for ax in (a, b):
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
    handles, labels = b.get_legend_handles_labels() if b.lines else a.get_legend_handles_labels()
    if len(labels) > 6:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    else:
        for ax in (a, b):
            if ax.lines:
                ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_pareto(rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Final loss (validation; held-out in a second panel when present) against weight memory of the
    quantized layers, ``non-embedding params × weight bits``, with the Pareto frontier (no run both smaller and
    better) drawn through the runs."""
    pts = [r for r in rows if r.get("non_emb_params") and r.get("w_bits") and r.get("val_loss") is not None]
    if not pts:
        return None
    plt = pyplot()

    from matplotlib.ticker import NullFormatter

    metrics = [m for m in ("val_loss", "heldout_loss") if all(r.get(m) is not None for r in pts)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        xs = [r["non_emb_params"] * r["w_bits"] for r in pts]
        ys = [r[m] for r in pts]
        ax.scatter(xs, ys, zorder=3)
        for x, y, r in zip(xs, ys, pts, strict=True):
            ax.annotate(_run_label(r["run"], r["recipe"]), (x, y), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        front, best = [], float("inf")
        for x, y in sorted(zip(xs, ys, strict=True)):
            if y < best:
                front.append((x, y))
                best = y
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color="C3", alpha=0.6,
                label="Pareto frontier")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor-tick labels overlap on a one-decade axis
        ax.set(title=f"{m.replace('_', ' ')} vs weight bits", xlabel="non-embedding params × bits per weight",
               ylabel="loss (nats)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


DIAGNOSTICS = {"flip_rate/mean": "DQT flip rate (codes changed per step)",
               "act_masked/mean": "QuEST: masked fraction, activations",
               "weight_masked/mean": "QuEST: masked fraction, weights"}
"""Eval-record keys plotted by :func:`plot_diagnostics`, with their panel titles."""


def plot_diagnostics(runs: list[str | Path], path: str | Path) -> Path | None:
    """One panel per :data:`DIAGNOSTICS` key found in any run's eval records, against the step; None if none."""
    data = {k: {} for k in DIAGNOSTICS}
    for r in runs:
        ev = read_log(r, "eval")
        for k in DIAGNOSTICS:
            pts = [(p["step"], p[k]) for p in ev if k in p and "step" in p]
            if pts:
                data[k][_label(Path(r))] = pts
    keys = [k for k in DIAGNOSTICS if data[k]]
    if not keys:
        return None
    plt = pyplot()

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        for label, pts in data[k].items():
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", ms=3, label=label)
        ax.set(title=DIAGNOSTICS[k], xlabel="step", ylabel="fraction")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def _run_label(name: str, recipe: str) -> str:
    return name if recipe == name else f"{name} ({recipe})"


def _label(run_dir: Path) -> str:
    p = run_dir / "config.json"
    if p.is_file():
        return _run_label(run_dir.name, json.loads(p.read_text()).get("quant", {}).get("recipe", "?"))
    return run_dir.name


def report(runs: list[str | Path], out_dir: str | Path | None = None) -> str:
    """Markdown comparison of ``runs``; with ``out_dir``, also writes report.md and loss.png there."""
    missing = [str(r) for r in runs if not (Path(r) / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"not run directories (no config.json): {', '.join(missing)}")
    rows = [run_row(r) for r in runs]
    md = markdown_table(rows)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        png = plot_runs(runs, out / "loss.png")
        text = "# lowbit report\n\n" + md + f"\n![loss curves]({png.name})\n"
        pareto = plot_pareto(rows, out / "pareto.png")
        if pareto is not None:
            text += f"\n![loss vs weight bits]({pareto.name})\n"
        diag = plot_diagnostics(runs, out / "diagnostics.png")
        if diag is not None:
            text += f"\n![flip rate and masked fractions]({diag.name})\n"
        (out / "report.md").write_text(text)
    return md
