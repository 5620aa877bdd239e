"""Multi-process training with PyTorch's own engine: torchrun, DDP, FSDP2, DCP checkpoints (docs/distributed.md).

``init_distributed`` opens the process group, ``parallelize`` wraps a single-device model (activation
checkpointing, per-block compile, DDP or FSDP2), ``lowbit.distributed.checkpoint`` saves and loads sharded
checkpoints at any world size, ``launch`` runs ``lowbit train`` on N local processes (``--nproc N``).
Importing this package does no distributed work.
"""

from lowbit.distributed.parallel import (
    DistInfo,
    barrier,
    grad_sync,
    init_distributed,
    mean_over_ranks,
    parallelize,
    shutdown,
    sync_direct_grads,
    wrap_direct_grad_hooks,
)

__all__ = [
    "DistInfo",
    "barrier",
    "grad_sync",
    "init_distributed",
    "mean_over_ranks",
    "parallelize",
    "shutdown",
    "sync_direct_grads",
    "wrap_direct_grad_hooks",
]
