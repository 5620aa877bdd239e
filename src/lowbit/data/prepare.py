"""DataConfig → a prepared dataset directory: tokenizer + token shards + manifest.

:func:`prepare_data` is the one entry point the trainer and the CLI call. It is idempotent: a directory whose
manifest carries the same *config fingerprint* (sources, held-out sources, text field, max_chars,
val_fraction, tokenizer and, for a trained BPE, the vocabulary size) is reused as is, in milliseconds;
anything else is rebuilt. Files in the sources are not hashed (that would cost as much as a rebuild): after
editing them in place, pass ``force=True`` (CLI: delete the directory).

Steps of a build, each streamed so that memory stays flat whatever the corpus size:
1. read the training documents and cut each one into a head (train) and a tail of ``val_fraction`` of its
   characters (val), on a whitespace boundary;
2. train a byte-level BPE on the heads only (``data.tokenizer=bpe``), or load the given tokenizer;
3. encode heads, tails and held-out documents in chunks of a few MB with ``encode_batch`` (parallel in Rust)
   and stream the ids into the shard files;
4. write the manifest last.

Run alone: ``python -m lowbit.data.prepare [--config FILE] [data.source=... model.vocab_size=...]``.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lowbit.config import DataConfig
from lowbit.data import shards
from lowbit.data.shards import MANIFEST, ShardWriter, dtype_for, read_manifest, write_manifest
from lowbit.data.sources import DataError, check_source, describe, iter_documents
from lowbit.data.tokenizer import MIN_BPE_VOCAB, Tokenizer

# Characters per encode_batch call: large enough to keep every core busy, small enough that the Python lists
# of ids of one chunk stay around 100 MB.
CHUNK_CHARS = 1 << 22

_WS = re.compile(r"\s")


def split_tail(doc: str, fraction: float) -> tuple[str, str]:
    """Cut ``doc`` into (head, tail) with the tail about ``fraction`` of its characters. The cut is at a
    whitespace character (the first one at or after the ideal point, else the last one before it), which
    starts the tail: head + tail == doc, and no word is cut in two. A document too short to give a tail of at
    least one character, or without whitespace, stays whole in the head."""
    n_tail = int(len(doc) * fraction)
    if n_tail <= 0:
        return doc, ""
    target = len(doc) - n_tail
    m = _WS.search(doc, target)
    k = m.start() if m else next((i for i in range(target - 1, 0, -1) if doc[i].isspace()), 0)
    if k <= 0:
        return doc, ""
    return doc[:k], doc[k:]


def config_fingerprint(cfg: DataConfig, vocab_size: int) -> tuple[str, dict[str, Any]]:
    """(sha256, the fields it hashes): everything that changes the shards' content, nothing else (the data
    order ``seed`` and the directory are not in it)."""
    fields: dict[str, Any] = {
        "format": shards.FORMAT, "version": shards.VERSION, "source": list(cfg.source),
        "heldout": list(cfg.heldout), "text_field": cfg.text_field, "max_chars": cfg.max_chars,
        "val_fraction": cfg.val_fraction, "tokenizer": cfg.tokenizer,
    }
    if cfg.tokenizer == "bpe":
        fields["vocab_size"] = vocab_size  # a pretrained tokenizer's ids do not depend on the model's vocab
    else:
        fields["tokenizer_sha256"] = Tokenizer.load(cfg.tokenizer).sha256  # the file changed → rebuild
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return digest, fields


def prepare_data(cfg: DataConfig, vocab_size: int, progress: bool = True, force: bool = False) -> Path:
    """Build (or reuse) the dataset directory ``cfg.dir`` for a model with ``vocab_size`` ids; return it.

    The tokenizer's vocabulary must fit the model's: ``tokenizer.vocab_size <= vocab_size`` (a larger model
    vocabulary only leaves some embedding rows unused, as with GPT-2's 50257 → 50304 padding; a smaller one
    would index out of range). ``data.tokenizer=bpe`` trains exactly ``vocab_size`` tokens when the text
    allows it (a tiny corpus may stop earlier: a warning says so).
    """
    out = Path(cfg.dir).expanduser()
    pretrained = None
    if cfg.tokenizer == "bpe":
        if vocab_size < MIN_BPE_VOCAB:
            raise DataError(f"model.vocab_size={vocab_size} is too small for a byte-level BPE tokenizer, "
                            f"which has at least {MIN_BPE_VOCAB} tokens (256 bytes + <|endoftext|>); "
                            f"raise model.vocab_size")
    else:
        pretrained = Tokenizer.load(cfg.tokenizer)
        _check_vocab(pretrained.vocab_size, vocab_size, cfg.tokenizer)
    fingerprint, fields = config_fingerprint(cfg, vocab_size)
    if not force and _reusable(out, fingerprint):
        _check_vocab(read_manifest(out)["tokenizer"]["vocab_size"], vocab_size, str(out))
        return out
    for s in [*cfg.source, *cfg.heldout]:
        check_source(s)  # a typo fails now, before any download or training

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    # the old manifest goes first: from here until the new one is written, the directory is never reused
    (out / MANIFEST).unlink(missing_ok=True)

    def documents() -> Iterator[str]:
        return iter_documents(cfg.source, cfg.text_field, cfg.max_chars)

    timings: dict[str, float] = {}
    if pretrained is None:
        t = time.perf_counter()
        heads = (split_tail(d, cfg.val_fraction)[0] for d in documents())
        tok = Tokenizer.train_bpe(heads, vocab_size, progress=progress)
        timings["train_tokenizer_s"] = round(time.perf_counter() - t, 3)
        if tok.vocab_size < vocab_size:
            warnings.warn(f"the training text supports only {tok.vocab_size} BPE tokens, fewer than "
                          f"model.vocab_size={vocab_size}; {vocab_size - tok.vocab_size} embedding rows will "
                          f"stay unused (add text or lower model.vocab_size)", stacklevel=2)
    else:
        tok = pretrained
    tok_file = tok.save(out)

    dtype = dtype_for(tok.vocab_size)
    writers = {s: ShardWriter(out, s, dtype, tok.eos_id) for s in (["train", "val"] +
                                                                     (["heldout"] if cfg.heldout else []))}
    try:
        t = time.perf_counter()
        parts = (split_tail(d, cfg.val_fraction) for d in documents())
        _encode_stream(tok, parts, [writers["train"], writers["val"]], progress, "tokenize train+val")
        if cfg.heldout:
            docs = ((d,) for d in iter_documents(cfg.heldout, cfg.text_field, cfg.max_chars))
            _encode_stream(tok, docs, [writers["heldout"]], progress, "tokenize heldout")
        timings["tokenize_s"] = round(time.perf_counter() - t, 3)
        if writers["val"].n_docs == 0:
            raise DataError(f"the val split is empty: the documents are too short to give a "
                            f"val_fraction={cfg.val_fraction} tail (or hold no whitespace); raise "
                            f"data.val_fraction or use longer documents")
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    splits = {name: w.commit(describe(cfg.heldout if name == "heldout" else cfg.source))
              for name, w in writers.items()}
    for stale in ("train.bin", "val.bin", "heldout.bin", "tokenizer.json", "tokenizer.model"):
        if stale not in {s["file"] for s in splits.values()} | {tok_file.name}:
            (out / stale).unlink(missing_ok=True)

    manifest = {
        "format": shards.FORMAT,
        "version": shards.VERSION,
        "fingerprint": fingerprint,
        "config": {**fields, "requested_vocab_size": vocab_size},
        "tokenizer": {"file": tok_file.name, "kind": tok.kind, "sha256": tok.sha256,
                      "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "source": cfg.tokenizer},
        "dtype": dtype.name,
        "splits": splits,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "build_seconds": {**timings, "total_s": round(time.perf_counter() - t0, 3)},
    }
    write_manifest(out, manifest)
    return out


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer of a prepared dataset, checked against the sha256 its manifest recorded."""
    m = read_manifest(directory)
    tok = Tokenizer.load(Path(directory) / m["tokenizer"]["file"])
    if tok.sha256 != m["tokenizer"]["sha256"]:
        raise DataError(f"{directory}: {m['tokenizer']['file']} is not the tokenizer that wrote the shards "
                        f"(sha256 differs); prepare the dataset again")
    return tok


def _check_vocab(tok_vocab: int, vocab_size: int, what: str) -> None:
    if tok_vocab > vocab_size:
        raise DataError(f"the tokenizer ({what}) has {tok_vocab} tokens but model.vocab_size={vocab_size}: "
                        f"the model's vocabulary must be at least the tokenizer's; set model.vocab_size >= "
                        f"{tok_vocab}")


def _reusable(out: Path, fingerprint: str) -> bool:
    try:
        m = read_manifest(out)
    except DataError:
        return False
    if m.get("fingerprint") != fingerprint:
        return False
    tok_file = out / m["tokenizer"]["file"]
    if not tok_file.is_file() or Tokenizer.load(tok_file).sha256 != m["tokenizer"]["sha256"]:
        return False
    itemsize = dtype_for(m["tokenizer"]["vocab_size"]).itemsize
    return all((out / s["file"]).is_file() and (out / s["file"]).stat().st_size == s["n_tokens"] * itemsize
               for s in m["splits"].values())


def _encode_stream(tok: Tokenizer, items: Iterable[tuple[str, ...]], writers: list[ShardWriter],
                   progress: bool, desc: str) -> None:
    """Encode tuples of texts (text i goes to writer i) in chunks of ~CHUNK_CHARS characters."""
    from tqdm.auto import tqdm

    bar = tqdm(desc=desc, unit="B", unit_scale=True, disable=not progress, leave=False)
    buf: list[list[str]] = [[] for _ in writers]
    chars = 0

    def flush() -> None:
        for texts, w in zip(buf, writers, strict=True):
            n_bytes = sum(len(t.encode("utf-8")) for t in texts)
            w.add(tok.encode_batch(texts), n_bytes)
            bar.update(n_bytes)
            texts.clear()

    try:
        for item in items:
            for texts, text in zip(buf, item, strict=True):
                if text:
                    texts.append(text)
                    chars += len(text)
            if chars >= CHUNK_CHARS:
                flush()
                chars = 0
        flush()
    finally:
        bar.close()


def summary(directory: str | Path) -> str:
    """A few lines describing a prepared dataset (for the CLI and ``python -m lowbit.data.prepare``)."""
    m = read_manifest(directory)
    t = m["tokenizer"]
    lines = [f"dataset {directory}: tokenizer {t['kind']}, vocab {t['vocab_size']}, eos id {t['eos_id']}, "
             f"{m['dtype']}"]
    for name, s in m["splits"].items():
        lines.append(f"  {name:8s} {s['n_tokens']:>12,} tokens {s['n_bytes']:>14,} bytes "
                     f"{s['n_docs']:>8,} docs ({s['n_bytes'] / max(1, s['n_tokens']):.2f} B/token)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m lowbit.data.prepare [--config FILE] [--force] [key=value ...]``: prepare and summarize."""
    import argparse

    from lowbit.config import load_config

    ap = argparse.ArgumentParser(prog="python -m lowbit.data.prepare", description=main.__doc__)
    ap.add_argument("--config", default=None)
    ap.add_argument("--force", action="store_true", help="rebuild even if the manifest matches")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    from lowbit.config import ConfigError

    t = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        d = prepare_data(cfg.data, cfg.model.vocab_size, progress=True, force=args.force)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(d))
    print(f"ready in {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
