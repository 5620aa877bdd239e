import json

import pytest
import torch

from lowbit.config import ModelConfig, TrainConfig
from lowbit.models.llama import Llama
from lowbit.train import checkpoint as ckpt
from lowbit.train.optim import build_optimizer


def tiny(**kw):
    return Llama(ModelConfig(**(dict(size="tiny", vocab_size=64, dim=32, n_layers=1, n_heads=2, ffn_dim=64,
                                     max_seq_len=8) | kw)))


def trained_pair():
    torch.manual_seed(0)
    m = tiny()
    opt = build_optimizer(m, TrainConfig(), torch.device("cpu"))
    x = torch.randint(0, 64, (2, 8))
    m(x, x).backward()
    opt.step()
    return m, opt


def test_round_trip(tmp_path):
    m, opt = trained_pair()
    ckpt.save_checkpoint(tmp_path, 5, m, opt, {"data": {"epoch": 1, "pos": 3}})
    m2 = tiny()
    opt2 = build_optimizer(m2, TrainConfig(), torch.device("cpu"))
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), m2, opt2)
    assert state["step"] == 5 and state["data"] == {"epoch": 1, "pos": 3}
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for i in s1:
        for k in s1[i]:
            assert torch.equal(torch.as_tensor(s1[i][k]), torch.as_tensor(s2[i][k]))
    # no pickle anywhere: only safetensors and JSON
    files = {p.name for p in ckpt.latest_checkpoint(tmp_path).iterdir()}
    assert files == {"model.safetensors", "optim.safetensors", "rng.safetensors", "state.json"}


def test_rng_restored(tmp_path):
    m, opt = trained_pair()
    torch.manual_seed(123)
    ckpt.save_checkpoint(tmp_path, 1, m, opt, {})
    expected = torch.rand(4)
    torch.manual_seed(0)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), m, opt)
    assert torch.equal(torch.rand(4), expected)


def test_keep_prunes_old(tmp_path):
    m, opt = trained_pair()
    for s in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, s, m, opt, {}, keep=2)
    names = sorted(p.name for p in (tmp_path / "ckpt").glob("step_*"))
    assert names == ["step_0000002", "step_0000003"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000003"


def test_killed_save_leaves_previous_usable(tmp_path, monkeypatch):
    m, opt = trained_pair()
    ckpt.save_checkpoint(tmp_path, 1, m, opt, {})
    calls = {"n": 0}
    real = ckpt._save_tensors

    def dying(tensors, path):  # the process "dies" in the middle of writing the second file
        calls["n"] += 1
        if calls["n"] == 2:
            path.write_bytes(b"\x00" * 10)
            raise KeyboardInterrupt
        real(tensors, path)

    monkeypatch.setattr(ckpt, "_save_tensors", dying)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, m, opt, {})
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_0000001"
    m2 = tiny()
    ckpt.load_checkpoint(latest, m2, None)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values(), strict=True))


def test_truncated_file_is_a_clear_error(tmp_path):
    m, opt = trained_pair()
    path = ckpt.save_checkpoint(tmp_path, 1, m, opt, {})
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        ckpt.load_checkpoint(path, tiny(), None)
    # also when the size record is gone: safetensors' own header check catches it
    state = json.loads((path / "state.json").read_text())
    state["file_sizes"] = {}
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        ckpt.load_checkpoint(path, tiny(), None)
    (path / "state.json").write_text("{\"format_ver")
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        ckpt.load_checkpoint(path, tiny(), None)


def test_other_model_config_is_a_clear_error(tmp_path):
    m, opt = trained_pair()
    path = ckpt.save_checkpoint(tmp_path, 1, m, opt, {})
    with pytest.raises(ckpt.CheckpointError, match="another model shape"):
        ckpt.load_checkpoint(path, tiny(dim=64, n_heads=4), None)
    with pytest.raises(ckpt.CheckpointError, match="does not fit"):
        ckpt.load_checkpoint(path, tiny(n_layers=2), None)


def test_tied_weights_stored_once(tmp_path):
    m = tiny(tie_embeddings=True)
    path = ckpt.save_checkpoint(tmp_path, 1, m, None, {})
    m2 = tiny(tie_embeddings=True)
    ckpt.load_checkpoint(path, m2, None)
    assert m2.lm_head.weight is m2.embed_tokens.weight
    assert torch.equal(m2.embed_tokens.weight, m.embed_tokens.weight)
