"""lowbit.kernels.lowbit_gemv: the reference against packing's unpack + matmul (exact, float64), the Triton kernel
against the reference (Triton's CPU interpreter, in a child process; the GPU at real shapes), a packed model with
the kernel hook, the custom op."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lowbit.kernels import lowbit_gemv as lg
from lowbit.kernels.lowbit_gemv import grid_zero, lowbit_gemv, lowbit_gemv_ref
from lowbit.quant.packing import pack, pack_base3, unpack, unpack_base3
from lowbit.testing import run_interpreted_tests

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'lowbit[triton]')")

# (storage, qmin, levels, offset): ternary (2-bit and base 3), 2-bit centered, 4-bit integer and centered,
# int8, binary
LAYOUTS = {
    "ternary": ("2bit", -1, 3, 0.0),
    "ternary-base3": ("base3", -1, 3, 0.0),
    "w2-centered": ("2bit", -2, 4, 0.5),
    "w4-int": ("4bit", -8, 16, 0.0),
    "w4-centered": ("4bit", -8, 16, 0.5),
    "w8": ("int8", -128, 256, 0.0),
    "w1": ("1bit", -1, 2, 0.5),
}


def _weights(layout, n, k, *, groups=0, seed=0, device="cpu"):
    """(codes int8 (N, K), packed, scale, zero) of random codes on ``layout``'s grid; ``groups``: 0 per row,
    -1 per tensor, g > 0 that many groups along K."""
    storage, qmin, levels, offset = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(qmin, qmin + levels, (n, k), generator=g).to(torch.int8)
    packed = pack_base3(codes, qmin) if storage == "base3" else pack(codes, qmin, levels)
    if groups == -1:
        scale = torch.tensor(0.03, dtype=torch.float32)
    else:
        scale = (torch.rand(n, max(groups, 1), generator=g) + 0.5) * 0.02
    return codes.to(device), packed.to(device), scale.to(device), grid_zero(storage, qmin, offset)


def _x(b, k, dtype=torch.float32, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, generator=g).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# the reference is packing's unpack + dequantize + matmul (float64: exact)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [-1, 0, 2])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_ref_equals_unpack_matmul_fp64(layout, groups) -> None:
    storage, qmin, levels, offset = LAYOUTS[layout]
    n, k = 37, 130
    codes, packed, scale, zero = _weights(layout, n, k, groups=groups)
    unpacked = unpack_base3(packed, k, qmin) if storage == "base3" else unpack(packed, qmin, levels, k)
    assert torch.equal(unpacked, codes)
    s = scale.double().reshape(-1, 1) if scale.dim() == 0 else scale.double()
    w = ((unpacked.double() + offset).reshape(n, s.shape[1], -1) * s[:, :, None]).reshape(n, k)
    x = _x(3, k, torch.float64)
    bias = torch.randn(n, dtype=torch.float64)
    assert torch.equal(lowbit_gemv_ref(x, packed, scale, storage=storage, zero=zero), x @ w.t())
    assert torch.equal(lowbit_gemv_ref(x, packed, scale, bias, storage=storage, zero=zero), x @ w.t() + bias)
    # float32 x: the dequantized weight is (code + offset)·Δ rounded once, like lowbit.quant.dequantize
    y32 = lowbit_gemv_ref(x.float(), packed, scale, storage=storage, zero=zero)
    assert y32.dtype == torch.float32 and y32.shape == (3, n)


def test_grid_zero_matches_packed_linear() -> None:
    from lowbit.export.packed import PackedLinear
    from lowbit.quant.recipes import get_recipe

    for recipe in ("bitnet-b1.58", "quest-w4", "ste-w8a8", "quest-w2"):
        spec = get_recipe(recipe).weight
        layer = PackedLinear(130, 37, weight_spec=spec, act_spec=None)
        g = torch.Generator().manual_seed(0)
        info = layer.weight_spec.info
        codes = torch.randint(info.qmin, info.qmax + 1, (37, 130), generator=g).to(torch.int8)
        layer.set_codes(codes, torch.rand(layer.scale.shape, generator=g) + 0.1)
        x = _x(2, 130)
        zero = grid_zero(layer.storage, info.qmin, info.offset)
        want = x @ layer.weight_values().t()
        got = lowbit_gemv_ref(x, layer.codes, layer.scale, storage=layer.storage, zero=zero)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_checks() -> None:
    _, packed, scale, zero = _weights("ternary", 8, 20)
    x = _x(2, 20)
    with pytest.raises(ValueError, match="storage"):
        lowbit_gemv(x, packed, scale, storage="3bit", zero=zero, backend="ref")
    with pytest.raises(ValueError, match="bytes per row"):
        lowbit_gemv(_x(2, 24), packed, scale, storage="2bit", zero=zero, backend="ref")
    with pytest.raises(TypeError, match="uint8"):
        lowbit_gemv(x, packed.view(torch.int8), scale, storage="2bit", zero=zero, backend="ref")
    with pytest.raises(ValueError, match="scale"):
        lowbit_gemv(x, packed, torch.ones(8, 3), storage="2bit", zero=zero, backend="ref")
    with pytest.raises(TypeError, match="x must be"):
        lowbit_gemv(x.double(), packed, scale, storage="2bit", zero=zero, backend="ref")


def test_custom_op_opcheck() -> None:
    _, packed, scale, zero = _weights("w4-centered", 12, 40)
    args = (_x(3, 40), packed, scale, None, "4bit", zero, False, "ref")
    torch.library.opcheck(lg._lowbit_gemv_op, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    y = lowbit_gemv(_x(3, 40).reshape(1, 3, 40), packed, scale, storage="4bit", zero=zero, backend="ref")
    assert y.shape == (1, 3, 12)


# ----------------------------------------------------------------------------------------------------------
# the Triton kernel against the reference, in Triton's CPU interpreter (a child process)
# ----------------------------------------------------------------------------------------------------------


@needs_triton
def test_kernel_in_triton_interpreter() -> None:
    run_interpreted_tests(__file__)


def _assert_within_ref_error(got, x, packed, scale, bias, storage, zero, *, interpreted):
    """|got − truth| ≤ the output's rounding + 8 × the float32 reference's own error (truth: float64)."""
    truth = lowbit_gemv_ref(x.double(), packed, scale, None if bias is None else bias.double(), storage=storage,
                            zero=zero)
    ref32 = lowbit_gemv_ref(x.float(), packed, scale, None if bias is None else bias.float(), storage=storage,
                            zero=zero).double()
    ref_err = (ref32 - truth).abs().max().item()
    out_eps = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11}[got.dtype]
    if interpreted and got.dtype != torch.float32:
        out_eps *= 2  # the interpreter truncates float32 → bf16/fp16 instead of rounding
    bound = (truth.abs() + torch.finfo(got.dtype).smallest_normal) * out_eps * 1.01 + 8 * ref_err + 1e-30
    err = (got.double() - truth).abs()
    assert got.dtype == x.dtype and got.shape == truth.shape
    assert not (err > bound).any(), f"max error {err.max().item():.3g}, bound {bound.min().item():.3g}"


@pytest.mark.parametrize(
    ("layout", "b", "k", "dtype", "groups", "det"),
    [
        ("ternary", 1, 96, torch.float32, 0, False),
        ("ternary", 3, 130, torch.bfloat16, -1, True),
        ("ternary-base3", 1, 130, torch.bfloat16, -1, False),
        ("ternary-base3", 8, 96, torch.float32, 0, True),
        ("w2-centered", 8, 130, torch.float16, 0, False),
        ("w4-int", 1, 130, torch.bfloat16, 0, True),
        ("w4-centered", 3, 96, torch.float32, 2, False),
        ("w4-centered", 1, 96, torch.float16, 3, False),
        ("w8", 1, 130, torch.float32, 0, False),
        ("w8", 8, 96, torch.bfloat16, 0, True),
        ("w1", 3, 130, torch.float32, 0, False),
    ],
)
def test_kernel_vs_ref_interpreted(interpret, layout, b, k, dtype, groups, det) -> None:
    storage = LAYOUTS[layout][0]
    n = 37
    _, packed, scale, zero = _weights(layout, n, k, groups=groups, seed=b + k)
    x = _x(b, k, dtype, seed=k)
    bias = torch.randn(n).to(dtype) if b == 3 else None
    got = lowbit_gemv(x, packed, scale, bias, storage=storage, zero=zero, deterministic=det, backend="triton")
    _assert_within_ref_error(got, x, packed, scale, bias, storage, zero, interpreted=True)


def test_split_k_configs_interpreted(interpret) -> None:
    """Every SPLIT_K of the byte kernel, atomic and deterministic, gives the reference (float32, 4-bit, batch 1
    and 3)."""
    _, packed, scale, zero = _weights("w4-int", 19, 200)
    for b in (1, 3):
        x = _x(b, 200)
        for split in (1, 3, 4):
            for det in (False, True):
                cfg = {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": split}
                got = lg._lowbit_gemv_triton(x, packed, scale, None, "4bit", zero, det, config=cfg, kernel="bytes")
                _assert_within_ref_error(got, x, packed, scale, None, "4bit", zero, interpreted=True)


@pytest.mark.parametrize("layout", ["ternary", "w2-centered", "w4-int", "w4-centered", "w8", "w1"])
def test_word_kernel_vs_ref_interpreted(interpret, layout) -> None:
    """The word kernel (int32 loads, digits dequantized in place) at batch 1 (FMA) and 3, 16 (tensor cores), with
    split-K atomic and deterministic, bias, per-row and per-tensor steps; K a whole number of words but not of
    the block, so the tail is masked."""
    storage = LAYOUTS[layout][0]
    per_word = 4 * lg._per_byte(storage)
    k = per_word * 11
    for b, groups, det in ((1, 0, False), (1, -1, True), (3, 0, True), (16, -1, False)):
        _, packed, scale, zero = _weights(layout, 23, k, groups=groups, seed=b)
        x = _x(b, k, seed=b + 7)
        bias = torch.randn(23) if b == 3 else None
        for split in (1, 2):
            cfg = {"BLOCK_N": 16, "BLOCK_W": 4, "SPLIT_K": split}
            got = lg._lowbit_gemv_triton(x, packed, scale, bias, storage, zero, det, config=cfg, kernel="words")
            _assert_within_ref_error(got, x, packed, scale, bias, storage, zero, interpreted=True)
    with pytest.raises(ValueError, match="word kernel"):  # rows of 10 bytes are not whole int32 words
        lg._lowbit_gemv_triton(torch.zeros(1, 20), torch.zeros(5, 10, dtype=torch.uint8), torch.ones(5, 1), None,
                               "4bit", 7.5, False, kernel="words")


def test_word_view_where_it_applies() -> None:
    """The word kernel takes bit storages with whole-word rows and per-row/per-tensor steps; the byte kernel the
    rest (base 3, per-group steps, ragged rows, misaligned views)."""
    rows = torch.zeros(5, 12, dtype=torch.uint8)
    assert lg._word_view(rows, "2bit", 1).shape == (5, 3)
    assert lg._word_view(rows, "base3", 1) is None
    assert lg._word_view(rows, "2bit", 2) is None
    assert lg._word_view(torch.zeros(5, 10, dtype=torch.uint8), "4bit", 1) is None
    assert lg._word_view(torch.zeros(5, 13, dtype=torch.uint8)[:, 1:], "4bit", 1) is None


def test_workspace_only_where_split_k_needs_it() -> None:
    # SPLIT_K = 1 (explicit, or the autotuner's recorded choice): a placeholder, no zeroing memset per call
    cpu = torch.device("cpu")
    assert lg._workspace(3, 37, True, cpu, 1, zero=True).numel() == 1
    ws = lg._workspace(3, 37, True, cpu, None, zero=True)  # an explicit split-K config: zeroed for atomic adds
    assert ws.shape == (3, 37) and not ws.any()
    assert lg._workspace(3, 37, True, cpu, 4, zero=False).shape == (3, 37)  # autotuned: its pre-hook zeroes
    assert lg._workspace(3, 37, False, cpu, 4, zero=True).shape == (lg.SPLIT_MAX, 3, 37)


@pytest.mark.parametrize("atomic", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_split_k_hook_zeroes_and_times_the_whole_call(atomic, bias, monkeypatch) -> None:
    # the autotuned split-K configurations' pre-hook: zero the atomic workspace; while tuning, also the launcher's
    # pass after the kernel (partials → output, + bias), so a split-K configuration is timed at its full cost
    b, n, split = 2, 5, 3
    ws = torch.randn(2, n) if atomic else torch.randn(lg.SPLIT_MAX, b, n)
    out, bias_t = torch.full((b, n), 7.0), torch.randn(n)
    nargs = dict(ws_ptr=ws, out_ptr=out, ATOMIC=atomic, SPLIT_K=split, HAS_BIAS=bias, bias_ptr=bias_t)
    want_ws = torch.zeros_like(ws) if atomic else ws.clone()
    want_out = (want_ws if atomic else ws[:split].sum(0)) + (bias_t if bias else 0)
    lg._split_k_hook(nargs)  # not tuning: only the zeroing
    assert torch.equal(ws, want_ws) and bool((out == 7).all())
    monkeypatch.setattr(lg, "_TUNING", True)
    lg._split_k_hook(nargs)
    torch.testing.assert_close(out, want_out)


def _tiny_packed(recipe, tmp_path):
    from lowbit.config import ModelConfig
    from lowbit.export.packed import load_packed, pack_model, save_packed
    from lowbit.models.llama import Llama
    from lowbit.nn import quantize_

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=128, n_layers=1, n_heads=2, ffn_dim=256, max_seq_len=16)
    model = quantize_(Llama(cfg), recipe)
    tensors, meta = pack_model(model, float_dtype="fp32")
    save_packed(tensors, meta, tmp_path / "model.safetensors")
    return load_packed(tmp_path)[0]


@pytest.mark.parametrize("recipe", ["bitnet-b1.58", "quest-w4", "ste-w8a8"])
def test_packed_model_logits_interpreted(interpret, recipe, tmp_path) -> None:
    """Logits with the kernel hook on every PackedLinear equal the torch path (float32; A8 layers go through
    the torch activation quantizer first — the stopgap)."""
    model = _tiny_packed(recipe, tmp_path)
    idx = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(idx)
        assert lg.install(model) == 7
        got = model(idx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_install_and_prefill_fallback(tmp_path) -> None:
    """The hook routes more than max_rows rows to the torch path (no kernel runs: any machine)."""
    model = _tiny_packed("bitnet-b1.58", tmp_path)
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(idx)
        assert lg.install(model, max_rows=4) == 7
        got = model(idx)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------------------
# real shapes on the GPU (the GPU session)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.needs_cuda
@pytest.mark.parametrize("layout", ["ternary", "ternary-base3", "w4-int", "w4-centered", "w8", "w2-centered", "w1"])
@pytest.mark.parametrize(("n", "k"), [(4096, 11008), (11008, 4096)])
@pytest.mark.parametrize("b", [1, 8])
def test_kernel_cuda_real_shapes(layout, n, k, b) -> None:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    storage = LAYOUTS[layout][0]
    _, packed, scale, zero = _weights(layout, n, k, seed=n)
    packed, scale = packed.cuda(), scale.cuda()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = _x(b, k, dtype, device="cuda")
        got = lowbit_gemv(x, packed, scale, storage=storage, zero=zero, backend="triton")
        _assert_within_ref_error(got.cpu(), x.cpu(), packed.cpu(), scale.cpu(), None, storage, zero,
                                 interpreted=False)
    x = _x(b, k, torch.bfloat16, device="cuda")
    d1 = lowbit_gemv(x, packed, scale, storage=storage, zero=zero, deterministic=True, backend="triton")
    d2 = lowbit_gemv(x, packed, scale, storage=storage, zero=zero, deterministic=True, backend="triton")
    assert torch.equal(d1, d2)


@pytest.mark.needs_cuda
def test_kernel_cuda_autotuned(monkeypatch) -> None:
    """The autotuned launch (the tests around run DEFAULT_GPU_CONFIG: LOWBIT_AUTOTUNE=0, conftest) at one shape."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("LOWBIT_AUTOTUNE", "1")
    _, packed, scale, zero = _weights("ternary", 3072, 2048, seed=3)
    packed, scale = packed.cuda(), scale.cuda()
    tuned = lg._kernels(False).tuned_words(False)  # 2-bit rows of whole words, batch 1: the word kernel's FMA path
    before = len(tuned.cache)
    x = _x(1, 2048, torch.bfloat16, device="cuda")
    got = lowbit_gemv(x, packed, scale, storage="2bit", zero=zero, backend="triton")
    _assert_within_ref_error(got.cpu(), x.cpu(), packed.cpu(), scale.cpu(), None, "2bit", zero, interpreted=False)
    assert len(tuned.cache) == before + 1
    # the choice is recorded; the next call (its workspace sized by it) is right too (atomic split-K sums in any
    # order, so not necessarily bit-equal)
    assert lg._TUNED_SPLIT and tuned.best_config.kwargs["SPLIT_K"] in lg._TUNED_SPLIT.values()
    again = lowbit_gemv(x, packed, scale, storage="2bit", zero=zero, backend="triton")
    _assert_within_ref_error(again.cpu(), x.cpu(), packed.cpu(), scale.cpu(), None, "2bit", zero, interpreted=False)


@pytest.mark.needs_cuda
def test_packed_linear_hook_cuda_graph() -> None:
    """The hook inside a CUDA graph (as generate replays it), bf16 autocast, equals the eager torch path."""
    from lowbit.export.packed import PackedLinear
    from lowbit.quant.recipes import get_recipe

    spec = get_recipe("bitnet-b1.58").weight
    layer = PackedLinear(4096, 1024, weight_spec=spec, act_spec=None, device="cuda")
    codes = torch.randint(-1, 2, (1024, 4096), device="cuda", dtype=torch.int8)
    layer.set_codes(codes, torch.tensor(0.02))
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    want = layer.reference_forward(x)
    layer.kernel = lg.packed_linear_kernel
    layer(x)  # compile (or autotune) outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = layer(x)
    g.replay()
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
