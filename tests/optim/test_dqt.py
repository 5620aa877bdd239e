"""The DQT optimizer: AdamW math, stochastic rounding onto the grid, state precisions, update in backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.config import ConfigError, DQTConfig, ModelConfig, TrainConfig, load_config
from lowbit.models.llama import Llama
from lowbit.nn import DirectQuantLinear, direct_modules, quantize_direct_
from lowbit.optim import DirectOptimizer, blockwise
from lowbit.quant import get_recipe, quantize
from lowbit.quant.packing import pack
from lowbit.train.optim import build_optimizer

INT8 = get_recipe("dqt-int8").weight


def _module(recipe: str = "dqt-int8", shape=(64, 96), seed: int = 0, rounding: str = "stochastic"):
    torch.manual_seed(seed)
    r = get_recipe(recipe)
    return DirectQuantLinear(torch.randn(*shape) * 0.02, weight_spec=r.weight, act_spec=None,
                             update_rounding=rounding)


def _tiny(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(ModelConfig(size="tiny", vocab_size=256, dim=64, n_layers=2, n_heads=2, ffn_dim=128,
                             max_seq_len=32))


def _train(m: nn.Module, opt, steps: int, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 256, (4, 32), generator=g)
    out = []
    for _ in range(steps):
        loss = m(idx, idx)
        loss.backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        out.append(float(loss.detach()))
    return out


def test_adamw_math_matches_torch_before_rounding(monkeypatch) -> None:
    q = _module()
    opt = DirectOptimizer([("q", q)], lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ref = nn.Parameter(q.dequantized_weight().clone())
    topt = torch.optim.AdamW([ref], lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    seen: list[torch.Tensor] = []
    real = opt._write_back
    monkeypatch.setattr(opt, "_write_back", lambda *a: (seen.append(a[2].clone()), real(*a))[1])
    for step in range(3):
        g = torch.randn(q.weight_shape, generator=torch.Generator().manual_seed(step))
        q.weight_grad, ref.grad = g.clone(), g.clone()
        opt.step()
        topt.step()
        torch.testing.assert_close(seen[-1], ref.detach(), rtol=1e-6, atol=1e-9)
        with torch.no_grad():
            ref.copy_(q.dequantized_weight())  # DQT continues from the rounded weights


def _constant_module(code: int, delta: float, rounding: str = "stochastic", shape=(256, 256)):
    q = _module(shape=shape, rounding=rounding)
    q.set_codes(torch.full(shape, code, dtype=torch.int8), torch.tensor(delta))
    return q


@pytest.mark.parametrize("frac", [0.3, -0.7, 0.05])
def test_stochastic_rounding_is_unbiased(frac: float) -> None:
    # SGD without momentum, lr 1: W' = W − g exactly; every element moves by frac·Δ from code 3
    delta = 0.01
    q = _constant_module(3, delta)
    opt = DirectOptimizer([("q", q)], lr=1.0, betas=(0.0, 0.0), rule="sgd")
    q.weight_grad = torch.full(q.weight_shape, -frac * delta)
    opt.step()
    c = q.codes().float()
    assert set(c.unique().tolist()) <= {2.0, 3.0, 4.0}
    assert float(c.mean()) == pytest.approx(3 + frac, abs=0.01)  # E[new value] = W' (n = 65536: σ ≈ 0.002)
    assert float(q.last_flips) / c.numel() == pytest.approx(abs(frac), abs=0.01)
    # nearest rounding (the ablation) stalls on updates under half a step
    qn = _constant_module(3, delta, rounding="nearest")
    optn = DirectOptimizer([("q", qn)], lr=1.0, betas=(0.0, 0.0), rule="sgd")
    qn.weight_grad = torch.full(qn.weight_shape, -frac * delta)
    optn.step()
    assert float(qn.codes().float().mean()) == 3 + round(frac)


def test_explicit_uniforms() -> None:
    # the quantizer takes the uniforms explicitly: stratified u gives the exact expectation
    spec = INT8.replace(rounding="stochastic")
    w = torch.full((1000,), 3.3 * 0.01)
    u = (torch.arange(1000) + 0.5) / 1000
    codes, _ = quantize(w, spec, scale=torch.tensor(0.01), noise=u)
    assert float(codes.float().mean()) == pytest.approx(3.3, abs=1e-6)


@pytest.mark.parametrize("recipe", ["dqt-ternary", "dqt-int2", "dqt-int3", "dqt-int4", "dqt-int8",
                                    "dqt-quest-w4a4"])
def test_codes_never_leave_the_grid(recipe: str) -> None:
    q = _module(recipe)
    opt = DirectOptimizer([("q", q)], lr=10.0, scale="recompute", scale_every=2)  # absurd steps: clipping
    info = q.weight_spec.info
    for step in range(4):
        q.weight_grad = torch.randn(q.weight_shape, generator=torch.Generator().manual_seed(step)) * 100
        opt.step()
        c = q.codes()
        assert int(c.min()) >= info.qmin and int(c.max()) <= info.qmax
        pack(c, info.qmin, info.levels, check=True)
        assert torch.isfinite(q.weight_scale).all() and (q.weight_scale > 0).all()


def test_scale_policies() -> None:
    # signed_max (the reference SR rescale): Δ' = max(W_before)/Qp — unchanged while the top code is used
    q = _constant_module(3, 0.01, shape=(8, 8))
    c = q.codes()
    c[0, 0] = 50
    q.set_codes(c)
    opt = DirectOptimizer([("q", q)], lr=0.0, scale="signed_max")
    q.weight_grad = torch.zeros(q.weight_shape)
    opt.step()
    assert float(q.weight_scale) == pytest.approx(0.01 * 50 / 127)
    assert int(q.codes().max()) == 127  # the old maximum maps onto the top of the new grid
    before = float(q.weight_scale)
    q.weight_grad = torch.zeros(q.weight_shape)
    opt.step()
    assert float(q.weight_scale) == pytest.approx(before)  # top code occupied: in effect frozen
    # recompute: the spec's rule (absmean / Qp) on the updated tensor
    q = _module()
    opt = DirectOptimizer([("q", q)], lr=0.0, scale="recompute")
    w = q.dequantized_weight()
    q.weight_grad = torch.zeros(q.weight_shape)
    opt.step()
    assert float(q.weight_scale) == pytest.approx(float(w.abs().mean()) / 127, rel=1e-6)
    # frozen (default): untouched
    q = _module()
    s = q.weight_scale.clone()
    opt = DirectOptimizer([("q", q)], lr=1e-2)
    q.weight_grad = torch.randn(q.weight_shape)
    opt.step()
    assert torch.equal(q.weight_scale, s)


def test_blockwise_8bit_states() -> None:
    torch.manual_seed(0)
    x = torch.randn(1000) * torch.logspace(-6, 0, 1000)
    q, a = blockwise.encode_signed(x)
    assert q.dtype == torch.int8 and q.numel() == 1024 and a.numel() == 4
    y = blockwise.decode_signed(q, a, (1000,))
    big = x.abs() > 0.1 * a.repeat_interleave(256)[:1000]
    assert ((y - x).abs()[big] / x.abs()[big]).max() < 0.03
    assert blockwise.decode_signed(*blockwise.encode_signed(torch.zeros(5)), (5,)).abs().max() == 0
    v = x.square()
    qv, av = blockwise.encode_second_moment(v)
    assert qv.dtype == torch.uint8
    w = blockwise.decode_second_moment(qv, av, (1000,))
    assert (w > 0).all()  # zero excluded: Adam's m/(√v + ε) can never blow up
    top = v > 0.1 * v.max()
    assert ((w - v).abs()[top] / v[top]).max() < 0.05


@pytest.mark.parametrize("rule, state_dtype", [("adamw", "bf16"), ("adamw", "8bit"), ("sgd", "fp32"),
                                               ("adafactor", "8bit")])
def test_rules_and_state_precisions_train(rule: str, state_dtype: str) -> None:
    m = quantize_direct_(_tiny(), "dqt-int8")
    lr = 0.3 if rule == "sgd" else 3e-3
    opt = build_optimizer(m, TrainConfig(lr=lr), torch.device("cpu"),
                          DQTConfig(optimizer=rule, state_dtype=state_dtype))
    losses = _train(m, opt, 12)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.5
    st = opt.dqt_state["layers.0.mlp.up_proj"]
    if rule == "adafactor":
        assert st["exp_avg_sq_row"].shape == (128,) and st["exp_avg_sq_col"].shape == (64,)
    if state_dtype == "bf16":
        assert st["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize("rule, state_dtype, scale", [("adamw", "8bit", "frozen"), ("adafactor", "bf16", "signed_max"),
                                                      ("sgd", "fp32", "recompute")])
def test_chunking_does_not_change_the_update(rule: str, state_dtype: str, scale: str) -> None:
    """The float32 scratch is one chunk of rows at a time; the result is bit-identical for any chunk size."""
    outs = []
    for chunk in (None, 300, 1):
        q = _module("dqt-int4", shape=(37, 50))
        opt = DirectOptimizer([("q", q)], lr=1e-2, rule=rule, state_dtype=state_dtype, scale=scale,
                              chunk_elems=chunk)
        for step in range(3):
            q.weight_grad = torch.randn(q.weight_shape, generator=torch.Generator().manual_seed(step))
            opt.step()
        outs.append((q.weight_codes.clone(), q.weight_scale.clone(), int(q.last_flips),
                     {k: v.clone() for k, v in opt.dqt_state["q"].items() if torch.is_tensor(v)}))
    for o in outs[1:]:
        assert torch.equal(o[0], outs[0][0]) and torch.equal(o[1], outs[0][1]) and o[2] == outs[0][2]
        assert all(torch.equal(o[3][k], outs[0][3][k]) for k in outs[0][3])


def test_update_in_backward_equals_stashed_update() -> None:
    """Without clipping, applying each update inside backward gives bit-identical codes: same gradients, same
    counter-based noise; and no gradient is ever stashed."""
    results = []
    for in_bwd in (False, True):
        m = quantize_direct_(_tiny(), "dqt-ternary")
        opt = build_optimizer(m, TrainConfig(lr=3e-3, grad_clip=0.0), torch.device("cpu"),
                              DQTConfig(update_in_backward=in_bwd, state_dtype="8bit"))
        idx = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            m(idx, idx).backward()
            if in_bwd:
                assert all(mod.weight_grad is None for _, mod in direct_modules(m))
            opt.clip_grad_norm_(float("inf"))
            opt.step()
            opt.zero_grad()
        results.append([mod.weight_codes.clone() for _, mod in direct_modules(m)] + [m.lm_head.weight.detach()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_clip_previous_and_state_dict_round_trip() -> None:
    m = quantize_direct_(_tiny(), "dqt-int4")
    opt = build_optimizer(m, TrainConfig(lr=3e-3, grad_clip=0.5), torch.device("cpu"),
                          DQTConfig(update_in_backward=True, clip="previous"))
    idx = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    m(idx, idx).backward()
    norm = opt.clip_grad_norm_(0.5)
    assert opt.prev_norm is not None and float(opt.prev_norm) == pytest.approx(float(norm))
    opt.step()
    opt.zero_grad()
    sd = opt.state_dict()
    m2 = quantize_direct_(_tiny(1), "dqt-int4")
    opt2 = build_optimizer(m2, TrainConfig(lr=3e-3, grad_clip=0.5), torch.device("cpu"),
                           DQTConfig(update_in_backward=True, clip="previous"))
    opt2.load_state_dict(sd)
    assert float(opt2.prev_norm) == pytest.approx(float(norm))
    for n, st in opt.dqt_state.items():
        assert st["step"] == opt2.dqt_state[n]["step"] == 1
        assert torch.equal(st["exp_avg"], opt2.dqt_state[n]["exp_avg"])
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    with pytest.raises(ValueError, match="state_dtype"):
        DirectOptimizer(direct_modules(m2), state_dtype="8bit").load_state_dict(sd)


def test_one_optimizer_interface() -> None:
    m = quantize_direct_(_tiny(), "dqt-int8")
    opt = build_optimizer(m, TrainConfig(lr=1e-3, weight_decay=0.1), torch.device("cpu"), DQTConfig())
    groups = opt.param_groups
    assert groups[-1]["dqt"] and len(groups[-1]["modules"]) == 14
    for g in groups:
        g["lr"] = 0.5  # the trainer's set_lr
    assert opt.dqt_group["lr"] == 0.5 and opt.float_opt.param_groups[0]["lr"] == 0.5
    n_float = sum(p.numel() for p in m.parameters())
    _train(m, opt, 1)
    assert sum(v.numel() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)) > 2 * n_float


def test_config_validation() -> None:
    base = ["quant.recipe=dqt-int8", "dqt.update_in_backward=true"]
    with pytest.raises(ConfigError, match="grad_accum"):
        load_config(None, base + ["train.grad_accum=2"])
    assert load_config(None, base).dqt.update_in_backward
    load_config(None, ["quant.recipe=bitnet-b1.58", "dqt.update_in_backward=true", "train.grad_accum=2"])
    with pytest.raises(ConfigError, match="state_dtype"):
        load_config(None, ["dqt.state_dtype=4bit"])
    with pytest.raises(ConfigError, match="tie_embeddings"):
        load_config(None, ["quant.recipe=dqt-int8", "dqt.quantize_embeddings=true", "model.tie_embeddings=true"])
    assert load_config(None, ["state_dtype=8bit"]).dqt.state_dtype == "8bit"  # bare key: one section has it
    cfg = load_config(None, ["quant.recipe=dqt-quest-w4a4", "dqt.seed=7"])
    assert cfg.is_direct and cfg.dqt.seed == 7


def test_update_in_backward_keeps_nan_out_of_the_codes() -> None:
    """The update happens inside backward, before the trainer can look at the norm: a NaN gradient must leave
    the codes finite and on the grid, and still show up in the returned norm so the run stops."""
    m = quantize_direct_(_tiny(), "dqt-int8")
    opt = build_optimizer(m, TrainConfig(lr=3e-3, grad_clip=1.0), torch.device("cpu"),
                          DQTConfig(update_in_backward=True))
    before = [mod.weight_codes.clone() for _, mod in direct_modules(m)]
    idx = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    loss = m(idx, idx) * float("nan")
    loss.backward()
    norm = opt.clip_grad_norm_(1.0)
    assert not torch.isfinite(norm)
    for b, (_, mod) in zip(before, direct_modules(m), strict=True):
        assert mod.weight_codes.dtype == b.dtype
        assert int(mod.weight_codes.min()) >= -128 and int(mod.weight_codes.max()) <= 127
        # the NaN gradient became zero: only weight decay and the rounding noise move a code, by at most one step
        assert int((mod.weight_codes.int() - b.int()).abs().max()) <= 1


def test_8bit_states_decay_with_stochastic_reencoding() -> None:
    """A moment that only decays (zero gradients) must decay in 8 bits too. Re-encoded with nearest rounding
    every step it gets stuck (round(q·√β) = q); with the counter-based stochastic re-encoding the optimizer
    uses, it follows β^t on average — here the second moment of small entries beside a block outlier."""
    from lowbit.optim import blockwise
    from lowbit.rng import counter_uniform

    beta, steps = 0.99, 300
    v = torch.full((256,), 1e-4)
    v[0] = 1.0  # the outlier holds the block's absmax, so the small entries sit low in the map
    expected = 1e-4 * beta**steps
    means = {}
    for mode in ("nearest", "stochastic"):
        q, a = blockwise.encode_second_moment(v)
        for t in range(steps):
            x = blockwise.decode_second_moment(q, a, (256,)) * beta
            x[0] = 1.0
            noise = counter_uniform(0, t, 7, (256,)) if mode == "stochastic" else None
            q, a = blockwise.encode_second_moment(x, noise)
        means[mode] = blockwise.decode_second_moment(q, a, (256,))[1:].mean().item()
    assert means["nearest"] > 5 * expected  # stuck
    assert abs(means["stochastic"] - expected) < 0.5 * expected
    m = torch.full((256,), 0.05)
    m[0] = 1.0
    q, a = blockwise.encode_signed(m)
    for t in range(steps):
        x = blockwise.decode_signed(q, a, (256,)) * 0.9
        x[0] = 1.0
        q, a = blockwise.encode_signed(x, counter_uniform(0, t, 8, (256,)))
    assert blockwise.decode_signed(q, a, (256,))[1:].abs().mean().item() < 1e-4  # decays to ~0, not stuck
