"""Precision scaling law over finished runs (``lowbit fit RUN...``).

    L(N, D, P) = A / (N · eff(P))^α + B / D^β + E

N = non-embedding parameters, D = training tokens, P = the run's recipe (its "precision"); the reference recipe
(bf16) has eff ≡ 1, every other recipe gets one eff(P): the fraction of a bf16 model's parameters its
parameters are worth — the bf16 model size, at the same D, whose loss the recipe's run reaches. Fitted as in
Chinchilla's approach 3: Huber loss (δ = 1e-3) on the log-space residuals log L_pred − log L_obs, L-BFGS-B
from the best points of a grid of initial values, log A, log B, log E, α, β and log eff(P) bounded.

When every run has the same tokens per parameter (D = c·N), A/N^α and B/D^β are not separately identifiable,
and neither is eff(P) on N alone. The fit then reports eff(P) along the sampled path (N and D scaled
together: L = A/(N·eff)^α + B/(D·eff)^β + E), which is identifiable — where a recipe's loss lands on the bf16
curve at the same tokens per parameter. ``--tie`` (β = α), ``--fix-alpha``, ``--fix-beta``, ``--fix-e`` remove
the parameters the runs cannot determine; a warning says when there are too few distinct (N, D) points.

Uncertainty: bootstrap, stratified by recipe. A recipe with ≥ 2 runs at every size N it has is case-resampled
among its own runs (the reference keeps ≥ 1 run per size); a recipe with a single run at some size gets a
smoothed residual bootstrap (prediction + a residual drawn from the fit's pooled log residuals, kernel-smoothed).
Intervals are the 5th–95th percentiles of the refits, next to their median.

Effective parameters per bit (QuEST's view): a recipe storing weights on ``b`` bits spends N·b bits on N·eff
effective parameters, so its effective parameters per bit of weight storage are ∝ eff(P)/b. Reported relative
to bf16 (16 bits, eff 1): ``eff_per_bit = eff(P) · 16 / b``; > 1 means more effective parameters per stored bit
than bf16, and the best precision for a memory budget is the one where it is highest.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE = "bf16"
METRICS = ("val_loss", "heldout_loss")
PARAMS = ("A", "alpha", "B", "beta", "E")
EFF_MIN, EFF_MAX = 1e-4, 1.5
HUBER_DELTA = 1e-3
QUEST_REFERENCE_EFF: dict[float, float] = {1: 0.021, 2: 0.152, 3: 0.433, 4: 0.692, 8: 1.016}
"""eff(P) of QuEST WxAx reported by the QuEST paper (Panferov et al. 2025), by bit width x."""

LAW = "L(N, D, P) = A/(N·eff(P))^α + B/D^β + E"
LAW_PATH = "L(N, D, P) = A/(N·eff(P))^α + B/(D·eff(P))^β + E"

# full parameter vector: [log A, α, log B, β, log E, log eff_1 … log eff_K], with log N and log D centred by
# fit_scaling (so the first entry is log A − α·mean log N, and likewise for B)
_LA, _AL, _LB, _BE, _LE = range(5)
_SHARED_BOUNDS = [(-30.0, 30.0), (1e-3, 3.0), (-30.0, 30.0), (1e-3, 3.0), (-10.0, None)]


class ScalingFitError(ValueError):
    """Input the fit cannot use (no runs, no reference run, contradictory options): one clear message."""


@dataclass(frozen=True)
class RunPoint:
    """One finished run as the fit sees it."""

    recipe: str
    n: float
    """Non-embedding parameters."""
    d: float
    """Training tokens."""
    loss: float
    path: str = ""


# ---- input -------------------------------------------------------------------------------------------------


def _notice(log: Callable[[str], Any] | None, msg: str) -> None:
    if log is None:
        print(msg, file=sys.stderr)
    else:
        log(msg)


def find_run_dirs(paths: Iterable[str | Path], log: Callable[[str], Any] | None = None) -> list[Path]:
    """Run directories (those with a ``summary.json``) among ``paths`` and their children and grandchildren.
    A directory with no run in it is skipped with a notice through ``log`` (default: stderr)."""
    out: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p)

    def subdirs(p: Path) -> list[Path]:
        return sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))

    def unfinished(p: Path) -> bool:  # a run directory (config.json) that has no summary.json yet
        if (p / "config.json").is_file():
            _notice(log, f"skipping {p}: no summary.json (not a finished run)")
            return True
        return False

    for p in map(Path, paths):
        if not p.is_dir():
            raise ScalingFitError(f"{p}: not a directory (give run directories or directories holding them)")
        if (p / "summary.json").is_file():
            add(p)
            continue
        if unfinished(p):
            continue
        found = False
        for child in subdirs(p):
            if (child / "summary.json").is_file():
                add(child)
                found = True
                continue
            if unfinished(child):
                continue
            grand = subdirs(child)
            done = [g for g in grand if (g / "summary.json").is_file()]
            pending = [g for g in grand if g not in done and unfinished(g)]  # each gets its notice
            for g in done:
                add(g)
            found |= bool(done)
            if not done and not pending:
                _notice(log, f"skipping {child}: no summary.json (not a run)")
        if not found:
            _notice(log, f"skipping {p}: no finished run (summary.json) in it or in its sub-directories")
    return out


def load_runs(
    paths: Iterable[str | Path], metric: str = "val_loss", log: Callable[[str], Any] | None = None
) -> list[RunPoint]:
    """One :class:`RunPoint` per finished run under ``paths`` (see :func:`find_run_dirs`): recipe, non-embedding
    parameters, tokens seen and ``final[metric]`` from ``summary.json`` (the recipe from ``config.json`` when the
    summary lacks it). Post-training conversions (``lowbit convert``) and runs missing a number are skipped with
    a notice."""
    if metric not in METRICS:
        raise ScalingFitError(f"--metric must be one of {', '.join(METRICS)}, not {metric!r}")
    runs = []
    for d in find_run_dirs(paths, log):
        try:
            s = json.loads((d / "summary.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            _notice(log, f"skipping {d}: unreadable summary.json ({e})")
            continue
        source = s.get("ptq_of") or s.get("ternary_of")
        if source:
            _notice(log, f"skipping {d}: a post-training conversion of {source}, not a trained run")
            continue
        if isinstance(s.get("step"), int) and isinstance(s.get("steps"), int) and s["step"] < s["steps"]:
            _notice(log, f"skipping {d}: stopped at step {s['step']} of {s['steps']} (not finished)")
            continue
        recipe = s.get("recipe")
        if not recipe and (d / "config.json").is_file():
            try:
                recipe = json.loads((d / "config.json").read_text()).get("quant", {}).get("recipe")
            except (OSError, json.JSONDecodeError):
                recipe = None
        final = s.get("final") or {}
        values = {
            "recipe": recipe,
            "params.non_embedding": (s.get("params") or {}).get("non_embedding"),
            "tokens_seen": s.get("tokens_seen") or final.get("tokens"),
            f"final.{metric}": final.get(metric),
        }
        missing = [k for k, v in values.items() if v is None]
        if missing:
            _notice(log, f"skipping {d}: summary.json has no {', '.join(missing)}")
            continue
        n, tokens, loss = (float(values[k]) for k in ("params.non_embedding", "tokens_seen", f"final.{metric}"))
        if not all(math.isfinite(v) and v > 0 for v in (n, tokens, loss)):
            _notice(log, f"skipping {d}: non-positive or non-finite N={n}, D={tokens} or {metric}={loss}")
            continue
        runs.append(RunPoint(str(recipe), n, tokens, loss, str(d)))
    return runs


def recipe_bits(recipe: str) -> tuple[float | None, float | None]:
    """(weight bits, activation bits) of ``recipe``, 16 for a tensor it leaves in high precision:
    ``quest-w4a4`` → (4, 4), ``quest-w4`` → (4, 16), ``bitnet-b1.58`` → (1.58, 8), ``bf16`` → (16, 16). An
    unregistered name is parsed for ``wX[aY]``; (None, None) when that fails too."""
    if recipe == REFERENCE:
        return 16.0, 16.0
    try:
        from lowbit.quant.recipes import get_recipe

        r = get_recipe(recipe)
    except ValueError:
        m = re.search(r"(?:^|-)w(\d+(?:\.\d+)?)(?:a(\d+(?:\.\d+)?))?(?:-|$)", recipe.lower())
        if not m:
            return None, None
        return float(m.group(1)), float(m.group(2)) if m.group(2) else 16.0
    return (16.0 if r.weight is None else float(r.weight.bits)), (16.0 if r.act is None else float(r.act.bits))


def bits_label(w: float | None, a: float | None) -> str:
    return "?" if w is None else f"W{w:g}A{a:g}"


# ---- the objective -----------------------------------------------------------------------------------------


def _scipy_minimize():
    try:
        from scipy.optimize import minimize
    except ImportError as e:
        raise ScalingFitError(
            "lowbit fit needs scipy: `pip install 'scipy>=1.11'` (a dependency of lowbit; "
            "reinstalling lowbit with `pip install -e .` brings it)"
        ) from e
    return minimize


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


class _Law:
    """Huber loss of log L_pred − log L_obs (weighted, scaled by 1/δ²) and its gradient over the free
    parameters. ``group[i]`` is run i's recipe index into the eff vector, −1 for the reference."""

    def __init__(self, logn, logd, logl, group, k: int, fixed: dict[int, float], tie: bool, path: bool, delta: float):
        self.logn, self.logd, self.logl = logn, logd, np.array(logl, dtype=float)
        self.group, self.k, self.tie, self.path, self.delta = group, k, tie, path, delta
        self.w = np.ones_like(self.logl)
        self.z0 = np.zeros(5 + k)
        for i, v in fixed.items():
            self.z0[i] = v
        self.free = np.array([i for i in range(5 + k) if i not in fixed and not (tie and i == _BE)], dtype=int)
        self.quant = group >= 0
        self.gq = group[self.quant]
        hi_e = float(np.max(self.logl)) + 1.0
        bounds = [*_SHARED_BOUNDS[:4], (-10.0, hi_e)] + [(math.log(EFF_MIN), math.log(EFF_MAX))] * k
        self.bounds = [bounds[i] for i in self.free]

    def full(self, x: np.ndarray) -> np.ndarray:
        z = self.z0.copy()
        z[self.free] = x
        if self.tie:
            z[_BE] = z[_AL]
        return z

    def log_eff(self, z: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], z[5:]])[self.group + 1]

    def log_pred(self, z: np.ndarray) -> np.ndarray:
        le = self.log_eff(z)
        u = np.stack(
            [
                z[_LA] - z[_AL] * (self.logn + le),
                z[_LB] - z[_BE] * (self.logd + (le if self.path else 0.0)),
                np.full_like(le, z[_LE]),
            ]
        )
        return np.logaddexp.reduce(u, axis=0)

    def __call__(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        z = self.full(x)
        le = self.log_eff(z)
        u1 = z[_LA] - z[_AL] * (self.logn + le)
        u2 = z[_LB] - z[_BE] * (self.logd + (le if self.path else 0.0))
        m = np.maximum(np.maximum(u1, u2), z[_LE])
        e1, e2, e3 = np.exp(u1 - m), np.exp(u2 - m), np.exp(z[_LE] - m)
        s = e1 + e2 + e3
        r = m + np.log(s) - self.logl
        d = self.delta
        quad = np.abs(r) <= d
        scale = 1.0 / (d * d)
        f = scale * float(np.sum(self.w * np.where(quad, 0.5 * r * r, d * (np.abs(r) - 0.5 * d))))
        gi = scale * self.w * np.where(quad, r, d * np.sign(r))
        w1, w2, w3 = gi * e1 / s, gi * e2 / s, gi * e3 / s
        g = np.empty_like(z)
        g[_LA] = w1.sum()
        g[_AL] = -(w1 * (self.logn + le)).sum()
        g[_LB] = w2.sum()
        g[_BE] = -(w2 * (self.logd + (le if self.path else 0.0))).sum()
        g[_LE] = w3.sum()
        dle = -z[_AL] * w1 - (z[_BE] * w2 if self.path else 0.0)
        g[5:] = np.bincount(self.gq, weights=dle[self.quant], minlength=self.k)
        if self.tie:
            g[_AL] += g[_BE]
        return f, g[self.free]

    def minimize(self, x0: np.ndarray) -> tuple[np.ndarray, float]:
        if len(self.free) == 0:
            return x0, self(x0)[0]
        lo = np.array([b[0] if b[0] is not None else -np.inf for b in self.bounds])
        hi = np.array([b[1] if b[1] is not None else np.inf for b in self.bounds])
        res = _scipy_minimize()(
            self,
            np.clip(x0, lo, hi),
            jac=True,
            method="L-BFGS-B",
            bounds=self.bounds,
            options={"maxiter": 2000, "maxfun": 5000, "ftol": 1e-10, "gtol": 1e-8},
        )
        return np.asarray(res.x), float(res.fun)

    def grid_starts(self, n_starts: int = 8) -> list[np.ndarray]:
        """Initial points: the ``n_starts`` best of a grid over the shared parameters, each recipe's log eff set
        to its best value on a grid given those (the objective is a sum of independent per-recipe parts)."""
        fixed = {i: self.z0[i] for i in range(5) if i not in self.free and not (self.tie and i == _BE)}
        lmin = float(np.min(self.logl))
        alphas = [fixed[_AL]] if _AL in fixed else [0.1, 0.2, 0.35, 0.5, 0.75]
        betas = [None] if self.tie or _BE in fixed else [0.1, 0.2, 0.35, 0.5, 0.75]
        coefs = [0.03, 0.1, 0.3, 1.0, 3.0]  # size of a term at the runs' mean N (or D), in nats
        ca = [None] if _LA in fixed else coefs
        cb = [None] if _LB in fixed else coefs
        es = [fixed[_LE]] if _LE in fixed else [lmin + math.log(f) for f in (0.1, 0.3, 0.5, 0.7, 0.9)]
        mn, md = float(self.logn.mean()), float(self.logd.mean())
        rows = []
        for al, c1, be, c2, e in itertools.product(alphas, ca, betas, cb, es):
            be = al if self.tie else (fixed[_BE] if be is None else be)
            la = fixed[_LA] if c1 is None else math.log(c1) + al * mn
            lb = fixed[_LB] if c2 is None else math.log(c2) + be * md
            rows.append((la, al, lb, be, e))
        g = np.array(rows)  # (G, 5)
        col = lambda j: g[:, j, None]  # (G, 1): against runs
        c = lambda j: g[:, j, None, None]  # (G, 1, 1): against eff grid × runs
        total = np.zeros(len(g))
        ref = ~self.quant
        if ref.any():
            u = np.stack(
                [
                    col(_LA) - col(_AL) * self.logn[ref],
                    col(_LB) - col(_BE) * self.logd[ref],
                    np.broadcast_to(col(_LE), (len(g), int(ref.sum()))),
                ]
            )
            total += (self.w[ref] * _huber(np.logaddexp.reduce(u, axis=0) - self.logl[ref], self.delta)).sum(1)
        les = np.linspace(math.log(1e-3), math.log(EFF_MAX), 25)
        best_le = np.zeros((len(g), self.k))
        for j in range(self.k):
            idx = self.group == j
            ln, ld = self.logn[idx][None, None, :], self.logd[idx][None, None, :]
            le = les[None, :, None]
            u1 = c(_LA) - c(_AL) * (ln + le)
            u2 = c(_LB) - c(_BE) * (ld + (le if self.path else 0.0))
            u3 = np.broadcast_to(c(_LE), u1.shape)
            u2 = np.broadcast_to(u2, u1.shape)
            h = (self.w[idx] * _huber(np.logaddexp(np.logaddexp(u1, u2), u3) - self.logl[idx], self.delta)).sum(2)
            best_le[:, j] = les[np.argmin(h, axis=1)]
            total += h.min(axis=1)
        starts = []
        for i in np.argsort(total)[:n_starts]:
            z = self.z0.copy()
            z[:5] = g[i]
            z[5:] = best_le[i]
            starts.append(z[self.free])
        return starts


# ---- the fit -----------------------------------------------------------------------------------------------


@dataclass
class ScalingFit:
    """Result of :func:`fit_scaling`. ``intervals`` maps ``A``, ``alpha``, ``B``, ``beta``, ``E``,
    ``eff/<recipe>`` and ``eff_per_bit/<recipe>`` to their bootstrap ``median``, ``lo`` (5 %) and ``hi`` (95 %)."""

    params: dict[str, float]
    eff: dict[str, float]
    bits: dict[str, tuple[float | None, float | None]]
    runs: list[RunPoint]
    predicted: list[float]
    residual_rms: float
    eff_mode: str
    reference: str = REFERENCE
    metric: str = "val_loss"
    intervals: dict[str, dict[str, float]] = field(default_factory=dict)
    bootstrap: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    objective: float = float("nan")

    @property
    def recipes(self) -> list[str]:
        return list(self.eff)

    def eff_per_bit(self, recipe: str) -> float | None:
        """eff(P) · 16 / weight bits: effective parameters per bit of weight storage, relative to bf16 (= 1)."""
        w = self.bits.get(recipe, (None, None))[0]
        return None if w is None else self.eff[recipe] * 16.0 / w

    def predict(self, n: float, d: float, recipe: str | None = None) -> float:
        p = self.params
        eff = self.eff.get(recipe or self.reference, 1.0)
        dd = d * eff if self.eff_mode == "path" else d
        return p["A"] / (n * eff) ** p["alpha"] + p["B"] / dd ** p["beta"] + p["E"]

    def interval(self, key: str) -> tuple[float | None, float | None]:
        iv = self.intervals.get(key)
        return (iv["lo"], iv["hi"]) if iv else (None, None)

    def rows(self) -> list[dict[str, Any]]:
        """One row per recipe: the printed table."""
        counts: dict[str, int] = {}
        for r in self.runs:
            counts[r.recipe] = counts.get(r.recipe, 0) + 1
        rows = []
        for name in self.recipes:
            w, a = self.bits[name]
            e_iv = self.intervals.get(f"eff/{name}", {})
            b_iv = self.intervals.get(f"eff_per_bit/{name}", {})
            row = {
                "recipe": name + (" (ref)" if name == self.reference else ""),
                "bits": bits_label(w, a),
                "runs": counts.get(name, 0),
                "eff": self.eff[name],
                "median": e_iv.get("median"),
                "5 %": e_iv.get("lo"),
                "95 %": e_iv.get("hi"),
                "eff·16/bits": self.eff_per_bit(name),
                "eff·16/bits 5 %": b_iv.get("lo"),
                "eff·16/bits 95 %": b_iv.get("hi"),
            }
            if not self.intervals:  # no bootstrap: no empty interval columns
                row = {k: v for k, v in row.items() if k in ("recipe", "bits", "runs", "eff", "eff·16/bits")}
            rows.append(row)
        return rows

    def format(self) -> str:
        """The printed report: the law's parameters with intervals, the residual RMS and the per-recipe table."""
        from lowbit.eval.report import markdown_table

        b = self.bootstrap
        head = (
            f"{LAW_PATH if self.eff_mode == 'path' else LAW}  —  {len(self.runs)} runs, {len(self.recipes)} "
            f"recipes, {self.metric}, Huber δ={self.options.get('huber_delta', HUBER_DELTA):g} on log L"
        )
        if b.get("n"):
            head += f"; bootstrap {b['ok']}/{b['n']} ({', '.join(sorted(set(b['method'].values())))}), 5–95 %"
        lines = [head, ""]
        names = {"A": "A", "alpha": "α", "B": "B", "beta": "β", "E": "E"}
        for k, v in self.params.items():
            lo, hi = self.interval(k)
            how = self.options.get("how", {}).get(k, "")
            iv = f"[{_g(lo)}, {_g(hi)}]" if lo is not None and not how else ""
            lines.append(f"  {names[k]:2s} = {_g(v):>10s}  {iv}{how}")
        rms = self.residual_rms
        lines.append(f"  residual RMS (log L) {rms:.4g}  (≈ {100 * rms:.2g} % of the loss)")
        lines += ["", markdown_table(self.rows()).rstrip()]
        lines.append(
            "eff·16/bits: effective parameters per bit of weight storage relative to bf16 (> 1: more "
            "than bf16 per stored bit)"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def iv(key: str, value: float | None) -> dict[str, Any]:
            return {"value": _num(value), **{k: _num(v) for k, v in self.intervals.get(key, {}).items()}}

        counts: dict[str, int] = {}
        for r in self.runs:
            counts[r.recipe] = counts.get(r.recipe, 0) + 1
        return {
            "law": LAW_PATH if self.eff_mode == "path" else LAW,
            "eff_mode": self.eff_mode,
            "metric": self.metric,
            "reference": self.reference,
            "params": {k: iv(k, v) for k, v in self.params.items()},
            "recipes": {
                name: {
                    "w_bits": self.bits[name][0],
                    "a_bits": self.bits[name][1],
                    "bits": bits_label(*self.bits[name]),
                    "runs": counts.get(name, 0),
                    "eff": iv(f"eff/{name}", self.eff[name]),
                    "eff_per_bit": iv(f"eff_per_bit/{name}", self.eff_per_bit(name)),
                }
                for name in self.recipes
            },
            "eff_per_bit_definition": "eff(P) * 16 / weight bits of P: effective parameters per bit of weight "
            "storage relative to bf16 (bf16 = 1)",
            "residual_rms_log": self.residual_rms,
            "objective": _num(self.objective),
            "options": self.options,
            "bootstrap": self.bootstrap,
            "warnings": self.warnings,
            "runs": [
                {
                    "path": r.path,
                    "recipe": r.recipe,
                    "N": r.n,
                    "D": r.d,
                    "loss": r.loss,
                    "predicted": p,
                    "log_residual": math.log(p) - math.log(r.loss),
                }
                for r, p in zip(self.runs, self.predicted, strict=True)
            ],
            "quest_reference_eff": {f"{k:g}": v for k, v in QUEST_REFERENCE_EFF.items()},
        }


def _g(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def _num(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _distinct(x: np.ndarray, decimals: int = 6) -> int:
    return len(np.unique(np.round(x, decimals)))


def fit_scaling(
    runs: Sequence[RunPoint],
    *,
    reference: str = REFERENCE,
    fix_alpha: float | None = None,
    fix_beta: float | None = None,
    fix_e: float | None = None,
    tie: bool = False,
    eff_mode: str = "auto",
    huber_delta: float = HUBER_DELTA,
    bootstrap: int = 200,
    seed: int = 0,
    metric: str = "val_loss",
    n_starts: int = 8,
) -> ScalingFit:
    """Fit the precision scaling law (module docstring) to ``runs``.

    ``fix_alpha`` / ``fix_beta`` / ``fix_e`` hold α, β, E at a value; ``tie`` sets β = α. ``eff_mode``: "params"
    (eff scales N), "path" (eff scales N and D: a single tokens-per-parameter ratio) or "auto" (path exactly when
    all runs share one D/N and there are ≥ 2 sizes). ``bootstrap`` refits (0: none) give the intervals."""
    runs = list(runs)
    if not runs:
        raise ScalingFitError(
            "no finished runs to fit: each run directory needs a summary.json with "
            "params.non_embedding, tokens_seen and final.<metric>"
        )
    recipes_present = sorted({r.recipe for r in runs})
    if reference not in recipes_present:
        raise ScalingFitError(
            f"no {reference} run among the {len(runs)} runs (recipes: "
            f"{', '.join(recipes_present)}): eff(P) is measured against the {reference} law, so "
            f"train {reference} at the same sizes"
        )
    if eff_mode not in ("auto", "params", "path"):
        raise ScalingFitError(f"eff_mode must be auto, params or path, not {eff_mode!r}")
    if huber_delta <= 0:
        raise ScalingFitError("the Huber delta must be > 0")
    for name, v, lo, hi in (
        ("--fix-alpha", fix_alpha, 1e-3, 3.0),
        ("--fix-beta", fix_beta, 1e-3, 3.0),
        ("--fix-e", fix_e, 1e-9, min(r.loss for r in runs)),
    ):
        if v is not None and not lo <= v < hi:
            raise ScalingFitError(f"{name} {v} is out of range: it must be in [{lo:g}, {hi:.4g})")
    if tie and fix_alpha is not None and fix_beta is not None and fix_alpha != fix_beta:
        raise ScalingFitError(f"--tie sets β = α, but --fix-alpha {fix_alpha} and --fix-beta {fix_beta} differ")
    if tie and fix_alpha is None:
        fix_alpha = fix_beta

    bits = {name: recipe_bits(name) for name in recipes_present}
    others = sorted(
        (n for n in recipes_present if n != reference), key=lambda n: (-(bits[n][0] or 0), -(bits[n][1] or 0), n)
    )
    index = {name: j for j, name in enumerate(others)}
    k = len(others)
    logn = np.log([r.n for r in runs])
    logd = np.log([r.d for r in runs])
    logl = np.log([r.loss for r in runs])
    group = np.array([index.get(r.recipe, -1) for r in runs], dtype=int)

    # ---- identifiability ----
    warnings: list[str] = []
    n_sizes = _distinct(logn)
    n_points = len({(round(a, 6), round(b, 6)) for a, b in zip(logn, logd, strict=True)})
    # one tokens-per-parameter ratio (within 5 %: sweeps round D up to whole steps), or one D (within 1 %)
    collinear = n_sizes >= 2 and float(np.ptp(logd - logn)) < math.log(1.05)
    single_d = n_sizes >= 2 and float(np.ptp(logd)) < math.log(1.01)
    mode = eff_mode if eff_mode != "auto" else ("path" if collinear else "params")
    fixed: dict[int, float] = {}
    if fix_alpha is not None:
        fixed[_AL] = float(fix_alpha)
    if fix_beta is not None:
        fixed[_BE] = float(fix_beta)
    if fix_e is not None:
        fixed[_LE] = math.log(fix_e)
    free_shared = [p for i, p in enumerate(PARAMS) if i not in fixed and not (tie and i == _BE)]
    if collinear and not single_d:
        ratio = math.exp(float(np.mean(logd - logn)))
        warnings.append(
            f"every run has the same tokens per parameter (D/N = {ratio:.3g}): A/N^α and B/D^β are not separately "
            f"identifiable (only their sum along N is), and neither is eff(P) at fixed D. "
            + (
                "eff(P) is reported along the sampled path (N and D scaled together, eff_mode=path): the bf16 "
                "size, at the same D/N, whose loss the recipe reaches. "
                if mode == "path"
                else ""
            )
            + (
                "Use --tie (β = α) or --fix-beta/--fix-e to pin the parameters the runs cannot determine; "
                if not (tie or fix_beta is not None)
                else ""
            )
            + "runs at ≥ 2 token budgets per size separate the terms."
        )
    if single_d:
        warnings.append(
            "every run saw the same number of tokens D: B/D^β and E merge into one constant (only "
            "E + B/D^β is determined); eff(P) is measured at that D"
        )
    if n_points <= len(free_shared):
        warnings.append(
            f"only {n_points} distinct (N, D) point(s) for {len(free_shared)} free parameters of the "
            f"{reference} law ({', '.join(free_shared)}): they are not all identifiable and eff(P) "
            f"inherits that arbitrariness; fix some with --fix-alpha, --fix-beta, --fix-e or --tie"
        )

    # centred log N and log D: the optimiser sees log(A/N̄^α) instead of log A, which is far better conditioned
    cn, cd = float(np.mean(logn)), float(np.mean(logd))
    logd_fit = logd
    if mode == "path" and collinear:
        # on the path itself: D = c̄·N exactly (c̄ the geometric mean ratio); the rounding jitter in D would only
        # make A and B barely separable, a long flat valley for the optimiser
        logd_fit = logn + float(np.mean(logd - logn))
    law = _Law(logn - cn, logd_fit - cd, logl, group, k, fixed, tie, mode == "path", huber_delta)
    best_x, best_f = None, math.inf
    for x0 in law.grid_starts(n_starts):
        x, f = law.minimize(x0)
        if f < best_f:
            best_x, best_f = x, f
    z = law.full(best_x)
    log_pred = law.log_pred(z)
    resid = log_pred - logl

    def unpack(z: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
        params = {
            "A": math.exp(z[_LA] + z[_AL] * cn),
            "alpha": float(z[_AL]),
            "B": math.exp(z[_LB] + z[_BE] * cd),
            "beta": float(z[_BE]),
            "E": math.exp(z[_LE]),
        }
        eff = {reference: 1.0} | {name: math.exp(z[5 + j]) for name, j in index.items()}
        return params, eff

    params, eff = unpack(z)
    for name in others:
        if eff[name] >= EFF_MAX * 0.999 or eff[name] <= EFF_MIN * 1.001:
            warnings.append(f"eff({name}) = {eff[name]:.4g} sits at the bound of [{EFF_MIN:g}, {EFF_MAX:g}]")
    how = {p: " (fixed)" for i, p in enumerate(PARAMS) if i in fixed}
    if tie:
        how["beta"] = " (tied: β = α)" if "alpha" not in how else " (fixed, tied: β = α)"
    fit = ScalingFit(
        params=params,
        eff=eff,
        bits={n: bits[n] for n in eff},
        runs=runs,
        predicted=[float(v) for v in np.exp(log_pred)],
        residual_rms=float(np.sqrt(np.mean(resid**2))),
        eff_mode=mode,
        reference=reference,
        metric=metric,
        warnings=warnings,
        objective=best_f,
        options={
            "fix_alpha": fix_alpha,
            "fix_beta": fix_beta,
            "fix_e": fix_e,
            "tie": tie,
            "huber_delta": huber_delta,
            "eff_mode": eff_mode,
            "how": how,
        },
    )
    if bootstrap > 0 and len(runs) <= len(law.free):
        warnings.append(
            f"{len(runs)} runs for {len(law.free)} free parameters (eff included): the fit interpolates "
            f"the runs, leaving no residuals to resample; bootstrap skipped (no intervals)"
        )
    elif bootstrap > 0:
        _bootstrap(fit, law, best_x, resid, bootstrap, seed, unpack)
    return fit


def _bootstrap(
    fit: ScalingFit, law: _Law, x_hat: np.ndarray, resid: np.ndarray, n_boot: int, seed: int, unpack: Callable
) -> None:
    """Refit ``n_boot`` resampled data sets from the point estimate; fills ``fit.intervals`` and ``fit.bootstrap``.

    Stratified by recipe. A recipe with ≥ 2 runs at every size (N) it has is case-resampled: as many draws as it
    has runs, with replacement, from its own runs — for the reference, one draw per size first, so every size
    keeps a reference run and the curve stays determined. Any other recipe gets a smoothed residual bootstrap:
    its log losses become log L_pred + e, e drawn from the fit's pooled log residuals (inflated by √(n/(n−p)))
    plus Gaussian noise of bandwidth h = 1.06·σ·n^(−1/5), rescaled to keep the variance. The smoothing matters:
    the Huber loss with a small δ is nearly a least-absolute-deviation fit, which a bootstrap from the raw,
    discrete residuals makes look too precise."""
    rng = np.random.default_rng(seed)
    logl_obs, log_pred = law.logl.copy(), law.logl + resid
    n, p = len(resid), len(law.free)
    pool = -resid * (math.sqrt(n / (n - p)) if n > p else 1.0)
    sigma = float(np.std(pool))
    h = 1.06 * sigma * n ** (-0.2)
    by_recipe: dict[str, dict[float, list[int]]] = {}
    for i, r in enumerate(fit.runs):
        by_recipe.setdefault(r.recipe, {}).setdefault(round(math.log(r.n), 6), []).append(i)
    method = {
        name: "case" if all(len(idx) >= 2 for idx in by_recipe[name].values()) else "residual" for name in fit.recipes
    }
    resid_idx = np.array([i for i, r in enumerate(fit.runs) if method[r.recipe] == "residual"], dtype=int)

    def case_draws(name: str) -> np.ndarray:
        sizes = list(by_recipe[name].values())
        every = np.concatenate([np.array(idx) for idx in sizes])
        if name != fit.reference:
            return rng.choice(every, size=len(every))
        first = [rng.choice(idx) for idx in sizes]
        return np.concatenate([first, rng.choice(every, size=len(every) - len(sizes))]).astype(int)

    samples: dict[str, list[float]] = {}
    ok = 0
    for _ in range(n_boot):
        w = np.zeros(n)
        for name in fit.recipes:
            if method[name] == "case":
                np.add.at(w, case_draws(name), 1.0)
        w[resid_idx] = 1.0
        logl = logl_obs.copy()
        if len(resid_idx):
            e = rng.choice(pool, size=len(resid_idx)) + h * rng.standard_normal(len(resid_idx))
            logl[resid_idx] = log_pred[resid_idx] + e / math.sqrt(1.0 + (h / sigma) ** 2 if sigma > 0 else 1.0)
        law.w, law.logl = w, logl
        x, f = law.minimize(x_hat)
        if not math.isfinite(f):
            continue
        ok += 1
        params, eff = unpack(law.full(x))
        for kk, v in params.items():
            samples.setdefault(kk, []).append(v)
        for name, v in eff.items():
            samples.setdefault(f"eff/{name}", []).append(v)
            wb = fit.bits[name][0]
            if wb is not None:
                samples.setdefault(f"eff_per_bit/{name}", []).append(v * 16.0 / wb)
    law.w, law.logl = np.ones(n), logl_obs
    for kk, vals in samples.items():
        lo, med, hi = np.percentile(vals, [5, 50, 95])
        fit.intervals[kk] = {"median": float(med), "lo": float(lo), "hi": float(hi), "mean": float(np.mean(vals))}
    fit.bootstrap = {"n": n_boot, "ok": ok, "seed": seed, "method": method, "percentiles": [5, 95]}


# ---- plots and files ---------------------------------------------------------------------------------------


def _bits_axis(ax, xs: Iterable[float]) -> None:
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ticks = sorted({1, 2, 4, 8, 16, *xs})
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _errorbar_points(fit: ScalingFit, key: str, value: Callable[[str], float | None]):
    pts = []
    for name in fit.recipes:
        w, v = fit.bits[name][0], value(name)
        if w is None or v is None:
            continue
        lo, hi = fit.interval(f"{key}/{name}")
        pts.append((name, w, v, v - lo if lo is not None else 0.0, hi - v if hi is not None else 0.0))
    return pts


def plot_fit(fit: ScalingFit, path: str | Path) -> Path:
    """``fit.png``: left, each run's loss against N·eff(P) with the fitted bf16 curve (losses moved to a common
    D with the fitted data term, or along the path in path mode); right, eff(P) with its 5–95 % interval
    against weight bits, QuEST's published WxAx values as hollow markers."""
    from lowbit.eval.report import pyplot, save_figure

    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    p, path_mode = fit.params, fit.eff_mode == "path"
    ratio = float(np.exp(np.median([math.log(r.d / r.n) for r in fit.runs])))
    d_ref = float(np.exp(np.median([math.log(r.d) for r in fit.runs])))

    def data_ref(x):
        return p["B"] / (ratio * x if path_mode else d_ref) ** p["beta"]

    xs_all = []
    for i, name in enumerate(fit.recipes):
        e = fit.eff[name]
        rs = [r for r in fit.runs if r.recipe == name]
        x = np.array([r.n * e for r in rs])
        data_run = np.array([p["B"] / (r.d * (e if path_mode else 1.0)) ** p["beta"] for r in rs])
        y = np.array([r.loss for r in rs]) - data_run + data_ref(x)
        xs_all += list(x)
        color = "black" if name == fit.reference else f"C{i % 10}"
        ax.scatter(x, y, s=22, color=color, zorder=3, label=f"{name} (eff {e:.3g})")
    xs = np.geomspace(min(xs_all) / 1.5, max(xs_all) * 1.5, 200)
    ax.plot(
        xs,
        p["A"] / xs ** p["alpha"] + data_ref(xs) + p["E"],
        color="black",
        lw=1,
        alpha=0.7,
        label=f"{fit.reference} law",
    )
    ax.set_xscale("log")
    ylabel = (
        f"{fit.metric} (D = {ratio:.3g}·N)"
        if path_mode
        else f"{fit.metric} at D = {d_ref:.3g} tokens (via fitted B/D^β)"
    )
    ax.set(
        xlabel="effective parameters N·eff(P)",
        ylabel=ylabel,
        title=f"A={p['A']:.3g} α={p['alpha']:.3g} B={p['B']:.3g} β={p['beta']:.3g} E={p['E']:.3g}",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)

    pts = _errorbar_points(fit, "eff", lambda n: fit.eff[n])
    for i, (name, w, v, lo, hi) in enumerate(pts):
        color = "black" if name == fit.reference else f"C{fit.recipes.index(name) % 10}"
        bx.errorbar([w], [v], yerr=[[lo], [hi]], fmt="o", color=color, capsize=3, zorder=3)
        bx.annotate(name, (w, v), fontsize=7, xytext=(5, -10 if i % 2 else 4), textcoords="offset points")
    rx = sorted(QUEST_REFERENCE_EFF)
    bx.scatter(
        rx,
        [QUEST_REFERENCE_EFF[b] for b in rx],
        facecolors="none",
        edgecolors="dimgray",
        marker="s",
        s=45,
        zorder=2,
        label="QuEST paper, WxAx",
    )
    bx.axhline(1.0, color="gray", lw=0.8, ls="--")
    _bits_axis(bx, [w for _, w, *_ in pts])
    bx.set(xlabel="weight bits", ylabel="eff(P)", title="eff(P), 5–95 % bootstrap interval")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def plot_eff_per_bit(fit: ScalingFit, path: str | Path) -> Path:
    """``eff_per_bit.png``: eff(P)·16/bits (effective parameters per bit of weight storage, bf16 = 1) against
    weight bits, with QuEST's published values converted the same way."""
    from lowbit.eval.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    pts = _errorbar_points(fit, "eff_per_bit", fit.eff_per_bit)
    best = max(pts, key=lambda t: t[2])[0] if pts else None
    for i, (name, w, v, lo, hi) in enumerate(pts):
        color = "black" if name == fit.reference else f"C{fit.recipes.index(name) % 10}"
        ax.errorbar(
            [w],
            [v],
            yerr=[[lo], [hi]],
            fmt="*" if name == best else "o",
            ms=10 if name == best else 6,
            color=color,
            capsize=3,
            zorder=3,
        )
        ax.annotate(name, (w, v), fontsize=7, xytext=(5, -10 if i % 2 else 4), textcoords="offset points")
    rx = sorted(QUEST_REFERENCE_EFF)
    ax.scatter(
        rx,
        [QUEST_REFERENCE_EFF[b] * 16 / b for b in rx],
        facecolors="none",
        edgecolors="dimgray",
        marker="s",
        s=45,
        label="QuEST paper, WxAx",
    )
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    _bits_axis(ax, [w for _, w, *_ in pts])
    ax.set(
        xlabel="weight bits",
        ylabel="eff(P) · 16 / bits",
        title="effective parameters per bit of weight storage (bf16 = 1)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_fit(fit: ScalingFit, out_dir: str | Path) -> list[Path]:
    """``fit.json`` (every number), ``fit.png`` and ``eff_per_bit.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fit.json").write_text(json.dumps(fit.to_dict(), indent=2, ensure_ascii=False))
    return [out / "fit.json", plot_fit(fit, out / "fit.png"), plot_eff_per_bit(fit, out / "eff_per_bit.png")]


def fit_runs(
    paths: Iterable[str | Path],
    *,
    metric: str = "val_loss",
    out_dir: str | Path | None = None,
    log: Callable[[str], Any] | None = None,
    **options: Any,
) -> ScalingFit:
    """``lowbit fit``: load the runs under ``paths``, :func:`fit_scaling` them (``options``), write
    :func:`write_fit`'s files when ``out_dir`` is given."""
    fit = fit_scaling(load_runs(paths, metric, log), metric=metric, **options)
    if out_dir is not None:
        write_fit(fit, out_dir)
    return fit
