"""``lowbit chat``: the reused cache gives the logits of a full re-prefill, old turns are dropped to fit
max_seq_len, a reply stops where the model starts the next user turn, the loop reads piped stdin."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lowbit.chat import ChatSession, _held_back, run_chat
from lowbit.cli import main
from lowbit.config import ModelConfig
from lowbit.models.llama import Llama
from lowbit.testing import ByteTok


@pytest.fixture(autouse=True)
def _keep_global_rng():
    with torch.random.fork_rng():
        yield


def tiny(**over) -> Llama:
    torch.manual_seed(0)
    kw = dict(vocab_size=257, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=48) | over
    return Llama(ModelConfig(**kw)).eval()


class AsciiTok(ByteTok):
    """One token per ASCII character, EOS = 128: every id sequence decodes to text that encodes back to it."""

    eos_id = 128
    vocab_size = 129

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i < 128)


def _full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1]


def test_cache_reuse_equals_full_prefill():
    model = tiny(vocab_size=129, max_seq_len=256)
    tok = AsciiTok()  # random replies that re-tokenize to themselves (so the whole history is reused)
    seen = []
    s = ChatSession(model, tok, max_new_tokens=12, temperature=0.9, seed=1, on_logits=seen.append)
    for msg in ("hello there", "how are you?", "tell me more"):
        seen.clear()
        reply = "".join(s.reply(msg))
        ids = tok.encode(s.format(s.turns[:-1], msg))
        assert s.cached[:len(ids)] == ids
        torch.testing.assert_close(seen[0][0], _full_logits(model, ids), rtol=1e-5, atol=1e-5)
        assert s.turns[-1][0] == msg and reply == s.turns[-1][1].lstrip(" ")
    assert s.last_prefill < len(tok.encode("User: tell me more\nAssistant:")) + 1 + 12  # not the whole history
    assert s.last_prefill < len(ids) // 2
    n = len(s.turns)
    s.reset()
    assert s.turns == [] and s.cached == [] and n == 3


def test_trims_oldest_turns_to_fit():
    model = tiny(vocab_size=257, max_seq_len=64)
    tok = ByteTok()
    seen = []
    s = ChatSession(model, tok, max_new_tokens=10, temperature=0, on_logits=seen.append)
    for i in range(6):
        seen.clear()
        "".join(s.reply(f"message {i}"))
        ids = tok.encode(s.format(s.turns[:-1], f"message {i}"))
        assert len(ids) + 10 <= 64
        torch.testing.assert_close(seen[0][0], _full_logits(model, ids), rtol=1e-5, atol=1e-5)
    assert s.trimmed > 0 and s.turns[-1][0] == "message 5" and s.turns[0][0] != "message 0"
    with pytest.raises(ValueError, match="no room"):
        list(s.reply("x" * 60))
    assert s.turns[-1][0] == "message 5"  # left as it was


class ScriptedLM(nn.Module):
    """Replies with ``script`` byte by byte after every prefill (to test where a reply stops)."""

    def __init__(self, script: str, max_seq_len: int = 200) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(vocab_size=257, max_seq_len=max_seq_len, n_layers=1, n_kv_heads=1, head_dim=2)
        self.embed_tokens = nn.Embedding(257, 2)
        self.script, self.i = list(script.encode()), 0

    def forward(self, idx, cache=None, pos=0):
        cache.start(pos, idx.shape[1], self.cfg.max_seq_len)
        if idx.shape[1] > 1:
            self.i = 0
        logits = torch.full((idx.shape[0], idx.shape[1], 257), float("-inf"))
        logits[..., self.script[self.i] if self.i < len(self.script) else 256] = 0.0  # certain at any temperature
        self.i += 1
        return logits


def test_reply_stops_at_next_user_turn():
    assert _held_back("abc\nUs") == 3 and _held_back("abc") == 0 and _held_back("abc\n") == 1
    s = ChatSession(ScriptedLM(" Fine, thanks.\nUser: and you?"), ByteTok(), max_new_tokens=50, temperature=0)
    pieces = list(s.reply("how are you"))
    assert "".join(pieces) == "Fine, thanks." and not any("\n" in p for p in pieces)
    assert s.turns == [("how are you", " Fine, thanks.")]
    s = ChatSession(ScriptedLM(" a\nb\nUse"), ByteTok(), max_new_tokens=50, temperature=0)  # then EOS
    assert "".join(s.reply("x")) == "a\nb\nUse"
    s = ChatSession(ScriptedLM(" " + "y" * 40), ByteTok(), max_new_tokens=5, temperature=0)
    assert "".join(s.reply("x")) == "yyyy"  # 5 tokens, the first a space


def test_run_chat_commands():
    s = ChatSession(ScriptedLM(" ok\nUser:"), ByteTok(), max_new_tokens=20, temperature=0)
    out = io.StringIO()
    n = run_chat(s, io.StringIO("hi\n\n/temp 0.5\n/temp x\nagain\n/reset\nthird\n/exit\nnever\n"), out)
    assert n == 3 and out.getvalue() == "ok\nok\nok\n"
    assert s.temperature == 0.5 and [u for u, _ in s.turns] == ["third"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_corpus):
    from lowbit.testing import tiny_run_config
    from lowbit.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("chat_run")
    cfg = tiny_run_config(tmp / "run", tiny_corpus, tmp / "data", **{
        "model.max_seq_len": 96, "train.steps": 2, "train.eval_every": 2, "train.ckpt_every": 2,
        "train.eval_batches": 1})
    Trainer(cfg).fit()
    return tmp / "run"


def test_cli_chat_piped_stdin(run, monkeypatch, capsys):
    args = ["chat", str(run), "--temperature", "0", "--max-new-tokens", "8"]
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nWhat is the weather?\n"))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nWhat is the weather?\n"))
    assert main(args) == 0
    assert capsys.readouterr().out == out  # greedy: the same conversation


def test_cli_generate_samples_and_prompt_file(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    base = ["generate", str(run), "--max-new-tokens", "6"]
    assert main([*base, "--prompt", "The old", "--num-samples", "3", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert [ln for ln in out.splitlines() if ln.startswith("---")] == [f"--- sample {i} ---" for i in (1, 2, 3)]
    assert main([*base, "--prompt", "The old", "--num-samples", "3", "--seed", "1"]) == 0
    assert capsys.readouterr().out == out
    assert main([*base, "--prompt", "The old", "--num-samples", "2", "--temperature", "0", "--echo"]) == 0
    greedy = capsys.readouterr().out.split("--- sample 2 ---\n")
    assert greedy[0].removeprefix("--- sample 1 ---\n") == greedy[1] and greedy[1].startswith("The old")
    assert main([*base, "--prompt", "The old", "--temperature", "0", "--echo"]) == 0
    assert capsys.readouterr().out == greedy[1]  # the batched greedy row = the streamed run
    f = tmp_path / "prompts.txt"
    f.write_text("The old\n\nA much longer prompt than the first\nThe old\n")
    assert main([*base, "--prompt-file", str(f), "--temperature", "0", "--batch-size", "2"]) == 0
    parts = capsys.readouterr().out.split("--- prompt ")
    assert [p.split(" ---")[0] for p in parts[1:]] == ["1", "2", "3"]
    assert parts[1].split("---\n", 1)[1] == parts[3].split("---\n", 1)[1] == greedy[1].removeprefix("The old")
    assert main([*base, "--prompt-file", str(f), "--prompt", "x"]) == 2
