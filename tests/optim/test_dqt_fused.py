"""DirectOptimizer's fused path (lowbit.kernels.dqt_step): when it is used, how many kernels a step launches,
the update inside backward, and the configuration. Kernel numerics: tests/kernels/test_dqt_step.py."""

from __future__ import annotations

import pytest
import torch

from lowbit.config import ConfigError, DQTConfig, ModelConfig, TrainConfig, load_config
from lowbit.kernels import dqt_step
from lowbit.models.llama import Llama
from lowbit.nn import direct_modules, quantize_direct_
from lowbit.optim import DirectOptimizer
from lowbit.testing import interpret_in_process
from lowbit.train.optim import build_optimizer


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused path on CPU tensors: Triton's interpreter (these tests use the CPU even on a GPU machine)."""
    if not dqt_step.has_triton():
        pytest.skip("triton is not installed (pip install 'lowbit[triton]')")
    interpret_in_process(monkeypatch)  # numpy compat: the trainer test reaches scaled_mm's runtime-bound loop


def _model(recipe: str = "dqt-int8", seed: int = 0):
    torch.manual_seed(seed)
    m = Llama(ModelConfig(size="tiny", vocab_size=128, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=16))
    return quantize_direct_(m, recipe)


def _opt(m, **dqt):
    return build_optimizer(m, TrainConfig(lr=3e-3, weight_decay=0.1, grad_clip=1.0), torch.device("cpu"),
                           DQTConfig(**dqt))  # fmt: skip


def _step(m, opt, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    idx = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))
    (m(idx, idx) * scale).backward()
    norm = opt.clip_grad_norm_(1.0)
    opt.step()
    opt.zero_grad()
    return norm


def _launches(fn) -> dict[str, int]:
    before = dict(dqt_step.LAUNCHES)
    fn()
    return {k: v - before.get(k, 0) for k, v in dqt_step.LAUNCHES.items() if v - before.get(k, 0)}


def test_launches_per_step(interpreter) -> None:
    """Stashed gradients: one grouped kernel for all 7 DQT tensors per step (same grid spec); update inside
    backward: one kernel per tensor as its gradient arrives. Counted, not timed."""
    m = _model()
    opt = _opt(m, fused="on")
    assert len(direct_modules(m)) == 7
    for s in range(2):
        assert _launches(lambda s=s: _step(m, opt, s)) == {"group": 1}
    m = _model()
    opt = _opt(m, fused="on", update_in_backward=True)
    assert _launches(lambda: _step(m, opt)) == {"tensor": 7}
    # scale="recompute": the re-fitting steps take the torch path, the others the kernel
    m = _model()
    opt = _opt(m, fused="on", scale="recompute", scale_every=2)
    assert _launches(lambda: _step(m, opt, 0)) == {"group": 1}
    assert _launches(lambda: _step(m, opt, 1)) == {}


def test_auto_is_the_torch_path_on_cpu(interpreter) -> None:
    """dqt.fused=auto uses the kernel for CUDA tensors only; on CPU it is the torch path (no launch)."""
    m = _model()
    opt = _opt(m)
    assert opt.fused is None
    assert _launches(lambda: _step(m, opt)) == {}
    assert not any(opt._fused_ok.values())


def test_fused_on_needs_cuda_or_the_interpreter(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    m = _model()
    opt = _opt(m, fused="on")
    with pytest.raises(RuntimeError, match="CUDA"):
        _step(m, opt)
    with pytest.raises(ValueError, match="adamw"):
        DirectOptimizer(direct_modules(m), rule="sgd", fused=True)


def test_fused_update_in_backward_keeps_nan_out_of_the_codes(interpreter) -> None:
    """As the torch path: a NaN gradient applied inside backward leaves the codes on the grid (the kernel
    zeroes non-finite gradient values after clipping), and the returned norm is NaN so the trainer stops."""
    m = _model()
    opt = _opt(m, fused="on", update_in_backward=True)
    before = [mod.weight_codes.clone() for _, mod in direct_modules(m)]
    norm = _step(m, opt, scale=float("nan"))
    assert not torch.isfinite(norm)
    for b, (_, mod) in zip(before, direct_modules(m), strict=True):
        assert int((mod.weight_codes.int() - b.int()).abs().max()) <= 1  # weight decay and noise only
    assert all(torch.isfinite(st["exp_avg"]).all() for st in opt.dqt_state.values())


def test_fused_config() -> None:
    assert DQTConfig().fused == "auto"
    assert load_config(None, ["quant.recipe=dqt-int8", "dqt.fused=off"]).dqt.fused == "off"
    with pytest.raises(ConfigError, match="fused"):
        load_config(None, ["dqt.fused=yes"])
    with pytest.raises(ConfigError, match="adamw"):
        DQTConfig(fused="on", optimizer="sgd")
    m = _model()
    assert [_opt(m, fused=f).fused for f in ("auto", "on", "off")] == [None, True, False]


def test_trainer_resumes_across_fused_and_torch_paths(interpreter, monkeypatch, tmp_path, tiny_corpus,
                                                      run_config) -> None:  # fmt: skip
    """Through the trainer's safetensors checkpoint: a fused run resumed fused is bit-identical to the
    uninterrupted one, and resumed on the torch path (dqt.fused=off) it continues the same run."""
    from lowbit.train import trainer
    from lowbit.train.logger import read_log
    from lowbit.train.trainer import Trainer

    # dqt.fused is an execution detail like train.device: a resume may change it
    monkeypatch.setattr(trainer, "RESUMABLE_CHANGES", trainer.RESUMABLE_CHANGES | {"dqt.fused"})

    over = {"quant.recipe": "dqt-int8", "train.steps": 3, "train.ckpt_every": 1, "train.eval_every": 3,
            "dqt.fused": "on", "model.n_layers": 1}  # fmt: skip
    data = tmp_path / "data"
    cfg = lambda name, **o: run_config(tmp_path / name, tiny_corpus, data, **(over | o))  # noqa: E731
    Trainer(cfg("a")).fit()
    for name, fused in (("b", "on"), ("c", "off")):
        Trainer(cfg(name)).fit(until_step=1)
        Trainer(cfg(name, **{"dqt.fused": fused}), resume=True).fit()
    la, lb, lc = ([r["loss"] for r in read_log(tmp_path / n, "train")] for n in "abc")
    assert la == lb
    assert la[:2] == lc[:2] and lc == pytest.approx(la, rel=1e-3)  # step 2's loss comes before its update


class _RowShard:
    """What lowbit.distributed.parallel.DirectShard offers the optimizer (rows [row0, row0 + rows) of the codes,
    world size), without a process group: world_size 1, so no flip all-reduce."""

    def __init__(self, codes: torch.Tensor, row0: int, rows: int, n_rows: int) -> None:
        self._codes, self.row0, self.rows, self.n_rows, self.world_size = codes, row0, rows, n_rows, 1

    def local(self) -> torch.Tensor:
        return self._codes.view(self.n_rows, -1)[self.row0:self.row0 + self.rows]


@pytest.mark.parametrize("state", ["fp32", "8bit"])
def test_fused_step_on_a_row_shard_equals_the_torch_path(interpreter, state) -> None:
    """An FSDP2 rank's update — rows [8, 24) of a 24×64 DQT tensor, per-row Δ, stochastic rounding with the
    noise at row0·K: the fused kernel (the shard as a tensor of its own) writes the torch path's codes and
    states, and leaves the other rank's rows alone."""
    from lowbit.nn.direct import DirectQuantLinear
    from lowbit.quant import get_recipe

    recipe = get_recipe("dqt-int8")
    out = []
    for fused in (False, True):
        w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0)) * 0.02
        mod = DirectQuantLinear(w, weight_spec=recipe.weight.replace(granularity="row"), act_spec=None,
                                update_rounding=recipe.update_rounding)  # fmt: skip
        mod.shard = _RowShard(mod.weight_codes, 8, 16, 24)
        opt = DirectOptimizer([("l", mod)], lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                              state_dtype=state, seed=7, fused=fused)  # fmt: skip
        before = mod.weight_codes.clone()
        launches = _launches(lambda opt=opt, mod=mod: [
            (setattr(mod, "weight_grad", torch.randn(16, 64, generator=torch.Generator().manual_seed(s)) * 1e-2),
             opt.step()) for s in range(3)])  # fmt: skip
        assert bool(launches) == fused  # the kernel ran on the shard (and only when asked)
        assert torch.equal(mod.weight_codes[:8], before[:8])  # the rows of the other rank: untouched
        assert int((mod.weight_codes[8:] != before[8:]).sum()) > 0
        out.append((mod.weight_codes.clone(), {k: v.clone() for k, v in opt.dqt_state["l"].items()
                                               if torch.is_tensor(v)}))  # fmt: skip
    (codes_t, st_t), (codes_f, st_f) = out
    diff = (codes_t.int() - codes_f.int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= 2  # a rounding threshold crossed at most rarely
    for k, v in st_t.items():
        if v.dtype == torch.float32:
            torch.testing.assert_close(st_f[k], v, rtol=1e-5, atol=1e-9)
        else:  # 8-bit state codes
            assert int(((st_f[k].int() - v.int()).abs() > 1).sum()) == 0, k
