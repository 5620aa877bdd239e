"""Token shards: flat binary files of token ids, memory-mapped for reading, plus a JSON manifest.

A prepared dataset directory holds::

    manifest.json     what is in the directory (written last: a directory without it is incomplete)
    tokenizer.json    the tokenizer that produced the ids (or tokenizer.model for SentencePiece)
    train.bin         token ids, little-endian uint16 (vocabulary <= 65536) or uint32, no header
    val.bin           the in-domain validation tail of every training document
    heldout.bin       the out-of-domain documents (only when heldout sources are given)

Inside a ``.bin`` every document is followed by the end-of-text token. Files are written under temporary
names and renamed into place, and the manifest is replaced last, so a crash at any moment leaves either the
previous complete dataset or one without a manifest (which is rebuilt, never read). See docs/data.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.data.sources import DataError

FORMAT = "lowbit-token-shards"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "heldout")


def dtype_for(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id: uint16 halves disk and page-cache use for V <= 65536."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Streams documents' token ids into ``<directory>/<split>.bin``.

    Ids go to a temporary file chunk by chunk (a 60 M-token split never sits in a Python list);
    :meth:`commit` renames it into place and returns the split's manifest entry.
    """

    def __init__(self, directory: str | Path, split: str, dtype: np.dtype, eos_id: int) -> None:
        self.directory = Path(directory)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.eos_id = int(eos_id)
        self.path = self.directory / f"{split}.bin"
        self.tmp = self.directory / f".{split}.bin.tmp-{os.getpid()}"
        self._f = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/abort
        self.n_tokens = self.n_bytes = self.n_docs = 0

    def add(self, docs_ids: Sequence[Sequence[int]], n_bytes: int) -> None:
        """Append documents (each followed by EOS). ``n_bytes``: UTF-8 bytes of the text they came from."""
        if not docs_ids:
            return
        count = sum(len(ids) for ids in docs_ids) + len(docs_ids)
        flat = chain.from_iterable(chain(ids, (self.eos_id,)) for ids in docs_ids)
        arr = np.fromiter(flat, dtype=np.int64, count=count)
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
            raise DataError(f"token id out of range for {self.dtype}: the tokenizer and the dtype disagree")
        self._f.write(arr.astype(self.dtype).tobytes())
        self.n_tokens += count
        self.n_bytes += int(n_bytes)
        self.n_docs += len(docs_ids)

    def commit(self, sources: list[str]) -> dict[str, Any]:
        """Flush, rename into place, return the manifest entry of this split."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "n_tokens": self.n_tokens, "n_bytes": self.n_bytes,
                "n_docs": self.n_docs, "sources": sources}

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Atomically (temporary file + rename) write ``manifest.json``."""
    path = Path(directory) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dataset directory; :class:`DataError` if missing or of another format."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{directory} is not a prepared dataset (no {MANIFEST}); run `lowbit data` first")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path}: unreadable manifest ({e}); delete the directory and prepare it again") \
            from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise DataError(f"{path}: format {m.get('format')!r} version {m.get('version')!r}, expected "
                        f"{FORMAT!r} version {VERSION}; prepare the dataset again with this lowbit")
    return m


def open_split(directory: str | Path, split: str) -> TokenShard | None:
    """The split, or None when the prepared dataset has none of that name (e.g. no held-out sources). A
    missing dataset, an unreadable manifest or a truncated shard file is still a :class:`DataError`: an
    evaluation must not silently drop a split because its file is broken."""
    if split not in read_manifest(directory)["splits"]:
        return None
    return TokenShard(directory, split)


class TokenShard:
    """One split of a prepared dataset, read through a read-only memory map (no copy, shared page cache).

    ``n_bytes / n_tokens`` is the split's UTF-8 bytes per token, which turns a mean loss in nats into bits
    per byte: ``bpb = loss / ln(2) / bytes_per_token``. (EOS tokens count in ``n_tokens`` but cover no byte.)
    """

    def __init__(self, directory: str | Path, split: str) -> None:
        self.directory = Path(directory)
        self.split = split
        self.manifest = read_manifest(self.directory)
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"{self.directory}: no {split!r} split (it has: {', '.join(splits)})")
        info = splits[split]
        self.n_tokens: int = int(info["n_tokens"])
        self.n_bytes: int = int(info["n_bytes"])
        self.n_docs: int = int(info["n_docs"])
        self.dtype = np.dtype(self.manifest["dtype"])
        path = self.directory / info["file"]
        expected = self.n_tokens * self.dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            size = path.stat().st_size if path.is_file() else "missing"
            raise DataError(f"{path}: size {size}, manifest says {expected} bytes; prepare the dataset again")
        self.tokens: np.ndarray = (np.memmap(path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
                                   if self.n_tokens else np.empty(0, dtype=self.dtype))

    @property
    def eos_id(self) -> int:
        return int(self.manifest["tokenizer"]["eos_id"])

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (the model's must be at least this)."""
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(1, self.n_tokens)

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return (f"TokenShard({str(self.directory)!r}, {self.split!r}, n_tokens={self.n_tokens}, "
                f"n_bytes={self.n_bytes})")
