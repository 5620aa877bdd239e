"""lowbit.kernels.packed_prefill: the prefill GEMM of packed layers equals PackedLinear.reference_forward (CPU, the
kernels' torch references), the Triton kernels in the interpreter (a child process), real shapes on the GPU, and
the combined decode/prefill hook in a packed model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lowbit.kernels import packed_prefill as pp
from lowbit.testing import run_interpreted_tests

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'lowbit[triton]')")

RECIPES = ["quest-w4a4", "quest-w2a2", "bitnet-b1.58", "dqt-int8", "dqt-ternary"]
REF = dict(gemm_backend="ref", quant_backend="ref")


@pytest.fixture(autouse=True)
def _keep_global_rng():
    with torch.random.fork_rng():
        yield


def _tiny_packed(recipe: str, tmp_path: Path, n_layers: int = 1, max_seq_len: int = 16):
    """A packed d = 128 Llama of ``recipe`` (random init; DQT through quantize_direct_), float32, loaded back."""
    from lowbit.config import ModelConfig
    from lowbit.export.packed import load_packed, pack_model, save_packed
    from lowbit.models.llama import Llama
    from lowbit.nn import quantize_
    from lowbit.nn.direct import quantize_direct_

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=128, n_layers=n_layers, n_heads=2, ffn_dim=256, max_seq_len=max_seq_len)
    model = Llama(cfg)
    model = quantize_direct_(model, recipe) if recipe.startswith("dqt-") else quantize_(model, recipe)
    tensors, meta = pack_model(model, float_dtype="fp32")
    save_packed(tensors, meta, tmp_path / "model.safetensors")
    return load_packed(tmp_path)[0]


def _layers(model):
    from lowbit.export.packed import packed_modules

    return packed_modules(model)


def _x(m: int, k: int, dtype=torch.float32, seed: int = 1, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# CPU: kernels' references vs PackedLinear.reference_forward
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_prefill_matches_reference_forward(recipe, tmp_path) -> None:
    model = _tiny_packed(recipe, tmp_path)
    layers = _layers(model)
    assert len(layers) == 7
    want_kind = "quest" if recipe.startswith("quest") else "int8"
    want_fmt = "fp8" if recipe.startswith("quest") else "int8"
    for name, layer in layers:
        plan = pp.prefill_plan(layer)
        assert plan is not None and plan["kind"] == want_kind and plan["fmt"] == want_fmt, (name, plan)
        x = _x(70, layer.in_features, seed=len(name)).reshape(2, 35, -1)
        with torch.no_grad():
            want = layer.reference_forward(x)
            got = pp.prefill_kernel(layer, x, **REF)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_weight_cache_and_flag(tmp_path) -> None:
    model = _tiny_packed("quest-w4a4", tmp_path)
    layer = _layers(model)[0][1]
    x = _x(80, layer.in_features)
    y0 = pp.prefill_kernel(layer, x, **REF, cache_weights=False)
    assert pp._CACHE_ATTR not in layer.__dict__
    y1 = pp.prefill_kernel(layer, x, **REF)
    cw, sw = layer.__dict__[pp._CACHE_ATTR][1]
    assert cw.dtype == torch.float8_e4m3fn and cw.shape == (layer.out_features, layer.in_features)
    assert sw.dtype == torch.float32 and sw.shape == (layer.out_features,)
    # the FP8 operand holds the grid values c + ½ exactly: value = code·step is the dequantized weight
    torch.testing.assert_close(cw.float() * sw[:, None], layer.weight_values(), rtol=0, atol=0)
    assert torch.equal(y0, y1)
    assert pp.prefill_weight(layer, "fp8")[0] is cw  # a hit
    # new codes → the cache is rebuilt
    info = layer.weight_spec.info
    codes = torch.randint(info.qmin, info.qmax + 1, (layer.out_features, layer.in_features), dtype=torch.int8)
    layer.set_codes(codes, layer.scale.clone())
    cw2, _ = pp.prefill_weight(layer, "fp8")
    assert cw2 is not cw and torch.equal(cw2.float(), codes.float() + 0.5)
    pp.clear_cache(model)
    assert pp._CACHE_ATTR not in layer.__dict__


def test_int8_weight_operand(tmp_path) -> None:
    model = _tiny_packed("bitnet-b1.58", tmp_path)
    layer = _layers(model)[0][1]
    cw, sw = pp.prefill_weight(layer, "int8")
    assert cw.dtype == torch.int8 and torch.equal(cw, layer.weight_codes())
    torch.testing.assert_close(cw.float() * sw[:, None], layer.weight_values(), rtol=0, atol=0)


def test_weight_cache_with_inference_tensors(tmp_path) -> None:
    # codes set under torch.inference_mode (a model loaded for generation) have no version counter: the cache
    # is keyed without it and still hits
    model = _tiny_packed("bitnet-b1.58", tmp_path)
    layer = _layers(model)[0][1]
    with torch.inference_mode():
        layer.set_codes(layer.weight_codes(), layer.scale.clone())
    assert layer.codes.is_inference()
    cw, _ = pp.prefill_weight(layer, "int8")
    assert pp.prefill_weight(layer, "int8")[0] is cw and torch.equal(cw, layer.weight_codes())


def test_supports_and_fallbacks() -> None:
    from lowbit.export.packed import PackedLinear
    from lowbit.quant.recipes import get_recipe

    def layer(recipe, k=128, n=32, **replace_act):
        r = get_recipe(recipe)
        act = r.act.replace(**replace_act) if (r.act is not None and replace_act) else r.act
        return PackedLinear(k, n, weight_spec=r.weight, act_spec=act)

    assert pp.supports(layer("quest-w4a4")) and pp.prefill_plan(layer("quest-w4a4"))["fmt"] == "fp8"
    assert pp.prefill_plan(layer("quest-w3a4"))["fmt"] == "fp8"
    assert pp.supports(layer("ste-w4a8")) and pp.prefill_plan(layer("ste-w4a8"))["kind"] == "int8"
    assert not pp.supports(layer("quest-w8a8"))  # 8-bit centered: ±255 half-steps fit neither
    assert not pp.supports(layer("quest-w4"))  # weight-only: nothing to quantize
    assert not pp.supports(layer("lsq-w4a4"))  # learned activation step
    assert not pp.supports(layer("quest-w4a4", k=96))  # Hadamard-128 would shrink
    assert not pp.supports(layer("bitnet-b1.58", k=40))  # K not a multiple of 16
    assert pp.supports(layer("quest-w4a4", alpha=1.0, trust=2.0))  # hadamard_quantize takes the layer's α, trust
    # an act spec that is not QuEST's (e.g. absmax) with a shared rotation: the torch path
    assert not pp.supports(layer("quest-w4a4", scale="absmax"))
    # unsupported layers fall back to reference_forward
    fb = layer("quest-w8a8")
    x = _x(70, 128)
    assert torch.equal(pp.prefill_kernel(fb, x, **REF), fb.reference_forward(x))


@pytest.mark.parametrize(("bits_w", "bits_a", "fmt"), [(6, 6, "int8"), (4, 7, "int8"), (1.58, 6, "int8"),
                                                      (3, 1.58, "fp8")])
def test_quest_other_grids_match_reference(bits_w, bits_a, fmt) -> None:
    """5–7-bit QuEST grids on the INT8 path (odd integers, Δ/2), ternary mixes; random codes and steps."""
    from lowbit.export.packed import PackedLinear
    from lowbit.quant.recipes import quest_spec

    layer = PackedLinear(256, 48, weight_spec=quest_spec(bits_w), act_spec=quest_spec(bits_a), bias=True)
    info = layer.weight_spec.info
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(info.qmin, info.qmax + 1, (48, 256), generator=g).to(torch.int8)
    layer.set_codes(codes, torch.rand(layer.scale.shape, generator=g) * 0.02 + 0.01)
    layer.bias = torch.randn(48, generator=g)
    assert pp.prefill_plan(layer)["fmt"] == fmt
    x = _x(70, 256)
    with torch.no_grad():
        torch.testing.assert_close(pp.prefill_kernel(layer, x, **REF), layer.reference_forward(x), rtol=1e-5,
                                   atol=1e-5)


def test_install_all_routes_rows(tmp_path, monkeypatch) -> None:
    """≤ max_rows rows → the GEMV hook, more → the prefill GEMM (both spied; references underneath)."""
    from lowbit.kernels import lowbit_gemv as lg

    model = _tiny_packed("bitnet-b1.58", tmp_path)
    calls = []
    real_gemv, real_prefill = lg.packed_linear_kernel, pp.prefill_kernel
    monkeypatch.setattr(lg, "packed_linear_kernel", lambda layer, x, **kw: calls.append("gemv") or real_gemv(
        layer, x, **kw))
    monkeypatch.setattr(pp, "prefill_kernel", lambda layer, x, **kw: calls.append("prefill") or real_prefill(
        layer, x, **kw))
    counts = pp.install_all(model, max_rows=4, gemv_backend="ref", **REF)
    assert counts == {"gemv": 7, "prefill": 7, "layers": 7}
    idx = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(idx)
    assert calls == ["gemv"] * 7
    calls.clear()
    with torch.no_grad():
        model(torch.cat([idx, idx], 1))
    assert calls == ["prefill"] * 7


@pytest.mark.parametrize("recipe", ["quest-w4a4", "bitnet-b1.58"])
def test_packed_model_logits_long_prompt(recipe, tmp_path) -> None:
    """A prompt longer than 64 tokens: logits with install_all equal the torch path (float32, CPU references)."""
    model = _tiny_packed(recipe, tmp_path, n_layers=2, max_seq_len=128)
    idx = torch.randint(0, 64, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(idx)
        pp.install_all(model, gemv_backend="ref", **REF)
        got = model(idx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_cli_generate_uses_install_all() -> None:
    src = (Path(__file__).parents[2] / "src/lowbit/cli.py").read_text()
    assert "packed_prefill.install_all(model)" in src


def test_bench_decode_prefill_cpu_logic(tmp_path) -> None:
    """benchmarks/bench_decode.py parses, picks sections from --only, and renders the prefill tables (no GPU)."""
    path = Path(__file__).parents[2] / "benchmarks/bench_decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode_smoke", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.build_parser().parse_args(["--only", "prefill", "--out", str(tmp_path / "r.md")])
    assert bench.sections(args) == {"prefill"}
    assert bench.sections(bench.build_parser().parse_args(["--skip-e2e"])) == {"gemv", "prefill"}
    assert bench.sections(bench.build_parser().parse_args(["--only", "decode"])) == {"gemv", "e2e"}
    assert (args.prefill_tokens, args.prefill_seq) == (4096, 512)
    flops = 2.0 * 4096 * 2048 * 2048
    moved = 4096 * 2048 * (2 + 1 + 1 / 8) + 4 * 4096
    base = (100.0, 80.0)
    rows = [bench.prefill_layer_row("2048→2048", 4096, "bf16", 100.0, 80.0, flops, base),
            bench.prefill_layer_row("2048→2048", 4096, "quest-w4a4", 50.0, 60.0, flops, base),
            bench.prefill_layer_row("2048→2048", 4096, "  quantizer only (W4A4)", 30.0, 10.0, 0.0, None, moved),
            bench.prefill_layer_row("2048→2048", 4096, "quest-w4a4", 70.0, None, flops, base),
            dict(shape="2048→2048", tokens=4096, variant="  FP8 GEMM only, torch._scaled_mm", failed="RuntimeError: x")]
    assert rows[1]["speedup"] == 2.0 and rows[1]["met"] is True
    assert rows[1]["speedup_graph"] == 80 / 60 and rows[1]["met_graph"] is False
    assert rows[2]["speedup"] is None and rows[2]["gbs"] == moved / 10.0 / 1e3  # from the graph (device) time
    e2e = [dict(model="quest-w4a4", batch=8, seq=512, ms=10.0, tps=409600.0, speedup=1.5, goal=1.4, met=True)]
    text = "\n".join(bench.prefill_lines(args, rows, e2e))
    assert "| 2048→2048 | quest-w4a4 | 50.0 | 60.0 | 573 |  |  | 2.00× | 1.33× | ≥ 1.6×: eager ✓, graph ✗ |" in text
    pct = f"{100 * moved / 10e-6 / bench.hbm_bytes_per_s():.0f}%"
    assert f"| 2048→2048 |   quantizer only (W4A4) | 30.0 | 10.0 |  | {moved / 1e4:.0f} | {pct} |  |  |  |" in text
    assert "| 2048→2048 | quest-w4a4 | 70.0 |  | 491 |  |  | 1.43× |  | ≥ 1.6×: eager ✗ |" in text  # no graph
    assert "| 2048→2048 |   FP8 GEMM only, torch._scaled_mm | failed: RuntimeError: x |" in text
    assert "| quest-w4a4 | 8 | 10.00 | 409600 | 1.50× | ≥ 1.4× ✓ |" in text
    assert {(k, n) for k, n in bench.PREFILL_SHAPES} == {(2048, 2048), (2048, 5632), (5632, 2048)}
    from lowbit.config import ModelConfig

    cfg = ModelConfig(size="800m", vocab_size=32000)
    assert (cfg.dim, cfg.ffn_dim) == (2048, 5632)  # the shapes above are the 800m model's


# ----------------------------------------------------------------------------------------------------------
# the Triton kernels in Triton's CPU interpreter (a child process)
# ----------------------------------------------------------------------------------------------------------


@needs_triton
def test_prefill_in_triton_interpreter() -> None:
    run_interpreted_tests(__file__)


@pytest.mark.parametrize("recipe", ["quest-w4a4", "bitnet-b1.58"])
def test_prefill_triton_interpreted(interpret, recipe, tmp_path) -> None:
    """hadamard_quantize and scaled_mm as Triton kernels (interpreted) on one layer at a tiny shape."""
    model = _tiny_packed(recipe, tmp_path)
    layer = dict(_layers(model))["layers.0.mlp.gate_proj"]  # 128 → 256
    x = _x(40, layer.in_features)
    with torch.no_grad():
        want = layer.reference_forward(x)
        got = pp.prefill_kernel(layer, x, gemm_backend="triton", quant_backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# real shapes on the GPU (the GPU session)
# ----------------------------------------------------------------------------------------------------------


def _real_layer(recipe: str, n: int, k: int):
    from lowbit.export.packed import PackedLinear
    from lowbit.quant.core import scale_shape
    from lowbit.quant.recipes import get_recipe

    r = get_recipe(recipe)
    layer = PackedLinear(k, n, weight_spec=r.weight, act_spec=r.act, device="cuda")
    info = layer.weight_spec.info
    g = torch.Generator(device="cuda").manual_seed(n)
    codes = torch.randint(info.qmin, info.qmax + 1, (n, k), device="cuda", dtype=torch.int8, generator=g)
    layer.set_codes(codes, torch.rand(scale_shape((n, k), layer.weight_spec), device="cuda") * 0.02 + 0.01)
    return layer


@pytest.mark.needs_cuda
@pytest.mark.parametrize("recipe", ["quest-w4a4", "quest-w2a2", "bitnet-b1.58", "dqt-int8", "dqt-ternary"])
@pytest.mark.parametrize(("n", "k"), [(4096, 11008), (11008, 4096)])
def test_prefill_cuda_real_shapes(recipe, n, k) -> None:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    layer = _real_layer(recipe, n, k)
    x = torch.randn(4096, k, device="cuda")
    with torch.no_grad():
        want = layer.reference_forward(x)  # float32 torch path (TF32 off by default for matmul)
        got = pp.prefill_kernel(layer, x)  # auto: Triton hadamard_quantize + Triton scaled_mm on Hopper
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4 * want.abs().max().item())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got16 = pp.prefill_kernel(layer, x.bfloat16())
        assert got16.dtype == torch.bfloat16
        torch.testing.assert_close(got16.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.needs_cuda
def test_install_all_packed_model_cuda(tmp_path) -> None:
    """A packed QuEST W4A4 model on the GPU: a 100-token prefill through install_all equals the torch path."""
    model = _tiny_packed("quest-w4a4", tmp_path, n_layers=2, max_seq_len=128).cuda()
    idx = torch.randint(0, 64, (2, 100), device="cuda")
    with torch.no_grad():
        want = model(idx)
        assert pp.install_all(model)["prefill"] == 14
        got = model(idx)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
