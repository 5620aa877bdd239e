"""Kernel tests: the ``interpret`` fixture for tests that run Triton kernels in Triton's CPU interpreter.

Such tests (named ``*_interpreted``) need TRITON_INTERPRET=1 before triton is first imported: in a normal run
the fixture skips them, and each file's ``test_*_in_triton_interpreter`` runs them in a child pytest
(:func:`lowbit.testing.run_interpreted_tests`).
"""

from __future__ import annotations

import importlib.util

import pytest

from lowbit.testing import interpreter_numpy_compat, interpreter_ready


@pytest.fixture
def interpret():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'lowbit[triton]')")
    if not interpreter_ready():
        pytest.skip("runs in the TRITON_INTERPRET=1 child pytest of this file's test_*_in_triton_interpreter")
    interpreter_numpy_compat()
