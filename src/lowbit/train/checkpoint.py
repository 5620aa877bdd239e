"""Checkpoints: safetensors for tensors, JSON for everything else; never pickle.

Layout of a run directory::

    RUN/config.json                 resolved RunConfig
    RUN/ckpt/step_000100/model.safetensors
    RUN/ckpt/step_000100/optim.safetensors   optimizer tensors, keyed "<param name>.<state key>"
    RUN/ckpt/step_000100/rng.safetensors     torch CPU/CUDA generator states
    RUN/ckpt/step_000100/state.json          step, data position, optimizer hyper-parameters, python RNG,
                                             config, file sizes (to detect truncation), format version
    RUN/ckpt/latest                          name of the newest complete checkpoint

Multi-process runs (``train.parallel``) write the tensors as a sharded ``dcp/`` directory instead
(:mod:`lowbit.distributed.checkpoint`); :func:`load_model_state` reads those too.

Saving is atomic: everything is written into a hidden temporary directory, fsync'ed, renamed into place,
and only then is ``latest`` replaced (write + ``os.replace``). A process killed at any point leaves the
previous checkpoint complete and ``latest`` pointing at it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, or does not fit the model being loaded."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses shared storage and non-contiguous views; clone to plain CPU tensors
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt ({e})") from None


# ---------------------------------------------------------------------------------------------------------
# optimizer state ↔ flat tensors keyed by parameter name (robust to parameter order)
# ---------------------------------------------------------------------------------------------------------


def _param_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    by_id = {}
    for n, p in model.named_parameters(remove_duplicate=True):
        by_id.setdefault(id(p), n)
    return [by_id[id(p)] for g in opt.param_groups for p in g["params"]]


def optimizer_to_flat(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    if hasattr(opt, "to_flat"):  # composite optimizers (lowbit.optim.DirectOptimizer) name their own tensors
        return opt.to_flat(model)
    sd = opt.state_dict()
    names = _param_names(model, opt)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{names[idx]}.{k}"] = v
            else:
                scalars.setdefault(names[idx], {})[k] = v
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [names[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(model: torch.nn.Module, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                        meta: dict) -> None:
    if hasattr(opt, "from_flat"):
        return opt.from_flat(model, tensors, meta)
    names = _param_names(model, opt)
    index = {n: i for i, n in enumerate(names)}
    saved_groups = meta["param_groups"]
    cur = opt.state_dict()
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in cur["param_groups"]]:
        raise CheckpointError("optimizer parameter groups in the checkpoint do not match the model")
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        pname, _, skey = key.rpartition(".")
        if pname not in index:
            raise CheckpointError(f"optimizer state for unknown parameter {pname!r}")
        state.setdefault(index[pname], {})[skey] = t
    for pname, d in meta.get("scalars", {}).items():
        state.setdefault(index[pname], {}).update(d)
    groups = []
    for g, cg in zip(saved_groups, cur["param_groups"], strict=True):
        groups.append({k: v for k, v in g.items() if k != "params"} | {"params": cg["params"]})
    opt.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            tensors[f"torch_cuda_{i}"] = torch.cuda.get_rng_state(i)
    v, internal, gauss = random.getstate()
    return tensors, {"python": [v, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    for k, t in tensors.items():
        if k.startswith("torch_cuda_") and torch.cuda.is_available():
            i = int(k.rsplit("_", 1)[1])
            if i < torch.cuda.device_count():
                torch.cuda.set_rng_state(t, i)
    v, internal, gauss = meta["python"]
    random.setstate((v, tuple(internal), gauss))


# ---------------------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------------------


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "ckpt"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = ckpt_root(run_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The persistent state of the model, with tied weights stored once."""
    seen: set[tuple] = set()
    out = {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if v.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer | None,
                    extra: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and prune old ones down to ``keep`` (0 keeps all)."""
    root = ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {}
    _save_tensors(model_state(model), tmp / "model.safetensors")
    files["model.safetensors"] = None
    opt_meta = None
    if opt is not None:
        t, opt_meta = optimizer_to_flat(model, opt)
        _save_tensors(t, tmp / "optim.safetensors")
        files["optim.safetensors"] = None
    rt, rmeta = rng_state()
    _save_tensors(rt, tmp / "rng.safetensors")
    files["rng.safetensors"] = None
    sizes = {f: (tmp / f).stat().st_size for f in files}
    state = {"format_version": FORMAT_VERSION, "step": step, "optimizer": opt_meta, "rng": rmeta,
             "file_sizes": sizes} | extra
    with open(tmp / "state.json", "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / "latest", name + "\n")
    if keep > 0:
        done = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    sj = path / "state.json"
    if not sj.is_file():
        raise CheckpointError(f"{path} is not a checkpoint (no state.json)")
    try:
        state = json.loads(sj.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{sj} is truncated or corrupt ({e})") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format_version')} is not supported "
                              f"(this lowbit reads format {FORMAT_VERSION})")
    for f, size in state.get("file_sizes", {}).items():
        actual = (path / f).stat().st_size if (path / f).is_file() else -1
        if actual != size:
            raise CheckpointError(f"checkpoint file {path / f} is truncated or corrupt "
                                  f"({actual} bytes, expected {size})")
    return state


def load_model_state(path: str | Path, model: torch.nn.Module, strict: bool = True) -> None:
    if not (Path(path) / "model.safetensors").is_file() and (Path(path) / "dcp").is_dir():
        from lowbit.distributed.checkpoint import read_full  # a sharded (DCP) checkpoint not consolidated yet

        tensors = read_full(path, "model")
    else:
        tensors = _load_tensors(Path(path) / "model.safetensors")
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    # tied weights are stored once: fill a missing alias from the tensor it shares storage with
    if missing:
        ptr = {(v.data_ptr(), v.shape): k for k, v in own.items() if k in tensors}
        for k in list(missing):
            src = ptr.get((own[k].data_ptr(), own[k].shape))
            if src is not None:
                tensors[k] = tensors[src]
                missing.remove(k)
    unexpected = [k for k in tensors if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(f"checkpoint {path} does not fit this model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    bad = [f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
           if k in tensors and tensors[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"checkpoint {path} was written for another model shape: {bad[:3]}")
    model.load_state_dict(tensors, strict=strict)


def load_checkpoint(path: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore model, optimizer and RNG state in place; return state.json (step, data position, ...)."""
    path = Path(path)
    state = read_state(path)
    load_model_state(path, model)
    if opt is not None and state.get("optimizer") is not None:
        optimizer_from_flat(model, opt, _load_tensors(path / "optim.safetensors"), state["optimizer"])
    set_rng_state(_load_tensors(path / "rng.safetensors"), state["rng"])
    return state
