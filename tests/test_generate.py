"""Generation: the KV-cache forward equals the full-sequence forward, sampling filters keep what they promise,
greedy decoding is the argmax chain, a seed fixes the tokens, streamed text never splits a character."""

from __future__ import annotations

import pytest
import torch

from lowbit.config import ModelConfig
from lowbit.generate import (
    KVCache,
    TextStreamer,
    encode_prompt,
    generate,
    generate_batch,
    generate_ids,
    generate_ids_batch,
    sample,
    top_k_filter,
    top_p_filter,
)
from lowbit.models.llama import Llama
from lowbit.testing import ByteTok


@pytest.fixture(autouse=True)
def _keep_global_rng():
    with torch.random.fork_rng():
        yield


def tiny(recipe: str | None = None, **over) -> Llama:
    torch.manual_seed(0)
    kw = dict(vocab_size=300, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=48) | over
    model = Llama(ModelConfig(**kw))
    if recipe:
        from lowbit.nn import quantize_

        quantize_(model, recipe)
    return model.eval()


# ---- the cache ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", [None, "quest-w4a4", "bitnet-b1.58", "dqt-int4"])
def test_cached_decode_equals_full_forward(recipe):
    model = tiny(recipe)
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        cache = KVCache.for_model(model, 2, 40)
        parts = [model(x[:, :12], cache=cache, pos=0),  # prefill
                 model(x[:, 12:20], cache=cache, pos=12)]  # a chunk after a cached prefix
        parts += [model(x[:, p:p + 1], cache=cache, pos=p) for p in range(20, 40)]  # one token at a time
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
        # the CUDA-graph form (0-d position tensor, whole buffer under a mask) computes the same
        cache2 = KVCache.for_model(model, 2, 40)
        parts = [model(x[:, :12], cache=cache2, pos=0)]
        parts += [model(x[:, p:p + 1], cache=cache2, pos=torch.tensor(p)) for p in range(12, 40)]
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_training_forward_is_unchanged():
    model = tiny()
    x = torch.randint(0, 300, (2, 16))
    loss = model(x[:, :-1], x[:, 1:])
    assert loss.requires_grad and loss.item() == pytest.approx(model(x[:, :-1], x[:, 1:], cache=None).item())


def test_cache_bounds():
    model = tiny()
    cache = KVCache.for_model(model, 1, 8)
    assert cache.layers[0].k.shape == (1, 2, 8, 32)  # (B, n_kv_heads, max_len, head_dim)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), cache=cache, pos=0)
        with pytest.raises(ValueError, match="do not fit"):
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache, pos=6)
    with pytest.raises(ValueError, match="max_seq_len"):
        KVCache.for_model(model, 1, 49)


# ---- sampling ----------------------------------------------------------------------------------------------


def test_top_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 3.0, -2.0]])
    kept = top_k_filter(logits, 2).isfinite()
    assert kept.tolist() == [[False, True, True, True, False]]  # ties at the k-th value stay
    assert torch.equal(top_k_filter(logits, 0), logits) and torch.equal(top_k_filter(logits, 5), logits)
    x = torch.randn(4, 50)
    for k in (1, 7, 49):
        out = top_k_filter(x, k)
        assert (out.isfinite().sum(-1) == k).all()
        assert torch.equal(out.max(-1).values, x.max(-1).values)


def test_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert top_p_filter(logits, 0.5).isfinite().tolist() == [[True, False, False, False]]
    assert top_p_filter(logits, 0.6).isfinite().tolist() == [[True, True, False, False]]
    assert top_p_filter(logits, 0.95).isfinite().tolist() == [[True, True, True, False]]
    assert top_p_filter(logits, 0.01).isfinite().tolist() == [[True, False, False, False]]  # top always kept
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    x = torch.randn(8, 100) * 3  # property: the kept set is the smallest top set whose mass reaches p
    for p in (0.1, 0.5, 0.9):
        kept = top_p_filter(x, p).isfinite()
        pr = x.softmax(-1)
        mass = (pr * kept).sum(-1)
        assert (mass >= p - 1e-6).all()
        smallest_kept = torch.where(kept, pr, torch.inf).min(-1).values
        assert (mass - smallest_kept < p + 1e-6).all()  # dropping the least likely kept token falls below p
        assert (torch.where(kept, -torch.inf, pr).max(-1).values <= smallest_kept).all()  # a top set
    with pytest.raises(ValueError):
        top_p_filter(logits, 0.0)


def test_sample():
    x = torch.randn(3, 40)
    assert torch.equal(sample(x, 0.0), x.argmax(-1))
    assert torch.equal(sample(x, 1.0, top_k=1, generator=torch.Generator().manual_seed(0)), x.argmax(-1))
    draws = [sample(x, 1.0, top_k=3, generator=torch.Generator().manual_seed(s)) for s in range(30)]
    top3 = x.topk(3, -1).indices
    assert all((d[:, None] == top3).any(-1).all() for d in draws)
    a = sample(x, 0.7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, sample(x, 0.7, generator=torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError):
        sample(x, -1.0)


# ---- the decode loop ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", [None, "quest-w4a4"])
def test_greedy_is_the_argmax_chain(recipe):
    model = tiny(recipe)
    prompt = [5, 17, 250, 3]
    steps = []
    got = list(generate_ids(model, prompt, 10, temperature=0, on_logits=steps.append))
    ids = list(prompt)
    with torch.no_grad():
        for i in range(10):
            logits = model(torch.tensor([ids]))[0, -1]
            torch.testing.assert_close(steps[i][0], logits, rtol=1e-5, atol=1e-5)
            ids.append(int(logits.argmax()))
    assert got == ids[len(prompt):]


def test_seeded_sampling_is_deterministic():
    model = tiny()
    run = lambda seed: list(generate_ids(model, [1, 2, 3], 20, temperature=1.0, top_k=0, top_p=1.0, seed=seed))
    a = run(0)
    assert a == run(0) and len(a) == 20
    assert any(run(s) != a for s in (1, 2, 3))


def test_stops_at_eos_and_max_seq_len():
    model = tiny(max_seq_len=10)
    out = list(generate_ids(model, [1, 2, 3], 50, temperature=0))
    assert len(out) == 7  # cut at max_seq_len
    eos = out[2]
    stopped = list(generate_ids(model, [1, 2, 3], 50, temperature=0, eos_id=eos))
    assert stopped[-1] == eos and len(stopped) == out.index(eos) + 1
    with pytest.raises(ValueError, match="no room"):
        list(generate_ids(model, list(range(10)), 5))
    with pytest.raises(ValueError, match="at least one"):
        list(generate_ids(model, [], 5))


def test_streamer_never_splits_a_character():
    tok = ByteTok()
    text = "héllo wörld € 𝄞 end"
    s = TextStreamer(tok, tok.encode("ab"))
    pieces = [s.push(b) for b in tok.encode(text)] + [s.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[tok.encode(text).index(0xE2)] == ""  # first byte of "€": held back
    # an invalid byte is final once the next one shows it is not a continuation
    s = TextStreamer(tok)
    out = "".join([s.push(0xFF), s.push(ord("a")), s.flush()])
    assert out == "\ufffda"


def test_generate_text():
    model = tiny(vocab_size=257)
    tok = ByteTok()
    pieces = list(generate(model, tok, "hi", 12, temperature=0))
    ids = list(generate_ids(model, tok.encode("hi"), 12, temperature=0, eos_id=tok.eos_id))
    if tok.eos_id in ids:
        ids = ids[:ids.index(tok.eos_id)]
    assert "".join(pieces) == tok.decode(ids)
    assert encode_prompt(tok, "") == [tok.eos_id]
    assert list(generate(model, tok, "", 3, temperature=0.9, seed=1)) == list(
        generate(model, tok, "", 3, temperature=0.9, seed=1))


# ---- batched generation ------------------------------------------------------------------------------------


def test_batch_of_identical_prompts_greedy_rows_are_identical():
    model = tiny()
    rows = generate_ids_batch(model, [[5, 17, 250]] * 3, 10, temperature=0)
    assert rows[0] == rows[1] == rows[2] == list(generate_ids(model, [5, 17, 250], 10, temperature=0))


def test_batched_greedy_equals_each_prompt_alone():
    model = tiny("quest-w4a4")
    prompts = [[5, 17, 250, 3], [9, 9, 1, 44], [120, 7, 8, 2]]  # equal lengths: no padding, no mask
    assert generate_ids_batch(model, prompts, 12, temperature=0) == [
        list(generate_ids(model, p, 12, temperature=0)) for p in prompts]


def test_left_padded_batch_equals_each_prompt_alone():
    model = tiny()
    prompts = [[5, 17, 250, 3, 8, 9, 10], [9, 9], [120, 7, 8, 2]]
    steps = []
    rows = generate_ids_batch(model, prompts, 10, temperature=0, on_logits=steps.append)
    for b, p in enumerate(prompts):
        alone = []
        assert rows[b] == list(generate_ids(model, p, 10, temperature=0, on_logits=alone.append))
        for i, s in enumerate(alone):  # RoPE is relative: shifted positions give the same logits
            torch.testing.assert_close(steps[i][b], s[0], rtol=1e-4, atol=1e-4)
    # the CUDA-graph form of the step (0-d position tensor, whole buffer under the mask) agrees with padding too
    x = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    with torch.no_grad():
        a, b = KVCache.for_model(model, 2, 8), KVCache.for_model(model, 2, 8)
        a.set_left_padding([2, 0])
        b.set_left_padding([2, 0])
        model(x[:, :3], cache=a, pos=0)
        model(x[:, :3], cache=b, pos=0)
        for p in (3, 4):
            torch.testing.assert_close(model(x[:, p:p + 1], cache=a, pos=p),
                                       model(x[:, p:p + 1], cache=b, pos=torch.tensor(p)), rtol=1e-5, atol=1e-5)


def test_batched_sampling_is_seeded_and_stops_rows_at_eos():
    model = tiny(max_seq_len=16)
    run = lambda seed: generate_ids_batch(model, [[1, 2, 3]] * 4, 20, temperature=1.0, top_k=0, top_p=1.0,
                                          seed=seed)
    a = run(0)
    assert a == run(0) and a != run(1)
    assert all(len(r) == 13 for r in a)  # capped at max_seq_len
    assert len({tuple(r) for r in a}) > 1  # the rows are different samples
    greedy = generate_ids_batch(model, [[1, 2, 3], [4, 5, 6]], 10, temperature=0)
    eos = greedy[0][2]
    stopped = generate_ids_batch(model, [[1, 2, 3], [4, 5, 6]], 10, temperature=0, eos_id=eos)
    for g, s in zip(greedy, stopped, strict=True):
        assert s == (g[:g.index(eos) + 1] if eos in g else g)
    with pytest.raises(ValueError, match="no room"):
        generate_ids_batch(model, [[1], list(range(16))], 5)
    assert generate_ids_batch(model, [], 5) == []


def test_generate_batch_text():
    model = tiny(vocab_size=257)
    tok = ByteTok()
    texts = generate_batch(model, tok, ["hi", "hello there", "hi"], 12, temperature=0)
    assert texts[0] == texts[2] == "".join(generate(model, tok, "hi", 12, temperature=0))
    assert texts[1] == "".join(generate(model, tok, "hello there", 12, temperature=0))


def test_compiled_decode_step_matches_eager(recipe="quest-w4a4"):
    # torch.compile of the decode step (DecodeStep: tensor position, whole cache under a mask) gives the eager
    # step's logits up to float rounding (inductor fuses and reorders), and the same greedy tokens
    model = tiny(recipe)
    prompt = [5, 17, 250, 3]
    eager, compiled = [], []
    a = list(generate_ids(model, prompt, 8, temperature=0, on_logits=eager.append))
    torch._dynamo.reset()
    b = list(generate_ids(model, prompt, 8, temperature=0, compile=True, on_logits=compiled.append))
    assert a == b
    for x, y in zip(eager, compiled, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
    rows = [[5, 17, 250, 3], [9, 9, 1]]  # left padding: the mask path under compile too
    assert generate_ids_batch(model, rows, 6, temperature=0, compile=True) == generate_ids_batch(
        model, rows, 6, temperature=0)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("recipe", [None, "bitnet-b1.58"])
def test_cuda_graph_and_compiled_decode_match_eager_cuda(recipe):
    # the decode step captured as a CUDA graph, and compiled then captured, give the eager step's logits
    model = tiny(recipe).cuda()
    prompt = [5, 17, 250, 3]
    runs = {}
    for name, opts in {"eager": {}, "graph": {"cuda_graphs": True},
                       "compiled": {"cuda_graphs": True, "compile": True}}.items():
        torch._dynamo.reset()
        logits: list[torch.Tensor] = []
        runs[name] = (list(generate_ids(model, prompt, 8, temperature=0, on_logits=logits.append, **opts)), logits)
    for name in ("graph", "compiled"):
        assert runs[name][0] == runs["eager"][0], name
        for x, y in zip(runs["eager"][1], runs[name][1], strict=True):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
