"""lowbit sweep: experiment files, the plan, resumable execution, conversions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lowbit import sweep
from lowbit.config import ConfigError

TINY_MODEL = {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64}


def write_experiment(tmp_path: Path, corpus: Path, body: str = "", recipes=("bf16", "dqt-int8"),
                     budget: str = "tokens = [256]") -> Path:
    base = tmp_path / "base.toml"
    base.write_text(f"""
[model]
vocab_size = 320
max_seq_len = 32
[data]
source = ["{corpus}"]
heldout = []
dir = "{tmp_path / 'data'}"
[train]
batch_size = 2
seq_len = 32
lr = 3e-3
warmup = 1
eval_every = 0
eval_batches = 2
ckpt_every = 0
log_every = 1
tensorboard = false
device = "cpu"
""")
    rec = ", ".join(f'"{r}"' for r in recipes)
    exp = tmp_path / "exp.toml"
    sizes = "\n".join(f"{k} = {v}" for k, v in TINY_MODEL.items())
    exp.write_text(f"""
[experiment]
name = "t"
base = "base.toml"
out = "{tmp_path / 'out'}"
parallel = 2
sizes = ["mini"]
recipes = [{rec}]
{budget}

[sizes.mini]
{sizes}
{body}
""")
    return exp


def test_load_errors(tmp_path, tiny_corpus):
    with pytest.raises(ConfigError, match="not found"):
        sweep.load_experiment(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('[experiment]\nsizes = ["tiny"]\nrecipes = ["bf16"]\ntokens = [1]\ntoken_per_param = [2]\n')
    with pytest.raises(ConfigError, match="unknown \\[experiment\\] key"):
        sweep.load_experiment(bad)
    bad.write_text('[experiment]\nsizes = ["tiny"]\nrecipes = ["bf16"]\ntokens = [1]\ntokens_per_param = [2]\n')
    with pytest.raises(ConfigError, match="exactly one of"):
        sweep.load_experiment(bad)
    exp = write_experiment(tmp_path, tiny_corpus, body='[[convert]]\nfrom = "quest-w4a4"\nto = "ternary"\n')
    with pytest.raises(ConfigError, match="not one of the experiment's recipes"):
        sweep.load_experiment(exp)


def test_plan_steps_and_names(tmp_path, tiny_corpus):
    exp = sweep.load_experiment(write_experiment(tmp_path, tiny_corpus, budget="tokens_per_param = [0.01, 0.02]"))
    runs = sweep.plan(exp)
    assert [r.name for r in runs] == ["mini-t0.01/bf16", "mini-t0.01/dqt-int8", "mini-t0.02/bf16",
                                      "mini-t0.02/dqt-int8"]
    r = runs[0]
    # non-embedding parameters of the 2-layer d=32 model: per block 4·32² (attention) + 3·32·64 (SwiGLU) + 2·32
    assert r.non_embedding == 2 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32
    assert r.steps == math.ceil(0.01 * r.non_embedding / 64) and r.tokens == r.steps * 64
    assert runs[2].steps == math.ceil(0.02 * r.non_embedding / 64)
    assert all(x.status == "todo" for x in runs)
    assert [x.name for x in sweep.plan(exp, only=["*/dqt-*"])] == ["mini-t0.01/dqt-int8", "mini-t0.02/dqt-int8"]
    with pytest.raises(ConfigError):
        sweep.plan(exp, extra=["train.nonsense=1"])


def test_status_on_disk(tmp_path):
    d = tmp_path / "run"
    assert sweep.run_status(d, 5) == "todo"
    (d / "ckpt").mkdir(parents=True)
    (d / "ckpt" / "latest").write_text("step_3")
    assert sweep.run_status(d, 5) == "resume"
    (d / "summary.json").write_text(json.dumps({"step": 3}))
    assert sweep.run_status(d, 5) == "resume"  # a summary short of the final step is not done
    (d / "summary.json").write_text(json.dumps({"step": 5}))
    assert sweep.run_status(d, 5) == "done"


def test_execute_skip_and_convert(tmp_path, tiny_corpus):
    path = write_experiment(tmp_path, tiny_corpus, body='[[convert]]\nfrom = "dqt-int8"\nto = "ternary"\n'
                            '[recipe_overrides."bf16"]\n"train.lr" = 1e-3\n')
    exp = sweep.load_experiment(path)
    runs = sweep.execute(exp, sweep.plan(exp), progress=False, poll_s=0.2)
    assert [r.status for r in runs] == ["done", "done"], [(r.name, r.returncode) for r in runs]
    out = tmp_path / "out"
    for r in runs:
        s = json.loads((Path(r.dir) / "summary.json").read_text())
        assert s["step"] == r.steps == 4 and s["recipe"] == r.recipe
        assert json.loads((Path(r.dir) / "config.json").read_text())["train"]["lr"] == (
            1e-3 if r.recipe == "bf16" else 3e-3)
    conv = out / "mini-d256" / "dqt-int8-to-ternary" / "summary.json"
    conv_summary = json.loads(conv.read_text())
    assert conv_summary["recipe"] == "dqt-ternary" and conv_summary["ternary_of"].endswith("dqt-int8")
    index = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in index["runs"]] == ["done", "done"]
    # a second sweep finds everything done and starts nothing
    mtime = (Path(runs[0].dir) / "summary.json").stat().st_mtime
    again = sweep.plan(exp)
    assert [r.status for r in again] == ["done", "done"]
    sweep.execute(exp, again, progress=False, poll_s=0.2)
    assert (Path(runs[0].dir) / "summary.json").stat().st_mtime == mtime


def test_failed_run_does_not_stop_others(tmp_path, tiny_corpus):
    path = write_experiment(tmp_path, tiny_corpus, body='[recipe_overrides."dqt-int8"]\n"train.device" = "cuda:99"\n')
    exp = sweep.load_experiment(path)
    runs = sweep.execute(exp, sweep.plan(exp), progress=False, poll_s=0.2)
    status = {r.recipe: (r.status, r.returncode) for r in runs}
    assert status["bf16"] == ("done", 0)
    assert status["dqt-int8"][0] == "failed" and status["dqt-int8"][1] != 0
    log = tmp_path / "out" / "logs" / "mini-d256__dqt-int8.log"
    assert "cuda:99" in log.read_text()


def test_cli_dry_run(tmp_path, tiny_corpus, capsys):
    from lowbit.cli import main

    path = write_experiment(tmp_path, tiny_corpus)
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "mini-d256/bf16" in out and "todo" in out
    assert not (tmp_path / "out" / "mini-d256").exists()
    assert main(["sweep", str(path), "--only", "nothing*"]) == 2


def test_time_limit_interrupts_and_resumes(tmp_path, tiny_corpus):
    """A run cut by the time limit is checkpointed (status resume) and the next sweep finishes it."""
    path = write_experiment(tmp_path, tiny_corpus, recipes=("bf16",), budget="tokens = [128000]",
                            body='[overrides]\n"train.ckpt_every" = 50\n')
    exp = sweep.load_experiment(path)
    runs = sweep.execute(exp, sweep.plan(exp), progress=False, poll_s=0.2, time_limit=8.0)
    assert runs[0].steps == 2000
    assert runs[0].status == "resume", runs[0]
    again = sweep.plan(exp)
    assert again[0].status == "resume"
    done = sweep.execute(exp, again, progress=False, poll_s=0.2)
    assert done[0].status == "done"
    assert json.loads((Path(done[0].dir) / "summary.json").read_text())["step"] == 2000


def test_visible_gpus_and_pick(monkeypatch):
    assert sweep.visible_gpus(None) == []
    assert sweep.visible_gpus("0, 2") == ["0", "2"]
    with pytest.raises(ValueError, match="comma list"):
        sweep.visible_gpus(",")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert sweep.visible_gpus("auto") == ["3", "5"]
    # least busy first, ties to the first listed
    assert sweep._pick_gpu(["0", "1"], []) == "0"
    assert sweep._pick_gpu(["0", "1"], ["0"]) == "1"
    assert sweep._pick_gpu(["0", "1"], ["0", "1", "1"]) == "0"
    assert sweep._pick_gpu([], ["0"]) is None


def test_execute_spreads_runs_over_gpus(tmp_path, tiny_corpus):
    exp = sweep.load_experiment(write_experiment(tmp_path, tiny_corpus))  # 2 runs, parallel 2, CPU device
    runs = sweep.execute(exp, sweep.plan(exp), progress=False, poll_s=0.2, gpus=["7", "9"])
    assert [r.status for r in runs] == ["done", "done"]
    logs = sorted((tmp_path / "out" / "logs").glob("*.log"))
    seen = sorted(line for log in logs for line in log.read_text().splitlines() if line.startswith("CUDA_VISIBLE"))
    assert seen == ["CUDA_VISIBLE_DEVICES=7", "CUDA_VISIBLE_DEVICES=9"]
