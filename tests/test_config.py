import pytest

from lowbit.config import ConfigError, RunConfig, load_config, parse_override


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[model]\nsize = "tiny"\n[train]\nsteps = 7\nlr = 1e-3\n')
    cfg = load_config(p, ["train.batch_size=3", "steps=9", "data.source=a.txt,b.txt", "train.compile=true"])
    assert cfg.train.steps == 9 and cfg.train.batch_size == 3 and cfg.train.lr == 1e-3
    assert cfg.data.source == ["a.txt", "b.txt"]
    assert cfg.train.compile is True
    assert cfg.model.dim == 256  # filled from the size table


def test_round_trip_json():
    cfg = load_config(None, ["model.size=30m", "model.max_seq_len=512", "train.seq_len=512"])
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_override_parsing():
    assert parse_override("train.lr=3e-4") == ("train.lr", 3e-4)
    assert parse_override("quant.recipe=quest-w4a4") == ("quant.recipe", "quest-w4a4")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.lr")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "did you mean 'train.steps'"),
        ("trian.steps=3", "unknown config key 'trian'"),
        ("train.steps=abc", "must be an integer"),
        ("train.lr=-1", "must be > 0"),
        ("train.compile=maybe", "true or false"),
        ("train.schedule=cosin", "did you mean 'cosine'"),
        ("train.seq_len=4096", "exceeds model.max_seq_len"),
        ("data.source=[]", "data.source is empty"),
        ("model.size=31m", "not one of"),
        ("stepz=3", "needs its section"),
    ],
)
def test_bad_values_give_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_and_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps=3")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_repo_configs_parse():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))
    assert configs
    for c in configs:
        load_config(c)
