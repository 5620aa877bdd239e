"""`lowbit eval --tasks / --text` on a tiny trained run, and `lowbit report` of two runs."""

import json

import pytest

from lowbit.cli import main


def make_cfg(tmp_path, corpus, heldout, name="run", **over):
    from lowbit.config import load_config

    base = {
        "model.size": "tiny", "model.vocab_size": 320, "model.dim": 32, "model.n_layers": 2,
        "model.n_heads": 2, "model.ffn_dim": 64, "model.max_seq_len": 32,
        "data.source": [str(corpus)], "data.heldout": [str(heldout)], "data.dir": str(tmp_path / "data"),
        "train.steps": 6, "train.batch_size": 2, "train.seq_len": 32, "train.lr": 3e-3, "train.warmup": 2,
        "train.eval_every": 3, "train.eval_batches": 2, "train.ckpt_every": 6, "train.log_every": 1,
        "train.progress": False, "train.tensorboard": False, "train.out_dir": str(tmp_path / name),
    }
    base |= over
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in base.items()])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_corpus, tiny_heldout):
    from lowbit.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("runs")
    Trainer(make_cfg(tmp, tiny_corpus, tiny_heldout, "bf16")).fit()
    Trainer(make_cfg(tmp, tiny_corpus, tiny_heldout, "quest", **{"quant.recipe": "quest-w2a4"})).fit()
    return tmp / "bf16", tmp / "quest"


def test_eval_tasks_and_text(two_runs, tmp_path, tiny_heldout, capsys):
    run = two_runs[0]
    task = tmp_path / "mine.jsonl"
    task.write_text("".join(json.dumps({"ctx": "The king", "endings": ["sees", "see", "seen"], "label": 0}) + "\n"
                            for _ in range(4)))
    out = tmp_path / "r.json"
    assert main(["eval", str(run), "--tasks", f"cloze,nextsent,{task}", "--limit", "20", "--json", str(out),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "cloze" in printed and "nextsent" in printed and "mine" in printed
    res = json.loads(out.read_text())["tasks"]
    assert set(res) == {"cloze", "nextsent", "mine"}
    assert res["nextsent"]["n"] + res["nextsent"]["skipped"] == 20 and 0 <= res["nextsent"]["acc"] <= 1
    assert res["mine"]["n"] == 4
    assert res["cloze"]["kind"] == "cloze" and res["cloze"]["target_logprob"] < 0
    assert "val" not in json.loads(out.read_text())  # --tasks alone skips the token splits
    saved = json.loads((run / "tasks.json").read_text())
    assert set(saved) == {"cloze", "nextsent", "mine"}
    cached = list((tmp_path.parent).glob("**/tasks/cloze-*.jsonl")) or list(run.parent.glob("data/tasks/*.jsonl"))
    assert cached
    # the cached build is reused: same numbers
    assert main(["eval", str(run), "--tasks", "nextsent", "--limit", "20", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["tasks"]["nextsent"]["acc"] == res["nextsent"]["acc"]

    text = next(tiny_heldout.glob("*.txt"))
    assert main(["eval", str(run), "--text", str(text), "--stride", "16", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["text"]
    assert 0 < r["bpb"] < 8 and r["stride"] == 16 and r["tokens"] > 100


def test_eval_unknown_task_is_clear_error(two_runs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    assert main(["eval", str(two_runs[0]), "--tasks", str(bad)]) == 2
    assert "unknown task shape" in capsys.readouterr().err
    assert main(["eval", str(two_runs[0]), "--tasks", "nosuch"]) == 2


def test_report_two_runs(two_runs, tmp_path, capsys):
    a, b = two_runs
    (a / "tasks.json").write_text(json.dumps({"nextsent": {"kind": "mc", "acc": 0.3, "acc_norm": 0.35, "n": 9}}))
    out = tmp_path / "rep"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "nextsent" in md and "0.3500" in md
    assert "w_bits" in md and "| 16.0000 |" in md and "| 2.0000 |" in md  # bf16 and quest-w2a4 weights
    for png in ("loss.png", "pareto.png", "diagnostics.png"):
        assert (out / png).stat().st_size > 5000, png
        assert f"({png})" in md
