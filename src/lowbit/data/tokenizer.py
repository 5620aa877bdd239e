"""One small tokenizer wrapper over three backends.

* **Trained byte-level BPE** (:meth:`Tokenizer.train_bpe`, HF ``tokenizers``): GPT-2's scheme. Text is split
  by GPT-2's regex, every byte is a base symbol (so any Unicode text round-trips exactly and nothing is ever
  unknown), merges are learned on the training text. The special token ``<|endoftext|>`` is **id 0** (special
  tokens come first in the trainer's vocabulary); it separates documents in the token shards. The 256 byte
  symbols follow, then the merges: a vocabulary of V holds V - 257 merges.
* **A tokenizer.json** (:meth:`Tokenizer.load`): any HF ``tokenizers`` file (GPT-2, LLaMA-3, Mistral ...).
  Its end-of-text token is found by name (``<|endoftext|>``, ``</s>``, ``<|end_of_text|>``, ``<eos>``, ...).
* **A SentencePiece ``.model``** (optional ``sentencepiece`` package): ``eos_id`` is the model's (``</s>``).
  SentencePiece normalizes text (NFKC, whitespace), so decode(encode(s)) == s does not hold in general.

Special tokens written in the text itself are encoded as plain text, never as the control token: a document
that quotes ``<|endoftext|>`` must not be able to cut itself in two.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lowbit.data.sources import DataError

EOS_TOKEN = "<|endoftext|>"
# Names of the end-of-text token in common tokenizer.json files, tried in order.
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
# Smallest byte-level BPE: 256 byte symbols + <|endoftext|>.
MIN_BPE_VOCAB = 257

# A single space between two non-space characters is a point where GPT-2's pre-tokenizer regex always starts a
# new piece (" x" is matched as one piece; the piece before it cannot contain a space). So a text cut just
# before such a space encodes to exactly the concatenation of its parts' encodings; see _split_long.
_SAFE_CUT = re.compile(r"(?<=\S) (?=\S)")


class Tokenizer:
    """Text ↔ token ids. Build with :meth:`train_bpe` or :meth:`load`; persist with :meth:`save`."""

    def __init__(self, backend: Any, kind: str, eos_id: int, serialized: bytes) -> None:
        # kind: "bpe" (trained here), "json" (a loaded tokenizer.json) or "sentencepiece"
        self._backend = backend
        self.kind = kind
        self.eos_id = int(eos_id)
        self._serialized = serialized
        self.sha256 = hashlib.sha256(serialized).hexdigest()
        """Hash of the serialized tokenizer (the bytes :meth:`save` writes); stored in the dataset manifest so
        that shards are never read with a different tokenizer than the one that wrote them."""
        self._splittable = kind != "sentencepiece" and _is_gpt2_byte_level(serialized)

    # ---------------------------------------------------------------- construction
    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, progress: bool = False,
                  length: int | None = None) -> Tokenizer:
        """Train a byte-level BPE of (at most) ``vocab_size`` tokens on ``texts``; ``<|endoftext|>`` = id 0.
        A small corpus may run out of pairs to merge before reaching ``vocab_size``; the result is then
        smaller (check :attr:`vocab_size`)."""
        if vocab_size < MIN_BPE_VOCAB:
            raise DataError(f"a byte-level BPE needs vocab_size >= {MIN_BPE_VOCAB} (256 bytes + "
                            f"{EOS_TOKEN}), got vocab_size={vocab_size}; raise model.vocab_size")
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        # add_prefix_space=False keeps the round trip exact (no space invented at the start of a text)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the text or not
            show_progress=progress,
        )
        tok.train_from_iterator(texts, trainer, length=length)
        return cls._from_hf(tok, "bpe")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json``, a SentencePiece ``.model``, or a directory holding either (as written by
        :meth:`save`)."""
        p = Path(path).expanduser()
        if p.is_dir():
            for name in ("tokenizer.json", "tokenizer.model"):
                if (p / name).is_file():
                    p = p / name
                    break
            else:
                raise DataError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
        if not p.is_file():
            raise DataError(f"tokenizer file not found: {path}")
        if p.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            try:
                tok = HFTokenizer.from_file(str(p))
            except Exception as e:
                raise DataError(f"{p}: not a valid Hugging Face tokenizer.json ({e})") from None
            return cls._from_hf(tok, "json")
        if p.suffix == ".model":
            return cls._from_sentencepiece(p)
        raise DataError(f"{path}: unknown tokenizer file type; give a tokenizer.json or a SentencePiece "
                        f".model, or data.tokenizer=bpe to train one")

    @classmethod
    def _from_hf(cls, tok: Any, kind: str) -> Tokenizer:
        tok.encode_special_tokens = True  # "<|endoftext|>" in the text is text (see the module docstring)
        eos = next((i for i in (tok.token_to_id(t) for t in EOS_CANDIDATES) if i is not None), None)
        if eos is None:
            raise DataError(f"the tokenizer has none of the end-of-text tokens {EOS_CANDIDATES}; lowbit "
                            f"needs one to separate documents")
        # the backend's own compact serialization is canonical: a saved and reloaded tokenizer hashes the same
        return cls(tok, kind, eos, tok.to_str().encode("utf-8"))

    @classmethod
    def _from_sentencepiece(cls, path: Path) -> Tokenizer:
        try:
            import sentencepiece as spm
        except ImportError:
            raise DataError(f"{path} is a SentencePiece model: pip install 'lowbit[sentencepiece]' "
                            f"(or pip install sentencepiece)") from None
        data = path.read_bytes()
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except Exception as e:
            raise DataError(f"{path}: not a valid SentencePiece model ({e})") from None
        if sp.eos_id() < 0:
            raise DataError(f"{path}: the SentencePiece model has no end-of-sentence token (eos_id = -1)")
        return cls(sp, "sentencepiece", sp.eos_id(), data)

    # ---------------------------------------------------------------- use
    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's vocabulary must be at least this)."""
        if self.kind == "sentencepiece":
            return int(self._backend.get_piece_size())
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts at once, in parallel (Rust threads for HF tokenizers). Long texts are cut
        into pieces first when that provably changes nothing (see ``_split_long``), so that one huge document
        is encoded on all cores too."""
        texts = list(texts)
        if self.kind == "sentencepiece":
            return [list(ids) for ids in self._backend.encode(texts)]
        if not self._splittable:
            return [e.ids for e in self._encode_hf(texts)]
        pieces, owner = [], []
        for i, t in enumerate(texts):
            for p in _split_long(t):
                pieces.append(p)
                owner.append(i)
        out: list[list[int]] = [[] for _ in texts]
        for i, e in zip(owner, self._encode_hf(pieces), strict=True):
            out[i].extend(e.ids)
        return out

    def _encode_hf(self, texts: list[str]) -> list[Any]:
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we never use
        enc = getattr(self._backend, "encode_batch_fast", None) or self._backend.encode_batch
        return enc(texts, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are kept (decode(encode(s)) == s for the byte-level BPE)."""
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._backend.decode(ids)
        return self._backend.decode(ids, skip_special_tokens=False)

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` (or ``tokenizer.model``) into ``directory``; returns the file."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        f = d / self.filename
        tmp = f.with_name(f".{f.name}.tmp")
        tmp.write_bytes(self._serialized)
        tmp.replace(f)
        return f

    @property
    def filename(self) -> str:
        return "tokenizer.model" if self.kind == "sentencepiece" else "tokenizer.json"

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _is_gpt2_byte_level(serialized: bytes) -> bool:
    """Is this a HF tokenizer whose encoding is provably unchanged by cutting at ``_SAFE_CUT``? That needs
    GPT-2's pre-tokenizer regex (ByteLevel with use_regex), no normalizer, and no non-special added token
    (added tokens are matched before pre-tokenization and could contain spaces)."""
    try:
        d = json.loads(serialized)
    except ValueError:
        return False
    pre = d.get("pre_tokenizer") or {}
    added_ok = all(t.get("special") and " " not in t.get("content", "") for t in d.get("added_tokens") or [])
    return (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and d.get("normalizer") is None
            and (d.get("model") or {}).get("type") == "BPE" and added_ok)


def _split_long(text: str, size: int = 1 << 15) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters, only just before a single space that has a
    non-space character on both sides. GPT-2's regex matches `` ?\\p{L}+``, `` ?\\p{N}+`` and
    `` ?[^\\s\\p{L}\\p{N}]+``, so such a space always starts a new pre-token, and no pre-token ends with one:
    the pieces' encodings concatenate to the encoding of the whole (property-tested)."""
    if len(text) <= size:
        return [text]
    out, start = [], 0
    while len(text) - start > size:
        m = _SAFE_CUT.search(text, start + size)
        if m is None:
            break
        out.append(text[start : m.start()])
        start = m.start()
    out.append(text[start:])
    return out

