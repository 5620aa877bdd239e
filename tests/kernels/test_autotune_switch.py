"""LOWBIT_AUTOTUNE: the switch between the kernels' autotuner and one fixed GPU configuration (CPU only: the
decision functions and the launch helper with stand-in kernels; the GPU runs of both paths are the needs_cuda
tests of each kernel's file)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from lowbit.kernels import hadamard_quant as hq
from lowbit.kernels import lowbit_gemv as lg
from lowbit.kernels import packed_mm as pm
from lowbit.kernels import scaled_mm as sm
from lowbit.kernels._triton import AUTOTUNE_ENV, autotune_enabled, launch_config

INTERP = {"BLOCK": 16}
DEFAULT = {"BLOCK": 128, "num_warps": 8}
EXPLICIT = {"BLOCK": 32}


def test_conftest_turns_autotuning_off_unless_the_environment_sets_it() -> None:
    if os.environ.get(AUTOTUNE_ENV) != "0":
        pytest.skip(f"{AUTOTUNE_ENV}={os.environ.get(AUTOTUNE_ENV)!r} came from the environment")
    assert not autotune_enabled()


@pytest.mark.parametrize(("value", "on"), [(None, True), ("1", True), ("0", False), (" off ", False),
                                           ("false", False), ("yes", True)])  # fmt: skip
def test_autotune_enabled_reads_the_environment_at_each_call(monkeypatch, value, on) -> None:
    if value is None:
        monkeypatch.delenv(AUTOTUNE_ENV, raising=False)
    else:
        monkeypatch.setenv(AUTOTUNE_ENV, value)
    assert autotune_enabled() is on


def test_launch_config_decision(monkeypatch) -> None:
    for env in ("0", "1"):
        monkeypatch.setenv(AUTOTUNE_ENV, env)
        # an explicit config wins everywhere; the interpreter always runs its own config
        for interpret in (False, True):
            assert launch_config(EXPLICIT, interpret, INTERP, DEFAULT) == EXPLICIT
        assert launch_config(None, True, INTERP, DEFAULT) == INTERP
    monkeypatch.setenv(AUTOTUNE_ENV, "0")
    assert launch_config(None, False, INTERP, DEFAULT) == DEFAULT  # GPU, autotuner off: the fixed config
    monkeypatch.setenv(AUTOTUNE_ENV, "1")
    assert launch_config(None, False, INTERP, DEFAULT) is None  # GPU, autotuner on
    got = launch_config(None, True, INTERP, DEFAULT)
    got.pop("BLOCK")  # a copy: callers pop num_warps/num_stages from it
    assert INTERP == {"BLOCK": 16}


def _entry(cfg: dict, names: tuple[str, ...]) -> tuple:
    return tuple(cfg[n] for n in names)


def test_defaults_are_gpu_configs_entries() -> None:
    assert _entry(pm.DEFAULT_GPU_CONFIG, ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_stages", "num_warps")) in pm.GPU_CONFIGS
    assert pm.DEFAULT_GPU_CONFIG["GROUP_M"] == 8  # the autotuned configs' group size
    assert _entry(lg.DEFAULT_GPU_CONFIG, ("BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")) in lg.GPU_CONFIGS
    assert lg.DEFAULT_GPU_CONFIG["SPLIT_K"] <= lg.SPLIT_MAX
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_stages", "num_warps", "SUBTILE")
    assert _entry(sm.DEFAULT_GPU_CONFIG, names) in sm.GPU_CONFIGS
    assert sm.DEFAULT_GPU_CONFIG["GROUP_M"] == 8 and "NUM_SMS" not in sm.DEFAULT_GPU_CONFIG  # NUM_SMS: the device's
    assert _entry(hq.DEFAULT_GPU_CONFIG, ("BLOCK_M", "K_SPLIT", "num_warps", "num_stages")) in hq.GPU_CONFIGS


def test_scaled_mm_default_survives_the_promotion_pruning() -> None:
    # FP8 with promotion (the default) keeps only some tiles: the fixed config must be one of them
    cfg = dict(sm.DEFAULT_GPU_CONFIG)
    stub = SimpleNamespace(kwargs=cfg, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    others = [SimpleNamespace(kwargs={"BLOCK_M": 128, "BLOCK_N": 256}, num_warps=8, num_stages=3)]
    for promote in (32, 128):
        assert stub in sm._prune([stub, *others], {}, PROMOTE=promote, IS_INT=False)


class _Kernel:
    """Stands in for a jitted or autotuned kernel: records ``kernel[grid](*args, **kwargs)``."""

    def __init__(self) -> None:
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.parametrize(("env", "interpret", "which"),
                         [("0", False, "default"), ("1", False, "tuned"), ("1", True, "interpret"),
                          ("0", True, "interpret")])  # fmt: skip
def test_packed_mm_launch_follows_the_switch(monkeypatch, env, interpret, which) -> None:
    monkeypatch.setenv(AUTOTUNE_ENV, env)
    fixed, tuned = _Kernel(), _Kernel()
    pm._launch(fixed, tuned, _cdiv, 300, "BLOCK_N", 500, ("args",), {"BITS": 2}, None, interpret)
    if which == "tuned":
        assert not fixed.calls and len(tuned.calls) == 1
        grid, args, kwargs = tuned.calls[0]
        assert callable(grid) and kwargs == {"BITS": 2}
        assert grid({"BLOCK_M": 64, "BLOCK_N": 128}) == (_cdiv(300, 64) * _cdiv(500, 128),)
        return
    cfg = pm.DEFAULT_GPU_CONFIG if which == "default" else pm.INTERPRET_CONFIG
    assert not tuned.calls and len(fixed.calls) == 1
    grid, args, kwargs = fixed.calls[0]
    assert args == ("args",) and kwargs.pop("BITS") == 2
    assert kwargs == {"num_warps": 4, "num_stages": 3} | cfg
    assert grid == (_cdiv(300, cfg["BLOCK_M"]) * _cdiv(500, cfg["BLOCK_N"]),)
