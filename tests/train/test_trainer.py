"""End-to-end trainer behaviour on a tiny model and the generated test corpus (CPU)."""

import json

import pytest
import torch

from lowbit.config import ConfigError
from lowbit.train.logger import read_log
from lowbit.train.trainer import Trainer, TrainingDiverged


@pytest.fixture
def make_cfg(run_config):
    def make(tmp_path, corpus, name="run", **over):
        return run_config(tmp_path / name, corpus, tmp_path / "data", **over)

    return make


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_log(run_dir, "train")]


def test_trains_and_writes_run(tmp_path, tiny_corpus, make_cfg):
    cfg = make_cfg(tmp_path, tiny_corpus, **{"train.steps": 30, "train.eval_every": 30})
    t = Trainer(cfg)
    s = t.fit()
    assert s["final"]["val_loss"] < s["initial"]["val_loss"] - 0.5
    out = tmp_path / "run"
    for f in ("config.json", "log.jsonl", "summary.json", "loss.png", "ckpt/latest"):
        assert (out / f).exists(), f
    # memory accounting equals the tensor sizes: fp32 weights (+ the two RoPE tables, 32 × 16 each),
    # fp32 grads, AdamW's two moments plus one fp32 step counter per parameter tensor
    mem = s["memory"]
    n, n_tensors = mem["n_params"], len(list(t.model.parameters()))
    assert n == sum(p.numel() for p in t.model.parameters())
    assert mem["weights"] == 4 * n + 2 * 32 * 16 * 4
    assert mem["grads"] == 4 * n
    assert mem["optimizer"] == 8 * n + 4 * n_tensors
    assert mem["activations"] > 0


def test_exact_resume_matches_uninterrupted(tmp_path, tiny_corpus, make_cfg):
    a = make_cfg(tmp_path, tiny_corpus, "a")
    Trainer(a).fit()
    b = make_cfg(tmp_path, tiny_corpus, "b")
    Trainer(b).fit(until_step=3)
    assert [s for s, _ in losses(tmp_path / "b")] == [1, 2, 3]
    ck = tmp_path / "b" / "ckpt"
    first = json.loads((ck / (ck / "latest").read_text().strip() / "state.json").read_text())["train_seconds"]
    Trainer(b, resume=True).fit()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # bit for bit: floats compared exactly
    ea = [r for r in read_log(tmp_path / "a", "eval")]
    eb = [r for r in read_log(tmp_path / "b", "eval")]
    assert [r["val_loss"] for r in ea] == [r["val_loss"] for r in eb]
    # the summary's total training time runs through the checkpoint: the first process's seconds up to step 3
    # plus the second's; train_seconds / tok_per_s stay this process's own
    sb = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert first > 0
    assert sb["train_seconds_total"] == pytest.approx(first + sb["train_seconds"])


def test_existing_run_is_not_overwritten(tmp_path, tiny_corpus, make_cfg):
    cfg = make_cfg(tmp_path, tiny_corpus, **{"train.steps": 2})
    Trainer(cfg).fit()
    before = (tmp_path / "run" / "log.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(cfg)
    assert (tmp_path / "run" / "log.jsonl").read_text() == before
    Trainer(cfg, overwrite=True).fit()


def test_resume_refuses_other_config(tmp_path, tiny_corpus, make_cfg):
    cfg = make_cfg(tmp_path, tiny_corpus, **{"train.steps": 2})
    Trainer(cfg).fit()
    other = make_cfg(tmp_path, tiny_corpus, **{"train.steps": 2, "train.lr": 1e-3})
    with pytest.raises(ConfigError, match="train.lr"):
        Trainer(other, resume=True)
    with pytest.raises(Exception, match="no complete checkpoint"):
        Trainer(make_cfg(tmp_path, tiny_corpus, "fresh"), resume=True)


def test_vocab_mismatch(tmp_path, tiny_corpus, make_cfg):
    cfg = make_cfg(tmp_path, tiny_corpus, **{"train.steps": 1})
    Trainer(cfg).fit()
    small = make_cfg(tmp_path, tiny_corpus, "small", **{"model.vocab_size": 100, "train.steps": 1})
    with pytest.raises(Exception, match="vocab"):
        Trainer(small).fit()


def test_nan_is_detected_and_named(tmp_path, tiny_corpus, monkeypatch, make_cfg):
    cfg = make_cfg(tmp_path, tiny_corpus, **{"train.steps": 3})
    t = Trainer(cfg)
    real_setup = t._setup

    def poisoned_setup():
        real_setup()
        with torch.no_grad():
            t.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")

    monkeypatch.setattr(t, "_setup", poisoned_setup)
    with pytest.raises(TrainingDiverged, match=r"step 1: .*layers\.1\.mlp\.up_proj\.weight"):
        t.fit()


def test_quantized_recipe_resumes_exactly_and_restores_recipe(tmp_path, tiny_corpus, make_cfg):
    from lowbit.nn import QuantLinear
    from lowbit.runs import load_run

    over = {"quant.recipe": "quest-w4a4", "train.steps": 4, "train.ckpt_every": 2, "train.eval_every": 2}
    Trainer(make_cfg(tmp_path, tiny_corpus, "a", **over)).fit()
    Trainer(make_cfg(tmp_path, tiny_corpus, "b", **over)).fit(until_step=2)
    Trainer(make_cfg(tmp_path, tiny_corpus, "b", **over), resume=True).fit()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    model, cfg, _ = load_run(tmp_path / "b")
    assert cfg.quant.recipe == "quest-w4a4"
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 7 * 2
    evals = read_log(tmp_path / "b", "eval")
    assert any(k.startswith("act_masked/") for k in evals[-1])  # trust-estimator diagnostics are logged


def test_statistics_recorded_only_for_the_report(tmp_path, tiny_corpus, make_cfg, monkeypatch):
    # training steps run with the layers' statistics off (set_track_stats: a cost on the fused-kernel path); the
    # eval-time diagnostics come from one extra no-grad forward of the last batch with them on, and equal what
    # that batch's statistics are
    from lowbit.nn import QuantLinear, quant_diagnostics, set_track_stats

    seen = []
    orig = QuantLinear.forward

    def spy(self, x):
        seen.append((torch.is_grad_enabled(), self.track_stats))
        return orig(self, x)

    monkeypatch.setattr(QuantLinear, "forward", spy)
    over = {"quant.recipe": "quest-w4a4", "train.steps": 3, "train.eval_every": 3}
    t = Trainer(make_cfg(tmp_path, tiny_corpus, "a", **over))
    t.fit()
    train_calls = [on for grad, on in seen if grad]
    stats_calls = [on for grad, on in seen if not grad and on]
    assert train_calls and not any(train_calls)  # no training forward recorded statistics
    assert len(stats_calls) == 7 * 2  # one recording forward: every quantized layer once
    assert not any(m.track_stats for m in t.model.modules() if isinstance(m, QuantLinear))  # off again
    logged = read_log(tmp_path / "a", "eval")[-1]
    set_track_stats(t.model, True)
    with torch.no_grad():
        t.model(*t._last_batch)
    expect = quant_diagnostics(t.model)
    assert {k: logged[k] for k in expect} == pytest.approx(expect)


def test_ptq_convert_and_report(tmp_path, tiny_corpus, capsys, make_cfg):
    from lowbit.cli import main
    from lowbit.runs import load_run

    cfg = make_cfg(tmp_path, tiny_corpus, "base", **{"train.steps": 4})
    Trainer(cfg).fit()
    assert main(["convert", str(tmp_path / "base"), "--ptq", "quest-w4a4", "--batches", "2"]) == 0
    out = tmp_path / "base-ptq-quest-w4a4"
    _, pcfg, _ = load_run(out)
    assert pcfg.quant.recipe == "quest-w4a4"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["val_loss"] > 0
    assert main(["report", str(tmp_path / "base"), str(out), "--out", str(tmp_path / "rep")]) == 0
    table = capsys.readouterr().out
    assert "quest-w4a4" in table and "bf16" in table
    assert (tmp_path / "rep" / "loss.png").stat().st_size > 1000
    assert main(["eval", str(tmp_path / "base"), "--batches", "2", "--splits", "val",
                 "--json", str(tmp_path / "ev.json")]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["step"] == 4 and ev["val"]["loss"] > 0 and ev["val"]["bpb"] > 0
    assert main(["recipes"]) == 0
    assert "bitnet-b1.58" in capsys.readouterr().out
