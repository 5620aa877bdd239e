"""``model.init = "hf:PATH"`` / ``lowbit train --init hf:PATH``: architecture and tokenizer from a local Hugging
Face Llama, its weights under the recipe, and back out with ``lowbit export --format hf``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lowbit.config import ConfigError, load_config  # noqa: E402

TRAIN = {"train.steps": 2, "train.batch_size": 2, "train.seq_len": 32, "train.eval_every": 0,
         "train.ckpt_every": 0, "train.eval_batches": 1, "train.progress": False, "train.tensorboard": False,
         "model.max_seq_len": 32, "data.heldout": []}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_dataset) -> Path:
    """A tiny random LlamaForCausalLM (d=64, 2 layers, GQA, RoPE θ 5e5, ε 1e-6) saved with save_pretrained,
    with lowbit's 512-token BPE as its tokenizer (tokenizer.json + tokenizer_config.json)."""
    d = tmp_path_factory.mktemp("hf_llama")
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-6, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_dataset / "tokenizer.json"),
                                               eos_token="<|endoftext|>")
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_data") / "data"


def overrides(hf_dir: Path, out: Path, corpus: Path, data: Path, **over) -> list[str]:
    base = TRAIN | {"model.init": f"hf:{hf_dir}", "data.source": [str(corpus)], "data.dir": str(data),
                    "train.out_dir": str(out)} | over
    return [f"{k}={json.dumps(v)}" for k, v in base.items()]


def hf_model(hf_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def test_config_takes_architecture_and_tokenizer(hf_dir, tmp_path, tiny_corpus, data_dir):
    cfg = load_config(None, overrides(hf_dir, tmp_path / "run", tiny_corpus, data_dir))
    m = cfg.model
    assert (m.vocab_size, m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim) == (512, 64, 2, 4, 2, 128)
    assert (m.rope_theta, m.norm_eps, m.tie_embeddings, m.max_seq_len) == (500000.0, 1e-6, False, 32)
    assert cfg.data.tokenizer == str(hf_dir / "tokenizer.json") and m.init == f"hf:{hf_dir}"
    # the resolved config is self-contained: read back without the checkpoint directory
    from lowbit.config import RunConfig

    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    # an explicit field that agrees is fine; one that conflicts is a clear error
    load_config(None, overrides(hf_dir, tmp_path / "run", tiny_corpus, data_dir, **{"model.dim": 64}))
    with pytest.raises(ConfigError, match=r"model.dim=128 \(the checkpoint has 64\)"):
        load_config(None, overrides(hf_dir, tmp_path / "run", tiny_corpus, data_dir, **{"model.dim": 128}))
    with pytest.raises(ConfigError, match="model.n_kv_heads=4"):
        load_config(None, overrides(hf_dir, tmp_path / "run", tiny_corpus, data_dir, **{"model.n_kv_heads": 4}))
    with pytest.raises(ConfigError, match="data.tokenizer='bpe'"):
        load_config(None, overrides(hf_dir, tmp_path / "run", tiny_corpus, data_dir, **{"data.tokenizer": "bpe"}))
    with pytest.raises(ConfigError, match="expected \"hf:PATH\""):
        load_config(None, ["model.init=llama"])
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(None, [f"model.init=\"hf:{tmp_path / 'nope'}\""])


def test_unsupported_checkpoints_are_refused(hf_dir, tmp_path):
    d = tmp_path / "scaled"
    shutil.copytree(hf_dir, d)
    c = json.loads((d / "config.json").read_text())
    c["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(ConfigError, match="RoPE scaling"):
        load_config(None, [f"model.init=\"hf:{d}\""])
    c["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    c["attention_bias"] = True
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(ConfigError, match="attention_bias"):
        load_config(None, [f"model.init=\"hf:{d}\""])


def test_step0_logits_equal_the_checkpoint(hf_dir, tmp_path, tiny_corpus, data_dir):
    from lowbit.train.trainer import Trainer

    cfg = load_config(None, overrides(hf_dir, tmp_path / "run", tiny_corpus, data_dir))
    tr = Trainer(cfg)
    tr._setup()  # data prepared with the checkpoint's tokenizer, model built with its weights
    manifest = json.loads((Path(cfg.data.dir) / "manifest.json").read_text())
    from lowbit.data import Tokenizer

    assert manifest["tokenizer"]["sha256"] == Tokenizer.load(hf_dir / "tokenizer.json").sha256
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(tr.model.eval()(ids), hf_model(hf_dir)(ids).logits, rtol=1e-4, atol=1e-4)
    tr.logger.close()


@pytest.mark.parametrize("recipe", ["quest-w4", "dqt-int8"])
def test_train_from_checkpoint_and_export_back(recipe, hf_dir, tmp_path, tiny_corpus, data_dir, capsys):
    """QAT quantizes the loaded weights, DQT converts them to codes; a few steps later the run exports back to
    a LlamaForCausalLM that transformers loads, with lowbit's logits and the checkpoint's tokenizer."""
    from lowbit.cli import main
    from lowbit.export.hf import without_activation_quant
    from lowbit.quant import get_recipe, quantize
    from lowbit.runs import build_model, load_run

    run = tmp_path / "run"
    ov = overrides(hf_dir, run, tiny_corpus, data_dir, **{"quant.recipe": recipe})
    ov = [o for o in ov if not o.startswith("model.init=")]
    # the recipe is applied to the loaded weights (step 0)
    cfg = load_config(None, ov + [f"model.init={json.dumps(f'hf:{hf_dir}')}"])
    q = build_model(cfg, init_weights=True).layers[1].mlp.down_proj
    w_hf = hf_model(hf_dir).model.layers[1].mlp.down_proj.weight.detach()
    spec = get_recipe(recipe).weight
    if get_recipe(recipe).direct:
        assert torch.equal(q.codes(), quantize(w_hf, spec)[0])
    else:
        assert torch.equal(q.weight.detach(), w_hf)
    # train through the CLI's --init
    assert main(["train", "--init", f"hf:{hf_dir}", *ov]) == 0
    stored = json.loads((run / "config.json").read_text())
    assert stored["model"]["init"] == f"hf:{hf_dir}" and stored["model"]["dim"] == 64
    assert main(["export", str(run), "--format", "hf", "--dtype", "float32", "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    hf = hf_model(tmp_path / "hf")
    model, _, state = load_run(run)
    assert state["step"] == 2
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), without_activation_quant(model):
        torch.testing.assert_close(hf(ids).logits, model.eval()(ids), rtol=1e-4, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("a test").input_ids == transformers.AutoTokenizer.from_pretrained(hf_dir)("a test").input_ids
