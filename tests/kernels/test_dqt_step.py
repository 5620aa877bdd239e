"""lowbit.kernels.dqt_step: the torch reference against DirectOptimizer (bit for bit), the Triton kernel against
the reference (Triton's CPU interpreter here, the GPU where there is one), its noise, stochastic rounding,
resume across the fused and the torch path, the custom op, and real-shape checks for the GPU machine."""

from __future__ import annotations

import pytest
import torch

from lowbit.config import DQTConfig, ModelConfig, TrainConfig
from lowbit.kernels import dqt_step
from lowbit.kernels.dqt_step import dqt_adamw_step_reference, dqt_adamw_step_triton
from lowbit.models.llama import Llama
from lowbit.nn import DirectQuantLinear, direct_modules, quantize_direct_
from lowbit.optim import DirectOptimizer, blockwise
from lowbit.quant import get_recipe
from lowbit.rng import counter_uniform, stream_id
from lowbit.train.optim import build_optimizer

CASES = [  # (recipe, state dtype, scale policy, granularity): every grid family, state format and scale layout
    ("dqt-int8", "fp32", "frozen", "auto"),
    ("dqt-ternary", "8bit", "frozen", "auto"),
    ("dqt-int4", "bf16", "signed_max", "auto"),
    ("dqt-quest-w4a4", "fp32", "frozen", "auto"),  # centered grid, per-row Δ
    ("dqt-int2", "8bit", "signed_max", "group"),
    ("dqt-int8-nearest", "bf16", "frozen", "row"),
]


@pytest.fixture
def kdev(monkeypatch: pytest.MonkeyPatch) -> str:
    """Device for the Triton kernel: the GPU when there is one, else the CPU through TRITON_INTERPRET=1."""
    if not dqt_step.has_triton():
        pytest.skip("triton is not installed (pip install 'lowbit[triton]')")
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"


@pytest.fixture
def interp(monkeypatch: pytest.MonkeyPatch) -> str:
    """The CPU through TRITON_INTERPRET=1, also on a GPU machine (bit-exact comparisons of whole training steps
    need a deterministic backward)."""
    if not dqt_step.has_triton():
        pytest.skip("triton is not installed (pip install 'lowbit[triton]')")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"


def _module(recipe: str, shape, granularity: str = "auto", seed: int = 0, device="cpu") -> DirectQuantLinear:
    g = torch.Generator().manual_seed(seed)
    r = get_recipe(recipe)
    spec = r.weight if granularity == "auto" else r.weight.replace(granularity=granularity, group_size=8)
    w = (torch.randn(*shape, generator=g) * 0.02).to(device)
    return DirectQuantLinear(w, weight_spec=spec, act_spec=None, update_rounding=r.update_rounding)


def _grad(shape, step: int, device="cpu") -> torch.Tensor:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(100 + step)) * 1e-2
    g[0, :3] = 0.0  # exact zeros: m, v stay at their decayed values
    return g.to(device)


def _args(items, opt: DirectOptimizer, zero_nonfinite=False, coefs=()):
    """The reference/launcher arguments for modules ``items`` [(name, module, grad)], states taken from ``opt``
    (created as the optimizer creates them), Δ' as the optimizer computes it."""
    grp = opt.dqt_group
    eight = opt.state_dtype == "8bit"
    sfx = "_q" if eight else ""
    lists = {k: [] for k in ("c", "g", "m", "v", "ma", "va", "s", "sn", "t", "wd", "ws", "ms", "vs")}
    spec = opt._spec(items[0][1])
    for name, mod, grad in items:
        st = opt.dqt_state[name]
        t = st["step"] + 1
        for key, second in (("exp_avg", False), ("exp_avg_sq", True)):
            opt._state_tensor(st, key, mod.weight_numel, mod.weight_shape, mod.weight_codes.device, second)
        lists["c"].append(mod.weight_codes)
        lists["g"].append(grad)
        lists["m"].append(st["exp_avg" + sfx])
        lists["v"].append(st["exp_avg_sq" + sfx])
        if eight:
            lists["ma"].append(st["exp_avg_absmax"])
            lists["va"].append(st["exp_avg_sq_absmax"])
            lists["ms"].append(stream_id(f"{name}.exp_avg"))
            lists["vs"].append(stream_id(f"{name}.exp_avg_sq"))
        lists["s"].append(mod.weight_scale)
        lists["sn"].append(opt._new_scale(mod, spec, t))
        lists["t"].append(t)
        lists["wd"].append(grp["weight_decay"] if opt._decays[name] else 0.0)
        lists["ws"].append(stream_id(name + ".weight"))
    L = lists
    return (L["c"], L["g"], L["m"], L["v"], L["ma"], L["va"], L["s"], L["sn"], list(coefs), L["t"], L["wd"], L["ws"],
            L["ms"], L["vs"], grp["lr"], *grp["betas"], grp["eps"], opt.seed, spec.bits, spec.grid, spec.granularity,
            spec.group_size, spec.rounding == "stochastic", zero_nonfinite)  # fmt: skip


def _finish(items, opt, args, flips) -> None:
    """What the optimizer does after a launch: flips, the new Δ, the step counter."""
    for (name, mod, _), f, sn in zip(items, flips, args[7], strict=True):
        mod.last_flips = f
        mod.weight_scale.copy_(sn)
        opt.dqt_state[name]["step"] += 1


def _pair(recipe, state, scale, gran, shapes, device="cpu", wd=0.1):
    """Two identical sets of modules with an optimizer each."""
    out = []
    for _ in range(2):
        mods = [(f"layers.{i}.proj", _module(recipe, s, gran, seed=i, device=device)) for i, s in enumerate(shapes)]
        opt = DirectOptimizer(mods, lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd, state_dtype=state,
                              scale=scale, seed=7, chunk_elems=300, fused=False)  # fmt: skip
        out.append((mods, opt))
    return out


def _states(opt):
    return {n: {k: v.clone() for k, v in st.items() if torch.is_tensor(v)} for n, st in opt.dqt_state.items()}


# ----------------------------------------------------------------------------------------------------------
# the reference is DirectOptimizer's update (CPU, no Triton needed)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe, state, scale, gran", CASES)
def test_reference_equals_direct_optimizer(recipe, state, scale, gran) -> None:
    """Same inputs, same seed: the whole-tensor reference and the chunked torch path agree bit for bit in codes,
    states, Δ and flip counts, over several steps."""
    shapes = [(24, 40), (16, 64)]
    (mods_a, opt_a), (mods_b, opt_b) = _pair(recipe, state, scale, gran, shapes)
    for step in range(3):
        for (_, ma), (_, mb) in zip(mods_a, mods_b, strict=True):
            ma.weight_grad = _grad(ma.weight_shape, step)
            mb.weight_grad = ma.weight_grad.clone()
        opt_a.step()
        items = [(n, m, m.weight_grad) for n, m in mods_b]
        args = _args(items, opt_b)
        _finish(items, opt_b, args, dqt_adamw_step_reference(*args))
        for (_, ma), (_, mb) in zip(mods_a, mods_b, strict=True):
            assert torch.equal(ma.weight_codes, mb.weight_codes)
            assert torch.equal(ma.weight_scale, mb.weight_scale)
            assert int(ma.last_flips) == int(mb.last_flips) > 0
        sa, sb = _states(opt_a), _states(opt_b)
        assert all(torch.equal(sa[n][k], sb[n][k]) for n in sa for k in sa[n])


def test_reference_clip_coefficient_and_nan_guard() -> None:
    """grad_scales and zero_nonfinite are the update-in-backward path's ``grad * coef`` and ``nan_to_num``."""
    (mods_a, opt_a), (mods_b, opt_b) = _pair("dqt-int8", "fp32", "frozen", "auto", [(8, 32)])
    g = _grad((8, 32), 0)
    g[1, 1], g[2, 2], g[3, 3] = float("nan"), float("inf"), -float("inf")
    coef = torch.tensor(0.37)
    (_, ma), (_, mb) = mods_a[0], mods_b[0]
    opt_a._update("layers.0.proj", ma, torch.nan_to_num(g * coef, nan=0.0, posinf=0.0, neginf=0.0))
    items = [("layers.0.proj", mb, g)]
    args = _args(items, opt_b, zero_nonfinite=True, coefs=[coef])
    dqt_adamw_step_reference(*args)
    assert torch.equal(ma.weight_codes, mb.weight_codes)
    assert torch.equal(opt_a.dqt_state["layers.0.proj"]["exp_avg_sq"], opt_b.dqt_state["layers.0.proj"]["exp_avg_sq"])


def test_custom_op_on_cpu_is_the_reference() -> None:
    (mods_a, opt_a), (mods_b, opt_b) = _pair("dqt-ternary", "8bit", "frozen", "auto", [(16, 32), (8, 64)])
    ia = [(n, m, _grad(m.weight_shape, 0)) for n, m in mods_a]
    ib = [(n, m, _grad(m.weight_shape, 0)) for n, m in mods_b]
    fa = dqt_adamw_step_reference(*_args(ia, opt_a))
    fb = torch.ops.lowbit.dqt_adamw_step(*_args(ib, opt_b))
    assert torch.equal(fa, fb)
    assert all(torch.equal(a.weight_codes, b.weight_codes) for (_, a), (_, b) in zip(mods_a, mods_b, strict=True))
    (mods_c, opt_c), _ = _pair("dqt-int8", "bf16", "frozen", "auto", [(8, 16)])
    torch.library.opcheck(torch.ops.lowbit.dqt_adamw_step.default,
                          _args([(n, m, _grad(m.weight_shape, 0)) for n, m in mods_c], opt_c))  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# the Triton kernel against the reference
# ----------------------------------------------------------------------------------------------------------


def _assert_close_codes(a: torch.Tensor, b: torch.Tensor, what: str) -> int:
    """Codes equal but for rare rounding-threshold crossings (< 1e-4 of them, at least 2 allowed on tiny
    tensors), each by one step; returns the number of mismatches."""
    d = (a.int() - b.int()).abs()
    bad = int((d != 0).sum())
    assert bad <= max(2, 1e-4 * d.numel()), f"{what}: {bad} of {d.numel()} differ"
    assert int(d.max()) <= 1, f"{what}: a difference of {int(d.max())} steps"
    return bad


def _compare_states(sa: dict, sb: dict, state: str) -> None:
    for n in sa:
        for k, x in sa[n].items():
            y = sb[n][k]
            if x.dtype == torch.float32 and not k.endswith("absmax"):  # fp32 moments: ulps (fma vs two roundings)
                torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6 * float(x.abs().max()), msg=f"{n}.{k}")
            elif x.dtype == torch.bfloat16:  # rounding an fp32 value one ulp apart can move it one bf16 ulp
                assert int((x != y).sum()) <= max(2, 1e-4 * x.numel()), f"{n}.{k}"
                torch.testing.assert_close(y, x, rtol=2**-7, atol=0, msg=f"{n}.{k}")
            elif k.endswith("absmax"):
                torch.testing.assert_close(y, x, rtol=1e-6, atol=0, msg=f"{n}.{k}")
            else:  # 8-bit state codes
                _assert_close_codes(x, y, f"{n}.{k}")


@pytest.mark.parametrize("recipe, state, scale, gran", CASES)
@pytest.mark.parametrize("shapes", [[(37, 64)], [(37, 64), (16, 48), (5, 128), (3, 256)]], ids=["one", "group"])
def test_kernel_matches_reference(kdev, monkeypatch, recipe, state, scale, gran, shapes) -> None:
    """Odd row counts, several tiles per tensor and ragged last tiles (tiles of 512 elements here), the one-tensor
    and the grouped kernel, three steps from the same state."""
    monkeypatch.setattr(dqt_step, "INTERPRET_BLOCK", 512)
    if gran == "group":
        shapes = [(r, k) for r, k in shapes if k % 8 == 0]
    (mods_a, opt_a), (mods_b, opt_b) = _pair(recipe, state, scale, gran, shapes, device=kdev)
    for step in range(3):
        ia = [(n, m, _grad(m.weight_shape, step, kdev)) for n, m in mods_a]
        ib = [(n, m, _grad(m.weight_shape, step, kdev)) for n, m in mods_b]
        before = [m.codes() for _, m in mods_b]
        args_a, args_b = _args(ia, opt_a), _args(ib, opt_b)
        _finish(ia, opt_a, args_a, dqt_adamw_step_reference(*args_a))
        _finish(ib, opt_b, args_b, dqt_adamw_step_triton(*args_b))
        for (n, ma), (_, mb), c0 in zip(mods_a, mods_b, before, strict=True):
            bad = _assert_close_codes(ma.codes(), mb.codes(), f"step {step} {n}")
            assert int(mb.last_flips) == int((mb.codes() != c0).sum())  # the kernel's own count is right
            assert abs(int(mb.last_flips) - int(ma.last_flips)) <= bad
            torch.testing.assert_close(mb.weight_scale, ma.weight_scale, rtol=1e-6, atol=0)
        _compare_states(_states(opt_a), _states(opt_b), state)


def _row_split(args, r: int, k: int, eight: bool):
    """The launcher arguments of ONE tensor as two tensors: its rows [0, r) and [r, N) (views into the same
    storage, so the update writes the whole tensor), with the noise offsets of a row shard (row0·K)."""
    c, g, m, v, ma, va, s, sn = (args[i][0] if args[i] else None for i in range(8))
    rows = g.shape[0]

    def at(t, cut):  # the two parts of t at index cut of its first dimension
        return [t[:cut], t[cut:]]

    if eight:  # blockwise states: flat codes, one absmax per 256 values (r·K a multiple of 256)
        states = [at(m, r * k), at(v, r * k), at(ma, r * k // 256), at(va, r * k // 256)]
    else:
        states = [at(m.view(rows, k), r), at(v.view(rows, k), r), [], []]
    scales = [at(x.view(rows, -1), r) if x.dim() else [x, x] for x in (s, sn)]
    dup = [[x[0], x[0]] if x else [] for x in args[9:14]]
    return (at(c.view(rows, -1), r), at(g, r), *states, *scales, list(args[8]) * 2, *dup, *args[14:],
            [0, r * k])  # fmt: skip


@pytest.mark.parametrize("impl", ["reference", "kernel"])
@pytest.mark.parametrize(("recipe", "state", "gran"), [("dqt-int8", "fp32", "row"), ("dqt-ternary", "8bit", "auto"),
                                                         ("dqt-int4", "bf16", "row")])
def test_row_shards_with_noise_offsets_write_the_whole_tensors_update(kdev, monkeypatch, impl, recipe, state,
                                                                       gran) -> None:
    """An FSDP2 rank updates its rows [row0, row0 + rows) with the noise drawn at row0·K: two row shards
    updated as two tensors (noise_offsets [0, r·K]) write exactly the codes and states of the whole tensor's
    update — stochastic rounding of the weight and of the 8-bit states included."""
    monkeypatch.setattr(dqt_step, "INTERPRET_BLOCK", 512)
    fn = dqt_adamw_step_reference if impl == "reference" else dqt_adamw_step_triton
    dev = "cpu" if impl == "reference" else kdev
    shape, r = (24, 64), 8  # 8·64 = 512: shard boundaries on whole 256-value state blocks
    (mods_a, opt_a), (mods_b, opt_b) = _pair(recipe, state, "frozen", gran, [shape], device=dev)
    (n, ma), (_, mb) = mods_a[0], mods_b[0]
    for step in range(2):
        g = _grad(shape, step, dev)
        args_a, args_b = _args([(n, ma, g)], opt_a), _args([(n, mb, g)], opt_b)
        _finish([(n, ma, g)], opt_a, args_a, fn(*args_a))
        flips = fn(*_row_split(args_b, r, shape[1], state == "8bit"))
        _finish([(n, mb, g)], opt_b, args_b, flips.sum().reshape(1))
        assert torch.equal(ma.codes(), mb.codes()), f"step {step}"
        assert int(mb.last_flips) == int(ma.last_flips)
        for key, x in _states(opt_a)[n].items():
            assert torch.equal(x, _states(opt_b)[n][key]), f"step {step} {key}"


def test_noise_offsets_are_checked(kdev) -> None:
    (mods, opt), _ = _pair("dqt-int8", "fp32", "frozen", "auto", [(4, 64)], device=kdev)
    n, m = mods[0]
    args = _args([(n, m, _grad((4, 64), 0, kdev))], opt)
    with pytest.raises(ValueError, match="noise_offsets"):
        dqt_adamw_step_triton(*args, [-1])
    with pytest.raises(ValueError, match="noise_offsets"):
        dqt_adamw_step_triton(*args, [0, 0])


def test_kernel_odd_k_packed_codes_and_nan_guard(kdev, monkeypatch) -> None:
    """Packed codes with K not a multiple of the codes per byte (padded rows: the masked path), a clip
    coefficient and non-finite gradient values zeroed in the kernel."""
    monkeypatch.setattr(dqt_step, "INTERPRET_BLOCK", 256)
    (mods_a, opt_a), (mods_b, opt_b) = _pair("dqt-ternary", "fp32", "frozen", "auto", [(33, 19), (7, 5)], kdev)
    for step in range(2):
        g = [_grad(m.weight_shape, step, kdev) for _, m in mods_a]
        g[0][4, 4], g[1][1, 1] = float("nan"), float("inf")
        coef = torch.tensor(0.5, device=kdev)
        for (n, ma), (_, mb), gi in zip(mods_a, mods_b, g, strict=True):
            args_a = _args([(n, ma, gi)], opt_a, zero_nonfinite=True, coefs=[coef])
            args_b = _args([(n, mb, gi)], opt_b, zero_nonfinite=True, coefs=[coef])
            _finish([(n, ma, gi)], opt_a, args_a, dqt_adamw_step_reference(*args_a))
            _finish([(n, mb, gi)], opt_b, args_b, dqt_adamw_step_triton(*args_b))
            _assert_close_codes(ma.codes(), mb.codes(), n)
            assert int(mb.codes().abs().max()) <= 1  # every stored 2-bit code stays on the ternary grid
            pad_shift = 2 * (mb.weight_shape[-1] % 4)  # the last byte's padding codes stay u = 0
            assert int((mb.weight_codes[:, -1] >> pad_shift).max()) == 0
    _compare_states(_states(opt_a), _states(opt_b), "fp32")
    assert all(torch.isfinite(st["exp_avg_sq"]).all() for st in opt_b.dqt_state.values())


def test_kernel_noise_is_counter_uniform(kdev) -> None:
    """The kernel's hash is lowbit.rng's, bit for bit, 64-bit indices and seeds included."""
    idx = torch.cat([torch.arange(3000), torch.randint(0, 2**62, (1000,), generator=torch.Generator().manual_seed(0)),
                     torch.tensor([2**32 - 1, 2**32, 2**33 + 5])])  # fmt: skip
    for seed, step, stream in ((0, 1, 0), (123456789012, 7, 0xDEADBEEF), (2**40 + 3, 2**33, stream_id("x.weight"))):
        a = dqt_step.counter_uniform_triton(seed, step, stream, idx.to(kdev)).cpu()
        assert torch.equal(a, counter_uniform(seed, step, stream, index=idx))


@pytest.mark.parametrize("frac", [0.3, -0.7, 0.05])
def test_kernel_stochastic_rounding_is_unbiased(kdev, frac) -> None:
    """One AdamW step from zero moments moves every weight by lr·sign(−g): with lr = frac·Δ, E[code] moves by
    frac exactly (65 536 weights: σ ≈ 0.002); nearest rounding stalls below half a step."""
    delta = 0.01
    for rounding in ("stochastic", "nearest"):
        mod = _module("dqt-int8", (256, 256), device=kdev)
        mod.update_rounding = rounding
        mod.set_codes(torch.full((256, 256), 3, dtype=torch.int8, device=kdev), torch.tensor(delta))
        opt = DirectOptimizer([("q", mod)], lr=abs(frac) * delta, eps=1e-12, fused=False)
        grad = torch.full((256, 256), -1.0 if frac > 0 else 1.0, device=kdev)
        dqt_adamw_step_triton(*_args([("q", mod, grad)], opt))
        c = mod.codes().float()
        if rounding == "nearest":
            assert float(c.mean()) == 3 + round(frac)
            continue
        assert set(c.unique().tolist()) <= {2.0, 3.0, 4.0}
        assert float(c.mean()) == pytest.approx(3 + frac, abs=0.01)


# ----------------------------------------------------------------------------------------------------------
# the optimizer: fused and torch paths share one state format (resume across them)
# ----------------------------------------------------------------------------------------------------------


def _tiny(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(ModelConfig(size="tiny", vocab_size=128, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=16))


def _steps(m, opt, n: int, first: int = 0) -> list[float]:
    out = []
    for s in range(first, first + n):
        idx = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(s), device=m.lm_head.weight.device)
        loss = m(idx, idx)
        loss.backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        out.append(float(loss.detach()))
    return out


def _build(recipe, state, fused, device, in_bwd=False):
    m = quantize_direct_(_tiny(), recipe).to(device)
    cfg = DQTConfig(state_dtype=state, fused=fused, update_in_backward=in_bwd)
    return m, build_optimizer(m, TrainConfig(lr=3e-3, weight_decay=0.1), torch.device(device), cfg)


def _clone(sd):
    if torch.is_tensor(sd):
        return sd.clone()
    if isinstance(sd, dict):
        return {k: _clone(v) for k, v in sd.items()}
    if isinstance(sd, list | tuple):
        return type(sd)(_clone(v) for v in sd)
    return sd


@pytest.mark.parametrize("recipe, state, in_bwd", [("dqt-int8", "fp32", False), ("dqt-ternary", "8bit", True)])
def test_resume_across_fused_and_torch_paths(interp, recipe, state, in_bwd) -> None:
    """Train 2 steps fused, checkpoint, train 2 more. From the checkpoint, the fused path resumes bit for bit
    and the torch path continues the same run (codes equal but for rare last-bit rounding differences); the
    two paths' state dicts have the same keys, shapes and dtypes, and a torch-path checkpoint resumes fused."""
    m, opt = _build(recipe, state, "on", interp, in_bwd)
    _steps(m, opt, 2)
    msd, osd = _clone(m.state_dict()), _clone(opt.state_dict())
    ref_losses = _steps(m, opt, 2, first=2)
    ref_codes = [mod.codes() for _, mod in direct_modules(m)]
    for fused in ("on", "off"):
        m2, opt2 = _build(recipe, state, fused, interp, in_bwd)
        m2.load_state_dict(msd)
        opt2.load_state_dict(_clone(osd))
        losses = _steps(m2, opt2, 2, first=2)
        for a, (n, mod) in zip(ref_codes, direct_modules(m2), strict=True):
            if fused == "on":
                assert torch.equal(a, mod.codes()), n
            else:
                _assert_close_codes(a, mod.codes(), n)
        assert losses == ref_losses if fused == "on" else losses == pytest.approx(ref_losses, rel=1e-4)
    m3, opt3 = _build(recipe, state, "off", interp, in_bwd)
    _steps(m3, opt3, 2)
    shapes = lambda sd: {n: {k: (v.shape, v.dtype) for k, v in st.items()} for n, st in sd["dqt"].items()}  # noqa: E731
    assert shapes(opt3.state_dict()) == shapes(osd)
    m4, opt4 = _build(recipe, state, "on", interp, in_bwd)
    m4.load_state_dict(m3.state_dict())
    opt4.load_state_dict(_clone(opt3.state_dict()))
    _steps(m4, opt4, 1, first=2)
    _steps(m3, opt3, 1, first=2)
    for (n, a), (_, b) in zip(direct_modules(m3), direct_modules(m4), strict=True):
        _assert_close_codes(a.codes(), b.codes(), n)
    assert all(st["step"] == 3 for st in opt4.dqt_state.values())


# ----------------------------------------------------------------------------------------------------------
# real shapes, for the GPU machine
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.needs_cuda
@pytest.mark.parametrize("recipe, state", [("dqt-int8", "fp32"), ("dqt-int8", "bf16"), ("dqt-int8", "8bit"),
                                           ("dqt-ternary", "fp32"), ("dqt-ternary", "8bit")])  # fmt: skip
def test_kernel_matches_reference_4096(recipe, state) -> None:
    """4096 × 4096 (and a 4096 × 11008 MLP matrix in the same launch), 3 steps: codes equal to the CUDA torch
    reference but for < 1e-4 of them, by one step; states within float32 rounding."""
    if not dqt_step.has_triton():
        pytest.skip("triton is not installed")
    shapes = [(4096, 4096), (4096, 11008)]
    (mods_a, opt_a), (mods_b, opt_b) = _pair(recipe, state, "frozen", "auto", shapes, device="cuda")
    for step in range(3):
        grads = [torch.randn(s, device="cuda", generator=torch.Generator("cuda").manual_seed(step)) * 1e-2
                 for s in shapes]  # fmt: skip
        ia = [(n, m, g) for (n, m), g in zip(mods_a, grads, strict=True)]
        ib = [(n, m, g) for (n, m), g in zip(mods_b, grads, strict=True)]
        args_a, args_b = _args(ia, opt_a), _args(ib, opt_b)
        _finish(ia, opt_a, args_a, dqt_adamw_step_reference(*args_a))
        _finish(ib, opt_b, args_b, dqt_adamw_step_triton(*args_b))
        for (n, ma), (_, mb) in zip(mods_a, mods_b, strict=True):
            _assert_close_codes(ma.codes(), mb.codes(), f"step {step} {n}")
        _compare_states(_states(opt_a), _states(opt_b), state)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("state", ["fp32", "8bit"])
def test_fused_step_has_no_host_sync_and_few_launches(state) -> None:
    """A fused optimizer step (91 tensors of a 430m-like layer set, shrunk) runs without a host sync
    (``torch.cuda.set_sync_debug_mode("error")``) and launches one Triton kernel; the torch path has no host
    sync either."""
    if not dqt_step.has_triton():
        pytest.skip("triton is not installed")
    r = get_recipe("dqt-int8")
    for fused in (True, False):
        mods = [(f"layers.{i // 7}.p{i % 7}", DirectQuantLinear(torch.randn(256, 512) * 0.02, weight_spec=r.weight)
                 .cuda()) for i in range(91)]  # fmt: skip
        opt = DirectOptimizer(mods, fused=fused, state_dtype=state, weight_decay=0.1)
        for it in range(3):
            for _, m in mods:
                m.weight_grad = torch.randn(256, 512, device="cuda")
            torch.cuda.synchronize()
            before = dict(dqt_step.LAUNCHES)
            torch.cuda.set_sync_debug_mode("error" if it else "default")  # the first step creates the states
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            launched = {k: v - before.get(k, 0) for k, v in dqt_step.LAUNCHES.items()}
            if fused:
                assert launched.get("group", 0) == 1 and launched.get("tensor", 0) == 0
        torch.cuda.synchronize()


@pytest.mark.needs_cuda
def test_fused_and_torch_optimizer_agree_at_4096() -> None:
    """DirectOptimizer, fused vs torch path, 3 steps at 4096 × 4096: codes differ in < 1e-4 of the weights."""
    if not dqt_step.has_triton():
        pytest.skip("triton is not installed")
    outs = []
    for fused in (True, False):
        mod = _module("dqt-int8", (4096, 4096), device="cuda")
        opt = DirectOptimizer([("q", mod)], lr=1e-3, weight_decay=0.1, fused=fused)
        for step in range(3):
            mod.weight_grad = torch.randn(
                4096, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(step)
            )
            opt.step()
        outs.append(mod.codes())
    _assert_close_codes(outs[0], outs[1], "codes")


def test_blockwise_constant_matches_the_kernel() -> None:
    """The kernel decodes 8-bit first moments with absmax · fp32(1/16129): ATen's CUDA division by a host
    scalar; the 8-bit block size is the kernel's 256."""
    assert dqt_step.INV_16129 == float(torch.tensor(1.0) / torch.tensor(16129.0))
    assert blockwise.BLOCK == 256


@pytest.mark.parametrize("kind, per, state, scale", [("group", 1, 0, 0), ("tensor", 4, 2, 0), ("group", 2, 1, 1)])
def test_kernels_compile_for_hopper_with_ieee_float_ops(kind, per, state, scale) -> None:
    """Compile the kernels for sm_90 here (no GPU needed: Triton's bundled ptxas) and read the PTX: no
    approximate division or square root, exactly the three written-out fused multiply-adds per element (fp
    contraction off), and vector loads in the unmasked tiles."""
    if not dqt_step.has_triton():
        pytest.skip("triton is not installed (pip install 'lowbit[triton]')")
    import re

    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"triton's compiler API: {e}")
    k = dqt_step._kernels(False)
    block, warps = dqt_step.TILES[state]
    cx = dict(P=per, SB=8 // per, BYTES=block // per, ALIGNED=True, SCALE=scale, STATE=state, STOCHASTIC=True,
              HAS_COEF=kind == "tensor", ZERO_NONFINITE=kind == "tensor")  # fmt: skip
    if kind == "group":
        fn, sig = k.group, {"tab_ptr": "*i64", "flips_ptr": "*i64", "n_tensors": "i32", "qmin": "i32", "qmax": "i32"}
        sig |= dict.fromkeys(["w1", "b2", "w2", "eps", "goff"], "fp32")
        cx |= dict(LOG_T=7, NF=dqt_step._NF, ALIGN16=True)
        attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
    else:
        st, sv = {0: ("*fp32", "*fp32"), 1: ("*bf16", "*bf16"), 2: ("*i8", "*u8")}[state]
        sig = {"codes_ptr": "*i8" if per == 1 else "*u8", "grad_ptr": "*fp32", "m_ptr": st, "v_ptr": sv}
        sig |= dict.fromkeys(["ma_ptr", "va_ptr", "s_ptr", "sn_ptr", "coef_ptr"], "*fp32") | {"flips_ptr": "*i64"}
        sig |= dict.fromkeys(["n", "K", "KB", "n_bytes", "s_row", "s_gs", "wk1", "wk2", "mk1", "mk2", "vk1", "vk2",
                              "qmin", "qmax", "noff"], "i32")  # fmt: skip
        sig |= dict.fromkeys(["decay", "neg_step", "inv_sqrt_bc2", "w1", "b2", "w2", "eps", "goff"], "fp32")
        fn, attrs = k.tensor, {(i,): [["tt.divisibility", 16]] for i in range(10)}
    names = fn.arg_names
    sig |= dict.fromkeys(cx, "constexpr")
    src = ASTSource(fn=fn, signature={n: sig[n] for n in names}, attrs=attrs,
                    constexprs={(names.index(n),): v for n, v in cx.items()})  # fmt: skip
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, enable_fp_fusion=False))
    ptx = ptx.asm["ptx"]
    assert not re.search(r"div\.(full|approx)|sqrt\.approx|rcp\.approx", ptx)
    per_thread = block // (32 * warps)
    assert len(re.findall(r"fma\.rn\.f32", ptx)) == 2 * 3 * per_thread  # two tile variants (masked, unmasked)
    assert re.search(r"ld\.global(\.[a-z0-9]+)*\.v[24]", ptx)  # vectorised (v4 for fp32 states)
