"""Dispatch of QuantLinear / DirectQuantLinear to the fused kernels (``quant.kernels``): which recipes and layers
take them, the errors, and equivalence with the torch fake-quant path — on the CPU, with the kernels' reference
backends standing in for the Triton ones (the GPU session runs the real kernels: benchmarks/gpu_session.sh)."""

from __future__ import annotations

import pytest
import torch

from lowbit.config import ConfigError, DQTConfig, ModelConfig, QuantConfig, TrainConfig, load_config
from lowbit.models.llama import Llama
from lowbit.nn import DirectQuantLinear, QuantLinear, direct_modules, quant_diagnostics, quantize_
from lowbit.nn.linear import set_kernels
from lowbit.train.optim import build_optimizer, clip_gradients
from lowbit.train.trainer import RESUMABLE_CHANGES

PROJ = 7 * 2  # quantized projections of the 2-layer model


def model_for(recipe: str, seed: int = 0, dim: int = 128, layers: int = 2, **dqt) -> Llama:
    """2 layers, d = 128 (QuEST's Hadamard block divides K), SwiGLU width 256."""
    torch.manual_seed(seed)
    m = Llama(ModelConfig(size="tiny", vocab_size=96, dim=dim, n_layers=layers, n_heads=2, ffn_dim=2 * dim,
                          max_seq_len=32))
    if recipe.startswith("dqt"):
        from lowbit.nn import quantize_direct_

        return quantize_direct_(m, recipe, dqt=DQTConfig(**dqt))
    return quantize_(m, recipe)


def force(model, mode="on"):
    return set_kernels(model, mode, gemm_backend="ref", quant_backend="ref")


def train(model, steps: int = 3, seed: int = 0) -> list[float]:
    opt = build_optimizer(model, TrainConfig(lr=3e-3, weight_decay=0.1), torch.device("cpu"), DQTConfig())
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 96, (2, 33), generator=g)
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        clip_gradients(opt, model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("recipe,kind", [("quest-w4a4", "quest"), ("quest-w8a8", "quest"), ("quest-w2a2", "quest"),
                                         ("bitnet-b1.58", "int8"), ("ste-w4a8", "int8"), ("dqt-int8", "int8"),
                                         ("dqt-ternary", "int8"), ("dqt-int4", "int8")])
def test_recipes_with_a_kernel(recipe, kind):
    m = model_for(recipe)
    assert len(force(m)) == PROJ
    mods = [x for x in m.modules() if isinstance(x, QuantLinear | DirectQuantLinear)]
    assert all(x.kernel_op()[0] == kind and x.kernels == "on" for x in mods)


@pytest.mark.parametrize("recipe", ["quest-w4", "quest-noh-w4a4", "lsq-w4a4", "pact-w4a4", "ste-w1a8",
                                    "dqt-quest-w4a4"])
def test_recipes_without_a_kernel_run_the_torch_path(recipe):
    m = model_for(recipe)
    assert force(m) == []
    idx = torch.randint(0, 96, (2, 8))
    m(idx, idx).backward()  # "on" only concerns layers that have a kernel


def test_dqt_group_scales_have_no_kernel():
    assert force(model_for("dqt-int8", granularity="group", group_size=64)) == []
    assert len(force(model_for("dqt-int8", granularity="row"))) == PROJ


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out | {n: m.weight_grad for n, m in direct_modules(model)}


@pytest.mark.parametrize("recipe", ["quest-w4a4", "quest-w8a8", "bitnet-b1.58", "dqt-int8", "dqt-ternary"])
def test_three_training_steps_match_the_torch_path(recipe):
    """Each of 3 steps from the same state: the same loss and gradients (float32 rounding: the kernels' sums are
    exact, the fake-quant GEMM's are not); then the reference's update is copied over, so the comparison stays
    one step deep. Every quantized projection takes the kernel path every step. Losses agree to 1e-5 at every
    step, gradients to 1e-5 relative at the first (see below for the later ones)."""
    ref, fast = model_for(recipe), model_for(recipe)
    set_kernels(ref, "off")
    force(fast)
    calls = []
    for mod in fast.modules():
        if isinstance(mod, QuantLinear | DirectQuantLinear):
            orig = mod._kernel_forward
            mod._kernel_forward = lambda x, orig=orig: calls.append(1) or orig(x)
    opt = build_optimizer(ref, TrainConfig(lr=3e-3, weight_decay=0.1), torch.device("cpu"), DQTConfig())
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        idx = torch.randint(0, 96, (2, 33), generator=g)
        losses = [m(idx[:, :-1], idx[:, 1:]) for m in (ref, fast)]
        for loss in losses:
            loss.backward()
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
        g_ref, g_fast = grads(ref), grads(fast)
        assert g_ref.keys() == g_fast.keys()
        # step 0: float32 rounding only. Later steps may see an activation whose float32 difference (~1e-7) tips
        # an 8-bit code at a rounding tie (dqt-ternary, step 1: one code of layers.0.mlp.down_proj's input),
        # which the following quantized layers amplify into percent-level gradient differences downstream
        tol = 1e-5 if step == 0 else 2e-2
        for n, t in g_ref.items():
            err = ((g_fast[n].double() - t.double()).norm() / t.double().norm()).item()
            assert err < tol, (step, n, err)
        if hasattr(opt, "clip_grad_norm_"):
            opt.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        fast.zero_grad(set_to_none=True)
        for _, m in direct_modules(fast):
            m.weight_grad = None
        fast.load_state_dict(ref.state_dict())
    assert len(calls) == 3 * PROJ


@pytest.mark.parametrize("recipe", ["quest-w4a4", "bitnet-b1.58", "dqt-int8", "dqt-ternary"])
def test_three_free_running_steps_stay_close(recipe):
    """Trained independently, the two paths drift apart only by what float32 rounding sets off: a code at a
    rounding tie that flips, and AdamW's first steps, which move a weight by ±lr whatever the size of its
    gradient (so a gradient of ~0 that changes sign moves it by 2·lr)."""
    ref, fast = model_for(recipe), model_for(recipe)
    set_kernels(ref, "off")
    force(fast)
    torch.testing.assert_close(torch.tensor(train(fast)), torch.tensor(train(ref)), rtol=2e-3, atol=0)


@pytest.mark.parametrize("recipe", ["quest-w4a4", "bitnet-b1.58", "dqt-int8"])
def test_diagnostics_on_the_kernel_path(recipe):
    ref, fast = model_for(recipe), model_for(recipe)
    set_kernels(ref, "off")
    force(fast)
    idx = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref(idx, idx)
        fast(idx, idx)
    d_ref, d_fast = quant_diagnostics(ref), quant_diagnostics(fast)
    assert d_fast.keys() == d_ref.keys() and d_fast
    for k, v in d_ref.items():
        metric = k.split("/")[0]
        if metric == "act_snr_db" and recipe.startswith("quest"):  # a strided sample of 64 of the 128 rows
            assert abs(d_fast[k] - v) <= 0.5, k
        elif metric.endswith("_masked"):  # QuEST: counted from the kernel's own masks
            assert d_fast[k] == v, k
        else:
            assert d_fast[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("recipe", ["quest-w4a4", "quest-w2a2"])
def test_quest_kernel_path_masked_fractions_are_exact(recipe):
    # QuantLinear's kernel path reports the masked fraction of the op's trust masks (quest_linear(stats=)), not
    # an estimate from a sample of rows: act_masked and weight_masked equal the fake-quant path's bit for bit,
    # also for an input of more rows than the sample (STATS_ROWS) and under torch.compile
    from lowbit.nn.linear import STATS_ROWS
    from lowbit.quant import get_recipe

    r = get_recipe(recipe)
    torch.manual_seed(0)
    layer = QuantLinear(256, 48, weight_spec=r.weight, act_spec=r.act)
    x = torch.randn(3, 2 * STATS_ROWS + 5, 256)
    set_kernels(layer, "off")
    layer(x)
    d_ref = layer.diagnostics()
    force(layer)
    calls = []
    orig = layer._kernel_forward
    layer._kernel_forward = lambda t: calls.append(1) or orig(t)
    layer(x.requires_grad_(True)).sum().backward()
    d_fast = layer.diagnostics()
    assert calls and {"act_masked", "weight_masked"} <= d_ref.keys() and d_ref["act_masked"] > 0
    assert d_fast["act_masked"] == d_ref["act_masked"] and d_fast["weight_masked"] == d_ref["weight_masked"]
    layer.last_stats = {}
    torch.compile(layer, backend="aot_eager", fullgraph=True)(x)  # fullgraph: the statistics break nothing
    assert layer.diagnostics()["act_masked"] == d_ref["act_masked"]
    torch._dynamo.reset()


def test_on_without_cuda_is_an_error_auto_falls_back():
    m = model_for("quest-w4a4")
    idx = torch.randint(0, 96, (2, 8))
    set_kernels(m, "on")
    with pytest.raises(RuntimeError, match="CUDA"):
        m(idx, idx)
    set_kernels(m, "auto")
    mods = [x for x in m.modules() if isinstance(x, QuantLinear)]
    assert not any(x._use_kernel(torch.zeros(1, 128)) for x in mods)
    m(idx, idx).backward()


def test_k_not_a_multiple_of_the_block_falls_back_or_errors():
    m = model_for("quest-w4a4", dim=64)  # K = 64: QuEST's 128-block does not divide it
    force(m, "auto")
    idx = torch.randint(0, 96, (2, 8))
    m(idx, idx)
    force(m, "on")
    with pytest.raises(RuntimeError, match="multiple of the Hadamard block"):
        m(idx, idx)


@pytest.mark.parametrize("recipe", ["quest-w4a4", "bitnet-b1.58", "dqt-int8"])
def test_compiles_with_the_kernel_path(recipe):
    # aot_eager: dynamo + AOT autograd (what inductor compiles on the GPU); DQT layers graph-break (their
    # autograd.Function delivers the weight gradient to the module from backward)
    eager, comp = model_for(recipe, layers=1), model_for(recipe, layers=1)
    force(eager)
    force(comp)
    idx = torch.randint(0, 96, (2, 16))
    l0 = eager(idx, idx)
    l0.backward()
    l1 = torch.compile(comp, backend="aot_eager")(idx, idx)
    l1.backward()
    torch.testing.assert_close(l1, l0)
    if not recipe.startswith("dqt"):
        p0 = dict(eager.named_parameters())
        for n, p in comp.named_parameters():
            torch.testing.assert_close(p.grad, p0[n].grad, msg=n)
    else:
        for (_, a), (_, b) in zip(direct_modules(comp), direct_modules(eager), strict=True):
            torch.testing.assert_close(a.weight_grad, b.weight_grad)
    torch._dynamo.reset()


def test_config():
    assert QuantConfig().kernels == "off"
    with pytest.raises(ConfigError, match="quant.kernels"):
        QuantConfig(kernels="yes")
    with pytest.raises(ConfigError, match="CUDA"):
        load_config(None, ["quant.kernels=on", "train.device=cpu"])
    assert load_config(None, ["quant.kernels=off"]).quant.kernels == "off"
    assert "quant.kernels" in RESUMABLE_CHANGES
    with pytest.raises(ValueError, match="kernels"):
        set_kernels(model_for("bitnet-b1.58"), "fast")


def test_build_model_applies_quant_kernels():
    from lowbit.runs import build_model

    cfg = load_config(None, ["model.dim=128", "model.n_layers=1", "model.n_heads=2", "model.ffn_dim=256",
                             "quant.recipe=quest-w4a4", "quant.kernels=off"])
    m = build_model(cfg)
    assert {x.kernels for x in m.modules() if isinstance(x, QuantLinear)} == {"off"}


@pytest.mark.needs_cuda
@pytest.mark.parametrize("recipe", ["quest-w4a4", "quest-w8a8", "bitnet-b1.58", "dqt-int8", "dqt-ternary"])
def test_auto_takes_the_kernels_on_the_gpu(recipe):
    # the real kernels (Triton on Hopper), bf16 autocast as the trainer runs: loss and gradients close to the
    # torch path's (bf16 rounding differs: the kernels' forward sums are exact)
    ref, fast = model_for(recipe).cuda(), model_for(recipe).cuda()
    set_kernels(ref, "off")
    assert len(set_kernels(fast, "auto")) == PROJ
    mods = [x for x in fast.modules() if isinstance(x, QuantLinear | DirectQuantLinear)]
    assert all(x.kernel_blocker(torch.device("cuda")) is None for x in mods)
    idx = torch.randint(0, 96, (8, 33), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    losses = []
    for m in (ref, fast):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(idx[:, :-1], idx[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-2
    g_ref, g_fast = grads(ref), grads(fast)
    for n, t in g_ref.items():
        assert ((g_fast[n].float() - t.float()).norm() / t.float().norm()).item() < 5e-2, n


@pytest.mark.needs_cuda
@pytest.mark.parametrize("recipe", ["quest-w4a4", "bitnet-b1.58", "dqt-int8"])
def test_inductor_compiles_the_kernel_path_on_the_gpu(recipe):
    # what bench_train and the trainer run: torch.compile (inductor) of the whole model with the kernels on,
    # under bf16 autocast; the loss equals the eager kernel path's (same kernels, same codes)
    m = model_for(recipe, layers=1).cuda()
    force_cuda = set_kernels(m, "on")
    assert len(force_cuda) == PROJ // 2
    idx = torch.randint(0, 96, (2, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        l0 = m(idx, idx)
        l1 = torch.compile(m)(idx, idx)
    l1.backward()
    torch.testing.assert_close(l1, l0, rtol=2e-2, atol=2e-2)
    torch._dynamo.reset()
