"""The lm-eval adapter answers the three request kinds (only where lm-evaluation-harness is installed)."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("lm_eval")


class PreferA(nn.Module):
    def __init__(self):
        super().__init__()
        self.cfg = SimpleNamespace(max_seq_len=16)

    def forward(self, x):
        out = torch.zeros(*x.shape, 257)
        out[..., ord("a")] = 5.0
        return out


def test_adapter_request_kinds(byte_tok):
    from lowbit.eval.lm_eval_adapter import LowbitLM

    lm = LowbitLM(model=PreferA(), tokenizer=byte_tok, device="cpu")
    (ll, greedy), = lm.loglikelihood([SimpleNamespace(args=("x", "aa"))])
    p = math.exp(5) / (math.exp(5) + 256)
    assert greedy and ll == pytest.approx(2 * math.log(p), rel=1e-4)
    assert lm.loglikelihood_rolling([SimpleNamespace(args=("aaa",))])[0] == pytest.approx(3 * math.log(p), rel=1e-4)
    assert lm.generate_until([SimpleNamespace(args=("x", {"until": ["b"], "max_gen_toks": 3}))]) == ["aaa"]
    assert lm.generate_until([SimpleNamespace(args=("x", {"until": ["aa"], "max_gen_toks": 9}))]) == [""]
