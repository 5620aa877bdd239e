"""Compare runs: a markdown table and PNG plots (training loss, validation loss against tokens).

``lowbit report RUN...`` reads each run directory's ``config.json``, ``log.jsonl`` and ``summary.json``; no
model is loaded, so a report of many runs is instant.
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
    }


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
    cols = list(rows[0])
    head = "| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|\n"
    return head + "".join("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |\n" for r in rows)


def plot_runs(runs: list[str | Path], path: str | Path, smooth: int = 5) -> Path:
    """Training loss (moving average over ``smooth`` points) and validation loss of each run, vs tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        label = _label(Path(r))
        tr = read_log(r, "train")
        if tr:
            xs = [p["tokens"] for p in tr]
            ys = [p["loss"] for p in tr]
            k = max(1, min(smooth, len(ys)))
            sm = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
            a.plot(xs, sm, label=label)
        # the untrained point (tokens = 0) would dwarf the rest of the curve: it is in the table instead
        ev = [p for p in read_log(r, "eval") if "val_loss" in p and p.get("tokens", 0) > 0]
        if ev:
            b.plot([p["tokens"] for p in ev], [p["val_loss"] for p in ev], marker="o", ms=3, label=label)
    a.set(title="training loss", xlabel="tokens", ylabel="loss (nats)")
    b.set(title="validation loss", xlabel="tokens", ylabel="loss (nats)")
    from matplotlib.ticker import EngFormatter

    for ax in (a, b):
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _label(run_dir: Path) -> str:
    p = run_dir / "config.json"
    if p.is_file():
        recipe = json.loads(p.read_text()).get("quant", {}).get("recipe", "?")
        return run_dir.name if recipe == run_dir.name else f"{run_dir.name} ({recipe})"
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
        (out / "report.md").write_text("# lowbit report\n\n" + md + f"\n![loss curves]({png.name})\n")
    return md
