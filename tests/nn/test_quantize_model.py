"""quantize_ / ptq_ / quant_diagnostics on the tiny Llama (and a Hugging Face Llama when installed)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lowbit.nn import QuantLinear, ptq_, quant_diagnostics, quantize_
from lowbit.quant import list_recipes

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))


def test_default_targets_and_skips(make_tiny) -> None:
    m = make_tiny()
    w_before = m.layers[0].self_attn.q_proj.weight
    quantize_(m, "quest-w4a4")
    ql = {n for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}
    assert ql == {f"layers.{i}.{blk}.{p}" for i in range(2) for blk, ps in
                  (("self_attn", PROJ[:4]), ("mlp", PROJ[4:])) for p in ps}
    assert type(m.lm_head) is nn.Linear and type(m.embed_tokens) is nn.Embedding
    assert m.layers[0].self_attn.q_proj.weight is w_before  # same parameter, same device and dtype


def test_bf16_is_a_no_op_and_errors(make_tiny) -> None:
    m = make_tiny()
    quantize_(m, "bf16")
    assert not any(isinstance(x, QuantLinear) for x in m.modules())
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        quantize_(make_tiny(), "quest-w4a4", targets=["qproj"])
    m = quantize_(make_tiny(), "quest-w4a4")
    with pytest.raises(ValueError, match="already a QuantLinear"):
        quantize_(m, "ste-w4a4")
    with pytest.raises(ValueError, match="did you mean"):
        quantize_(make_tiny(), "quest-w4a5")


def test_targets_and_skip_options(make_tiny) -> None:
    m = quantize_(make_tiny(), "ste-w8a8", targets=["*"], skip=["layers.1"])
    names = {n for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}
    assert "lm_head" in names and not any(n.startswith("layers.1") for n in names)
    assert len(names) == 8


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_trains_a_step(recipe: str, make_tiny) -> None:
    m = quantize_(make_tiny(), recipe)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    idx = _batch()
    loss = m(idx, idx)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.endswith("proj.weight"):
            assert p.grad.abs().sum() > 0, name
    before = m.layers[0].mlp.up_proj.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, m.layers[0].mlp.up_proj.weight)
    assert torch.isfinite(m(idx, idx))


@pytest.mark.parametrize("recipe", ["quest-w4a4", "bitnet-b1.58", "lsq-w2a4", "pact-w4a4", "quest-w1.58"])
def test_state_dict_round_trip(recipe: str, make_tiny) -> None:
    m = quantize_(make_tiny(0), recipe)
    idx = _batch()
    m(idx, idx).backward()  # initialises learned scales
    torch.optim.AdamW(m.parameters(), lr=1e-2).step()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = quantize_(make_tiny(1), recipe)  # different init: everything must come from the checkpoint
    m2.load_state_dict(torch.load(buf))
    m.eval(), m2.eval()
    with torch.no_grad():
        torch.testing.assert_close(m2(idx), m(idx), rtol=0, atol=0)


def test_ptq_and_diagnostics(make_tiny) -> None:
    m = make_tiny()
    ref = m(_batch())
    ptq_(m, "lsq-w4a4")
    assert not m.training
    q = m.layers[0].self_attn.q_proj
    assert bool(q.weight_scale_ready)  # weight scales initialised from W, before any data
    with torch.no_grad():
        out = m(_batch())
    assert (out - ref).norm() / ref.norm() < 0.5

    m = quantize_(make_tiny(), "quest-w4a4")
    assert quant_diagnostics(m) == {
        k: v for k, v in quant_diagnostics(m).items() if k.startswith("weight")
    }  # no forward yet: weight numbers only
    m(_batch(), _batch()).backward()
    d = quant_diagnostics(m)
    layer = "layers.0.mlp.down_proj"
    for metric in ("weight_snr_db", "act_snr_db", "weight_masked", "act_masked"):
        assert f"{metric}/{layer}" in d and f"{metric}/mean" in d
    assert 0 <= d["act_masked/mean"] < 0.05 and 10 < d["weight_snr_db/mean"] < 30
    assert all(isinstance(v, float) for v in d.values())
    assert quant_diagnostics(make_tiny()) == {}


def test_hugging_face_llama() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg)
    quantize_(m, "quest-w4a4")
    names = [n for n, mod in m.named_modules() if isinstance(mod, QuantLinear)]
    assert len(names) == 14 and all(n.startswith("model.layers.") for n in names)
    assert not isinstance(m.lm_head, QuantLinear)
    idx = torch.randint(0, 128, (2, 8))
    out = m(input_ids=idx, labels=idx)
    out.loss.backward()
    assert torch.isfinite(out.loss) and m.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
