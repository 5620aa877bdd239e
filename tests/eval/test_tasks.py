"""Multiple-choice / cloze / sliding-window scoring on stub models whose log-probabilities are known."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lowbit.eval.tasks import (
    ClozeExample,
    MCExample,
    bootstrap_ci,
    build_cloze,
    build_nextsent,
    evaluate_cloze,
    evaluate_mc,
    load_task,
    save_task,
    score_continuations,
    text_perplexity,
)


class FixedDist(nn.Module):
    """Same next-token distribution at every position (``probs`` over bytes, the rest shares what is left)."""

    def __init__(self, probs: dict[str, float], max_seq_len=64):
        super().__init__()
        p = torch.full((257,), (1 - sum(probs.values())) / (257 - len(probs)), dtype=torch.float64)
        for ch, v in probs.items():
            p[ord(ch)] = v
        self.register_buffer("logp", p.log().float())
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return self.logp.expand(*x.shape, -1).clone()


class Oracle(nn.Module):
    """Logits that put almost all mass on ``text[i + 1]`` at input position i, where the input is EOS + a
    prefix of ``text``: it "knows" the gold continuation."""

    def __init__(self, golds: list[str], max_seq_len=512):
        super().__init__()
        self.golds = golds
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)

    def forward(self, x):
        out = torch.zeros(*x.shape, 257)
        for b, row in enumerate(x.tolist()):
            for k in range(len(row)):
                prefix = bytes(row[1:k + 1])  # position k has read EOS + k bytes
                for g in self.golds:
                    gb = g.encode()
                    if k < len(gb) and gb.startswith(prefix):
                        out[b, k, gb[k]] = 20.0
        return out


def test_oracle_scores_100_percent(byte_tok):
    ex = [MCExample("the king", ["sees the castle", "sings", "walks away"], 0),
          MCExample("a bold", ["horse runs", "crown"], 1),
          MCExample("night", ["falls", "sleeps", "the end", "waits"], 3)]
    golds = [e.context + e.delimiter + e.choices[e.gold] for e in ex]
    r = evaluate_mc(Oracle(golds), byte_tok, ex)
    assert r["acc"] == 1.0 and r["acc_norm"] == 1.0 and r["n"] == 3
    assert r["acc_ci95"] == (1.0, 1.0)
    assert r["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)


def test_length_normalisation_by_hand(byte_tok):
    # p(c) = 0.3, p(b) = 0.6, p(space) = 0.05: " c" = log .05 + log .3, " bbbb" = log .05 + 4 log .6
    m = FixedDist({"c": 0.3, "b": 0.6, " ": 0.05})
    ll_c = math.log(0.05) + math.log(0.3)
    ll_b = math.log(0.05) + 4 * math.log(0.6)
    scores = score_continuations(m, [([256, 120], [32, 99]), ([256, 120], [32, 98, 98, 98, 98])])
    assert scores[0][0] == pytest.approx(ll_c, abs=1e-5) and scores[1][0] == pytest.approx(ll_b, abs=1e-5)
    assert ll_c > ll_b and ll_c / 1 < ll_b / 4  # raw sum prefers "c", per byte prefers "bbbb"
    r = evaluate_mc(m, byte_tok, [MCExample("x", ["c", "bbbb"], 0)])
    assert r["acc"] == 1.0 and r["acc_norm"] == 0.0
    # greedy flag: "b" is the argmax everywhere, " " is not
    assert scores[1][1] is False
    assert score_continuations(m, [([256], [98, 98])])[0] == (pytest.approx(2 * math.log(0.6), abs=1e-5), True)


def test_context_truncated_from_left_and_batched():
    m = FixedDist({"a": 0.5}, max_seq_len=8)
    long_ctx = [97] * 100
    (s, _), = score_continuations(m, [(long_ctx, [97, 97, 97])])
    assert s == pytest.approx(3 * math.log(0.5), abs=1e-5)
    assert m.calls == [(1, 8)]
    m.calls.clear()
    score_continuations(m, [([1, 2], [3])] * 5, batch_size=2)
    assert len(m.calls) == 3
    with pytest.raises(ValueError, match="does not fit"):
        score_continuations(m, [([1], [2] * 9)])


def test_bootstrap_ci_seeded_and_brackets_mean():
    v = [1.0] * 30 + [0.0] * 70
    a, b = bootstrap_ci(v, seed=3), bootstrap_ci(v, seed=3)
    assert a == b and a[0] < 0.3 < a[1] and a[1] - a[0] < 0.25


def test_sliding_window_scores_every_token_once(byte_tok):
    m = FixedDist({"a": 0.5, "b": 0.25}, max_seq_len=8)
    text = "ab" * 20
    for stride in (1, 3, 8):
        r = text_perplexity(m, byte_tok, text, stride=stride)
        assert r["tokens"] == 40
        nll = -20 * (math.log(0.5) + math.log(0.25))
        assert r["loss"] == pytest.approx(nll / 40, abs=1e-5)
        assert r["bpb"] == pytest.approx(nll / math.log(2) / 40, abs=1e-5)
    assert text_perplexity(m, byte_tok, text, stride=8)["windows"] == 5
    assert text_perplexity(m, byte_tok, text, stride=4)["windows"] == 9


def test_sliding_window_context_matches_full_forward_on_llama(byte_tok):
    from lowbit.config import ModelConfig
    from lowbit.models.llama import Llama

    torch.manual_seed(0)
    model = Llama(ModelConfig(size="tiny", vocab_size=320, dim=32, n_layers=1, n_heads=2, ffn_dim=64,
                              max_seq_len=64))
    tok = byte_tok
    tok.eos_id = 0
    text = "hello world, the quick brown fox."
    full = text_perplexity(model, tok, text, stride=64)  # one window: the plain forward
    slid = text_perplexity(model, tok, text, stride=5, max_len=64)
    assert full["windows"] == 1 and slid["loss"] == pytest.approx(full["loss"], rel=1e-5)


TEXT = ("The old king saw the castle. Anna walked to the river in the morning! A storm came over the hills. "
        "The knight kept his silver sword near the gate. Felix whispered a secret to his sister. "
        "Winter ended and the harvest was golden. Clara laughed at the strange merchant. "
        "The ship returned to the island at night. Edmund built a tower beyond the bridge.")


def test_cloze_builder_deterministic_and_targets_unseen():
    texts = [TEXT * 3, TEXT.replace("the", "a") * 2]
    a = build_cloze(texts, n=50, n_words=9, seed=1)
    assert a == build_cloze(texts, n=50, n_words=9, seed=1)
    assert a != build_cloze(texts, n=50, n_words=9, seed=2)
    assert len(a) > 3
    for ex in a:
        words = [w.strip(".,!?").lower() for w in ex.context.split()]
        assert ex.target.isalpha() and ex.target.lower() not in words
        assert len(ex.context.split()) == 8


def test_nextsent_builder():
    ex = build_nextsent([TEXT, TEXT.upper()], n=20, n_choices=4, seed=0)
    assert ex == build_nextsent([TEXT, TEXT.upper()], n=20, n_choices=4, seed=0)
    assert len(ex) >= 5
    golds = {e.gold for e in ex}
    assert len(golds) > 1  # the true sentence is not always first
    for e in ex:
        assert len(e.choices) == 4 and len(set(e.choices)) == 4
        assert e.choices[e.gold] not in e.context


def test_oracle_cloze(byte_tok):
    ex = [ClozeExample("the old", "king"), ClozeExample("a silver", "sword")]
    r = evaluate_cloze(Oracle([e.context + " " + e.target for e in ex]), byte_tok, ex)
    assert r["acc"] == 1.0 and r["target_logprob"] > -0.01
    r = evaluate_cloze(FixedDist({}), byte_tok, ex)
    assert r["acc"] == 0.0 and r["target_ppl"] == pytest.approx(257, rel=1e-3)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loaders_parse_each_shape(tmp_path):
    hs = load_task(_write(tmp_path / "hs.jsonl", [{"ctx": "He opens", "endings": ["a", "b", "c", "d"], "label": 2}]))
    assert hs == [MCExample("He opens", ["a", "b", "c", "d"], 2)]
    piqa = load_task(_write(tmp_path / "p.jsonl", [{"goal": "dry hair", "sol1": "towel", "sol2": "oven",
                                                     "label": 0}]))
    assert piqa[0].context == "Question: dry hair\nAnswer:" and piqa[0].choices == ["towel", "oven"]
    arc = load_task(_write(tmp_path / "a.jsonl", [{"question": "Q?", "choices": {"text": ["x", "y", "z"],
                                                   "label": ["A", "B", "C"]}, "answerKey": "C"}]))
    assert arc[0].gold == 2 and arc[0].choices == ["x", "y", "z"]
    gen = load_task(_write(tmp_path / "g.jsonl", [{"context": "c", "choices": ["1", "2"], "gold": 1}] * 5),
                    limit=3)
    assert len(gen) == 3 and gen[0].gold == 1
    cl = load_task(_write(tmp_path / "c.jsonl", [{"context": "the old", "target": "king"}]))
    assert cl == [ClozeExample("the old", "king")]
    with pytest.raises(ValueError, match="unknown task shape"):
        load_task(_write(tmp_path / "u.jsonl", [{"prompt": "x", "answer": "y"}]))
    with pytest.raises(ValueError, match="answerKey"):
        load_task(_write(tmp_path / "b.jsonl", [{"question": "Q", "choices": {"text": ["x"], "label": ["A"]},
                                                  "answerKey": "E"}]))


def test_save_load_round_trip(tmp_path):
    cl = build_cloze([TEXT * 2], n=5, n_words=7, seed=0)
    assert load_task(save_task(cl, tmp_path / "cl.jsonl")) == cl
    ns = build_nextsent([TEXT], n=5, seed=0)
    assert load_task(save_task(ns, tmp_path / "ns.jsonl")) == ns
