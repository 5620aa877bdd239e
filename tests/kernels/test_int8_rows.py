"""The fused per-row int8 activation quantizer (lowbit.kernels.int8_rows) against lowbit's quantizer: codes and
steps equal bit for bit (Triton interpreter on CPU, compiled on the GPU)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lowbit.kernels import int8_rows as ir
from lowbit.quant import get_recipe
from lowbit.quant.recipes import quest_spec
from lowbit.testing import run_interpreted_tests

BITNET_ACT = get_recipe("bitnet-b1.58").act
STE_ACT4 = get_recipe("ste-w4a4").act  # the symmetric 4-bit int grid, absmax per row
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _x(m: int, k: int, dtype=torch.float32, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, m).unsqueeze(1)  # rows over five decades
    x[0] = 0.0  # the eps floor
    if m > 2:
        x[2, 3] = 1e4  # one outlier: the rest of the row rounds near zero, ties included
        x[2, 5] = x[2, 3] / 127 * 2.5  # exactly between codes 2 and 3
    return x.to(dtype).to(device)


def _assert_exact(x, spec, **kw):
    codes, step = ir.int8_rows(x, spec, **kw)
    rc, rs = ir.int8_rows_ref(x, spec)
    assert codes.dtype == torch.int8 and step.dtype == torch.float32
    bad_s = (step != rs).nonzero().flatten()[:5].tolist()
    assert not bad_s, f"steps differ at rows {bad_s}: {step[bad_s].tolist()} vs {rs[bad_s].tolist()}"
    bad = (codes != rc).nonzero()[:5].tolist()
    x2 = x.reshape(-1, x.shape[-1])
    assert not bad, f"{int((codes != rc).sum())} codes differ, e.g. at (row, col) {bad}: " + ", ".join(
        f"x={float(x2[i, j])!r} step={float(rs[i])!r} kernel {int(codes[i, j])} ref {int(rc[i, j])}" for i, j in bad)


def test_supports():
    assert ir.supports(BITNET_ACT) and ir.supports(STE_ACT4)
    assert not ir.supports(quest_spec(4)) and not ir.supports(get_recipe("bitnet-b1.58").weight)  # rms / absmean


def test_reference_path_and_fallback():
    x = _x(5, 96)
    _assert_exact(x, BITNET_ACT)  # CPU, auto: the reference
    codes, step = ir.int8_rows(x.reshape(5, 2, 48), quest_spec(4))  # a spec it does not fuse: lowbit's quantizer
    assert codes.shape == (10, 48) and step.shape == (10,)
    with pytest.raises(ValueError, match="backend"):
        ir.int8_rows(x, BITNET_ACT, backend="fast")


def test_custom_op_and_compile():
    x = _x(6, 64)
    torch.library.opcheck(ir._int8_rows_op, (x, 8.0, "int_asym", 1e-5, "ref"))
    f = torch.compile(lambda t: ir.int8_rows(t, BITNET_ACT), backend="aot_eager", fullgraph=True)
    c, s = f(x)
    rc, rs = ir.int8_rows_ref(x, BITNET_ACT)
    assert torch.equal(c, rc) and torch.equal(s, rs)
    torch._dynamo.reset()


@needs_triton
def test_int8_rows_in_triton_interpreter() -> None:
    run_interpreted_tests(__file__)


@pytest.mark.parametrize(("m", "k", "dtype"), [(1, 96, torch.float32), (7, 1030, torch.bfloat16),
                                               (9, 2048, torch.float16), (5, 1024, torch.float32)])
@pytest.mark.parametrize("spec", [BITNET_ACT, STE_ACT4], ids=["int8-asym", "int4"])
def test_kernel_exact_interpreted(interpret, m, k, dtype, spec) -> None:
    _assert_exact(_x(m, k, dtype, seed=m + k), spec, backend="triton")


@pytest.mark.needs_cuda
@pytest.mark.parametrize(("m", "k"), [(16384, 768), (8192, 4608), (3, 130)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_exact_cuda(m, k, dtype) -> None:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    x = _x(m, k, dtype, seed=k, device="cuda")
    calls = []
    orig = ir.int8_rows_triton
    ir.int8_rows_triton = lambda *a: calls.append(1) or orig(*a)
    try:
        _assert_exact(x, BITNET_ACT, backend="triton")
    finally:
        ir.int8_rows_triton = orig
    assert calls


def test_bench_kernels_int8_rows_smoke(tmp_path):
    # the benchmark's CPU logic: the reference row is timed, the kernel row reports why it cannot run here
    import importlib.util as iu
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"
    spec = iu.spec_from_file_location("bench_kernels_under_test", path)
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.main(["--smoke", "--device", "cpu", "--only", "int8_rows", "--warmup", "1", "--iters", "2",
                     "--out", str(tmp_path / "bk.md")])
    rows = [line for line in text.splitlines() if line.startswith("| smoke")]
    assert len(rows) == 2 and "reference (eager)" in rows[0] and "1.00×" in rows[0]
    assert "fused kernel" in rows[1] and (tmp_path / "bk.md").exists()
