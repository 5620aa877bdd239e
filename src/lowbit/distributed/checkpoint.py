"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), readable at any world size.

Layout (the run directory's, :mod:`lowbit.train.checkpoint`, with the tensors in DCP's format)::

    RUN/ckpt/step_000100/dcp/.metadata          DCP index: every tensor's global shape, dtype and chunks
    RUN/ckpt/step_000100/dcp/__<rank>_0.distcp  each rank's shards (FSDP2) / rank 0's replicas (DDP)
    RUN/ckpt/step_000100/rng.safetensors        rank 0's generator states
    RUN/ckpt/step_000100/state.json             as a single-file checkpoint's, plus "dcp": true, world_size
    RUN/ckpt/step_000100/model.safetensors      the final checkpoint only: consolidated by rank 0
    RUN/ckpt/step_000100/optim.safetensors      (idem), so eval/convert/export read it like any other

The DCP state is ``{"model": model.state_dict(), "optim": flat optimizer tensors}``, the flat keys of
:func:`lowbit.train.checkpoint.optimizer_to_flat` (``"<param>.<state key>"``, ``"dqt.<module>.weight.<key>"``):
the same names whatever the wrapping, so a checkpoint written by 2 FSDP2 ranks loads into 1 process, into
DDP, or into 4 FSDP2 ranks — DCP reshards on load. Tensors are DCP's own format (no pickle); the JSON and the
consolidated files are the project's safetensors + JSON. Saving is atomic as for single-file checkpoints: all
ranks write into a hidden directory, rank 0 renames it into place and only then moves ``latest``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from lowbit.distributed.parallel import DistInfo, barrier
from lowbit.train import checkpoint as ckpt

DCP_DIR = "dcp"


def is_dcp(path: str | Path) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").is_file()


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def _load(state: dict[str, Any], path: Path, no_dist: bool) -> None:
    import warnings

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, opt: Any, extra: dict[str, Any],
                    info: DistInfo, keep: int = 2, consolidate_now: bool = False) -> Path:
    """Collective: every rank calls it. Writes checkpoint ``step`` atomically, prunes to ``keep``, and with
    ``consolidate_now`` also writes the single-file safetensors (rank 0)."""
    root = ckpt.ckpt_root(run_dir)
    name = f"step_{step:07d}"
    tmp = root / f".tmp-{name}-dcp"  # the same on every rank (a pid would differ)
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(info)
    reshard(model)
    opt_tensors, opt_meta = ckpt.optimizer_to_flat(model, opt) if opt is not None else ({}, None)
    dcp.save({"model": model.state_dict(), "optim": opt_tensors}, checkpoint_id=str(tmp / DCP_DIR),
             no_dist=_no_dist())
    final = root / name
    if info.is_main:
        rt, rmeta = ckpt.rng_state()
        ckpt._save_tensors(rt, tmp / "rng.safetensors")
        state = {"format_version": ckpt.FORMAT_VERSION, "step": step, "optimizer": opt_meta, "rng": rmeta,
                 "file_sizes": {"rng.safetensors": (tmp / "rng.safetensors").stat().st_size}, "dcp": True,
                 "world_size": info.world_size} | extra
        _write_json(tmp / "state.json", state)
        ckpt._fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        ckpt._fsync_dir(root)
        if consolidate_now:
            consolidate(final)
        ckpt.atomic_write_text(root / "latest", name + "\n")
        if keep > 0:
            done = sorted(p for p in root.glob("step_*") if p.is_dir())
            for old in done[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module back to its sharded parameters: the root keeps its parameters gathered after a
    forward (reshard_after_forward=False), e.g. after an evaluation, and a state dict must see the shards."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _metadata(path: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path / DCP_DIR)).read_metadata().state_dict_metadata


def load_checkpoint(path: str | Path, model: nn.Module, opt: Any) -> dict[str, Any]:
    """Restore model, optimizer and RNG from a DCP checkpoint into ``model`` as it is now (plain, DDP-wrapped
    inner module, or FSDP2-sharded): collective when a process group is open, plain reads otherwise."""
    path = Path(path)
    state = ckpt.read_state(path)
    if not is_dcp(path):
        raise ckpt.CheckpointError(f"{path} is not a DCP checkpoint (no {DCP_DIR}/.metadata)")
    model_sd = model.state_dict()
    md = _metadata(path)
    missing = [k for k in model_sd if f"model.{k}" not in md]
    if missing:
        raise ckpt.CheckpointError(f"checkpoint {path} does not fit this model: missing {missing[:5]}")
    bad = [f"{k}: {tuple(md['model.' + k].size)} vs {tuple(v.shape)}" for k, v in model_sd.items()
           if tuple(md["model." + k].size) != tuple(v.shape)]
    if bad:
        raise ckpt.CheckpointError(f"checkpoint {path} was written for another model shape: {bad[:3]}")
    optim = _optim_targets(model, md) if opt is not None and state.get("optimizer") is not None else {}
    try:
        _load({"model": model_sd, "optim": optim}, path / DCP_DIR, _no_dist())
    except Exception as e:  # DCP reports a truncated shard as one of many exception types
        raise ckpt.CheckpointError(f"checkpoint {path}: DCP could not read it ({type(e).__name__}: {e})") from None
    model.load_state_dict(model_sd)
    if optim:
        ckpt.optimizer_from_flat(model, opt, optim, state["optimizer"])
    ckpt.set_rng_state(ckpt._load_tensors(path / "rng.safetensors"), state["rng"])
    return state


def _optim_targets(model: nn.Module, md: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Empty tensors for every optimizer tensor of the checkpoint, sharded like their parameter when they have
    its shape (FSDP2's AdamW moments are DTensors), plain CPU tensors otherwise (step counters, DQT states)."""
    params = dict(model.named_parameters())
    out = {}
    for key, m in md.items():
        if not key.startswith("optim."):
            continue
        k = key[len("optim."):]
        pname = k.rpartition(".")[0]
        p = params.get(pname)
        dtype = m.properties.dtype
        if p is not None and tuple(p.shape) == tuple(m.size) and p.dim() > 0:
            out[k] = torch.zeros_like(p, dtype=dtype, requires_grad=False).detach()
        else:
            out[k] = torch.zeros(tuple(m.size), dtype=dtype)
    return out


def read_full(path: str | Path, what: str = "model") -> dict[str, torch.Tensor]:
    """Every tensor under ``what`` ("model" or "optim") of a DCP checkpoint, unsharded, as plain CPU tensors
    (in this process alone: no collective, even while a process group is open)."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    meta = FileSystemReader(str(path / DCP_DIR)).read_metadata()
    out: dict[str, torch.Tensor] = {}
    for key, m in meta.state_dict_metadata.items():
        fqn = (meta.planner_data or {}).get(key, (key,))  # (what, name) for the nested dict we save
        if fqn[0] == what and hasattr(m, "size"):
            out[".".join(str(f) for f in fqn[1:])] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
    if out:
        _load({what: out}, path / DCP_DIR, True)
    return out


def consolidate(path: str | Path) -> Path:
    """Write ``model.safetensors`` and ``optim.safetensors`` next to a DCP checkpoint's ``dcp/`` (full tensors,
    the single-file format every reader of a run understands) and record their sizes in ``state.json``."""
    path = Path(path)
    state = ckpt.read_state(path)
    model = read_full(path, "model")
    tied = ("embed_tokens.weight", "lm_head.weight")
    if all(k in model for k in tied) and torch.equal(model[tied[0]], model[tied[1]]):
        del model[tied[1]]  # tied weights are stored once, as model_state does (load_model_state refills it)
    ckpt._save_tensors(model, path / "model.safetensors")
    sizes = dict(state.get("file_sizes", {}))
    sizes["model.safetensors"] = (path / "model.safetensors").stat().st_size
    if state.get("optimizer") is not None:
        ckpt._save_tensors(read_full(path, "optim"), path / "optim.safetensors")
        sizes["optim.safetensors"] = (path / "optim.safetensors").stat().st_size
    tmp = path / ".state.json.tmp"
    _write_json(tmp, state | {"file_sizes": sizes, "consolidated": True})
    os.replace(tmp, path / "state.json")
    return path



def load_any(path: str | Path, model: nn.Module, opt: Any, parallel: str) -> dict[str, Any]:
    """Resume from a DCP checkpoint (any world size, any wrapping) or a single-file one (one process or DDP)."""
    if is_dcp(path):
        return load_checkpoint(path, model, opt)
    if parallel == "fsdp2":
        raise ckpt.CheckpointError(f"{path} is a single-file checkpoint; an FSDP2 run resumes from DCP checkpoints "
                                   f"only (resume it once with train.parallel=ddp or none, which writes DCP with ddp)")
    return ckpt.load_checkpoint(path, model, opt)
