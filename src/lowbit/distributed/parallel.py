"""Process group, wrapping (DDP / FSDP2), gradient synchronisation of DQT layers, rank-0 helpers.

The model file stays single-device (``lowbit.models.llama``); everything distributed is applied here from
outside, in this order (torchtitan's): activation checkpointing per block → ``torch.compile`` per block →
DDP or ``fully_shard`` per block then at the root. Parameter names never change (no wrapper modules are
inserted: activation checkpointing replaces a block's ``forward`` on the instance, DDP's ``module.`` prefix
lives only on the wrapper the trainer calls), so checkpoints, optimizer keys and ``quant_diagnostics`` read the
same in every mode.

DQT layers (``lowbit.nn.DirectQuantLinear``) keep their weights as integer codes in buffers and deliver the
weight gradient by side effect (``weight_grad`` or the optimizer's ``grad_hook``), which DDP's reducer never
sees. :func:`sync_direct_grads` averages the stashed gradients over ranks once per step (after the last
micro-batch: no redundant all-reduce under accumulation), and :func:`wrap_direct_grad_hooks` averages each
gradient inside backward before the update-in-backward hook applies it. Every rank then applies the same
update with the same counter-based stochastic-rounding noise, so the codes stay identical on every rank
without ever being broadcast (DDP is built with ``broadcast_buffers=False``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lowbit.config import ConfigError, TrainConfig


@dataclass
class DistInfo:
    """Where this process stands: rank, world size, its device, and whether it opened the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False
    """train.parallel ≠ "none": the model is wrapped and checkpoints are DCP (even at world size 1)."""
    owns_group: bool = False
    """init_distributed created the process group (so :func:`shutdown` destroys it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) outside a launch."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(cfg: TrainConfig) -> DistInfo:
    """Open the process group (nccl on CUDA, gloo on CPU, ``train.dist_timeout``) when ``train.parallel`` asks
    for it; reuse one that is already open. A launch of several processes with parallel="none" is refused (each
    would train alone and write the same run directory)."""
    rank, world, local = env_world()
    if cfg.parallel == "none":
        if world > 1 or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            raise ConfigError(f"launched as {world} processes but train.parallel=\"none\": set train.parallel=ddp "
                              f"(any recipe) or fsdp2 (QAT recipes)")
        return DistInfo()
    if not dist.is_available():
        raise ConfigError("train.parallel needs torch.distributed, which this torch build lacks")
    owns = False
    if not dist.is_initialized():
        cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(local)
        if "MASTER_ADDR" not in os.environ:  # a single process without torchrun: a group of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout))
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, enabled=True, owns_group=owns)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled and info.world_size > 1:
        dist.barrier()


def local_device(cfg: TrainConfig, info: DistInfo) -> torch.device | None:
    """cuda:LOCAL_RANK for a CUDA launch (None: keep ``train.device``)."""
    if info.enabled and (cfg.device in ("auto", "cuda")) and torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return None


def mean_over_ranks(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average of ``t`` over ranks (SUM then divide: gloo has no AVG), in place, returned."""
    if info.enabled and info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(info.world_size)
    return t


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's clip_grad_norm_ returns one) as a plain replicated tensor; others unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ---------------------------------------------------------------------------------------------------------
# wrapping
# ---------------------------------------------------------------------------------------------------------


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (``model.layers``): the units of sharding, checkpointing, compiling."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{type(model).__name__} has no .layers ModuleList of blocks to parallelize")
    return list(layers)


def _checkpointed_forward(block: nn.Module) -> None:
    """Recompute ``block``'s forward in backward (non-reentrant torch.utils.checkpoint) without wrapping it in
    another module, so parameter names stay as they are."""
    from torch.utils.checkpoint import checkpoint

    inner = block.forward

    def forward(self, *args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = types.MethodType(forward, block)


def mp_policy(cfg: TrainConfig, device: torch.device):
    """FSDP2 mixed precision: bf16 all-gathered parameters with float32 gradient reduction when the run is bf16
    on CUDA (fp32 master shards stay in the optimizer); no casting otherwise (fp32 on CPU)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from lowbit.runs import autocast_dtype

    if device.type == "cuda" and autocast_dtype(cfg.precision, device) is torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def parallelize(model: nn.Module, cfg: TrainConfig, info: DistInfo, device: torch.device) -> nn.Module:
    """Apply activation checkpointing, per-block compile and DDP / FSDP2 to ``model`` (in place where the
    method allows). Returns what the training step calls: the DDP wrapper, or ``model`` itself (FSDP2 and
    the DQT-only case). Build the optimizer *after* this: FSDP2 replaces the parameters by sharded DTensors."""
    for b in blocks(model):
        if cfg.activation_checkpointing:
            _checkpointed_forward(b)
        if cfg.compile:
            b.compile()
    if cfg.parallel == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        mp = mp_policy(cfg, device)
        for b in blocks(model):
            # reshard_after_forward: all-gather again in backward, so only one block is ever unsharded
            fully_shard(b, mp_policy=mp, reshard_after_forward=True)
        fully_shard(model, mp_policy=mp)
        return model
    if cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if not any(p.requires_grad for p in model.parameters()):
            return model  # every weight is DQT codes: sync_direct_grads averages them, nothing for DDP to do
        ids = [device.index] if device.type == "cuda" else None
        # broadcast_buffers=False: DQT codes are buffers that every rank updates identically (module docstring)
        return DDP(model, device_ids=ids, broadcast_buffers=False)
    return model


@contextlib.contextmanager
def grad_sync(fwd: nn.Module, enabled: bool):
    """Gradient synchronisation on (the last micro-batch) or off (the others) for one forward + backward:
    DDP's ``no_sync`` / FSDP2's ``set_requires_gradient_sync``; nothing for an unwrapped model."""
    if enabled:
        yield
        return
    if hasattr(fwd, "no_sync"):
        with fwd.no_sync():
            yield
        return
    if hasattr(fwd, "set_requires_gradient_sync"):
        fwd.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            fwd.set_requires_gradient_sync(True)
        return
    yield


# ---------------------------------------------------------------------------------------------------------
# DQT gradients (delivered by side effect, invisible to DDP)
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sync_direct_grads(model: nn.Module, info: DistInfo) -> None:
    """Average every stashed DQT gradient (``weight_grad``) over ranks, as one flat all-reduce."""
    if not (info.enabled and info.world_size > 1):
        return
    from lowbit.nn.direct import direct_modules

    grads = [m.weight_grad for _, m in direct_modules(model) if m.weight_grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    mean_over_ranks(flat, info)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def wrap_direct_grad_hooks(model: nn.Module, info: DistInfo) -> None:
    """With ``dqt.update_in_backward``: average each DQT gradient over ranks inside backward, before the
    optimizer's hook clips it and writes the codes. Call after the optimizer is built (it sets the hooks).
    Backward visits the layers in the same order on every rank, so the all-reduces pair up."""
    if not (info.enabled and info.world_size > 1):
        return
    from lowbit.nn.direct import direct_modules

    for _, m in direct_modules(model):
        hook = m.grad_hook
        if hook is None or getattr(hook, "_lowbit_synced", False):
            continue

        def synced(mod, grad, _hook=hook):
            return _hook(mod, mean_over_ranks(grad.contiguous(), info))

        synced._lowbit_synced = True  # type: ignore[attr-defined]
        m.grad_hook = synced


# ---------------------------------------------------------------------------------------------------------
# trainer helpers
# ---------------------------------------------------------------------------------------------------------


def same_global_batch(diff: dict, stored_train: TrainConfig, train: TrainConfig, stored_world: int,
                      world: int) -> dict:
    """``diff`` (resume config differences) without train.batch_size / train.grad_accum when the global batch
    (world size × batch_size × grad_accum) is unchanged: a run saved by 2 ranks of batch b resumes on 1 process
    of batch 2b (or 2b through accumulation) over the same windows (lowbit.data.BatchLoader)."""
    keys = {"train.batch_size", "train.grad_accum"}
    if not keys & set(diff):
        return diff
    before = stored_world * stored_train.batch_size * stored_train.grad_accum
    if before != world * train.batch_size * train.grad_accum:
        return diff
    return {k: v for k, v in diff.items() if k not in keys}


class NullLogger:
    """What ranks other than 0 log to: nothing (rank 0 writes log.jsonl and TensorBoard)."""

    def log(self, record: dict, kind: str) -> None:
        pass

    def read(self, kind: str | None = None) -> list:
        return []

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
