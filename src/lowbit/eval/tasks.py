"""Evaluation beyond loss: multiple-choice log-likelihood, last-word cloze, sliding-window perplexity.

* **Multiple choice** (HellaSwag, PIQA, ARC, or any ``{"context", "choices", "gold"}`` JSONL): each choice is
  scored by the summed log-probability of its tokens given the context, as lm-evaluation-harness does.
  ``acc`` takes the argmax of the raw sum; ``acc_norm`` divides by the choice's length in UTF-8 bytes first
  (lm-eval divides by the character length; bytes equal characters for ASCII and stay tokenizer-independent).
  Ties go to the first choice. Each accuracy comes with a seeded bootstrap 95 % confidence interval.
* **Last-word cloze** (LAMBADA-style, Paperno et al. 2016): passages of ``n_words`` words from held-out text
  whose last word does not occur earlier in the passage — a cheap proxy for LAMBADA's "needs the context"
  human filter. Scored as ``acc`` (every token of `` word`` is the greedy argmax, lm-eval's ``is_greedy``) and
  the target's log-likelihood. :func:`build_cloze` is deterministic: the same text and seed give the same file.
* **Next sentence** (a small built-in MC task): the two sentences before a sentence are the context; the real
  next sentence and ``n_choices - 1`` sentences drawn from elsewhere in the text are the choices.
* **Sliding-window perplexity / bits per byte** of any text (:func:`text_perplexity`): every token is scored
  exactly once, with as much preceding context as the window allows (stride ``S`` ⇒ at least ``L - S``).

All scoring goes through :func:`score_continuations`, a batched ``(context ids, continuation ids)`` scorer
that truncates contexts from the left to fit ``model.cfg.max_seq_len``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

BUILDER_VERSION = 1
"""Bumped whenever a builder's output changes for the same inputs (it is part of the cache key)."""


@dataclass
class MCExample:
    """One multiple-choice item. ``choices`` are continuations of ``context``; each is scored with
    ``delimiter`` (a space by default) in front, and its byte length (for ``acc_norm``) excludes it."""

    context: str
    choices: list[str]
    gold: int
    delimiter: str = " "

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError("a multiple-choice example needs at least one choice")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"gold index {self.gold} outside the {len(self.choices)} choices")


@dataclass
class ClozeExample:
    context: str
    target: str
    delimiter: str = " "


# ----------------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------------


def model_max_len(model: nn.Module, default: int = 1024) -> int:
    cfg = getattr(model, "cfg", None)
    return int(getattr(cfg, "max_seq_len", default))


@torch.no_grad()
def score_continuations(model: nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                        device: torch.device | str = "cpu", batch_size: int = 16, max_len: int | None = None,
                        amp_dtype: torch.dtype | None = None) -> list[tuple[float, bool]]:
    """``(sum of log p(continuation | context), continuation is the greedy argmax)`` for each request.

    Context and continuation are token id lists; a context is cut from the left so that context +
    continuation fit ``max_len + 1`` tokens (the last token is only a target). An empty context must be given
    a start token by the caller (e.g. the tokenizer's EOS, which precedes every document in the shards)."""
    device = torch.device(device)
    max_len = max_len or model_max_len(model)
    was_training = model.training
    model.eval()
    prepared = []
    for ctx, cont in requests:
        cont = list(cont)
        if not cont:
            raise ValueError("empty continuation")
        if len(cont) > max_len:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit max_seq_len={max_len}")
        full = (list(ctx) + cont)[-(max_len + 1):]
        if len(full) == len(cont):
            raise ValueError("empty context: give a start token")
        prepared.append((full[:-1], full[1:], len(cont)))
    # longest first: padding waste is small and the first batch shows an out-of-memory at once
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(prepared)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        T = max(len(prepared[i][0]) for i in idx)
        x = torch.zeros(len(idx), T, dtype=torch.long)
        for row, i in enumerate(idx):
            inp = prepared[i][0]
            x[row, :len(inp)] = torch.tensor(inp)  # right padding: causal attention never looks at it
        with amp:
            logits = model(x.to(device))
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()  # (B, T, V)
        for row, i in enumerate(idx):
            inp, tgt, n = prepared[i]
            pos = torch.arange(len(inp) - n, len(inp))
            t = torch.tensor(tgt[-n:])
            lp = logp[row, pos]  # (n, V)
            out[i] = (float(lp.gather(1, t[:, None]).sum()), bool((lp.argmax(-1) == t).all()))
    model.train(was_training)
    return out


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (seeded, so reports are reproducible)."""
    if len(values) == 0:
        return (float("nan"), float("nan"))
    v = torch.tensor(values, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    means = v[torch.randint(len(v), (n_boot, len(v)), generator=g)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return (float(lo), float(hi))


def _encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    # encoded separately so the continuation's tokens are exactly those of its own text (lm-eval encodes the
    # whole and splits; with GPT-2's pre-tokenizer a cut before " word" gives the same ids)
    ctx = tok.encode(context) if context else []
    return [tok.eos_id, *ctx], tok.encode(continuation)


def _fitting(examples: Sequence[Any], tok: Any, model: nn.Module) -> tuple[list[Any], int]:
    """The examples all of whose continuations fit the model's window with at least one context token (the
    others cannot be scored faithfully: they are counted as ``skipped``, not silently truncated)."""
    if not examples:
        raise ValueError("no examples to evaluate")
    max_len = model_max_len(model)
    keep = [ex for ex in examples
            if all(len(tok.encode(ex.delimiter + c)) < max_len
                   for c in (ex.choices if isinstance(ex, MCExample) else [ex.target]))]
    if not keep:
        raise ValueError(f"no example fits max_seq_len={max_len} (the continuations are longer)")
    return keep, len(examples) - len(keep)


def evaluate_mc(model: nn.Module, tok: Any, examples: Sequence[MCExample], device: torch.device | str = "cpu",
                batch_size: int = 16, seed: int = 0, n_boot: int = 1000,
                amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """``acc`` and ``acc_norm`` (with bootstrap 95 % CIs) of ``model`` on multiple-choice ``examples``."""
    examples, skipped = _fitting(examples, tok, model)
    reqs, spans = [], []
    for ex in examples:
        spans.append((len(reqs), len(ex.choices)))
        reqs += [_encode_pair(tok, ex.context, ex.delimiter + c) for c in ex.choices]
    scores = score_continuations(model, reqs, device, batch_size, amp_dtype=amp_dtype)
    acc, acc_norm = [], []
    for ex, (s, n) in zip(examples, spans, strict=True):
        ll = [scores[s + k][0] for k in range(n)]
        norm = [x / max(1, len(c.encode())) for x, c in zip(ll, ex.choices, strict=True)]
        acc.append(float(max(range(n), key=lambda k: (ll[k], -k)) == ex.gold))
        acc_norm.append(float(max(range(n), key=lambda k: (norm[k], -k)) == ex.gold))
    return {"n": len(examples), "acc": sum(acc) / len(acc), "acc_ci95": bootstrap_ci(acc, n_boot, seed),
            "acc_norm": sum(acc_norm) / len(acc_norm), "acc_norm_ci95": bootstrap_ci(acc_norm, n_boot, seed),
            "chance": sum(1 / len(ex.choices) for ex in examples) / len(examples), "skipped": skipped}


def evaluate_cloze(model: nn.Module, tok: Any, examples: Sequence[ClozeExample],
                   device: torch.device | str = "cpu", batch_size: int = 16, seed: int = 0, n_boot: int = 1000,
                   amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Greedy exact-match accuracy of the last word and its mean log-likelihood (nats) / perplexity."""
    examples, skipped = _fitting(examples, tok, model)
    reqs = [_encode_pair(tok, ex.context, ex.delimiter + ex.target) for ex in examples]
    scores = score_continuations(model, reqs, device, batch_size, amp_dtype=amp_dtype)
    acc = [float(g) for _, g in scores]
    ll = [s for s, _ in scores]
    n_tok = sum(len(c) for _, c in reqs)
    return {"n": len(examples), "acc": sum(acc) / len(acc), "acc_ci95": bootstrap_ci(acc, n_boot, seed),
            "target_logprob": sum(ll) / len(ll), "target_ppl": math.exp(min(50.0, -sum(ll) / n_tok)),
            "skipped": skipped}


@torch.no_grad()
def text_perplexity(model: nn.Module, tok: Any, text: str, device: torch.device | str = "cpu",
                    stride: int | None = None, max_len: int | None = None, batch_size: int = 8,
                    amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Sliding-window loss, perplexity and bits per byte of ``text``.

    The text is encoded once, preceded by EOS (the shards put EOS before every document, so the first token
    is scored too). Windows of ``max_len`` inputs start every ``stride`` tokens; each window scores only the
    tokens no earlier window scored, so every token is scored exactly once, with at least ``max_len - stride``
    tokens of context once the first window is full. ``stride = max_len`` is plain chunked evaluation."""
    device = torch.device(device)
    max_len = max_len or model_max_len(model)
    stride = stride or max(1, max_len // 2)
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in [1, {max_len}], got {stride}")
    ids = [tok.eos_id, *tok.encode(text)]
    n = len(ids) - 1  # targets
    if n < 1:
        raise ValueError("text is empty")
    windows = []  # (start, first target index scored), targets are ids[start+1 : start+max_len+1]
    done, s = 0, 0
    while done < n:
        end = min(s + max_len, n)
        windows.append((s, done, end))  # score targets at positions done..end-1 (0-based over ids[1:])
        done = end
        s += stride
    was_training = model.training
    model.eval()
    nll = 0.0
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    for b in range(0, len(windows), batch_size):
        chunk = windows[b:b + batch_size]
        T = max(e - st for st, _, e in chunk)
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        for r, (st, _, e) in enumerate(chunk):
            x[r, :e - st] = torch.tensor(ids[st:e])
        with amp:
            logp = torch.log_softmax(model(x.to(device)).float(), -1).cpu()
        for r, (st, first, e) in enumerate(chunk):
            pos = torch.arange(first - st, e - st)  # input positions whose next token is a new target
            t = torch.tensor(ids[first + 1:e + 1])
            nll -= float(logp[r, pos].gather(1, t[:, None]).sum())
    model.train(was_training)
    n_bytes = len(text.encode())
    loss = nll / n
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": nll / math.log(2) / max(1, n_bytes),
            "tokens": n, "bytes": n_bytes, "windows": len(windows), "stride": stride, "max_len": max_len}


# ----------------------------------------------------------------------------------------------------------
# task files
# ----------------------------------------------------------------------------------------------------------


def _mc_from_row(row: dict[str, Any], where: str) -> MCExample:
    if {"context", "choices", "gold"} <= row.keys():
        return MCExample(str(row["context"]), [str(c) for c in row["choices"]], int(row["gold"]),
                         row.get("delimiter", " "))
    if {"ctx", "endings", "label"} <= row.keys():  # HellaSwag
        return MCExample(str(row["ctx"]), [str(e) for e in row["endings"]], int(row["label"]))
    if {"goal", "sol1", "sol2", "label"} <= row.keys():  # PIQA (lm-eval's prompt)
        return MCExample(f"Question: {row['goal']}\nAnswer:", [str(row["sol1"]), str(row["sol2"])],
                         int(row["label"]))
    if {"question", "choices", "answerKey"} <= row.keys():  # ARC (lm-eval's prompt)
        ch = row["choices"]
        if not isinstance(ch, dict) or not {"text", "label"} <= ch.keys():
            raise ValueError(f"{where}: ARC 'choices' must be {{'text': [...], 'label': [...]}}")
        labels = [str(x) for x in ch["label"]]
        key = str(row["answerKey"])
        if key not in labels:
            raise ValueError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
        return MCExample(f"Question: {row['question']}\nAnswer:", [str(t) for t in ch["text"]], labels.index(key))
    raise ValueError(f"{where}: unknown task shape with keys {sorted(row)}; expected one of "
                     "{context, choices, gold} (generic), {ctx, endings, label} (HellaSwag), "
                     "{goal, sol1, sol2, label} (PIQA), {question, choices{text,label}, answerKey} (ARC), "
                     "or {context, target} (cloze)")


def _read_jsonl(path: str | Path) -> Iterable[tuple[dict[str, Any], str]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{i}: each line must be a JSON object")
                yield row, f"{path}:{i}"


def load_task(path: str | Path, limit: int | None = None) -> list[MCExample] | list[ClozeExample]:
    """Examples of a JSONL task file; the shape (MC of any supported kind, or cloze) is detected per file
    from its first row. ``limit`` keeps the first ``limit`` examples."""
    out: list[Any] = []
    kind = None
    for row, where in _read_jsonl(path):
        if limit is not None and len(out) >= limit:
            break
        is_cloze = {"context", "target"} <= row.keys() and "choices" not in row
        if kind is None:
            kind = "cloze" if is_cloze else "mc"
        if kind == "cloze":
            if not is_cloze:
                raise ValueError(f"{where}: expected a cloze row {{context, target}} like the first row")
            out.append(ClozeExample(str(row["context"]), str(row["target"]), row.get("delimiter", " ")))
        else:
            out.append(_mc_from_row(row, where))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def save_task(examples: Sequence[MCExample | ClozeExample], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
    tmp.replace(path)
    return path


def evaluate_task(model: nn.Module, tok: Any, examples: Sequence[Any], **kw: Any) -> dict[str, Any]:
    if examples and isinstance(examples[0], ClozeExample):
        return {"kind": "cloze", **evaluate_cloze(model, tok, examples, **kw)}
    return {"kind": "mc", **evaluate_mc(model, tok, examples, **kw)}


# ----------------------------------------------------------------------------------------------------------
# builders (deterministic: the same texts and arguments give the same examples)
# ----------------------------------------------------------------------------------------------------------

_WORD = re.compile(r"\S+")
_TARGET = re.compile(r"([A-Za-z]+)[^\w\s]*")  # a plain word, optionally followed by punctuation


def build_cloze(texts: Iterable[str], n: int = 500, n_words: int = 40, seed: int = 0,
                min_target_len: int = 3) -> list[ClozeExample]:
    """Up to ``n`` last-word passages: ``n_words`` consecutive words of one document (whitespace collapsed to
    single spaces) whose last word — letters only, trailing punctuation dropped, at least ``min_target_len``
    letters — does not occur (case-insensitively, as a whole word) in the ``n_words - 1`` words before it.
    Windows do not overlap; which ones are used is a seeded shuffle."""
    cands = []
    for d, text in enumerate(texts):
        words = _WORD.findall(text)
        cands += [(d, i, words[i:i + n_words]) for i in range(0, len(words) - n_words + 1, n_words)]
    random.Random(seed).shuffle(cands)
    out = []
    for _, _, words in cands:
        m = _TARGET.fullmatch(words[-1])
        if m is None or len(m.group(1)) < min_target_len:
            continue
        target, context = m.group(1), " ".join(words[:-1])
        if re.search(rf"(?<![A-Za-z]){re.escape(target)}(?![A-Za-z])", context, re.IGNORECASE):
            continue
        out.append(ClozeExample(context, target))
        if len(out) >= n:
            break
    return out


_SENT = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def split_sentences(text: str) -> list[str]:
    return [s for s in (" ".join(p.split()) for p in _SENT.split(text)) if s]


def build_nextsent(texts: Iterable[str], n: int = 500, n_choices: int = 4, context_sentences: int = 2,
                   seed: int = 0, min_chars: int = 20, max_chars: int = 300) -> list[MCExample]:
    """Up to ``n`` "which is the real next sentence" items: ``context_sentences`` consecutive sentences, then
    the true next sentence and ``n_choices - 1`` distractors drawn from the whole text (other, distinct
    sentences of ``min_chars``..``max_chars`` characters, never the context's own), in a seeded order."""
    docs = [split_sentences(t) for t in texts]
    pool = sorted({s for d in docs for s in d if min_chars <= len(s) <= max_chars})
    cands = [(d, i) for d, sents in enumerate(docs) for i in range(context_sentences, len(sents))
             if min_chars <= len(sents[i]) <= max_chars]
    rng = random.Random(seed)
    rng.shuffle(cands)
    out = []
    for d, i in cands[:n]:
        ctx = docs[d][i - context_sentences:i]
        true = docs[d][i]
        avoid = {true, *ctx}
        distract: list[str] = []
        while len(distract) < n_choices - 1 and len(pool) > len(avoid) + len(distract):
            s = pool[rng.randrange(len(pool))]
            if s not in avoid and s not in distract:
                distract.append(s)
        if len(distract) < n_choices - 1:
            break
        choices = [true, *distract]
        rng.shuffle(choices)
        out.append(MCExample(" ".join(ctx), choices, choices.index(true)))
    return out


BUILTIN = {"cloze": build_cloze, "nextsent": build_nextsent}
"""Built-in tasks, built from held-out text by name."""


def builtin_task(name: str, sources: Sequence[str], cache_dir: str | Path | None = None, n: int = 500,
                 seed: int = 0, **kw: Any) -> tuple[list[Any], Path | None]:
    """Examples of built-in task ``name`` built from the text of ``sources`` (``lowbit.data`` syntax, e.g.
    ``["default-heldout"]``); cached as ``cache_dir/tasks/<name>-<key>.jsonl`` where the key hashes the
    sources, arguments and :data:`BUILDER_VERSION`. Returns the examples and the cache file."""
    from lowbit.data import DataError, iter_documents

    if name not in BUILTIN:
        raise ValueError(f"unknown built-in task {name!r}; built-in: {', '.join(BUILTIN)} (or a .jsonl path)")
    if not sources:
        raise DataError(f"task {name!r} is built from held-out text, but data.heldout is empty; "
                        "pass a task .jsonl file instead")
    key = hashlib.sha256(json.dumps([name, list(sources), n, seed, sorted(kw.items()), BUILDER_VERSION])
                         .encode()).hexdigest()[:12]
    path = Path(cache_dir) / "tasks" / f"{name}-{key}.jsonl" if cache_dir is not None else None
    if path is not None and path.is_file():
        return load_task(path), path
    examples = BUILTIN[name](list(iter_documents(list(sources))), n=n, seed=seed, **kw)
    if not examples:
        raise DataError(f"task {name!r}: the sources {list(sources)} gave no examples (text too short?)")
    if path is not None:
        save_task(examples, path)
    return examples, path


def run_tasks(model: nn.Module, tok: Any, tasks: Sequence[str], sources: Sequence[str],
              cache_dir: str | Path | None = None, limit: int | None = None, device: torch.device | str = "cpu",
              batch_size: int = 16, seed: int = 0, amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Evaluate each of ``tasks`` — a built-in name (:data:`BUILTIN`) or a JSONL file — and return
    ``{task name: metrics}``; a file's task name is its stem."""
    results = {}
    for t in tasks:
        if t in BUILTIN:
            ex, path = builtin_task(t, sources, cache_dir, seed=seed)
            name = t
        else:
            if not Path(t).is_file():
                raise FileNotFoundError(f"task {t!r} is neither built-in ({', '.join(BUILTIN)}) nor a file")
            ex, path, name = load_task(t), Path(t), Path(t).stem
        ex = ex[:limit] if limit else ex
        r = evaluate_task(model, tok, ex, device=device, batch_size=batch_size, seed=seed, amp_dtype=amp_dtype)
        results[name] = {**r, "source": str(path) if path else None}
    return results
