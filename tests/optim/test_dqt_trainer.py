"""DQT through the trainer: every recipe trains, exact resume with stochastic rounding, memory accounting,
flip-rate diagnostics, and ternary conversion of an 8-bit run."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.quant.packing import packed_shape
from lowbit.train.logger import read_log
from lowbit.train.trainer import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_corpus):
    return tmp_path_factory.mktemp("dqt_data")  # shared: prepared once, reused by every run here


@pytest.fixture
def _cfg(run_config):
    """The tiny run of tests/conftest.py, with the dataset shared across this module."""
    return lambda tmp_path, data_dir, corpus, name, **over: run_config(tmp_path / name, corpus, data_dir / "data",
                                                                       **over)


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_log(run_dir, "train")]


@pytest.mark.parametrize("recipe", ["dqt-ternary", "dqt-int2", "dqt-int3", "dqt-int4", "dqt-int8",
                                    "dqt-quest-w4a4", "dqt-quest-w8a8", "dqt-int8-nearest"])
def test_every_dqt_recipe_trains(recipe, tmp_path, data_dir, tiny_corpus, _cfg):
    over = {"quant.recipe": recipe, "train.steps": 8, "train.eval_every": 8, "train.ckpt_every": 8,
            "train.lr": 1e-2, "train.warmup": 1}
    s = Trainer(_cfg(tmp_path, data_dir, tiny_corpus, "r", **over)).fit()
    tr = [loss for _, loss in losses(tmp_path / "r")]
    assert all(map(lambda v: v == v and abs(v) < 100, tr))
    assert sum(tr[-3:]) / 3 < tr[0] - 0.1
    assert s["final"]["val_loss"] < s["initial"]["val_loss"]
    assert 0 < s["final"]["flip_rate/mean"] <= 1
    assert s["params"]["non_embedding"] == 2 * (4 * 32 * 32 + 3 * 32 * 64) + 5 * 32  # codes counted as params


def test_exact_resume_with_stochastic_rounding(tmp_path, data_dir, tiny_corpus, _cfg):
    over = {"quant.recipe": "dqt-ternary", "dqt.state_dtype": "8bit", "dqt.update_in_backward": True,
            "dqt.clip": "previous", "train.steps": 6, "train.ckpt_every": 3}
    Trainer(_cfg(tmp_path, data_dir, tiny_corpus, "a", **over)).fit()
    Trainer(_cfg(tmp_path, data_dir, tiny_corpus, "b", **over)).fit(until_step=3)
    Trainer(_cfg(tmp_path, data_dir, tiny_corpus, "b", **over), resume=True).fit()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # bit for bit
    ea, eb = read_log(tmp_path / "a", "eval"), read_log(tmp_path / "b", "eval")
    assert [r["val_loss"] for r in ea] == [r["val_loss"] for r in eb]
    assert [r.get("flip_rate/mean") for r in ea] == [r.get("flip_rate/mean") for r in eb]
    from lowbit.runs import load_run

    ma, _, _ = load_run(tmp_path / "a")
    mb, _, _ = load_run(tmp_path / "b")
    for (ka, va), (kb, vb) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


def test_memory_accounting_matches_tensor_sizes(tmp_path, data_dir, tiny_corpus, _cfg):
    over = {"quant.recipe": "dqt-ternary", "dqt.state_dtype": "8bit", "train.steps": 1}
    t = Trainer(_cfg(tmp_path, data_dir, tiny_corpus, "m", **over))
    mem = t.fit()["memory"]
    from lowbit.nn import direct_modules

    mods = direct_modules(t.model)
    floats = list(t.model.parameters())
    n_float = sum(p.numel() for p in floats)
    n_q = sum(m.weight_numel for _, m in mods)
    assert mem["n_params"] == n_float + n_q
    codes = sum(packed_shape(m.weight_shape, 3)[0] * packed_shape(m.weight_shape, 3)[1] for _, m in mods)
    # weights: float params + ternary codes (2 bits, rows padded to bytes) + one fp32 scale + 5 int32 format
    # words per layer + the RoPE tables (32 × 16 each)
    assert mem["weights"] == 4 * n_float + codes + len(mods) * (4 + 20) + 2 * 32 * 16 * 4
    # gradients: fp32 .grad of the float params + the fp32 stashed weight gradients of the DQT layers
    assert mem["grads"] == 4 * n_float + 4 * n_q
    # optimizer: AdamW (2 fp32 moments + step) for float params; 8-bit blockwise m and √v (1 byte each, padded
    # to blocks of 256, plus one fp32 absmax per block) for the DQT layers
    blocks = sum(-(-m.weight_numel // 256) for _, m in mods)
    assert mem["optimizer"] == 8 * n_float + 4 * len(floats) + 2 * (256 * blocks + 4 * blocks)
    # with update-in-backward no gradient is ever stashed
    over |= {"dqt.update_in_backward": True}
    mem2 = Trainer(_cfg(tmp_path, data_dir, tiny_corpus, "m2", **over)).fit()["memory"]
    assert mem2["grads"] == 4 * n_float and mem2["weights"] == mem["weights"]


def test_ternary_conversion_of_an_8bit_run(tmp_path, data_dir, tiny_corpus, capsys, _cfg):
    from lowbit.cli import main
    from lowbit.nn import direct_modules
    from lowbit.runs import load_run

    over = {"quant.recipe": "dqt-int8", "train.steps": 4, "train.eval_every": 4}
    Trainer(_cfg(tmp_path, data_dir, tiny_corpus, "base", **over)).fit()
    src, _, _ = load_run(tmp_path / "base")
    assert main(["convert", str(tmp_path / "base"), "--to", "ternary", "--batches", "2", "--device", "cpu"]) == 0
    out = tmp_path / "base-ternary"
    model, cfg, _ = load_run(out)
    assert cfg.quant.recipe == "dqt-ternary"
    for name, m in direct_modules(model):
        w = src.get_submodule(name).dequantized_weight()
        assert float(m.weight_scale) == pytest.approx(float(w.abs().mean()), rel=1e-5)  # BitNet absmean
        assert torch.equal(m.codes(), (w / w.abs().mean()).round().clamp(-1, 1).to(torch.int8))
    assert torch.equal(model.lm_head.weight, src.lm_head.weight)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["val_loss"] > 0 and summary["recipe"] == "dqt-ternary"
    assert main(["convert", str(tmp_path / "base")]) == 2  # neither --ptq nor --to
    assert "exactly one" in capsys.readouterr().err
