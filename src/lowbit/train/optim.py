"""Optimizer construction and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.config import TrainConfig


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Decay / no-decay groups. Decoupled weight decay goes to the matrices of the blocks only (QuEST: wd on
    linear weights); norm gains, learned quantizer scales/clips (1-D or scalar) and, unless
    ``decay_embeddings``, the embedding and lm_head matrices are not decayed."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_emb = "embed_tokens" in name or "lm_head" in name
        if p.dim() >= 2 and (cfg.decay_embeddings or not is_emb):
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device, dqt=None) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`; the fused CUDA kernel when on GPU (one launch for all tensors).

    A model with direct-quantized (DQT) layers gets a :class:`lowbit.optim.DirectOptimizer` instead: the same
    AdamW for its float parameters plus the DQT update for the layers stored as codes, as one object
    (``dqt``: the run's :class:`lowbit.config.DQTConfig`, default options when None)."""
    from lowbit.nn.direct import direct_modules

    if direct_modules(model):
        from lowbit.optim.dqt import build_direct_optimizer

        return build_direct_optimizer(model, cfg, device, dqt)  # type: ignore[return-value]
    fused = cfg.fused_adamw and device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    cosine: linear warmup to lr, then cosine to lr·min_lr_ratio at the last step.
    wsd: warmup, constant, then linear decay to the floor over the last ``decay_fraction`` of steps.
    constant: warmup then constant.
    """
    warm = cfg.warmup_steps
    if warm > 0 and step < warm:
        return cfg.lr * (step + 1) / warm
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - 1 - warm)
        t = min(1.0, (step - warm) / span)
        return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * t))
    # wsd
    decay_steps = max(1, int(round(cfg.decay_fraction * cfg.steps)))
    start = cfg.steps - decay_steps
    if step < start:
        return cfg.lr
    t = min(1.0, (step - start + 1) / decay_steps)
    return cfg.lr + (floor - cfg.lr) * t


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def clip_gradients(opt, params, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to ``max_norm`` and return the norm before clipping. A DQT optimizer clips
    its own gradients (stashed or applied in backward, never ``.grad`` of a Parameter) and the float ones it
    holds; any other optimizer gets ``torch.nn.utils.clip_grad_norm_`` over ``params``."""
    if hasattr(opt, "clip_grad_norm_"):
        return opt.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
