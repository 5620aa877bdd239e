"""A small, deterministic, generated English-like corpus for tests and smoke runs that need no network.

The text comes from a tiny probabilistic grammar (subject–verb agreement, adjectives, prepositional
phrases, dialogue, numbers) over a fixed word list, so it has real structure: a model trained on it for a
few dozen steps shows a clearly falling loss, and a byte-level BPE of a few hundred tokens fits it. The same
``seed`` gives the same bytes on every machine and Python version (only ``random.Random`` with a seed, whose
``random()``/``choice`` streams are stable, and no hash-ordered containers).
"""

from __future__ import annotations

import random
from pathlib import Path

_NOUNS = ("king queen knight castle river forest sword horse garden tower letter storm village merchant "
          "soldier daughter father mother brother sister friend stranger ship island mountain crown ring "
          "candle window door road bridge field harvest winter summer morning evening night shadow voice "
          "heart dream song story promise secret lantern market church wall").split()
_ADJS = ("old young quiet bright dark cold warm gentle bold strange golden silver small great ancient "
         "weary proud hidden distant noble poor happy sad green red").split()
_VERBS = [  # (singular, plural, past)
    ("sees", "see", "saw"), ("finds", "find", "found"), ("loves", "love", "loved"), ("keeps", "keep", "kept"),
    ("follows", "follow", "followed"), ("carries", "carry", "carried"),
    ("remembers", "remember", "remembered"),
    ("watches", "watch", "watched"), ("builds", "build", "built"), ("leaves", "leave", "left"),
    ("calls", "call", "called"), ("guards", "guard", "guarded"), ("opens", "open", "opened"),
]
_INTRANS = [("waits", "wait", "waited"), ("sleeps", "sleep", "slept"), ("sings", "sing", "sang"),
            ("walks", "walk", "walked"), ("laughs", "laugh", "laughed"), ("returns", "return", "returned")]
_PREPS = "in near under beyond behind across beside through".split()
_ADVS = "slowly softly always never often suddenly again together".split()
_NAMES = "Anna Marcus Elena Tobias Clara Hugo Mira Felix Rosa Edmund".split()
_SAID = "said asked whispered replied cried".split()


class _Grammar:
    def __init__(self, rng: random.Random) -> None:
        self.r = rng

    def noun_phrase(self) -> tuple[str, bool]:
        r = self.r
        if r.random() < 0.15:
            return r.choice(_NAMES), False
        plural = r.random() < 0.3
        noun = r.choice(_NOUNS)
        noun = noun + ("es" if noun.endswith(("s", "sh", "ch")) else "s") if plural else noun
        det = r.choice(["the", "the", "some", "many"] if plural else ["the", "the", "a", "every", "this"])
        if det == "a" and r.random() < 0.5:
            adj = r.choice(_ADJS)
            det = "an" if adj[0] in "aeiou" else "a"
            return f"{det} {adj} {noun}", plural
        if r.random() < 0.4:
            noun = f"{r.choice(_ADJS)} {noun}"
        if det == "a" and noun[0] in "aeiou":
            det = "an"
        return f"{det} {noun}", plural

    def clause(self) -> str:
        r = self.r
        subj, plural = self.noun_phrase()
        past = r.random() < 0.4
        if r.random() < 0.3:
            v = r.choice(_INTRANS)
            s = f"{subj} {v[2] if past else v[1 if plural else 0]}"
        else:
            v = r.choice(_VERBS)
            obj, _ = self.noun_phrase()
            s = f"{subj} {v[2] if past else v[1 if plural else 0]} {obj}"
        if r.random() < 0.3:
            s += f" {r.choice(_ADVS)}"
        if r.random() < 0.4:
            place, _ = self.noun_phrase()
            s += f" {r.choice(_PREPS)} {place}"
        return s

    def sentence(self) -> str:
        r = self.r
        u = r.random()
        if u < 0.15:
            s = f"{self.clause()}, and {self.clause()}"
        elif u < 0.25:
            s = f"when {self.clause()}, {self.clause()}"
        elif u < 0.32:
            n = r.randint(2, 99)
            s = f"{self.clause()} for {n} days"
        else:
            s = self.clause()
        s = s[0].upper() + s[1:]
        if r.random() < 0.12:
            return f'"{s}?" {r.choice(_SAID)} {r.choice(_NAMES)}.'
        return s + r.choice([".", ".", ".", "!"])


def synthetic_text(n_chars: int, seed: int = 0) -> str:
    """About ``n_chars`` characters (paragraphs of sentences, ending with a newline) of generated English."""
    g = _Grammar(random.Random(seed))
    paras: list[str] = []
    size = 0
    while size < n_chars:
        p = " ".join(g.sentence() for _ in range(g.r.randint(2, 7)))
        paras.append(p)
        size += len(p) + 2
    return "\n\n".join(paras) + "\n"


def write_synthetic_corpus(directory: str | Path, n_files: int = 4, chars_per_file: int = 40_000,
                           seed: int = 0) -> Path:
    """Write ``n_files`` documents ``doc_000.txt`` ... into ``directory`` (created); returns it. File i uses
    seed ``seed · 1000 + i``, so corpora of different seeds share no document."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (d / f"doc_{i:03d}.txt").write_text(synthetic_text(chars_per_file, seed * 1000 + i), encoding="utf-8")
    return d
