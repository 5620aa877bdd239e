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
        dist.barrier()  # no rank tears its group down while another still talks to it
    finally:
        dist.destroy_process_group()
    # Success: leave without the interpreter's teardown. Gloo's threads can still be joinable when C++ static
    # destructors run, which aborts the process ("terminate called without an active exception", SIGABRT) —
    # seen on a loaded 2-core machine after every rank had finished its work. Failures take the normal path
    # above (the exception reaches torch.multiprocessing, which reports it to the caller).
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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

            from lowbit.distributed.parallel import full_value
            from lowbit.nn.direct import direct_modules

            # FSDP2-sharded codes are DTensors: gathered (a collective every rank makes in the same order)
            codes = {n: full_value(m.weight_codes).detach().contiguous() for n, m in direct_modules(t.model)}
            save_file(codes, f"{job['codes']}.{rank}")


def all_gather_jobs(rank: int, world: int, configs: dict[str, dict[str, Any]], out: str | None = None) -> dict:
    """For each ``{label: RunConfig.to_dict()}``: build the model, ``fully_shard`` it as ``train.parallel=fsdp2``
    does but with bf16 all-gathers (``MixedPrecisionPolicy(param_dtype=bf16)``, on any device), run one forward +
    backward of a random batch and measure the bytes this rank receives from the block units' all-gathers
    (:func:`lowbit.distributed.parallel.block_all_gather_bytes`). Rank 0 writes ``{label: bytes}`` to ``out``
    (JSON). DQT codes travel as stored (int8 / packed uint8), float weights as bf16."""
    import json

    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lowbit.config import RunConfig
    from lowbit.distributed.parallel import _record_shards, block_all_gather_bytes, blocks, shard_direct_codes
    from lowbit.runs import build_model

    res = {}
    for label, d in configs.items():
        cfg = RunConfig.from_dict(d)
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu"))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        sharded = shard_direct_codes(model)
        for b in blocks(model):
            fully_shard(b, mp_policy=mp, reshard_after_forward=True)
        fully_shard(model, mp_policy=mp)
        _record_shards(sharded)
        x = torch.randint(0, cfg.model.vocab_size, (2, cfg.train.seq_len))

        def step(model=model, x=x):
            model(x, x).backward()

        res[label] = block_all_gather_bytes(model, step)
    if rank == 0 and out:
        with open(out, "w") as f:
            json.dump(res, f)
    return res
