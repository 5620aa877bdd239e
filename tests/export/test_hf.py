"""Hugging Face export: the weights a plain LlamaForCausalLM must hold, logits through transformers itself,
transformers' BitNet packed layout, provenance, and the warnings/refusals for what a plain load cannot do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lowbit.cli import main  # noqa: E402
from lowbit.export import ExportError  # noqa: E402
from lowbit.export.hf import (  # noqa: E402
    effective_weight,
    eval_tokens,
    export_hf,
    export_hf_bitnet,
    pack_ternary_rows,
    unpack_ternary_rows,
    without_activation_quant,
)
from lowbit.runs import load_run  # noqa: E402

SMALL = {"model.dim": 64, "model.n_heads": 4, "model.ffn_dim": 128, "train.steps": 2, "train.eval_every": 0,
         "train.ckpt_every": 0}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus, tiny_dataset):
    """recipe → a run directory trained 2 steps (d=64, 2 layers), made on first use."""
    from lowbit.testing import tiny_run_config
    from lowbit.train.trainer import Trainer

    made: dict[str, Path] = {}

    def get(recipe: str) -> Path:
        if recipe not in made:
            out = tmp_path_factory.mktemp("run") / recipe
            cfg = tiny_run_config(out, tiny_corpus, tiny_dataset, **SMALL, **{"quant.recipe": recipe,
                                                                               "model.vocab_size": 512})
            Trainer(cfg).fit()
            made[recipe] = out
        return made[recipe]

    return get


@pytest.fixture
def bitnet_loading(monkeypatch):
    """transformers' BitNet quantizer refuses to load without ``accelerate`` (which it does not use on CPU)
    and wraps its kernels in torch.compile (minutes on 2 CPU cores): run them eagerly, without the check."""
    import importlib.util

    import transformers.quantizers.quantizer_bitnet as qb

    if importlib.util.find_spec("accelerate") is None:
        monkeypatch.setattr(qb, "is_accelerate_available", lambda: True)
    with torch._dynamo.config.patch(disable=True):
        yield


def hf_logits(out: Path, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    with torch.no_grad():
        return hf(ids).logits.float()


def lowbit_logits(run: Path, ids: torch.Tensor, act_quant: bool = True) -> torch.Tensor:
    model, _, _ = load_run(run)
    with torch.no_grad():
        if act_quant:
            return model.eval()(ids)
        with without_activation_quant(model):
            return model.eval()(ids)


# ---- the effective weight --------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["quest-w4a4", "quest-w4", "dqt-quest-w4a4", "lsq-w4a4", "bitnet-b1.58"])
def test_effective_weight_reproduces_the_layer_without_activation_quant(recipe):
    """QuEST quantizes W·H: a W·A layer multiplies Q(XH)·Q(WH)ᵀ, so without Q on X it is XH·Q(WH)ᵀ =
    X·(Q(WH)·H)ᵀ; the exported weight must be Q(WH)·H, not Q(WH)."""
    from lowbit.nn import quantize_
    from lowbit.quant import fake_quantize, get_recipe, hadamard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 32, bias=False))
    quantize_(model, recipe, targets=["0"], skip=[])
    layer = model[0]
    x = torch.randn(5, 128)
    with torch.no_grad():
        layer(x)  # LSQ: initialise the learned scales
        w_eff = effective_weight(layer)
        with without_activation_quant(model):
            y = layer(x)
        torch.testing.assert_close(y, x @ w_eff.t(), rtol=1e-5, atol=1e-5)
        spec = get_recipe(recipe).weight
        if spec.hadamard and "dqt" not in recipe:
            q_rot = fake_quantize(layer.weight, spec, rotated=True)  # Q(WH), the rotated-domain operand
            torch.testing.assert_close(hadamard(x) @ q_rot.t(), x @ w_eff.t(), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(q_rot, w_eff, atol=1e-3)  # Q(WH) itself would be wrong


# ---- BitNet packing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 1), (8, 5), (12, 7), (64, 33)])
def test_pack_matches_transformers(shape, bitnet_loading):
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    g = torch.Generator().manual_seed(shape[0])
    codes = torch.randint(-1, 2, shape, generator=g, dtype=torch.int8)
    packed = pack_ternary_rows(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0] // 4, shape[1])
    assert torch.equal(packed, pack_weights(codes.clone().float()))
    assert torch.equal(unpack_ternary_rows(packed), codes)
    assert torch.equal(unpack_weights(packed, torch.float32), codes.float())
    # rows are interleaved by quarters: byte [r, k] holds rows r, r + N/4, ...
    r = shape[0] // 4
    assert int(packed[0, 0]) == sum(int(codes[i * r, 0] + 1) << 2 * i for i in range(4))
    with pytest.raises(ValueError, match="divisible by 4"):
        pack_ternary_rows(torch.zeros(6, 3, dtype=torch.int8))


# ---- --format hf ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["quest-w4", "dqt-int8", "bitnet-b1.58"])
def test_hf_weights_match_through_transformers(recipe, runs, tmp_path):
    """Weight-only check: transformers' logits (float32 export) equal lowbit's with activations unquantized."""
    run = runs(recipe)
    r = export_hf(run, tmp_path / "hf", dtype="float32")
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hf_logits(r.out, ids), lowbit_logits(run, ids, act_quant=False),
                               rtol=1e-4, atol=1e-4)
    assert r.exact == (recipe == "quest-w4")
    if recipe == "quest-w4":  # weight-only: the whole model is reproduced
        assert r.logit_diff["max_abs_logit_diff"] < 1e-4 and not r.warnings
        torch.testing.assert_close(hf_logits(r.out, ids), lowbit_logits(run, ids), rtol=1e-4, atol=1e-4)


def test_hf_default_bf16_directory(runs, tmp_path):
    """The default export: BF16 weights, provenance in config.json and the safetensors metadata, a tokenizer
    AutoTokenizer loads offline with lowbit's ids, a generation config."""
    from safetensors import safe_open

    from lowbit.data import load_tokenizer

    run = runs("quest-w4")
    r = export_hf(run, tmp_path / "hf")
    cfg = json.loads((r.out / "config.json").read_text())
    assert cfg["lowbit"]["recipe"] == "quest-w4" and cfg["lowbit"]["step"] == 2
    assert cfg["lowbit"]["source_run"] == str(run.resolve()) and cfg["lowbit"]["version"]
    assert cfg["lowbit"]["logit_diff"]["max_abs_logit_diff"] < 0.05  # BF16 rounding of the weights only
    with safe_open(str(r.out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    assert meta["lowbit_recipe"] == "quest-w4" and meta["lowbit_step"] == "2"
    assert json.loads(meta["lowbit"])["source_run"] == str(run.resolve())
    hf = transformers.AutoModelForCausalLM.from_pretrained(r.out)
    assert hf.dtype == torch.bfloat16 and hf.config.lowbit["recipe"] == "quest-w4"
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        d = (hf(ids).logits.float() - lowbit_logits(run, ids)).abs().max()
    assert d < 0.1
    tok = transformers.AutoTokenizer.from_pretrained(r.out)
    ours = load_tokenizer(json.loads((run / "config.json").read_text())["data"]["dir"])
    text = "The quick brown fox, it said."
    assert tok(text).input_ids == ours.encode(text)
    assert tok.eos_token_id == ours.eos_id == hf.config.eos_token_id
    assert transformers.GenerationConfig.from_pretrained(r.out).eos_token_id == ours.eos_id


def test_hf_activation_quant_is_measured_warned_and_refused_with_strict(runs, tmp_path, capsys):
    run = runs("quest-w4a4")
    with pytest.raises(ExportError, match="--strict: quest-w4a4 quantizes layer inputs"):
        export_hf(run, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()
    r = export_hf(run, tmp_path / "hf", dtype="float32")
    assert not r.exact and "max |Δlogit|" in r.warnings[0] and "Hadamard" in r.warnings[0]
    stored = json.loads((r.out / "config.json").read_text())["lowbit"]["logit_diff"]
    assert stored == r.logit_diff and stored["max_abs_logit_diff"] > 0
    assert stored["weights_only_max_abs_logit_diff"] < 1e-4
    # the stored number is what transformers really does on those tokens
    cfg = load_run(run)[1]
    ids, _ = eval_tokens(cfg)
    real = (hf_logits(r.out, ids) - lowbit_logits(run, ids)).abs().max().item()
    assert real == pytest.approx(stored["max_abs_logit_diff"], rel=1e-3, abs=1e-4)
    # CLI: the warning with the numbers on stderr; --strict is exit 2
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "cli")]) == 0
    cap = capsys.readouterr()
    assert "warning" in cap.err and "max |Δlogit|" in cap.err and "wrote" in cap.out
    assert main(["export", str(run), "--format", "hf", "--strict", "--out", str(tmp_path / "s2")]) == 2
    assert "--strict" in capsys.readouterr().err


# ---- --format hf-bitnet ----------------------------------------------------------------------------------


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
@pytest.mark.parametrize("recipe", ["bitnet-b1.58", "dqt-ternary"])
def test_hf_bitnet_logits_through_transformers(recipe, linear_class, runs, tmp_path, bitnet_loading):
    """Loaded by transformers' own BitNet integration, the model (its 8-bit per-token activations included)
    reproduces lowbit's: a wrong scale or row layout would load silently but fail here."""
    run = runs(recipe)
    r = export_hf_bitnet(run, tmp_path / "bn", linear_class=linear_class, dtype="float32")
    cfg = json.loads((r.out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "bitnet" and q["linear_class"] == linear_class
    assert "lm_head" in q["modules_to_not_convert"]
    assert r.exact and not r.warnings and r.logit_diff["max_abs_logit_diff"] < 1e-3
    hf = transformers.AutoModelForCausalLM.from_pretrained(r.out, dtype=torch.float32).eval()
    layer = hf.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == ("BitLinear" if linear_class == "bitlinear" else "AutoBitLinear")
    assert type(hf.lm_head).__name__ == "Linear"
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf(ids).logits.float()
    torch.testing.assert_close(theirs, lowbit_logits(run, ids), rtol=1e-3, atol=1e-3)


def test_hf_bitnet_bf16_default(runs, tmp_path, bitnet_loading):
    run = runs("bitnet-b1.58")
    r = export_hf_bitnet(run, tmp_path / "bn")
    hf = transformers.AutoModelForCausalLM.from_pretrained(r.out).eval()
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert (hf(ids).logits.float() - lowbit_logits(run, ids)).abs().max() < 0.1


def test_hf_bitnet_refuses_non_ternary(runs, tmp_path, capsys):
    run = runs("quest-w4")
    with pytest.raises(ExportError, match="cannot be written as a BitNet ternary layer"):
        export_hf_bitnet(run, tmp_path / "bn")
    assert main(["export", str(run), "--format", "hf-bitnet", "--out", str(tmp_path / "bn")]) == 2
    assert "ternary" in capsys.readouterr().err
    assert not (tmp_path / "bn").exists()


def test_hf_bitnet_of_a_ternary_conversion(runs, tmp_path, bitnet_loading):
    from lowbit.convert import ternary_run

    tern = ternary_run(runs("dqt-int8"), tmp_path / "tern", batches=1, device="cpu")
    r = export_hf_bitnet(tern, tmp_path / "bn", dtype="float32")
    ids = torch.randint(0, 512, (2, 16))
    torch.testing.assert_close(hf_logits(r.out, ids), lowbit_logits(tern, ids), rtol=1e-3, atol=1e-3)


def test_gguf_choice_is_registered(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "lowbit.export.gguf", None)  # the module missing: a clear error, exit 2
    assert main(["export", "some-run", "--format", "gguf"]) == 2
    assert "--format gguf is not available" in capsys.readouterr().err
    monkeypatch.undo()
    gguf = pytest.importorskip("lowbit.export.gguf")
    seen = {}
    monkeypatch.setattr(gguf, "export_gguf", lambda run, out, **kw: seen.update(run=run, out=out) or {})
    assert main(["export", "some-run", "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert seen == {"run": "some-run", "out": str(tmp_path / "m.gguf")}
