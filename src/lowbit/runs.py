"""Building models from configs and reading run directories back.

A run directory is self-describing: ``config.json`` (the resolved RunConfig) plus checkpoints. Everything
that loads a trained model (eval, report, convert, export) goes through :func:`load_run`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowbit.config import ConfigError, RunConfig
from lowbit.models.llama import Llama
from lowbit.train.checkpoint import CheckpointError, latest_checkpoint, load_model_state, read_state


def apply_recipe(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Apply ``cfg.quant.recipe`` to the model's target linears (no-op for bf16)."""
    if cfg.quant.recipe == "bf16":
        return model
    from lowbit.nn import quantize_, quantize_direct_
    from lowbit.nn.linear import set_kernels

    try:
        if cfg.is_direct:  # DQT: weights become codes, with the run's DQT options
            model = quantize_direct_(model, cfg.quant.recipe, targets=cfg.quant.targets, skip=cfg.quant.skip,
                                     dqt=cfg.dqt)
        else:
            model = quantize_(model, cfg.quant.recipe, targets=cfg.quant.targets, skip=cfg.quant.skip)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"quant.recipe: {str(e).strip(chr(39) + chr(34))}") from None
    set_kernels(model, cfg.quant.kernels)  # fused kernels where the recipe has them (quant.kernels)
    return model


def build_model(cfg: RunConfig, device: torch.device | str = "cpu", init_weights: bool = False) -> nn.Module:
    """A freshly initialised model for ``cfg`` (seeded by the caller), recipe applied, on ``device``.
    ``init_weights``: load ``model.init``'s checkpoint (``hf:PATH``) before the recipe is applied (a fresh
    run; a resumed or loaded run takes its weights from its own checkpoint)."""
    model = Llama(cfg.model)
    if init_weights and cfg.model.init:
        from lowbit.models.hf_import import load_init_weights

        load_init_weights(model, cfg.model.init)
    model = apply_recipe(model, cfg)
    return model.to(device)


def read_run_config(run_dir: str | Path) -> RunConfig:
    p = Path(run_dir) / "config.json"
    if not p.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.json)")
    return RunConfig.from_dict(json.loads(p.read_text()))


def load_run(run_dir: str | Path, device: torch.device | str = "cpu",
             checkpoint: str | Path | None = None) -> tuple[nn.Module, RunConfig, dict]:
    """Model (weights of the newest checkpoint, or ``checkpoint``), its config and the checkpoint state."""
    cfg = read_run_config(run_dir)
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint")
    state = read_state(ckpt)
    model = build_model(cfg, "cpu")
    load_model_state(ckpt, model)
    return model.to(device), cfg, state


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA GPU is available; use device=cpu or auto")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast (fp32 master weights) on GPU by default; fp32 on CPU, where bf16 matmuls are slow."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None
