"""Run a function on N local processes with a gloo/nccl group already open: tests and CPU smoke benchmarks.

``spawn(fn, nprocs, *args)`` starts ``nprocs`` processes (``torch.multiprocessing``, spawn method), sets
torchrun's environment in each (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on a free local port), opens
the process group and calls ``fn(rank, world_size, *args)``; a failure in any rank raises in the caller with
that rank's traceback. ``fn`` must be importable (a module-level function).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any


def _entry(rank: int, fn: Callable, world: int, port: int, backend: str, timeout: float, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, nprocs: int, *args: Any, backend: str = "gloo", timeout: float = 300.0) -> None:
    import torch.multiprocessing as mp

    from lowbit.distributed.parallel import _free_port

    mp.spawn(_entry, args=(fn, nprocs, _free_port(), backend, timeout, args), nprocs=nprocs, join=True)


def train_jobs(rank: int, world: int, jobs: list[dict[str, Any]]) -> None:
    """Train each job in turn on every rank: ``{"config": RunConfig.to_dict(), "until": step or None,
    "codes": path or None}``; with ``codes``, rank r writes the DQT codes it ends with to ``<codes>.<r>``
    (safetensors), to compare ranks."""
    from lowbit.config import RunConfig
    from lowbit.train.trainer import Trainer

    for job in jobs:
        t = Trainer(RunConfig.from_dict(job["config"]), overwrite=True)
        t.fit(until_step=job.get("until"))
        if job.get("codes"):
            from safetensors.torch import save_file

            from lowbit.nn.direct import direct_modules

            save_file({n: m.weight_codes.contiguous() for n, m in direct_modules(t.model)}, f"{job['codes']}.{rank}")
