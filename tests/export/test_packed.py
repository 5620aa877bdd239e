"""The packed inference format: a packed model computes what the fake-quant run computes, the metadata says what
the bytes are, bad files are one clear error, and the CLI converts and generates end to end."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.cli import main
from lowbit.export.packed import (
    FORMAT_NAME,
    FORMAT_VERSION,
    META_KEY,
    PackedFormatError,
    PackedLinear,
    convert_packed,
    is_packed,
    load_packed,
    pack_model,
    packed_linear_from,
    packed_modules,
    read_metadata,
    save_packed,
)
from lowbit.quant import QuantSpec

RECIPES = ["quest-w4a4", "quest-w4", "bitnet-b1.58", "dqt-int8", "dqt-ternary", "ste-w4a4"]


@pytest.fixture(autouse=True)
def _keep_global_rng():
    with torch.random.fork_rng():
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus):
    """One tiny run per recipe (d = 128 so that Hadamard-128 applies), trained 2 steps on CPU."""
    from lowbit.testing import tiny_run_config
    from lowbit.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("packed_runs")
    out = {}
    for recipe in RECIPES + ["bf16"]:
        cfg = tiny_run_config(tmp / recipe, tiny_corpus, tmp / "data", **{
            "quant.recipe": recipe, "model.dim": 128, "model.n_heads": 2, "model.ffn_dim": 256,
            "train.steps": 2, "train.eval_every": 2, "train.ckpt_every": 2, "train.eval_batches": 1})
        Trainer(cfg).fit()
        out[recipe] = tmp / recipe
    return out


def _logits(model, seed=0, vocab=320, shape=(2, 24)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, shape, generator=g)
    with torch.no_grad():
        return model.eval()(x)


# ---- parity with the fake-quant model ------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_packed_logits_match_fake_quant(recipe, runs, tmp_path):
    from lowbit.runs import load_run

    ref, cfg, _ = load_run(runs[recipe])
    formats = ["2bit", "base3"] if recipe in ("bitnet-b1.58", "dqt-ternary") else ["2bit"]
    for tf in formats:
        r = convert_packed(runs[recipe], tmp_path / tf, ternary_format=tf, float_dtype="fp32")
        model, meta = load_packed(r["out"])
        assert len(packed_modules(model)) == 14 == r["layers"]  # 7 projections × 2 layers
        assert all(t.device.type == "cpu" for t in model.state_dict().values())
        a, b = _logits(ref), _logits(model)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert meta["recipe"] == recipe and meta["ternary_format"] == tf
        assert meta["source_run"] == str(runs[recipe]) and meta["source_step"] == 2
    # bf16 embeddings / norms / lm_head (the default): the fake-quant model with those rounded to bf16
    r = convert_packed(runs[recipe], tmp_path / "bf16")
    model, _ = load_packed(r["out"])
    assert model.embed_tokens.weight.dtype == torch.float32  # stored bf16, loaded as float32
    with torch.no_grad():
        for key in ("embed_tokens.weight", "lm_head.weight", "norm.weight", "layers.1.input_layernorm.weight"):
            t = ref.get_parameter(key)
            t.copy_(t.bfloat16().float())
        for layer in ref.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(norm.weight.bfloat16().float())
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", RECIPES + ["bf16"])
def test_fused_projections_compute_the_same_logits(recipe, runs, tmp_path):
    # q/k/v and gate/up concatenated into one layer each (packed codes, or plain nn.Linear for the bf16 run's
    # float model): the same logits, two fused layers per block, the separate projections gone
    from lowbit.models.llama import fuse_projections
    from lowbit.runs import load_run

    if recipe == "bf16":
        model = load_run(runs[recipe])[0]
    else:
        model = load_packed(convert_packed(runs[recipe], tmp_path / "p", float_dtype="fp32")["out"])[0]
    before = _logits(model)
    assert fuse_projections(model) == 4 and fuse_projections(model) == 0  # 2 blocks × (qkv, gate_up); idempotent
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "up_proj")
    assert type(attn.qkv_proj) is (torch.nn.Linear if recipe == "bf16" else PackedLinear)
    assert attn.qkv_proj.out_features == 3 * 128 and mlp.gate_up_proj.out_features == 2 * 256
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)
    if recipe == "bitnet-b1.58":  # per-tensor steps of three tensors: one step per row of the fused layer
        assert attn.qkv_proj.weight_spec.granularity == "row" and attn.qkv_proj.scale.shape == (384, 1)


def test_concat_refuses_what_differs():
    from lowbit.nn.fuse import concat_linears

    a = PackedLinear(64, 8, weight_spec=SPECS[1], act_spec=None)
    b = PackedLinear(64, 8, weight_spec=SPECS[1], act_spec=QuantSpec(8, "int_asym", "absmax", "row"))
    c = PackedLinear(32, 8, weight_spec=SPECS[1], act_spec=None)
    assert concat_linears([a, b]) is None and concat_linears([a, c]) is None
    assert concat_linears([a, torch.nn.Linear(64, 8)]) is None
    assert concat_linears([torch.nn.Linear(64, 8), torch.nn.Linear(64, 8, bias=False)]) is None
    ab = concat_linears([a, a])
    assert isinstance(ab, PackedLinear) and ab.out_features == 16 and torch.equal(ab.codes, torch.cat([a.codes] * 2))


def test_weights_and_codes_are_the_trained_ones(runs, tmp_path):
    from lowbit.nn.direct import DirectQuantLinear
    from lowbit.runs import load_run

    ref, _, _ = load_run(runs["dqt-ternary"])
    model, _ = load_packed(convert_packed(runs["dqt-ternary"], tmp_path / "t", ternary_format="base3")["out"])
    for name, m in packed_modules(model):
        src = ref.get_submodule(name)
        assert isinstance(src, DirectQuantLinear) and m.storage == "base3"
        assert torch.equal(m.weight_codes(), src.codes())  # the DQT codes themselves, bit for bit
        assert torch.equal(m.scale, src.weight_scale)
    # QuEST weight-only: codes of W·H; rotated back they are the fake-quant weight
    from lowbit.quant import fake_quantize

    ref, _, _ = load_run(runs["quest-w4"])
    model, _ = load_packed(convert_packed(runs["quest-w4"], tmp_path / "q")["out"])
    name, m = packed_modules(model)[0]
    src = ref.get_submodule(name)
    torch.testing.assert_close(m.dequantized_weight(), fake_quantize(src.weight.detach(), src.weight_spec),
                               rtol=0, atol=1e-6)


def test_metadata_describes_every_layer(runs, tmp_path):
    r = convert_packed(runs["quest-w4a4"], tmp_path / "q")
    meta = read_metadata(r["out"])
    assert meta["format"] == FORMAT_NAME and meta["version"] == FORMAT_VERSION
    assert meta["float_dtype"] == "bf16" and meta["model"]["dim"] == 128 and "lowbit_version" in meta
    lm = meta["layers"]["layers.0.self_attn.q_proj"]
    assert lm["storage"] == "4bit" and lm["bits"] == 4 and lm["grid"] == "centered"
    assert (lm["qmin"], lm["levels"], lm["offset"]) == (-8, 16, 0.5)
    assert lm["rotated"] and lm["hadamard_block"] == 128 and lm["act_rotation"] == "shared"
    assert lm["scale_granularity"] == "row" and lm["act_spec"]["bits"] == 4
    assert read_metadata(convert_packed(runs["quest-w4"], tmp_path / "w")["out"])["layers"][
        "layers.1.mlp.down_proj"]["act_rotation"] == "online"  # weight-only QuEST: x rotated, not quantized
    b = read_metadata(convert_packed(runs["bitnet-b1.58"], tmp_path / "b")["out"])["layers"]["layers.0.mlp.up_proj"]
    assert (b["storage"], b["grid"], b["qmin"], b["levels"], b["scale_granularity"]) == (
        "2bit", "ternary", -1, 3, "tensor")
    assert b["act_rotation"] == "none" and b["act_spec"]["grid"] == "int_asym" and b["act_spec"]["bits"] == 8


def test_sizes(runs, tmp_path):
    two = convert_packed(runs["bitnet-b1.58"], tmp_path / "2")
    three = convert_packed(runs["bitnet-b1.58"], tmp_path / "3", ternary_format="base3")
    int8 = convert_packed(runs["dqt-int8"], tmp_path / "8")
    assert three["bytes"] < two["bytes"] < int8["bytes"] < two["bf16_bytes"] < two["source_bytes"]
    # per layer: q, k, v, o, gate, up have K = 128 (1024 rows), down K = 256 (128 rows); a row is ceil(K/4) bytes
    # (2bit) or ceil(K/5) (base3); the rest of the file differs only by the JSON header
    saved = 2 * (1024 * (128 // 4 - -(-128 // 5)) + 128 * (256 // 4 - -(-256 // 5)))
    assert two["bytes"] - three["bytes"] == pytest.approx(saved, abs=100)


# ---- the layer on its own, every storage --------------------------------------------------------------------

SPECS = [
    QuantSpec(1, "binary", "absmean", "row"),
    QuantSpec(1.58, "ternary", "absmean", "tensor"),
    QuantSpec(2, "int_asym", "absmean", "group", group_size=32),
    QuantSpec(3, "int", "absmax", "row"),
    QuantSpec(4, "centered", "rms", "row", hadamard=True, hadamard_block=64),
    QuantSpec(8, "int_asym", "absmax", "group", group_size=16),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
@pytest.mark.parametrize("act", [None, QuantSpec(8, "int_asym", "absmax", "row"),
                                 QuantSpec(4, "centered", "rms", "row", hadamard=True, hadamard_block=64)],
                         ids=["a16", "a8", "quest-a4"])
def test_packed_linear_matches_quant_linear(spec, act):
    from lowbit.nn.linear import QuantLinear

    torch.manual_seed(0)
    ql = QuantLinear(192, 40, bias=True, weight_spec=spec, act_spec=act).eval()
    formats = ["2bit", "base3"] if spec.info.levels == 3 else ["2bit"]
    x = torch.randn(3, 5, 192)
    for tf in formats:
        pl = packed_linear_from(ql, tf)
        assert isinstance(pl, PackedLinear)
        with torch.no_grad():
            torch.testing.assert_close(pl(x), ql(x), rtol=1e-5, atol=1e-5)


def test_kernel_hook_replaces_the_torch_path():
    from lowbit.nn.linear import QuantLinear

    ql = QuantLinear(64, 8, bias=False, weight_spec=SPECS[1], act_spec=None)
    pl = packed_linear_from(ql)
    calls = []
    pl.kernel = lambda mod, x: calls.append(x.shape) or mod.reference_forward(x) + 1
    x = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(pl(x), ql(x) + 1)
    assert calls == [(2, 64)]


def test_tied_embeddings_are_stored_once_and_retied(tmp_path):
    from lowbit.config import ModelConfig
    from lowbit.models.llama import Llama
    from lowbit.nn import quantize_

    torch.manual_seed(0)
    model = quantize_(Llama(ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=2, ffn_dim=128,
                                        max_seq_len=16, tie_embeddings=True)), "bitnet-b1.58")
    tensors, meta = pack_model(model, float_dtype="fp32")
    assert "lm_head.weight" not in tensors and "embed_tokens.weight" in tensors
    save_packed(tensors, meta, tmp_path / "model.safetensors")
    loaded, _ = load_packed(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    torch.testing.assert_close(_logits(loaded, vocab=64, shape=(1, 8)), _logits(model, vocab=64, shape=(1, 8)))


# ---- errors --------------------------------------------------------------------------------------------------


def _rewrite_meta(src, dst, fn):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    md = fn(meta)
    save_file(load_file(str(src)), str(dst), metadata=None if md is None else {META_KEY: json.dumps(md)})


def test_bad_files_are_clear_errors(runs, tmp_path):
    r = convert_packed(runs["bitnet-b1.58"], tmp_path / "ok")
    f = r["file"]
    (tmp_path / "v2").mkdir()
    _rewrite_meta(f, tmp_path / "v2" / "model.safetensors", lambda m: m | {"version": 2})
    with pytest.raises(PackedFormatError, match="version 2 is not supported"):
        load_packed(tmp_path / "v2")
    _rewrite_meta(f, tmp_path / "other.safetensors", lambda m: m | {"format": "gguf"})
    with pytest.raises(PackedFormatError, match="is not 'lowbit-packed'"):
        load_packed(tmp_path / "other.safetensors")
    _rewrite_meta(f, tmp_path / "none.safetensors", lambda m: None)
    assert not is_packed(tmp_path / "none.safetensors") and is_packed(f)
    with pytest.raises(PackedFormatError, match="no 'lowbit' metadata"):
        load_packed(tmp_path / "none.safetensors")
    bad_layer = lambda m: m | {"layers": m["layers"] | {"layers.0.mlp.up_proj": m["layers"]["layers.0.mlp.up_proj"]
                                                          | {"levels": 16}}}
    _rewrite_meta(f, tmp_path / "lv.safetensors", bad_layer)
    with pytest.raises(PackedFormatError, match="contradict"):
        load_packed(tmp_path / "lv.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PackedFormatError, match="not a readable"):
        load_packed(tmp_path / "junk.safetensors")
    with pytest.raises(PackedFormatError, match="bf16 run"):
        convert_packed(runs["bf16"], tmp_path / "bf")


def test_cli_errors_exit_2(runs, tmp_path, capsys):
    assert main(["convert", str(runs["bf16"]), "--to", "packed", "--out", str(tmp_path / "x")]) == 2
    assert "no low-bit weights" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "a"]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    r = convert_packed(runs["bitnet-b1.58"], tmp_path / "ok")
    (tmp_path / "v9").mkdir()
    _rewrite_meta(r["file"], tmp_path / "v9" / "model.safetensors", lambda m: m | {"version": 9})
    assert main(["generate", str(tmp_path / "v9"), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert "version 9" in err and "Traceback" not in err


# ---- CLI end to end ------------------------------------------------------------------------------------------


def test_cli_convert_and_generate(runs, tmp_path, capsys):
    run = str(runs["quest-w4a4"])
    out = tmp_path / "packed"
    assert main(["convert", run, "--to", "packed", "--float-dtype", "fp32", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "14 packed linears" in text and "as a bf16 checkpoint" in text and "MiB on disk" in text
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    args = ["--prompt", "The old", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(["generate", str(out), *args]) == 0
    from_packed = capsys.readouterr().out
    assert main(["generate", run, *args]) == 0
    from_run = capsys.readouterr().out
    assert from_packed == from_run and len(from_packed.strip()) > 0  # greedy: same tokens from both
    sampled = ["generate", str(out), "--prompt", "The", "--max-new-tokens", "8", "--seed", "3", "--echo"]
    assert main(sampled) == 0
    first = capsys.readouterr().out
    assert main(sampled) == 0
    assert capsys.readouterr().out == first and first.startswith("The")
