"""GGUF export: tiny runs of each grid → .gguf → read back with gguf's reader and reference dequantizer.

The expected weights are computed here independently of the exporter: the layer's own effective weight
(DQT: ``dequantized_weight``; QAT: ``fake_quantize`` of the latent weight) and llama.cpp's q/k row permutation
written as convert_hf_to_gguf.py writes it (reshape / swapaxes). The slow test runs llama.cpp itself
(``llama-cpp-python``) on the file and compares its logits with lowbit's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from lowbit.export.gguf import GGUFExportError, export_gguf, read_gguf_weights  # noqa: E402
from lowbit.testing import tiny_run_config  # noqa: E402

FP16_REL = 2.0**-11  # relative rounding error of an fp16 scale in its normal range


def make_run(tmp_path: Path, corpus: Path, data: Path, recipe: str, name: str | None = None, dim: int = 256,
             **over) -> tuple[Path, torch.nn.Module, object]:
    """A freshly initialised run directory (config + one checkpoint) of ``recipe``; norm gains randomised so
    a wrong norm tensor shows. dim=256 (and ffn 256) makes every row a multiple of the TQ block."""
    from lowbit.runs import build_model
    from lowbit.train import checkpoint as ckpt

    out = tmp_path / (name or recipe)
    base = {"model.vocab_size": 512, "quant.recipe": recipe}
    if dim != 32:
        base |= {"model.dim": dim, "model.ffn_dim": dim, "model.n_heads": 2}
    cfg = tiny_run_config(out, corpus, data, **(base | over))
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    out.mkdir(parents=True)
    ckpt.atomic_write_text(out / "config.json", cfg.to_json())
    ckpt.save_checkpoint(out, 1, model, None, {"config": cfg.to_dict(), "tokens_seen": 0})
    return out, model, cfg


def effective_weight(mod: torch.nn.Module) -> torch.Tensor:
    """What the layer multiplies with, in the original (un-rotated) domain, float32."""
    from lowbit.nn.direct import DirectModule
    from lowbit.nn.linear import QuantLinear
    from lowbit.quant import fake_quantize

    with torch.no_grad():
        if isinstance(mod, DirectModule):
            return mod.dequantized_weight() if mod.weight_values().dim() > 1 else mod.weight_values()
        if isinstance(mod, QuantLinear) and mod.weight_spec is not None:
            spec = mod.weight_spec
            scale = mod._scale("weight", mod.weight, spec) if spec.learned else None
            return fake_quantize(mod.weight, spec, scale=scale).float()
        return mod.weight.detach().float()


def row_step(mod: torch.nn.Module) -> np.ndarray:
    """The grid step Δ of a QAT layer's weight, per row (R, 1) or per tensor (1, 1)."""
    from lowbit.quant import quantize

    spec = mod.weight_spec
    scale = mod._scale("weight", mod.weight, spec) if spec.learned else None
    return quantize(mod.weight, spec, scale=scale)[1].numpy().reshape(-1, 1)


def hf_to_llamacpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
# llama.cpp name → lowbit module (the tiny runs have 2 layers)
SOURCES = {"token_embd.weight": "embed_tokens", "output_norm.weight": "norm", "output.weight": "lm_head"} | {
    f"blk.{i}.{g}.weight": f"layers.{i}.{h}" for i in range(2) for g, h in _NAMES.items()}


def expected_tensors(model: torch.nn.Module, cfg) -> dict[str, np.ndarray]:
    assert cfg.model.n_layers == 2
    mc = cfg.model
    res = {}
    for g, src in SOURCES.items():
        w = effective_weight(model.get_submodule(src)).numpy()
        if ".attn_q." in g:
            w = hf_to_llamacpp(w, mc.n_heads)
        elif ".attn_k." in g:
            w = hf_to_llamacpp(w, mc.n_kv_heads)
        res[g] = w
    return res


def check_against_lowbit(path: Path, model, cfg, report: dict, atol_steps: float = 0.0) -> None:
    """Every tensor gguf dequantizes equals lowbit's within the fp16 rounding of its scale (grid tensors) or of
    its values (F16), plus ``atol_steps`` grid steps (Q4_1's separately rounded offset)."""
    got = read_gguf_weights(path)
    want = expected_tensors(model, cfg)
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape, name
        t = report["tensors"][name]["type"]
        if t == "F32":
            np.testing.assert_array_equal(g, w, err_msg=name)
            continue
        step = row_step(model.get_submodule(SOURCES[name])) if t == "Q4_1" else np.zeros((1, 1))
        if ".attn_q." in name or ".attn_k." in name:  # rows in llama.cpp's order (a per-tensor Δ: no change)
            step = hf_to_llamacpp(np.broadcast_to(step, (w.shape[0], 1)).copy(),
                                  cfg.model.n_heads if ".attn_q." in name else cfg.model.n_kv_heads)
        bound = FP16_REL * 1.01 * np.abs(w) + atol_steps * step + 2.0**-24 * 128
        assert np.all(np.abs(g - w) <= bound), f"{name}: max error {np.abs(g - w).max()}"


# ----------------------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------------------

ROUND_TRIPS = [
    # recipe, overrides, GGUF type of the block projections
    ("bitnet-b1.58", {}, "TQ2_0"),
    ("dqt-ternary", {"dqt.quantize_embeddings": True}, "TQ2_0"),
    ("dqt-int8", {"model.n_kv_heads": 1}, "Q8_0"),
    ("dqt-int4", {"dqt.granularity": "row"}, "Q4_0"),
    ("dqt-ternary-group", {"dqt.granularity": "group", "dqt.group_size": 128}, "Q4_0"),  # groups < TQ's 256
    ("dqt-int2", {}, "Q4_0"),
    ("ste-w8a8", {}, "Q8_0"),
    ("ste-w3a8", {}, "Q4_0"),
    ("quest-noh-w4a4", {}, "Q4_1"),
    ("lsq-w4a4", {}, "Q4_1"),
    ("lsq-w2a8", {}, "Q4_0"),  # centered 2-bit: d = Δ/2, q = 2·code + 1 ∈ {−3, −1, 1, 3}
    ("quest-noh-w1a1", {}, "TQ2_0"),  # binary ±s = d·(±1) with d = s
]


@pytest.mark.parametrize("recipe,over,gtype", ROUND_TRIPS, ids=[r[0] for r in ROUND_TRIPS])
def test_round_trip_matches_lowbit(tmp_path, tiny_corpus, tiny_dataset, recipe, over, gtype):
    run, model, cfg = make_run(tmp_path, tiny_corpus, tiny_dataset, recipe.removesuffix("-group"), **over)
    out = tmp_path / "m.gguf"
    r = export_gguf(run, out, progress=False)
    blk = {e["type"] for n, e in r["tensors"].items() if n.startswith("blk.") and len(e["shape"]) == 2}
    assert blk == {gtype}
    assert r["exact"] and r["verified"] == len(r["tensors"])
    assert r["max_scale_rel_err"] <= FP16_REL * 1.01  # fp16 rounding of Δ, nothing else
    if over.get("dqt.quantize_embeddings"):
        assert r["tensors"]["token_embd.weight"]["type"] == gtype
        assert r["tensors"]["output.weight"]["type"] == gtype
    check_against_lowbit(out, model, cfg, r, atol_steps=7.5 * FP16_REL * 1.01 if gtype == "Q4_1" else 0.0)


def test_tq1_0(tmp_path, tiny_corpus, tiny_dataset):
    run, model, cfg = make_run(tmp_path, tiny_corpus, tiny_dataset, "bitnet-b1.58")
    r = export_gguf(run, tmp_path / "m.gguf", ternary_type="TQ1_0", progress=False)
    assert r["types"]["TQ1_0"] == 14
    check_against_lowbit(tmp_path / "m.gguf", model, cfg, r)
    # TQ1_0 (1.69 bits/weight) is smaller than TQ2_0 (2.06)
    r2 = export_gguf(run, tmp_path / "m2.gguf", progress=False)
    assert r["bytes"] < r2["bytes"]


def _set_exact_scales(model, step: float, codes_hook=None) -> None:
    from lowbit.nn.direct import DirectQuantLinear

    for _, m in model.named_modules():
        if isinstance(m, DirectQuantLinear):
            c = m.codes()
            if codes_hook is not None:
                c = codes_hook(c)
            m.set_codes(c, torch.full_like(m.weight_scale, step))


@pytest.mark.parametrize("recipe", ["dqt-int8", "dqt-int4", "dqt-ternary"])
def test_bit_exact_when_scales_are_fp16(tmp_path, tiny_corpus, tiny_dataset, recipe):
    """With Δ an fp16 number the file holds lowbit's weights bit for bit; Q8_0 keeps the code −128."""
    from lowbit.train import checkpoint as ckpt

    run, model, cfg = make_run(tmp_path, tiny_corpus, tiny_dataset, recipe)

    def hook(c):
        if recipe == "dqt-int8":
            c = c.clone()
            c[0, :5] = -128  # the bottom of the int_asym grid, outside Q8_0's reference quantizer's ±127
        return c

    _set_exact_scales(model, 2.0**-9, hook)
    ckpt.save_checkpoint(run, 2, model, None, {"config": cfg.to_dict(), "tokens_seen": 0})
    out = tmp_path / "m.gguf"
    r = export_gguf(run, out, progress=False)
    assert r["max_scale_rel_err"] == 0.0
    got, want = read_gguf_weights(out), expected_tensors(model, cfg)
    for name in want:
        if r["tensors"][name]["type"] not in ("F16",):
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    if recipe == "dqt-int8":
        q = hf_to_llamacpp(model.layers[0].self_attn.q_proj.codes().numpy(), cfg.model.n_heads)
        assert (q == -128).sum() >= 5  # absmean Δ = mean|W|/127 clips many weights to the ends of the grid
        np.testing.assert_array_equal(got["blk.0.attn_q.weight"][q == -128], -128 * 2.0**-9)


def test_q4_1_scale_pair():
    """Centered 4-bit as Q4_1: value = d·n + m must stand for (n − 7.5)·Δ; exact when Δ and 7.5·Δ are fp16
    numbers, else within the fp16 rounding of Δ plus half an ulp of 7.5·Δ."""
    from lowbit.export.gguf import _q41_scales

    d, m = _q41_scales(np.array([[2.0**-7, 3 * 2.0**-9]], np.float32), -7.5)
    assert d.tolist() == [[2.0**-7, 3 * 2.0**-9]] and m.tolist() == [[-7.5 * 2.0**-7, -7.5 * 3 * 2.0**-9]]
    s = np.random.default_rng(0).uniform(1e-4, 1e-1, size=(64, 4)).astype(np.float32)
    d, m = _q41_scales(s, -7.5)
    n = np.arange(16).reshape(16, 1, 1)
    err = np.abs(d.astype(np.float64) * n + m - (n - 7.5) * s.astype(np.float64))
    assert np.all(err <= (np.abs(n - 7.5) + 7.5) * s * 2.0**-11 * 1.01)


# ----------------------------------------------------------------------------------------------------------
# metadata and tokenizer
# ----------------------------------------------------------------------------------------------------------


def test_metadata_and_tokenizer(tmp_path, tiny_corpus, tiny_dataset):
    import gguf

    from lowbit import __version__
    from lowbit.data import load_tokenizer

    run, model, cfg = make_run(tmp_path, tiny_corpus, tiny_dataset, "bitnet-b1.58", **{"model.vocab_size": 600})
    out = tmp_path / "m.gguf"
    r = export_gguf(run, out, progress=False)
    rd = gguf.GGUFReader(str(out))

    def val(key):
        return rd.fields[key].contents()

    assert val("general.architecture") == "llama"
    assert val("llama.block_count") == cfg.model.n_layers
    assert val("llama.embedding_length") == 256
    assert val("llama.attention.head_count") == 2
    assert val("llama.rope.dimension_count") == 128
    assert val("lowbit.version") == __version__
    assert val("lowbit.recipe") == "bitnet-b1.58"
    assert "bitnet-b1.58" in val("lowbit.config")
    assert val("general.file_type") == int(gguf.LlamaFileType.MOSTLY_TQ2_0)
    tok = load_tokenizer(tiny_dataset)
    tokens, types = val("tokenizer.ggml.tokens"), val("tokenizer.ggml.token_type")
    assert val("tokenizer.ggml.model") == "gpt2" and val("tokenizer.ggml.pre") == "gpt-2"
    assert len(tokens) == len(types) == 600  # padded to the model's vocabulary
    assert tokens[tok.eos_id] == "<|endoftext|>" and types[tok.eos_id] == gguf.TokenType.CONTROL
    assert val("tokenizer.ggml.eos_token_id") == tok.eos_id == val("tokenizer.ggml.bos_token_id")
    assert tokens[599] == "[PAD599]" and types[599] == gguf.TokenType.UNUSED
    assert len(val("tokenizer.ggml.merges")) == tok.vocab_size - 257
    assert r["tokenizer"]["tokens"] == tok.vocab_size


# ----------------------------------------------------------------------------------------------------------
# what is refused, and the fallbacks
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["quest-w4a4", "quest-w4", "dqt-quest-w4a4", "quest-w1a1"])
def test_hadamard_recipes_refused(tmp_path, tiny_corpus, tiny_dataset, recipe):
    run, _, _ = make_run(tmp_path, tiny_corpus, tiny_dataset, recipe)
    with pytest.raises(GGUFExportError, match="Hadamard.*allow_dequantized"):
        export_gguf(run, tmp_path / "m.gguf", progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_hadamard_dequantized_on_request(tmp_path, tiny_corpus, tiny_dataset):
    run, model, cfg = make_run(tmp_path, tiny_corpus, tiny_dataset, "quest-w4a4")
    out = tmp_path / "m.gguf"
    r = export_gguf(run, out, allow_dequantized=True, float_type="F32", progress=False)
    assert not r["exact"] and r["warnings"] and "DEQUANTIZED" in r["warnings"][0]
    assert r["types"] == {"F32": len(r["tensors"])}
    check_against_lowbit(out, model, cfg, r)  # the effective weights Q(W·H)·H, exactly as F32


def test_unsupported_types_raise(tmp_path, tiny_corpus, tiny_dataset):
    run, _, _ = make_run(tmp_path, tiny_corpus, tiny_dataset, "dqt-int8")
    with pytest.raises(GGUFExportError, match="weight_type=Q4_0 cannot hold .*Q8_0"):
        export_gguf(run, tmp_path / "m.gguf", weight_type="Q4_0", progress=False)
    run, _, _ = make_run(tmp_path, tiny_corpus, tiny_dataset, "quest-noh-w4a4")
    with pytest.raises(GGUFExportError, match="odd multiples"):
        export_gguf(run, tmp_path / "m.gguf", weight_type="Q4_0", progress=False)
    run, _, _ = make_run(tmp_path, tiny_corpus, tiny_dataset, "quest-w1a1")
    with pytest.raises(GGUFExportError, match="Hadamard"):
        export_gguf(run, tmp_path / "m.gguf", weight_type="Q4_0", progress=False)
    run, _, _ = make_run(tmp_path, tiny_corpus, tiny_dataset, "bf16")
    with pytest.raises(GGUFExportError, match="does not re-quantize"):
        export_gguf(run, tmp_path / "m.gguf", weight_type="Q8_0", progress=False)
    with pytest.raises(GGUFExportError, match="ternary_type"):
        export_gguf(run, tmp_path / "m.gguf", ternary_type="Q2_K", progress=False)


def test_ternary_fallback_and_explicit_types(tmp_path, tiny_corpus, tiny_dataset):
    # d = 32: rows of 32 or 64 values, not a multiple of TQ's 256
    run, model, cfg = make_run(tmp_path, tiny_corpus, tiny_dataset, "bitnet-b1.58", dim=32)
    r = export_gguf(run, tmp_path / "m.gguf", progress=False)
    assert r["types"]["Q4_0"] == 14 and any("written as Q4_0" in n for n in r["notes"])
    check_against_lowbit(tmp_path / "m.gguf", model, cfg, r)
    with pytest.raises(GGUFExportError, match="not a multiple of TQ2_0's block of 256"):
        export_gguf(run, tmp_path / "m.gguf", weight_type="TQ2_0", progress=False)
    r = export_gguf(run, tmp_path / "m8.gguf", weight_type="Q8_0", progress=False)  # ternary fits Q8_0 too
    assert r["types"]["Q8_0"] == 14
    check_against_lowbit(tmp_path / "m8.gguf", model, cfg, r)


def test_missing_gguf_is_actionable(tmp_path, tiny_corpus, tiny_dataset, monkeypatch):
    run, _, _ = make_run(tmp_path, tiny_corpus, tiny_dataset, "dqt-int8", dim=32)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(GGUFExportError, match=r"pip install 'lowbit\[gguf\]'"):
        export_gguf(run, tmp_path / "m.gguf", progress=False)


# ----------------------------------------------------------------------------------------------------------
# llama.cpp itself
# ----------------------------------------------------------------------------------------------------------


def _qk_gain(model, c: float) -> None:
    """Sharpen attention (q, k scaled by c) so that a wrong q/k row order in the file changes llama.cpp's
    logits by ~1 instead of ~0.02 (random-init attention is almost uniform)."""
    for layer in model.layers:
        for mod in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            if hasattr(mod, "weight_codes"):
                mod.set_codes(mod.codes(), mod.weight_scale * c)
            else:
                mod.weight.data.mul_(c)


LLAMA_CPP_CASES = [
    # recipe, overrides, export options, max |Δlogit| allowed, compare with lowbit's activation quantizer on
    ("bitnet-b1.58", {}, {}, 0.05, True),
    ("bitnet-b1.58", {}, {"ternary_type": "TQ1_0"}, 0.05, True),
    ("dqt-int8", {"model.n_kv_heads": 1}, {}, 0.1, True),
    ("quest-noh-w4a4", {}, {"weight_type": "F32"}, 0.01, False),
]


@pytest.mark.slow
@pytest.mark.parametrize("recipe,over,opts,tol,act_quant", LLAMA_CPP_CASES,
                         ids=["tq2_0", "tq1_0", "q8_0-gqa", "f32-structure"])
def test_llama_cpp_logits(tmp_path, tiny_corpus, tiny_dataset, recipe, over, opts, tol, act_quant):
    """llama.cpp (llama-cpp-python, CPU) runs the exported file; its logits for 24 tokens match lowbit's.

    Measured (d = 256, 2 layers, logit std ≈ 0.33, q/k gain 6; llama.cpp 0.3.36 build): TQ2_0/TQ1_0 BitNet
    0.012 max |Δlogit| against lowbit's BitNet model — llama.cpp quantizes a TQ dot product's activations to
    Q8_K, int8 with one absmax scale per 256 values, which at d = 256 is BitNet's per-token 8-bit quantizer
    (0.028 against the model without it); Q8_0 DQT-int8 with GQA 0.017 (its activations: int8 per 32 values,
    finer than lowbit's per token); all-F32 weights 0.002 (the F16 KV cache). A wrong q/k row order gives 0.9.
    Tolerances: about 4× the measurement."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from lowbit.data import load_tokenizer
    from lowbit.train import checkpoint as ckpt

    run, model, cfg = make_run(tmp_path, tiny_corpus, tiny_dataset, recipe, **over)
    _qk_gain(model, 6.0)
    ckpt.save_checkpoint(run, 2, model, None, {"config": cfg.to_dict(), "tokens_seen": 0})
    out = tmp_path / "m.gguf"
    export_gguf(run, out, float_type="F32", progress=False, **opts)
    tok = load_tokenizer(tiny_dataset)
    text = "The quick brown fox jumps over the lazy dog. It was the best of times, it was"
    ids = ([tok.eos_id] + tok.encode(text))[:24]
    if not act_quant:  # the file holds no activation quantizer: compare with the weights-only model
        for mod in model.modules():
            if hasattr(mod, "act_spec"):
                mod.act_spec = None
    model.eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].float().numpy()
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=32, n_batch=32, logits_all=True, n_threads=1, verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    assert np.abs(got - ref).max() < tol
    # the embedded tokenizer is lowbit's: same ids, same text back, BOS = EOS = <|endoftext|>
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
    assert llm.detokenize(tok.encode(text)).decode() == text
    assert llm.token_bos() == llm.token_eos() == tok.eos_id


def test_cli(tmp_path, tiny_corpus, tiny_dataset, capsys):
    from lowbit.cli import main

    run, _, _ = make_run(tmp_path, tiny_corpus, tiny_dataset, "bitnet-b1.58")
    out = tmp_path / "b.gguf"
    assert main(["export", str(run), "--format", "gguf", "--out", str(out), "--ternary-type", "TQ1_0"]) == 0
    assert out.is_file() and "TQ1_0" in capsys.readouterr().out
    run, _, _ = make_run(tmp_path, tiny_corpus, tiny_dataset, "quest-w4a4")
    assert main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "q.gguf")]) == 2
    assert "allow_dequantized" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "q.gguf"),
                 "--allow-dequantized"]) == 0
    assert "DEQUANTIZED" in capsys.readouterr().out


def test_verification_catches_a_wrong_file(tmp_path, tiny_corpus, tiny_dataset, monkeypatch):
    """A packing bug (here: one code changed after the expected values were computed) is caught by the
    read-back, and the bad file is removed."""
    import lowbit.export.gguf as G

    run, _, _ = make_run(tmp_path, tiny_corpus, tiny_dataset, "dqt-int8", dim=32)
    real = G.pack_blocks

    def broken(w, gtype, gguf):
        raw, exp, d = real(w, gtype, gguf)
        raw = raw.copy()
        raw[0, 5] ^= 1
        return raw, exp, d

    monkeypatch.setattr(G, "pack_blocks", broken)
    with pytest.raises(GGUFExportError, match="reads back differently"):
        export_gguf(run, tmp_path / "m.gguf", progress=False)
    assert not (tmp_path / "m.gguf").exists()
