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

FSDP2 over DQT (:func:`shard_direct_codes`): the 2-D codes of every DQT layer become frozen Parameters
(``requires_grad=False``, same name, so checkpoints keep their keys) before ``fully_shard``, which shards them on
dim 0 and all-gathers them as stored (int8 / packed uint8: the mixed-precision policy casts floating
parameters only). Scales, format words and 1-D codes (norm gains) stay replicated buffers. Each layer records
its rows (:class:`DirectShard`); :func:`sync_direct_grads` reduce-scatters the full gradients to those rows and
the DQT optimizer updates only them, drawing the noise of their global element indices.
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
                              f"(any recipe) or fsdp2")
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


def compile_blocks(model: nn.Module, **compile_kwargs) -> None:
    """Regional compilation: ``torch.compile`` each block of ``model`` on its own, in place (``Module.compile``:
    no wrapper module, parameter names unchanged). Every block runs the same code, so dynamo traces one block
    and all the others reuse its graph: the compile time is that of one layer, not of the unrolled model.
    ``compile_kwargs`` go to ``torch.compile`` (``mode=...``). What ``train.compile_scope="block"`` and every
    parallel run (:func:`parallelize`) compile."""
    for b in blocks(model):
        b.compile(**compile_kwargs)


def compile_options(cfg: TrainConfig) -> dict:
    """torch.compile's keyword arguments from the train config (train.compile_mode)."""
    return {} if cfg.compile_mode == "default" else {"mode": cfg.compile_mode}


def compile_model(model: nn.Module, scope: str = "model", **compile_kwargs) -> nn.Module:
    """``torch.compile`` ``model`` as ``train.compile_scope`` says and return what the training step calls:
    "model" → ``torch.compile(model)`` (a wrapper; ``model`` itself stays eager), "block" →
    :func:`compile_blocks` (in place; returns ``model``)."""
    if scope == "model":
        return torch.compile(model, **compile_kwargs)  # type: ignore[return-value]
    if scope == "block":
        compile_blocks(model, **compile_kwargs)
        return model
    raise ConfigError(f"compile scope {scope!r} is not one of ['model', 'block']")


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


@dataclass
class DirectShard:
    """The rows [row0, row0 + rows) of a DQT layer's codes this rank holds under FSDP2 (``module.shard``)."""

    codes: nn.Parameter
    """The sharded codes Parameter (a DTensor, Shard(0)); ``codes.to_local()`` is this rank's (rows, ·) tensor."""
    row0: int
    rows: int
    n_rows: int
    world_size: int

    def local(self) -> torch.Tensor:
        return self.codes.to_local()


def _shardable(m: nn.Module) -> bool:
    return len(m.weight_shape) == 2 and isinstance(m.weight_codes, torch.Tensor)


def shard_direct_codes(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Before ``fully_shard``: turn the ``weight_codes`` buffer of every 2-D DQT layer into a frozen Parameter of
    the same name (so FSDP2 shards and all-gathers it; state-dict keys are unchanged). 1-D codes (DQT norm
    gains) stay replicated buffers. Returns the converted (name, module) pairs."""
    from lowbit.nn.direct import direct_modules

    done = []
    for name, m in direct_modules(model):
        if not _shardable(m) or isinstance(m.weight_codes, nn.Parameter):
            continue
        codes = m._buffers.pop("weight_codes")
        m.register_parameter("weight_codes", nn.Parameter(codes, requires_grad=False))
        done.append((name, m))
    if done:
        if not _fsdp2_keeps_requires_grad():
            allow_integer_parameters()
        _gather_integers_as_stored()
    return done


def _gather_integers_as_stored() -> None:
    """Make FSDP2 leave integer parameters out of the mixed-precision cast, as torch 2.13 does
    (``init_dtype_attrs`` clamps ``param_dtype`` to None for non-floating parameters). torch 2.11's FSDP2 casts
    them to the policy's bf16 for the all-gather: DQT's int8 codes then travel as 2 bytes a weight (measured on
    2 H200s: the same all-gather bytes as bf16). Wraps ``FSDPParam.init_dtype_attrs`` once, only where needed."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    orig = FSDPParam.init_dtype_attrs
    if getattr(orig, "_lowbit_integers", False) or "is_floating_point" in _fsdp_param_source("init_dtype_attrs"):
        return

    def init_dtype_attrs(self, mp_policy):
        orig(self, mp_policy)
        if not self.orig_dtype.is_floating_point:
            self.param_dtype = None

    init_dtype_attrs._lowbit_integers = True
    FSDPParam.init_dtype_attrs = init_dtype_attrs


def _fsdp2_keeps_requires_grad() -> bool:
    """Whether this torch's FSDP2 builds its sharded and unsharded Parameters with the original
    ``requires_grad`` (torch 2.13 does). Older FSDP2 (torch 2.11 among them) builds ``nn.Parameter(t)`` —
    requires_grad=True, which an integer tensor refuses — and only then calls ``requires_grad_``."""
    src = _fsdp_param_source("_init_sharded_param", "init_unsharded_param")
    return bool(src) and "nn.Parameter(self.to_sharded_dtensor(sharded_param))" not in src and \
        "nn.Parameter(unsharded_param)" not in src


def _fsdp_param_source(*methods: str) -> str:
    """The source of FSDP2's ``FSDPParam`` methods (what the checks above read to tell torch versions apart),
    or "" where it cannot be read — then both compatibility wraps are installed (each is a no-op where torch
    already behaves so)."""
    import inspect

    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    try:
        return "".join(inspect.getsource(getattr(FSDPParam, m)) for m in methods)
    except (OSError, TypeError, AttributeError):
        return ""


_PARAMETER_NEW = nn.Parameter.__dict__["__new__"]


def allow_integer_parameters(enable: bool = True) -> None:
    """Let ``nn.Parameter(t)`` of an integer tensor ``t`` (whose ``requires_grad=True`` default raises
    "only Tensors of floating point dtype can require gradients") build a Parameter without grad instead — the
    one behaviour changed, from an error to what a caller passing the tensor's own requires_grad would get.
    Installed by :func:`shard_direct_codes` only where FSDP2 needs it to shard DQT's integer codes (see
    :func:`_fsdp2_keeps_requires_grad`); ``enable=False`` restores torch's own constructor."""
    if not enable:
        nn.Parameter.__new__ = _PARAMETER_NEW
        return
    orig = _PARAMETER_NEW.__func__ if isinstance(_PARAMETER_NEW, staticmethod) else _PARAMETER_NEW

    def new(cls, data=None, requires_grad=True):
        if requires_grad and data is not None and not (data.is_floating_point() or data.is_complex()):
            requires_grad = False
        return orig(cls, data, requires_grad)

    nn.Parameter.__new__ = staticmethod(new)


def _record_shards(mods: list[tuple[str, nn.Module]]) -> None:
    """After ``fully_shard``: record on each module the rows of its codes this rank holds (FSDP2 chunks dim 0
    as ``torch.chunk``: ⌈N/world⌉ rows per rank, the last ranks fewer or none)."""
    for name, m in mods:
        p = m.weight_codes
        if not hasattr(p, "to_local"):
            raise RuntimeError(f"fully_shard left the codes of {name} unsharded ({type(p).__name__})")
        mesh = p.device_mesh
        world, rank = mesh.size(), mesh.get_local_rank()
        n = m.weight_shape[0]
        c = -(-n // world)
        row0 = min(rank * c, n)
        rows = p.to_local().shape[0]
        if rows != max(0, min(n, row0 + c) - row0):
            raise RuntimeError(f"{name}: FSDP2 gave this rank {rows} rows of {n}, not torch.chunk's layout")
        m.shard = DirectShard(p, row0, rows, n, world)


def parallelize(model: nn.Module, cfg: TrainConfig, info: DistInfo, device: torch.device) -> nn.Module:
    """Apply activation checkpointing, per-block compile and DDP / FSDP2 to ``model`` (in place where the
    method allows). Returns what the training step calls: the DDP wrapper, or ``model`` itself (FSDP2 and
    the DQT-only case). Build the optimizer *after* this: FSDP2 replaces the parameters by sharded DTensors."""
    if cfg.activation_checkpointing:
        for b in blocks(model):
            _checkpointed_forward(b)
    if cfg.compile:  # per block whatever train.compile_scope says (it picks the single-process scope)
        compile_blocks(model, **compile_options(cfg))
    if cfg.parallel == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        mp = mp_policy(cfg, device)
        sharded = shard_direct_codes(model)  # DQT: the codes themselves are sharded and gathered
        for b in blocks(model):
            # reshard_after_forward: all-gather again in backward, so only one block is ever unsharded
            fully_shard(b, mp_policy=mp, reshard_after_forward=True)
        fully_shard(model, mp_policy=mp)
        _record_shards(sharded)
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
    """Average every stashed DQT gradient (``weight_grad``) over ranks: replicated layers (DDP; 1-D codes
    under FSDP2) as one flat all-reduce, FSDP2-sharded layers as one flat reduce-scatter that leaves each rank
    the mean gradient of its own rows only (``module.shard``), ``weight_grad`` then being (rows, K)."""
    if not (info.enabled and info.world_size > 1):
        return
    from lowbit.nn.direct import direct_modules

    mods = [m for _, m in direct_modules(model) if m.weight_grad is not None]
    grads = [m.weight_grad for m in mods if getattr(m, "shard", None) is None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        mean_over_ranks(flat, info)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    sharded = [m for m in mods if getattr(m, "shard", None) is not None]
    if sharded:
        reduce_scatter_direct_grads(sharded, info.world_size)


def reduce_scatter_direct_grads(mods: list[nn.Module], world: int) -> None:
    """Mean over ranks of the full (N, K) gradients of FSDP2-sharded DQT layers, of which each rank keeps its
    rows: one ``reduce_scatter_tensor`` of a (world, L) buffer whose r-th row holds every layer's r-th chunk of
    ⌈N/world⌉ rows (zero-padded), L = Σ ⌈N/world⌉·K. Cost per rank: (world−1)/world · 4·L·world bytes sent,
    half of an all-reduce's; backends without reduce-scatter fall back to an all-reduce and a slice."""
    chunks = []
    for m in mods:
        k = m.weight_shape[-1]
        c = -(-m.shard.n_rows // world)
        chunks.append((m, k, c))
    total = sum(c * k for _, k, c in chunks)
    g0 = mods[0].weight_grad
    buf = torch.zeros(world, total, dtype=torch.float32, device=g0.device)
    off = 0
    for m, k, c in chunks:
        g = m.weight_grad.reshape(-1, k).float()
        pad = world * c - g.shape[0]
        if pad:
            g = torch.nn.functional.pad(g, (0, 0, 0, pad))
        buf[:, off:off + c * k] = g.reshape(world, c * k)
        off += c * k
    out = torch.empty(total, dtype=torch.float32, device=g0.device)
    try:
        dist.reduce_scatter_tensor(out, buf.reshape(-1))
    except (RuntimeError, NotImplementedError):  # a backend without reduce-scatter: all-reduce, keep our rows
        dist.all_reduce(buf)
        out.copy_(buf[dist.get_rank()])
    out.div_(world)
    off = 0
    for m, k, c in chunks:
        m.weight_grad = out[off:off + m.shard.rows * k].view(m.shard.rows, k)
        off += c * k


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


# ---------------------------------------------------------------------------------------------------------
# measuring FSDP2's all-gathers
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def count_all_gathers():
    """Record every all-gather FSDP2 issues while the context is open: yields a list that receives
    ``(modules of the FSDP unit, bytes received by this rank)`` per all-gather, the bytes being the output buffer
    (world × the rank's flat input, in the dtype that travels: int8/uint8 codes, bf16 or fp32 weights, or the
    bytes of a mixed-dtype unit). Patches ``torch.distributed.all_gather_single``/``all_gather_into_tensor`` and
    ``FSDPParamGroup.unshard`` (to know which unit gathers) for the duration; not thread-safe."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    records: list[tuple[tuple[nn.Module, ...], int]] = []
    current: list[tuple[nn.Module, ...]] = [()]
    orig_unshard = FSDPParamGroup.unshard
    names = [n for n in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, n)]
    origs = {n: getattr(dist, n) for n in names}

    def unshard(self, *args, **kwargs):
        current[0] = tuple(self.modules)
        return orig_unshard(self, *args, **kwargs)

    def wrap(name):
        def gather(output_tensor, input_tensor, *args, **kwargs):
            records.append((current[0], output_tensor.numel() * output_tensor.element_size()))
            return origs[name](output_tensor, input_tensor, *args, **kwargs)
        return gather

    FSDPParamGroup.unshard = unshard
    for n in names:
        setattr(dist, n, wrap(n))
    try:
        yield records
    finally:
        FSDPParamGroup.unshard = orig_unshard
        for n in names:
            setattr(dist, n, origs[n])


def block_all_gather_bytes(model: nn.Module, step) -> int:
    """Bytes this rank receives from the all-gathers of the block units (``model.layers``: the block linears,
    plus their norm gains) during ``step()`` (one forward + backward): measured with :func:`count_all_gathers`."""
    ids = {id(m) for b in blocks(model) for m in b.modules()}  # block units and the DQT units nested in them
    with count_all_gathers() as rec:
        step()
    return sum(nbytes for mods, nbytes in rec if any(id(m) in ids for m in mods))
