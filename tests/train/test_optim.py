import pytest
import torch

from lowbit.config import ModelConfig, TrainConfig
from lowbit.models.llama import Llama
from lowbit.train.optim import build_optimizer, lr_at, param_groups


def test_decay_groups():
    m = Llama(ModelConfig(size="tiny", vocab_size=64, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=8))
    decay, no_decay = param_groups(m, TrainConfig(weight_decay=0.1))
    names = {id(p): n for n, p in m.named_parameters()}
    dn = {names[id(p)] for p in decay["params"]}
    nn_ = {names[id(p)] for p in no_decay["params"]}
    assert all("proj" in n for n in dn) and len(dn) == 7
    assert {"embed_tokens.weight", "lm_head.weight", "norm.weight"} <= nn_
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(m, TrainConfig(), torch.device("cpu"))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))


def test_cosine_schedule():
    c = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, c) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_wsd_schedule():
    c = TrainConfig(steps=100, lr=1.0, warmup=0.1, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_at(50, c) == 1.0 and lr_at(79, c) == 1.0
    assert lr_at(99, c) == pytest.approx(0.0)
    assert 0 < lr_at(90, c) < 1
