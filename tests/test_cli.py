"""The command line: listings work, and bad input is one clear error (exit 2) that overwrites nothing."""

import pytest

from lowbit.cli import main


def test_sizes_and_config(capsys):
    assert main(["sizes"]) == 0
    out = capsys.readouterr().out
    assert "130m" in out and "430m" in out
    assert main(["config", "train.steps=5"]) == 0
    assert '"steps": 5' in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "train.stepz=1"], "did you mean 'train.steps'"),
        (["train", "train.steps=x"], "must be an integer"),
        (["train", "--config", "nope.toml"], "config file not found"),
        (["eval", "no-such-run"], "not a run directory"),
        (["report", "no-such-run"], "not run directories"),
    ],
)
def test_bad_input_is_one_clear_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_missing_corpus(tmp_path, capsys):
    rc = main(["train", f"data.source={tmp_path / 'missing.txt'}", "data.heldout=[]",
               f"data.dir={tmp_path / 'd'}", f"train.out_dir={tmp_path / 'r'}", "train.progress=false"])
    assert rc == 2
    assert "missing.txt" in capsys.readouterr().err


def test_empty_corpus(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    rc = main(["train", f"data.source={empty}", "data.heldout=[]", f"data.dir={tmp_path / 'd'}",
               f"train.out_dir={tmp_path / 'r'}", "train.progress=false"])
    assert rc == 2
    assert "empty" in capsys.readouterr().err.lower()
