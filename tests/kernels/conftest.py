"""Kernel tests: the ``interpret`` fixture for tests that run Triton kernels in Triton's CPU interpreter, and the
kernels' autotuner off by default.

Such tests (named ``*_interpreted``) need TRITON_INTERPRET=1 before triton is first imported: in a normal run
the fixture skips them, and each file's ``test_*_in_triton_interpreter`` runs them in a child pytest
(:func:`lowbit.testing.run_interpreted_tests`).

``LOWBIT_AUTOTUNE`` is "0" in every test here unless the environment sets it: the autotuned GPU kernels
(scaled_mm, packed_mm, lowbit_gemv, hadamard_quant's forward) then compile their one ``DEFAULT_GPU_CONFIG`` instead
of benchmarking every ``GPU_CONFIGS`` entry at each of the tests' many shapes (about a second per config and shape
on an H100). One ``needs_cuda`` test per kernel sets it to "1" (``*_autotuned``; hadamard_quant's:
``test_autotuned_launch_cuda``) and keeps the autotuned path covered;
``LOWBIT_AUTOTUNE=1 pytest …`` autotunes everywhere. No pytest-timeout needed.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from lowbit.kernels._triton import AUTOTUNE_ENV
from lowbit.testing import interpreter_numpy_compat, interpreter_ready


@pytest.fixture(autouse=True)
def _fixed_gpu_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    if AUTOTUNE_ENV not in os.environ:
        monkeypatch.setenv(AUTOTUNE_ENV, "0")


@pytest.fixture
def interpret():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'lowbit[triton]')")
    if not interpreter_ready():
        pytest.skip("runs in the TRITON_INTERPRET=1 child pytest of this file's test_*_in_triton_interpreter")
    interpreter_numpy_compat()
