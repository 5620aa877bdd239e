"""An interactive chat loop over a base language model (``lowbit chat``).

lowbit's models are base LMs: no chat template, no special tokens. The conversation is plain text,

    User: first message
    Assistant: first reply
    User: second message
    Assistant:

and the model continues it. The prompt ends with ``"Assistant:"`` (no trailing space: byte-level BPE attaches a
space to the word after it, so the model's own `` word`` token is the natural continuation); the leading space of
a reply is not printed. A reply ends at a newline followed by ``"User:"`` (the model starting the next user turn
itself; the text from the newline on is dropped), at the end-of-text token, or after ``max_new_tokens``.

**Cache reuse.** One :class:`~lowbit.generate.KVCache` of ``model.max_seq_len`` positions lives as long as the
session, together with the token ids whose keys/values it holds. Each turn the whole conversation text is
tokenized; the longest common prefix with the cached ids is kept and only the rest is prefilled (the new
message, and whatever re-tokenized differently at the end of the last reply: the conversation is kept as text, so
a reply the tokenizer would split otherwise is prefilled again from where the ids differ). The result is the same
as a full re-prefill of the conversation's tokens (tested: equal logits).

**Trimming.** When the conversation + ``max_new_tokens`` would exceed ``model.max_seq_len``, the oldest turns are
dropped until it fits. Positions are absolute, so a trimmed conversation is prefilled again from the start. A
message that does not fit on its own is an error (the session is left as it was).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import TextIO

import torch
from torch import nn

from lowbit.generate import KVCache, TextStreamer, _autocast, _float_tensor, sample

STOP = "\nUser:"
"""A reply ends where the model starts the next user turn."""


def _held_back(text: str, stop: str = STOP) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop`` (may still become it)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class ChatSession:
    """A conversation with ``model``: :meth:`reply` streams the answer to one user message and records the turn.
    ``temperature`` (0: greedy), ``top_k``, ``top_p`` and ``max_new_tokens`` may be changed between turns."""

    def __init__(self, model: nn.Module, tokenizer, *, max_new_tokens: int = 128, temperature: float = 0.8,
                 top_k: int | None = 50, top_p: float | None = 0.95, seed: int | None = 0,
                 device: torch.device | str | None = None, amp_dtype: torch.dtype | None = None,
                 on_logits: Callable[[torch.Tensor], None] | None = None) -> None:
        self.model, self.tok = model.eval(), tokenizer
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.seed, self.amp, self.on_logits = seed, amp_dtype, on_logits
        ref = _float_tensor(model)
        self.device = torch.device(device) if device is not None else (
            ref.device if ref is not None else torch.device("cpu"))
        self.max_len = model.cfg.max_seq_len
        self.cache = KVCache.for_model(model, 1, self.max_len, dtype=amp_dtype or (ref.dtype if ref is not None
                                                                                  else torch.float32),
                                       device=self.device)
        self.eos = getattr(tokenizer, "eos_id", None)
        self.turns: list[tuple[str, str]] = []  # (user message, reply text as generated, leading space included)
        self.cached: list[int] = []  # ids whose keys/values sit in the cache at positions 0 … len − 1
        self.last_prefill = 0  # tokens run through the last prefill (the rest came from the cache)
        self.trimmed = 0  # turns dropped (from the start) to fit max_seq_len, in total
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (and restart the sampling generator from the seed)."""
        self.turns, self.cached = [], []
        self.gen = torch.Generator(device=self.device).manual_seed(self.seed) if self.seed is not None else None

    @staticmethod
    def format(turns: list[tuple[str, str]], user: str | None = None) -> str:
        """The conversation as text; with ``user``, ending in that message and ``"Assistant:"``."""
        text = "".join(f"User: {u}\nAssistant:{a}\n" for u, a in turns)
        return text if user is None else text + f"User: {user}\nAssistant:"

    def _encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text))

    def context_ids(self, user: str) -> list[int]:
        """Token ids of the conversation + ``user``, dropping the oldest turns (``self.turns``) until they leave
        ``max_new_tokens`` of room (at least one token must be left: else ValueError, nothing dropped)."""
        ids = self._encode(self.format(self.turns, user))
        if len(ids) + self.max_new_tokens <= self.max_len:
            return ids
        alone = self._encode(self.format([], user))
        if len(alone) >= self.max_len:
            raise ValueError(f"the message is {len(alone)} tokens with its framing; model.max_seq_len="
                             f"{self.max_len} leaves no room for a reply")
        while self.turns and len(ids) + self.max_new_tokens > self.max_len:
            self.turns.pop(0)
            self.trimmed += 1
            ids = self._encode(self.format(self.turns, user))
        return ids

    def _forward(self, ids: list[int], pos: int) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        with _autocast(self.device, self.amp):
            logits = self.model(x, cache=self.cache, pos=pos)[:, -1].float()
        del self.cached[pos:]
        self.cached.extend(ids)
        if self.on_logits is not None:
            self.on_logits(logits)
        return logits

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Bring the cache to ``ids`` reusing the longest cached prefix; the next-token logits (1, V)."""
        keep = 0
        for a, b in zip(self.cached, ids[:-1], strict=False):  # the last id always runs: its logits are needed
            if a != b:
                break
            keep += 1
        self.last_prefill = len(ids) - keep
        return self._forward(ids[keep:], keep)

    @torch.inference_mode()
    def reply(self, user: str) -> Iterator[str]:
        """Stream the reply to ``user`` (text pieces, the leading space dropped); the turn is recorded when the
        iterator is exhausted."""
        ids = self.context_ids(user)
        logits = self.prefill(ids)
        n_new = min(self.max_new_tokens, self.max_len - len(ids))
        streamer = TextStreamer(self.tok, ids)
        text, sent, started = "", 0, False  # text so far; characters of it already yielded
        for i in range(n_new):
            t = int(sample(logits, self.temperature, self.top_k, self.top_p, self.gen))
            if self.eos is not None and t == int(self.eos):
                break
            text += streamer.push(t)
            if STOP in text:
                text = text[:text.index(STOP)]
                break
            end = min(len(text) - _held_back(text), len(text.rstrip()))  # trailing whitespace may end the reply
            if end > sent:
                piece, sent = text[sent:end], end
                if not started:
                    piece, started = piece.lstrip(" "), bool(piece.strip(" "))
                if piece:
                    yield piece
            if i < n_new - 1:
                logits = self._forward([t], len(self.cached))
        else:
            text += streamer.flush()
            if STOP in text:
                text = text[:text.index(STOP)]
        text = text.rstrip()
        if len(text) > sent:
            piece = text[sent:]
            yield piece.lstrip(" ") if not started else piece
        self.turns.append((user, text))


def run_chat(session: ChatSession, lines: TextIO | None = None, out: TextIO | None = None,
             prompt: str | None = None) -> int:
    """The read–reply loop: one message per line from ``lines`` (stdin) until EOF or ``/exit``; each reply is
    written to ``out`` (stdout) followed by a newline. Commands: ``/reset`` (forget the conversation),
    ``/temp X`` (sampling temperature, 0 = greedy), ``/exit``. ``prompt`` (e.g. "> " on a terminal) is written to
    stderr before each read. Returns the number of replies."""
    lines = lines if lines is not None else sys.stdin
    out = out if out is not None else sys.stdout
    n = 0
    while True:
        if prompt:
            print(prompt, end="", file=sys.stderr, flush=True)
        line = lines.readline()
        if not line:
            break
        msg = line.rstrip("\r\n")
        cmd = msg.strip()
        if not cmd:
            continue
        if cmd == "/exit":
            break
        if cmd == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if cmd.startswith("/temp"):
            try:
                t = float(cmd.split(maxsplit=1)[1])
                if t < 0:
                    raise ValueError
            except (IndexError, ValueError):
                print("usage: /temp X   (X ≥ 0; 0 = greedy)", file=sys.stderr)
                continue
            session.temperature = t
            print(f"(temperature {t})", file=sys.stderr)
            continue
        trimmed = session.trimmed
        try:
            for piece in session.reply(msg):
                print(piece, end="", file=out, flush=True)
        except ValueError as e:  # the message alone does not fit
            print(f"error: {e}", file=sys.stderr)
            continue
        print(file=out, flush=True)
        if session.trimmed > trimmed:
            print(f"(dropped the {session.trimmed - trimmed} oldest turn(s) to fit model.max_seq_len="
                  f"{session.max_len})", file=sys.stderr)
        n += 1
    return n


__all__ = ["STOP", "ChatSession", "run_chat"]
