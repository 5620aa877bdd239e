"""DQT weight flip rate: the fraction of a layer's codes that one optimizer update changed.

The optimizer records it per layer at every update (``DirectModule.last_flips``); the trainer logs it with its
evaluation diagnostics as ``flip_rate/<layer>`` and ``flip_rate/mean`` (the rate of the step just taken), and
:func:`plot_flip_rates` draws it against the step. Reference values (METHODS.md §3): BitNet ≈ 0.05 % per step,
ternary DQT ≈ 0.04 %, 8-bit DQT up to ≈ 8 %.
"""

from __future__ import annotations

from pathlib import Path


def flip_rates(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{layer (or "mean"): [(step, flip rate), …]} from a run's evaluation log."""
    from lowbit.train.logger import read_log

    out: dict[str, list[tuple[int, float]]] = {}
    for rec in read_log(run_dir, "eval"):
        for k, v in rec.items():
            if k.startswith("flip_rate/"):
                out.setdefault(k.split("/", 1)[1], []).append((int(rec["step"]), float(v)))
    return out


def plot_flip_rates(runs: list[str | Path], path: str | Path, layers: bool = True) -> Path | None:
    """Flip rate per step (log scale): the mean over layers of each run, and (``layers``, one run only) every
    layer as a thin line. Returns the path, or None when no run logged a flip rate."""
    from lowbit.eval.report import pyplot, save_figure

    plt = pyplot()
    data = {Path(r).name: flip_rates(r) for r in runs}
    if not any(data.values()):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for run, rates in data.items():
        if layers and len(runs) == 1:
            for name, pts in rates.items():
                if name != "mean":
                    ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], lw=0.6, alpha=0.4)
        if "mean" in rates:
            pts = rates["mean"]
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], lw=2, marker="o", ms=3, label=f"{run} (mean)")
    ax.set(title="weight flip rate per step (codes changed by one update)", xlabel="step", ylabel="% of codes")
    if ax.get_ylim()[0] >= 0 and any(y > 0 for line in ax.lines for y in line.get_ydata()):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return save_figure(fig, path)
