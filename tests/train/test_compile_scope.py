"""train.compile_scope: the whole model or each block compiled on its own (lowbit.distributed.parallel's
compile_blocks / compile_model, shared by the trainer, the parallel path and benchmarks/bench_train.py)."""

import copy

import pytest
import torch

from lowbit.config import ConfigError, load_config
from lowbit.distributed.parallel import compile_blocks, compile_model
from lowbit.train.logger import read_log
from lowbit.train.trainer import RESUMABLE_CHANGES, Trainer


def losses(run_dir):
    return [r["loss"] for r in read_log(run_dir, "train")]


def test_config_values():
    assert load_config(None, []).train.compile_scope == "model"
    assert load_config(None, ["train.compile_scope=block"]).train.compile_scope == "block"
    with pytest.raises(ConfigError, match=r"train.compile_scope='blocks' is not one of .*did you mean 'block'"):
        load_config(None, ["train.compile_scope=blocks"])
    with pytest.raises(ConfigError, match="compile scope 'layer'"):
        compile_model(torch.nn.Linear(2, 2), "layer")


def test_resume_may_change_the_scope(tmp_path, tiny_corpus, run_config):
    # an execution detail, like train.compile (left off here: this test is about the config check)
    assert {"train.compile", "train.compile_scope"} <= RESUMABLE_CHANGES
    over = {"train.steps": 2, "train.eval_every": 0, "train.ckpt_every": 1}
    Trainer(run_config(tmp_path / "r", tiny_corpus, tmp_path / "data", **over)).fit(until_step=1)
    cfg = run_config(tmp_path / "r", tiny_corpus, tmp_path / "data", **over, **{"train.compile_scope": "block"})
    Trainer(cfg, resume=True).fit()
    assert len(losses(tmp_path / "r")) == 2


def test_trainer_block_scope_matches_model_scope_and_eager(tmp_path, tiny_corpus, run_config):
    # the real thing (inductor, as the trainer calls torch.compile), on the 2-layer d=32 bf16 model
    over = {"train.steps": 3, "train.eval_every": 0, "train.ckpt_every": 0, "train.eval_batches": 1}
    runs = {"eager": {}, "model": {"train.compile": True},
            "block": {"train.compile": True, "train.compile_scope": "block"}}
    got = {}
    for name, extra in runs.items():
        torch._dynamo.reset()
        t = Trainer(run_config(tmp_path / name, tiny_corpus, tmp_path / "data", **over, **extra))
        t.fit()
        got[name] = losses(tmp_path / name)
        compiled = [b._compiled_call_impl is not None for b in t.model.layers]
        if name == "block":  # compiled in place: the step calls the model itself, its blocks compiled
            assert t.fwd is t.model and all(compiled)
        elif name == "model":  # a wrapper around an eager model
            assert t.fwd is not t.model and t.fwd._orig_mod is t.model and not any(compiled)
    torch._dynamo.reset()
    assert len(got["eager"]) == 3
    assert got["block"] == pytest.approx(got["eager"], rel=1e-5)
    assert got["model"] == pytest.approx(got["eager"], rel=1e-5)


def _train(model, fwd, batches):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = []
    for x, y in batches:
        loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


def test_helper_on_a_quantized_model(tmp_path, run_config):
    # quest-w4a4 (d = ffn = 128: the Hadamard block divides every K); inductor's CPU compile of the quantizer
    # takes a minute per scope, so the helper is tested directly, with the aot_eager backend (dynamo + AOT
    # autograd, eager kernels). Block scope: one graph for both blocks, reused (no recompiles).
    from torch._dynamo.testing import CompileCounterWithBackend

    from lowbit.nn import QuantLinear
    from lowbit.runs import build_model

    cfg = run_config(tmp_path / "r", tmp_path, tmp_path / "data", **{
        "quant.recipe": "quest-w4a4", "model.dim": 128, "model.ffn_dim": 128, "model.n_heads": 2})
    torch.manual_seed(0)
    base = build_model(cfg).train()
    assert sum(isinstance(m, QuantLinear) for m in base.modules()) == 7 * 2
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 320, (2, 32), generator=g), torch.randint(0, 320, (2, 32), generator=g))
               for _ in range(2)]
    eager = copy.deepcopy(base)
    ref = _train(eager, eager, batches)
    got = {}
    for scope in ("model", "block"):
        torch._dynamo.reset()
        model, counter = copy.deepcopy(base), CompileCounterWithBackend("aot_eager")
        got[scope] = _train(model, compile_model(model, scope, backend=counter), batches)
        if scope == "block":
            assert counter.frame_count == 1  # one block traced, the other reuses its graph
            assert all(b._compiled_call_impl is not None for b in model.layers)
            assert model._compiled_call_impl is None  # head (norm, lm_head, loss) and embedding stay eager
        else:
            assert counter.frame_count >= 1
    torch._dynamo.reset()
    assert got["block"] == pytest.approx(ref, rel=1e-5)
    assert got["model"] == pytest.approx(ref, rel=1e-5)


def test_compile_blocks_passes_options():
    # what parallelize and bench_train's --compile-mode use: kwargs reach torch.compile, in place
    from torch._dynamo.testing import CompileCounter

    from lowbit.config import ModelConfig
    from lowbit.models.llama import Llama

    torch._dynamo.reset()
    model = Llama(ModelConfig(size="tiny", vocab_size=64, dim=32, n_layers=3, n_heads=2, ffn_dim=64,
                              max_seq_len=16))
    names = [n for n, _ in model.named_parameters()]
    counter = CompileCounter()
    compile_blocks(model, backend=counter)
    assert [n for n, _ in model.named_parameters()] == names
    x = torch.randint(0, 64, (2, 16))
    model(x, x).backward()
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_parallelize_compiles_through_the_same_helper():
    # the parallel path (no process group needed to see it: parallel="none" leaves the wrapping out) compiles
    # per block in place, after activation checkpointing, whatever compile_scope says
    from lowbit.config import ModelConfig, TrainConfig
    from lowbit.distributed.parallel import DistInfo, parallelize
    from lowbit.models.llama import Llama

    model = Llama(ModelConfig(size="tiny", vocab_size=64, dim=32, n_layers=2, n_heads=2, ffn_dim=64,
                              max_seq_len=16))
    cfg = TrainConfig(compile=True, compile_scope="model", activation_checkpointing=True)
    assert parallelize(model, cfg, DistInfo(), torch.device("cpu")) is model
    assert all(b._compiled_call_impl is not None and "forward" in vars(b) for b in model.layers)
    assert model._compiled_call_impl is None


def test_compile_mode_config_and_pass_through(monkeypatch, tmp_path, tiny_corpus, run_config):
    # train.compile_mode reaches torch.compile (both scopes, and the parallel path's per-block compile)
    from lowbit.config import TrainConfig
    from lowbit.distributed import parallel

    assert load_config(None, []).train.compile_mode == "default"
    with pytest.raises(ConfigError, match=r"train.compile_mode='reduce_overhead' is not one of"):
        load_config(None, ["train.compile_mode=reduce_overhead"])
    assert "train.compile_mode" in RESUMABLE_CHANGES
    assert parallel.compile_options(TrainConfig()) == {}
    opts = parallel.compile_options(TrainConfig(compile_mode="reduce-overhead"))
    assert opts == {"mode": "reduce-overhead"}
    seen = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.append(kw) or m)
    compile_model(torch.nn.Linear(2, 2), "model", **opts)
    assert seen == [{"mode": "reduce-overhead"}]
    seen.clear()  # the trainer passes it on
    over = {"train.steps": 1, "train.eval_every": 0, "train.ckpt_every": 0, "train.compile": True,
            "train.compile_mode": "max-autotune-no-cudagraphs"}
    Trainer(run_config(tmp_path / "r", tiny_corpus, tmp_path / "data", **over)).fit()
    assert seen == [{"mode": "max-autotune-no-cudagraphs"}]
