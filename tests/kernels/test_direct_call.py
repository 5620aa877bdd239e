"""The kernels' public entry points call their implementation directly in eager mode on CUDA tensors and go
through their torch.library custom op otherwise (lowbit.kernels._triton.direct_call): same results either way."""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels import _triton
from lowbit.kernels import hadamard_quant as hq
from lowbit.kernels import scaled_mm as sm


def test_decision_on_the_cpu():
    assert not _triton.direct_call(torch.zeros(2))  # CPU tensors: the op
    assert not _triton.direct_call(None)
    seen = []
    f = torch.compile(lambda t: seen.append(_triton.direct_call(t)) or t + 1, backend="eager", fullgraph=False)
    f(torch.zeros(2))
    assert seen == [False]


@pytest.mark.parametrize("direct", [True, False])
def test_entry_points_equal_either_way(monkeypatch, direct):
    torch.manual_seed(0)
    x = torch.randn(8, 256)
    g = torch.randn(8, 256)
    ref_codes, ref_scale, ref_mask = hq.hadamard_quantize_ref(x, 4, 128)
    calls = []
    for mod in (hq, sm):
        monkeypatch.setattr(mod, "direct_call", lambda t: calls.append(1) or direct)
    codes, scale, mask = hq.hadamard_quantize(x, 4, 128, backend="ref")
    assert torch.equal(codes.float(), ref_codes.float()) and torch.equal(scale, ref_scale)
    assert torch.equal(mask, ref_mask)
    assert torch.equal(hq.masked_inverse_hadamard(g, mask, 128, backend="ref"),
                       hq.masked_inverse_hadamard_ref(g, mask, 128))
    a, b = codes[:4], codes[4:]
    y = sm.scaled_mm(a, b, scale[:4], scale[4:], None, torch.float32, backend="ref")
    assert torch.equal(y, sm.scaled_mm_ref(a, b, scale[:4], scale[4:], None, torch.float32))
    assert len(calls) == 3


@pytest.mark.needs_cuda
def test_decision_on_the_gpu():
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = torch.zeros(2, device="cuda")
    assert _triton.direct_call(t)
    with FakeTensorMode():
        assert not _triton.direct_call(torch.empty(2, device="cuda"))
