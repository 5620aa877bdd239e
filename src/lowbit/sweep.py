"""Experiment grids: one TOML file → many runs (sizes × recipes × token budgets), resumable.

An experiment file (``experiments/*.toml``) names a base run config and the grid around it::

    [experiment]
    name = "precision"
    base = "../configs/scaling-base.toml"   # relative to this file
    out = "runs/precision"                  # relative to the working directory
    parallel = 4                            # training processes at once (one GPU can hold several small runs)
    sizes = ["s3m", "s10m"]                 # named in [sizes.*] below, or lowbit's own sizes (lowbit sizes)
    recipes = ["bf16", "quest-w4a4", "dqt-int8"]
    tokens_per_param = [20]                 # D = ratio × non-embedding parameters, rounded up to whole steps

    [sizes.s3m]                             # model.* fields
    dim = 256
    n_layers = 4

    [overrides]                             # every run
    "train.eval_every" = 0

    [recipe_overrides."dqt-int8"]           # runs of one recipe
    "train.lr" = 3e-3

    [[convert]]                             # conversions of finished runs, no training
    from = "dqt-int8"
    to = "ternary"

Runs live in ``OUT/<size>-t<tokens per param>/<recipe>`` so that ``lowbit report OUT/<size>-t20/*`` compares one
size, and ``lowbit fit OUT`` sees them all. A run whose ``summary.json`` reached its final step is skipped; one
with a checkpoint resumes; anything else starts (over) from scratch. Each child's output goes to
``OUT/logs/<run>.log``; ``OUT/sweep.json`` records the plan and what happened to every run.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lowbit.config import ConfigError, RunConfig, load_config, parse_override, read_toml

_EXPERIMENT_KEYS = {"name", "description", "base", "out", "parallel", "sizes", "recipes", "tokens_per_param",
                    "tokens"}


@dataclass
class PlannedRun:
    name: str
    """``<size>-t<tpp>/<recipe>``: the run's path below the experiment's out directory."""
    size: str
    recipe: str
    tokens_per_param: float | None
    tokens: int
    """Training tokens actually used (whole steps)."""
    steps: int
    non_embedding: int
    dir: str
    overrides: list[str]
    status: str = "todo"
    """todo | resume | done | failed | running."""
    seconds: float | None = None
    returncode: int | None = None


@dataclass
class Experiment:
    name: str
    file: Path
    base: Path | None
    out: Path
    parallel: int
    sizes: list[str]
    recipes: list[str]
    tokens_per_param: list[float]
    tokens: list[int]
    size_fields: dict[str, dict[str, Any]]
    overrides: dict[str, Any]
    recipe_overrides: dict[str, dict[str, Any]]
    convert: list[dict[str, str]] = field(default_factory=list)
    description: str = ""


def _override_list(d: dict[str, Any]) -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, bool):
            v = str(v).lower()
        elif isinstance(v, list):
            v = ",".join(str(x) for x in v)
        out.append(f"{k}={v}")
    return out


def load_experiment(path: str | Path) -> Experiment:
    """Read and check an experiment file (unknown keys, empty grids, a base config that does not load)."""
    path = Path(path)
    raw = read_toml(path, "experiment file")
    unknown = set(raw) - {"experiment", "sizes", "overrides", "recipe_overrides", "convert"}
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {sorted(unknown)}; expected experiment, sizes, overrides, "
                          f"recipe_overrides, convert")
    ex = raw.get("experiment")
    if not isinstance(ex, dict):
        raise ConfigError(f"{path}: needs an [experiment] table")
    bad = set(ex) - _EXPERIMENT_KEYS
    if bad:
        raise ConfigError(f"{path}: unknown [experiment] key(s) {sorted(bad)}; known: {sorted(_EXPERIMENT_KEYS)}")
    recipes = list(ex.get("recipes", []))
    sizes = list(ex.get("sizes", []))
    if not recipes or not sizes:
        raise ConfigError(f"{path}: [experiment] needs non-empty 'sizes' and 'recipes'")
    tpp, tokens = list(ex.get("tokens_per_param", [])), list(ex.get("tokens", []))
    if bool(tpp) == bool(tokens):
        raise ConfigError(f"{path}: give exactly one of [experiment] tokens_per_param = [...] or tokens = [...]")
    base = ex.get("base")
    base_path = (path.parent / base).resolve() if base else None
    if base_path is not None and not base_path.is_file():
        raise ConfigError(f"{path}: base config {base_path} not found")
    convert = raw.get("convert", [])
    for c in convert:
        if set(c) != {"from", "to"} or c["to"] != "ternary":
            raise ConfigError(f"{path}: each [[convert]] needs from = RECIPE and to = \"ternary\", got {c}")
        if c["from"] not in recipes:
            raise ConfigError(f"{path}: [[convert]] from = {c['from']!r} is not one of the experiment's recipes")
    exp = Experiment(
        name=str(ex.get("name", path.stem)), file=path, base=base_path, out=Path(ex.get("out", f"runs/{path.stem}")),
        parallel=int(ex.get("parallel", 1)), sizes=sizes, recipes=recipes, tokens_per_param=[float(x) for x in tpp],
        tokens=[int(x) for x in tokens], size_fields=dict(raw.get("sizes", {})),
        overrides=dict(raw.get("overrides", {})), recipe_overrides=dict(raw.get("recipe_overrides", {})),
        convert=list(convert), description=str(ex.get("description", "")),
    )
    if exp.parallel < 1:
        raise ConfigError(f"{path}: [experiment] parallel must be >= 1")
    for r in exp.recipe_overrides:
        if r not in recipes:
            raise ConfigError(f"{path}: [recipe_overrides.{r!r}] names a recipe not in the experiment")
    return exp


def _size_overrides(exp: Experiment, size: str) -> list[str]:
    if size in exp.size_fields:
        fields = dict(exp.size_fields[size])
        fields.setdefault("size", fields.pop("base", "tiny"))
        return _override_list({f"model.{k}": v for k, v in fields.items()})
    return [f"model.size={size}"]


def _resolve(exp: Experiment, overrides: list[str]) -> RunConfig:
    return load_config(exp.base, overrides)


def _non_embedding(cfg: RunConfig) -> int:
    import torch

    from lowbit.models.llama import Llama, param_counts

    with torch.device("meta"):
        model = Llama(cfg.model)
    return param_counts(model)["non_embedding"]


def plan(exp: Experiment, extra: list[str] | None = None, only: list[str] | None = None) -> list[PlannedRun]:
    """Every run of the grid in order (sizes, then token budgets, then recipes), with its status on disk."""
    extra = list(extra or [])
    runs: list[PlannedRun] = []
    budgets: list[tuple[float | None, int | None]] = ([(t, None) for t in exp.tokens_per_param] or
                                                       [(None, t) for t in exp.tokens])
    for size in exp.sizes:
        size_ov = _size_overrides(exp, size)
        for tpp, tok in budgets:
            for recipe in exp.recipes:
                tag = f"t{tpp:g}" if tpp is not None else f"d{tok}"
                name = f"{size}-{tag}/{recipe}"
                if only and not any(fnmatch.fnmatch(name, pat) for pat in only):
                    continue
                ov = (_override_list(exp.overrides) + size_ov + [f"quant.recipe={recipe}"] +
                      _override_list(exp.recipe_overrides.get(recipe, {})) + extra)
                cfg = _resolve(exp, ov)
                n = _non_embedding(cfg)
                per_step = cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum
                target = tpp * n if tpp is not None else tok
                steps = max(1, math.ceil(target / per_step))
                run_dir = str(exp.out / name)
                ov += [f"train.steps={steps}", f"train.out_dir={run_dir}", "train.progress=false"]
                _resolve(exp, ov)  # a bad override fails here, before anything runs
                r = PlannedRun(name=name, size=size, recipe=recipe, tokens_per_param=tpp, tokens=steps * per_step,
                               steps=steps, non_embedding=n, dir=run_dir, overrides=ov)
                r.status = run_status(Path(run_dir), steps)
                runs.append(r)
    return runs


def run_status(run_dir: Path, steps: int) -> str:
    """done (summary at the final step), resume (a checkpoint exists), todo (nothing usable)."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            if json.loads(summary.read_text()).get("step") == steps:
                return "done"
        except (json.JSONDecodeError, OSError):
            pass
    if (run_dir / "ckpt" / "latest").is_file():
        return "resume"
    return "todo"


def format_plan(runs: list[PlannedRun]) -> str:
    lines = [f"{'run':<40} {'status':<7} {'non-emb':>9} {'tokens':>12} {'steps':>7}"]
    for r in runs:
        lines.append(f"{r.name:<40} {r.status:<7} {r.non_embedding / 1e6:>8.2f}M {r.tokens:>12,} {r.steps:>7}")
    return "\n".join(lines)


def _prepare_data(exp: Experiment, runs: list[PlannedRun]) -> None:
    """Prepare each distinct dataset once, here, before the children start (they would race otherwise)."""
    from lowbit.data.prepare import prepare_data

    seen: set[str] = set()
    for r in runs:
        cfg = _resolve(exp, r.overrides)
        key = json.dumps([asdict(cfg.data), cfg.model.vocab_size], sort_keys=True)
        if key not in seen:
            seen.add(key)
            prepare_data(cfg.data, cfg.model.vocab_size, progress=True)


def _child_command(exp: Experiment, r: PlannedRun) -> list[str]:
    cmd = [sys.executable, "-m", "lowbit.cli", "train"]
    if exp.base is not None:
        cmd += ["--config", str(exp.base)]
    cmd += ["--resume"] if r.status == "resume" else ["--overwrite"]
    return cmd + r.overrides


def _write_index(exp: Experiment, runs: list[PlannedRun], extra: dict[str, Any]) -> None:
    exp.out.mkdir(parents=True, exist_ok=True)
    index = {"experiment": exp.name, "file": str(exp.file), "base": str(exp.base), **extra,
             "runs": [asdict(r) for r in runs]}
    tmp = exp.out / "sweep.json.tmp"
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, exp.out / "sweep.json")


def _interrupt(active: dict[str, tuple[subprocess.Popen, PlannedRun, float, Any]], grace_s: float = 120.0) -> None:
    """SIGINT every child (the trainer saves a checkpoint on it, so the run resumes later), wait, then kill."""
    for p, r, _, _ in active.values():
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
        r.status = "resume"
    deadline = time.time() + grace_s
    for p, _, _, log in active.values():
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()
    for _, r, _, _ in active.values():
        r.status = run_status(Path(r.dir), r.steps)
        if r.status == "todo":
            r.status = "failed"


def visible_gpus(spec: str | None) -> list[str]:
    """GPU ids for ``--gpus``: ``None`` → none (children inherit the environment), ``auto`` → every GPU this
    process sees (``CUDA_VISIBLE_DEVICES`` entries, else ``0 … device_count-1``), else a comma list ``0,1``."""
    if spec is None:
        return []
    if spec != "auto":
        ids = [g.strip() for g in spec.split(",") if g.strip()]
        if not ids:
            raise ValueError(f"--gpus {spec!r}: expected 'auto' or a comma list of GPU ids such as 0,1")
        return ids
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _pick_gpu(gpus: list[str], busy: list[str]) -> str | None:
    """The GPU with the fewest running children (first on ties), or None without GPUs."""
    return min(gpus, key=lambda g: (busy.count(g), gpus.index(g))) if gpus else None


def execute(exp: Experiment, runs: list[PlannedRun], parallel: int | None = None, progress: bool = True,
            poll_s: float = 1.0, time_limit: float | None = None, gpus: list[str] | None = None) -> list[PlannedRun]:
    """Train every run not yet done, ``parallel`` at a time; then the conversions. Returns the runs with their
    final status. A failed run does not stop the others; its log path is printed. After ``time_limit`` seconds
    no run starts and the running ones are interrupted with a checkpoint (status ``resume``: the next sweep
    continues them); on Ctrl-C likewise. With ``gpus`` (ids), each child sees one GPU
    (``CUDA_VISIBLE_DEVICES``), the one with the fewest runs of this sweep on it when the child starts."""
    parallel = parallel or exp.parallel
    todo = [r for r in runs if r.status != "done"]
    logs = exp.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if todo:
        _prepare_data(exp, todo)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    t_start = time.time()
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"sweep {exp.name}", unit="run")
    queue = list(todo)
    active: dict[str, tuple[subprocess.Popen, PlannedRun, float, Any]] = {}
    on_gpu: dict[str, str] = {}  # run name → GPU id of a running child
    try:
        while queue or active:
            if time_limit is not None and time.time() - t_start > time_limit:
                msg = f"sweep: time limit {time_limit:g} s reached; interrupting {len(active)} run(s) to resume later"
                (bar.write if bar else print)(msg)
                _interrupt(active)
                active.clear()
                break
            while queue and len(active) < parallel:
                r = queue.pop(0)
                log = open(logs / (r.name.replace("/", "__") + ".log"), "w")  # noqa: SIM115 - closed when reaped
                log.write("$ " + " ".join(_child_command(exp, r)) + "\n")
                log.flush()
                gpu = _pick_gpu(gpus or [], list(on_gpu.values()))
                child_env = env if gpu is None else env | {"CUDA_VISIBLE_DEVICES": gpu}
                if gpu is not None:
                    on_gpu[r.name] = gpu
                    log.write(f"CUDA_VISIBLE_DEVICES={gpu}\n")
                    log.flush()
                p = subprocess.Popen(_child_command(exp, r), stdout=log, stderr=subprocess.STDOUT, env=child_env)
                r.status = "running"
                active[r.name] = (p, r, time.time(), log)
                _write_index(exp, runs, {"started": t_start})
            time.sleep(poll_s)
            for name in list(active):
                p, r, t0, log = active[name]
                rc = p.poll()
                if rc is None:
                    continue
                log.close()
                del active[name]
                on_gpu.pop(name, None)
                r.seconds, r.returncode = round(time.time() - t0, 1), rc
                r.status = "done" if rc == 0 and run_status(Path(r.dir), r.steps) == "done" else "failed"
                if r.status == "failed":
                    msg = f"sweep: {r.name} failed (exit {rc}); see {log.name}"
                    (bar.write if bar else print)(msg)
                if bar:
                    bar.update(1)
                    bar.set_postfix_str(", ".join(a.split("/")[-1] for a in active) or "-")
                _write_index(exp, runs, {"started": t_start})
    except KeyboardInterrupt:
        _interrupt(active)
        _write_index(exp, runs, {"started": t_start, "interrupted": True})
        raise
    finally:
        if bar:
            bar.close()
    _convert(exp, runs)
    _write_index(exp, runs, {"started": t_start, "seconds": round(time.time() - t_start, 1)})
    return runs


def _convert(exp: Experiment, runs: list[PlannedRun]) -> None:
    from lowbit.convert import ternary_run

    for c in exp.convert:
        for r in runs:
            if r.recipe != c["from"] or r.status != "done":
                continue
            out = Path(r.dir).parent / f"{r.recipe}-to-{c['to']}"
            if (out / "summary.json").is_file():
                continue
            print(f"sweep: converting {r.name} to {c['to']} → {out}")
            cfg = _resolve(exp, r.overrides)
            ternary_run(r.dir, str(out), batches=cfg.train.eval_batches, device=cfg.train.device)


def parse_set(items: list[str] | None) -> list[str]:
    """--set key=value items, checked for shape (the values are checked when the configs resolve)."""
    for it in items or []:
        parse_override(it)
    return list(items or [])
