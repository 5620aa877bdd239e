import math

import pytest
import torch

from lowbit.config import ConfigError, ModelConfig
from lowbit.models.llama import SIZES, Llama, flops_per_token, param_counts


def small(**kw) -> ModelConfig:
    base = dict(size="tiny", vocab_size=97, dim=64, n_layers=2, n_heads=4, ffn_dim=96, max_seq_len=32)
    return ModelConfig(**(base | kw))


def test_shapes_and_loss():
    torch.manual_seed(0)
    m = Llama(small())
    x = torch.randint(0, 97, (3, 17))
    assert m(x).shape == (3, 17, 97)
    loss = m(x, x)
    assert loss.ndim == 0
    # at init the prediction is near uniform: loss ≈ ln V
    assert abs(loss.item() - math.log(97)) < 0.5


def test_causal_masking():
    torch.manual_seed(0)
    m = Llama(small()).eval()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_gqa_and_tied():
    m = Llama(small(n_kv_heads=2, tie_embeddings=True))
    assert m.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)
    assert m.lm_head.weight is m.embed_tokens.weight
    counts = param_counts(m)
    assert counts["embedding"] == 97 * 64  # tied: counted once
    assert m(torch.randint(0, 97, (1, 8))).shape == (1, 8, 97)


def test_init_scaled_residuals():
    torch.manual_seed(0)
    m = Llama(small(dim=256, n_heads=4, ffn_dim=512, n_layers=8))
    std_q = m.layers[0].self_attn.q_proj.weight.std().item()
    std_o = m.layers[0].self_attn.o_proj.weight.std().item()
    assert abs(std_q - 0.02) < 0.002
    assert abs(std_o - 0.02 / math.sqrt(16)) < 0.001


def test_sequence_too_long():
    m = Llama(small())
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("size", list(SIZES))
def test_named_sizes_build_on_meta(size):
    cfg = ModelConfig(size=size, vocab_size=32000)
    with torch.device("meta"):
        m = Llama(cfg)
    c = param_counts(m)
    assert c["embedding"] == 2 * 32000 * cfg.dim
    assert c["non_embedding"] > 0
    assert flops_per_token(cfg, 1024) > 6 * c["non_embedding"]


def test_reference_sizes():
    # QuEST shapes: head dim 128, SwiGLU width ceil(8d/3/256)*256
    c = ModelConfig(size="30m")
    assert (c.n_layers, c.dim, c.n_heads, c.head_dim, c.ffn_dim) == (6, 640, 5, 128, 1792)
    c = ModelConfig(size="130m")
    assert (c.n_layers, c.dim, c.n_heads, c.ffn_dim) == (12, 768, 12, 2048)


def test_bad_model_config():
    with pytest.raises(ConfigError, match="did you mean"):
        ModelConfig(size="30M")
    with pytest.raises(ConfigError, match="divisible"):
        small(dim=66, n_heads=4)


def test_matches_hugging_face_llama():
    """Same weights → same logits as transformers' LlamaForCausalLM (RoPE rotate-half, RMSNorm, SwiGLU)."""
    transformers = pytest.importorskip("transformers")
    cfg = small(n_kv_heads=2)
    torch.manual_seed(0)
    ours = Llama(cfg).eval()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {("model." + k if not k.startswith("lm_head") else k): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [7, 16, 51])
def test_chunked_loss_equals_the_plain_loss(monkeypatch, chunk):
    # model.loss_chunk: the same mean cross-entropy and gradients, the logits made a chunk at a time (and
    # remade in backward); a chunk as large as the batch is the plain path
    import lowbit.models.llama as L

    torch.manual_seed(0)
    plain, chunked = Llama(small()), Llama(small(loss_chunk=chunk))
    chunked.load_state_dict(plain.state_dict())
    x = torch.randint(0, 97, (3, 17))
    calls = []
    orig = L._ce_sum
    monkeypatch.setattr(L, "_ce_sum", lambda *a: calls.append(a[1].shape[0]) or orig(*a))
    l0, l1 = plain(x, x), chunked(x, x)
    l0.backward()
    l1.backward()
    assert l1.item() == pytest.approx(l0.item(), rel=1e-6)
    for (n, p0), p1 in zip(plain.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-5, atol=1e-7, msg=n)
    n = 3 * 17
    once = [] if chunk >= n else [min(chunk, n - s) for s in range(0, n, chunk)]
    assert sorted(calls) == sorted(once * 2)  # forward + the recomputation in backward
    with torch.no_grad():  # evaluation: no backward to save memory for, the plain path
        assert chunked(x, x).item() == pytest.approx(l0.item(), rel=1e-6)


def test_loss_chunk_config():
    with pytest.raises(ConfigError, match="loss_chunk"):
        small(loss_chunk=-1)
