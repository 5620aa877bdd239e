"""Distributed pieces that need no second process: config checks, rank slicing of the data, the launcher's
command line; and (slow) the --nproc launch and the benchmark's CPU smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_parallel_config_checked():
    assert load_config(None, ["train.parallel=fsdp2"]).train.parallel == "fsdp2"
    with pytest.raises(ConfigError, match="train.parallel"):
        load_config(None, ["train.parallel=fsdp"])
    assert load_config(None, ["train.parallel=fsdp2", "quant.recipe=dqt-int8"]).train.parallel == "fsdp2"
    with pytest.raises(ConfigError, match="fsdp2.*update_in_backward"):  # not by the sharded DQT update yet
        load_config(None, ["train.parallel=fsdp2", "quant.recipe=dqt-int8", "dqt.update_in_backward=true"])
    with pytest.raises(ConfigError, match="dist_timeout"):
        load_config(None, ["train.dist_timeout=0"])


def test_launch_strips_nproc():
    from lowbit.distributed.launch import torchrun_command

    cmd = torchrun_command(2, ["train", "--nproc", "2", "-c", "x.toml", "--nproc=3", "train.steps=5"])
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    assert cmd[6:] == ["lowbit.cli", "train", "-c", "x.toml", "train.steps=5"]


def test_global_batch_rule():
    from lowbit.config import TrainConfig
    from lowbit.distributed.parallel import same_global_batch

    diff = {"train.batch_size": (2, 4), "train.lr": (1.0, 2.0)}
    assert same_global_batch(diff, TrainConfig(batch_size=2), TrainConfig(batch_size=4), 2, 1) == {
        "train.lr": (1.0, 2.0)}
    assert same_global_batch(diff, TrainConfig(batch_size=2), TrainConfig(batch_size=4), 1, 1) == diff


@pytest.mark.parametrize("world", [2, 3])
def test_rank_slices_are_disjoint_and_cover_the_global_batch(tiny_dataset, world):
    from lowbit.data import BatchLoader, TokenShard

    shard = TokenShard(tiny_dataset, "train")
    b, t = 3, 16
    one = BatchLoader(shard, b * world, t, seed=5)
    ranks = [BatchLoader(shard, b, t, seed=5, rank=r, world_size=world) for r in range(world)]
    for _ in range(one.batches_per_epoch + 2):  # across an epoch boundary
        x1, y1 = next(one)
        parts = [next(r) for r in ranks]
        assert np.array_equal(np.concatenate([p[0].numpy() for p in parts]), x1.numpy())
        assert np.array_equal(np.concatenate([p[1].numpy() for p in parts]), y1.numpy())
        # rank r's windows are positions [r·b, (r+1)·b) of the step's slice of one permutation: disjoint
        perm = ranks[0].permutation(ranks[0].epoch)
        step = perm[ranks[0].position - b * world:ranks[0].position]
        assert len(set(step.tolist())) == b * world
    assert all(r.state_dict() == one.state_dict() for r in ranks)


def _env():
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


@pytest.mark.slow
def test_nproc_launch(tmp_path, tiny_corpus, run_config):
    cfg = run_config(tmp_path / "run", tiny_corpus, tmp_path / "data", **{"train.steps": 2, "train.parallel": "ddp"})
    (tmp_path / "c.json").write_text(cfg.to_json())
    over = [f"{k}={json.dumps(v)}" for sec, d in cfg.to_dict().items() for k, v in
            ((f"{sec}.{k}", v) for k, v in d.items()) if v is not None]
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "train", "--nproc", "2", *over], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 2


@pytest.mark.slow
def test_bench_distributed_smoke(tmp_path):
    out = tmp_path / "bench.md"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_distributed.py"), "--spawn", "2", "--size",
                        "tiny", "--vocab", "320", "--dim", "32", "--batch", "2", "--seq", "32", "--steps", "1",
                        "--warmup", "1", "--recipes", "bf16,dqt-int8", "--out", str(out)], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "| ddp | dqt-int8 |" in text and "| fsdp2 | bf16 |" in text


def test_allow_integer_parameters_shim():
    """Older FSDP2 (torch 2.11) builds nn.Parameter(int8 shard) with the default requires_grad=True; the shim
    turns that error into a Parameter without grad and changes nothing else."""
    from torch import nn

    from lowbit.distributed.parallel import allow_integer_parameters

    codes = torch.arange(6, dtype=torch.int8).reshape(2, 3)
    with pytest.raises(RuntimeError, match="floating point"):
        nn.Parameter(codes)
    allow_integer_parameters()
    try:
        p = nn.Parameter(codes)
        assert isinstance(p, nn.Parameter) and not p.requires_grad and torch.equal(p, codes)
        f = nn.Parameter(torch.ones(2))
        assert f.requires_grad and not nn.Parameter(torch.ones(2), requires_grad=False).requires_grad
    finally:
        allow_integer_parameters(False)
    with pytest.raises(RuntimeError, match="floating point"):
        nn.Parameter(codes)
