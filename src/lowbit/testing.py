"""Helpers for lowbit's own tests and for tests of code built on lowbit: small, fast configurations.

Kept in the package (like ``torch.testing``) so that any test module can import them, whatever directory it
lives in; nothing here runs at import.
"""

from __future__ import annotations

from pathlib import Path


def tiny_run_config(out_dir: Path, corpus: Path, data_dir: Path, **over):
    """A RunConfig of a 2-layer, d=32 model on ``corpus`` that trains a step in milliseconds: 6 steps of 2 × 32
    tokens, evaluation and checkpoints every 3, a JSONL point every step. ``over`` = dotted overrides."""
    import json

    from lowbit.config import load_config

    base = {
        "model.size": "tiny", "model.vocab_size": 320, "model.dim": 32, "model.n_layers": 2,
        "model.n_heads": 2, "model.ffn_dim": 64, "model.max_seq_len": 32,
        "data.source": [str(corpus)], "data.heldout": [], "data.dir": str(data_dir),
        "train.steps": 6, "train.batch_size": 2, "train.seq_len": 32, "train.lr": 3e-3, "train.warmup": 2,
        "train.eval_every": 3, "train.eval_batches": 2, "train.ckpt_every": 3, "train.log_every": 1,
        "train.progress": False, "train.tensorboard": False, "train.out_dir": str(out_dir),
    } | over
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in base.items()])


# ----------------------------------------------------------------------------------------------------------
# Triton's CPU interpreter (kernel tests without a GPU)
# ----------------------------------------------------------------------------------------------------------


def interpreter_numpy_compat() -> None:
    """Triton 3.6's interpreter turns a runtime loop bound into a Python int with ``int(array_of_shape_(1,))``,
    which numpy ≥ 2.3 refuses ("only 0-dimensional arrays can be converted"); kernels with runtime loop bounds
    (persistent tile loops, K loops) need that one conversion patched. Test processes only; idempotent."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_lowbit_index_compat", False):
        return
    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._lowbit_index_compat = True


def interpret_in_process(monkeypatch) -> None:
    """TRITON_INTERPRET=1 for the rest of a test (pytest's ``monkeypatch``) plus the numpy compat patch: for tests
    that run a kernel whose triton library is not yet jit-decorated for the other mode (module docstrings)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreter_numpy_compat()


def interpreter_ready() -> bool:
    """TRITON_INTERPRET=1 and triton not yet imported in the other mode (its library is jit-decorated for one
    mode at import, so the variable must be set before anything — torch.compile too — imports triton)."""
    import sys

    from lowbit.kernels._triton import interpreting

    if not interpreting():
        return False
    tl = sys.modules.get("triton.language")
    return tl is None or type(tl.zeros).__name__ == "InterpretedFunction"


def run_interpreted_tests(test_file: str | Path, keyword: str = "interpreted") -> None:
    """Run the ``keyword`` tests of ``test_file`` in a child pytest with TRITON_INTERPRET=1 and fail unless they
    all ran and passed (none skipped: the kernels really ran). Skips when this process is that child."""
    import os
    import subprocess
    import sys

    import pytest

    if interpreter_ready():
        pytest.skip("this process is the interpreter run: the *_interpreted tests run directly")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "pytest", str(test_file), "-o", "addopts=", "-q", "-x", "-p", "no:cacheprovider",
           "-k", keyword]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=Path(test_file).parents[2])
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, f"interpreter run failed ({' '.join(cmd)}):\n{tail}"
    summary = res.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, tail


class ByteTok:
    """A tokenizer of one token per UTF-8 byte, EOS = 256: generation and chat tests need no trained tokenizer."""

    eos_id = 256
    vocab_size = 257

    def encode(self, s):
        return list(s.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------------------
# comparisons
# ----------------------------------------------------------------------------------------------------------


def within_one_bf16_ulp(y, ref) -> bool:
    """Whether every bf16 value of ``y`` is ``ref``'s or one of its two neighbours — what a library GEMM's epilogue
    can do by multiplying the two float32 scales in another order before its bf16 rounding (±0 count as equal)."""
    import torch

    def order(t):  # bf16 bit patterns → integers in the order of the values (±0 → 0, neighbours differ by 1)
        i = t.contiguous().view(torch.int16).int()
        return torch.where(i >= 0, i, -(i & 0x7FFF))

    return bool(((order(y) - order(ref)).abs() <= 1).all())
