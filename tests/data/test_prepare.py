"""prepare_data end to end on the generated corpus: shard contents, manifest, splits, reuse, rebuild."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from lowbit.config import DataConfig
from lowbit.data import DataError, Tokenizer, TokenShard, load_tokenizer, prepare_data, read_manifest
from lowbit.data.prepare import config_fingerprint, main, split_tail
from lowbit.data.shards import ShardWriter, dtype_for
from lowbit.data.sources import iter_documents

TINY_VOCAB = 512  # as in tests/conftest.py


def cfg_for(tmp_path: Path, corpus: Path, **kw) -> DataConfig:
    return DataConfig(**{"source": [str(corpus)], "heldout": [], "dir": str(tmp_path / "ds"), **kw})


def test_shards_equal_direct_encoding(tiny_dataset: Path, tiny_corpus: Path, tiny_heldout: Path) -> None:
    m = read_manifest(tiny_dataset)
    tok = load_tokenizer(tiny_dataset)
    docs = list(iter_documents([str(tiny_corpus)]))
    heads, tails = zip(*(split_tail(d, m["config"]["val_fraction"]) for d in docs), strict=True)

    def stream(texts) -> list[int]:
        return [i for t in texts if t for i in [*tok.encode(t), tok.eos_id]]

    for split, texts in (("train", heads), ("val", tails),
                         ("heldout", list(iter_documents([str(tiny_heldout)])))):
        shard = TokenShard(tiny_dataset, split)
        assert shard.tokens.dtype == np.uint16
        assert shard.tokens.tolist() == stream(texts), split
        assert shard.n_tokens == len(shard.tokens)
        assert shard.n_bytes == sum(len(t.encode("utf-8")) for t in texts)
        assert shard.n_docs == sum(1 for t in texts if t)
        assert tok.decode(shard.tokens[:-1].tolist()).split("<|endoftext|>") == [t for t in texts if t]


def test_manifest_contents(tiny_dataset: Path, tiny_corpus: Path, tiny_heldout: Path) -> None:
    m = json.loads((tiny_dataset / "manifest.json").read_text())
    assert m["format"] == "lowbit-token-shards" and m["version"] == 1
    assert m["dtype"] == "uint16"
    t = m["tokenizer"]
    assert t["file"] == "tokenizer.json" and t["vocab_size"] == TINY_VOCAB and t["eos_id"] == 0
    assert t["sha256"] == Tokenizer.load(tiny_dataset / "tokenizer.json").sha256
    assert set(m["splits"]) == {"train", "val", "heldout"}
    for s in m["splits"].values():
        assert {"file", "n_tokens", "n_bytes", "n_docs", "sources"} <= set(s)
        assert (tiny_dataset / s["file"]).stat().st_size == 2 * s["n_tokens"]
    assert m["splits"]["train"]["sources"] == [str(tiny_corpus)]
    assert m["splits"]["heldout"]["sources"] == [str(tiny_heldout)]
    cfg = DataConfig(source=[str(tiny_corpus)], heldout=[str(tiny_heldout)], dir=str(tiny_dataset))
    assert m["fingerprint"] == config_fingerprint(cfg, TINY_VOCAB)[0]
    assert not [p for p in tiny_dataset.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_val_is_a_nonempty_disjoint_tail(tiny_dataset: Path, tiny_corpus: Path) -> None:
    docs = list(iter_documents([str(tiny_corpus)]))
    val = TokenShard(tiny_dataset, "val")
    train = TokenShard(tiny_dataset, "train")
    assert val.n_docs == len(docs) and val.n_tokens > 0
    assert train.n_bytes + val.n_bytes == sum(len(d.encode()) for d in docs)
    assert 0.015 < val.n_bytes / (train.n_bytes + val.n_bytes) < 0.025  # val_fraction = 0.02
    for d in docs:
        head, tail = split_tail(d, 0.02)
        assert head + tail == d and tail[:1].isspace()


@pytest.mark.parametrize("doc, frac, expect", [
    ("aaaa bbbb cccc dddd", 0.25, ("aaaa bbbb cccc", " dddd")),
    ("aaaa bbbb ccccdddd", 0.25, ("aaaa bbbb", " ccccdddd")),  # no space after the point: the one before
    ("abcdefgh", 0.25, ("abcdefgh", "")),  # no whitespace: stays whole
    ("ab cd", 0.1, ("ab cd", "")),  # tail would be < 1 character
])
def test_split_tail(doc: str, frac: float, expect: tuple[str, str]) -> None:
    assert split_tail(doc, frac) == expect


def test_reuse_does_not_rewrite(tmp_path: Path, tiny_corpus: Path) -> None:
    cfg = cfg_for(tmp_path, tiny_corpus)
    d = prepare_data(cfg, 300, progress=False)
    files = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    os.utime(d / "train.bin", ns=(1, 1))  # make any rewrite visible even within the mtime resolution
    files["train.bin"] = 1
    assert prepare_data(cfg, 300, progress=False) == d
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == files
    # the dataset's seed and directory are not part of the fingerprint
    assert prepare_data(cfg_for(tmp_path, tiny_corpus, seed=5), 300, progress=False) == d
    assert (d / "train.bin").stat().st_mtime_ns == 1


@pytest.mark.parametrize("change", [{"val_fraction": 0.05}, {"max_chars": 50_000}, {"heldout": "H"},
                                    {"vocab": 320}, {"source": "twice"}])
def test_rebuild_when_config_changes(tmp_path: Path, tiny_corpus: Path, tiny_heldout: Path, change) -> None:
    base = cfg_for(tmp_path, tiny_corpus)
    d = prepare_data(base, 300, progress=False)
    before = read_manifest(d)
    os.utime(d / "train.bin", ns=(1, 1))
    kw = dict(change)
    vocab = kw.pop("vocab", 300)
    if kw.get("heldout") == "H":
        kw["heldout"] = [str(tiny_heldout)]
    if kw.get("source") == "twice":
        kw["source"] = [str(tiny_corpus), str(tiny_corpus)]
    prepare_data(cfg_for(tmp_path, tiny_corpus, **kw), vocab, progress=False)
    after = read_manifest(d)
    assert after["fingerprint"] != before["fingerprint"]
    assert (d / "train.bin").stat().st_mtime_ns != 1
    assert ("heldout" in after["splits"]) == ("heldout" in kw)
    # and back: the first config rebuilds again, and equals the first build exactly
    prepare_data(base, 300, progress=False)
    again = read_manifest(d)
    assert again["splits"] == before["splits"] and again["tokenizer"] == before["tokenizer"]
    assert not (d / "heldout.bin").exists()


def test_rebuild_when_files_are_damaged(tmp_path: Path, tiny_corpus: Path) -> None:
    cfg = cfg_for(tmp_path, tiny_corpus)
    d = prepare_data(cfg, 300, progress=False)
    good = (d / "val.bin").read_bytes()
    (d / "val.bin").write_bytes(good[:-2])
    with pytest.raises(DataError, match="size"):
        TokenShard(d, "val")
    prepare_data(cfg, 300, progress=False)
    assert (d / "val.bin").read_bytes() == good
    assert prepare_data(cfg, 300, progress=False, force=True) == d


def test_pretrained_tokenizer(tmp_path: Path, tiny_corpus: Path, tiny_dataset: Path) -> None:
    tok_file = tiny_dataset / "tokenizer.json"
    cfg = cfg_for(tmp_path, tiny_corpus, tokenizer=str(tok_file))
    d = prepare_data(cfg, 640, progress=False)  # a model vocabulary larger than the tokenizer's is fine
    m = read_manifest(d)
    assert m["tokenizer"]["sha256"] == Tokenizer.load(tok_file).sha256 and m["tokenizer"]["vocab_size"] == 512
    assert TokenShard(d, "train").tokens.tolist() == TokenShard(tiny_dataset, "train").tokens.tolist()
    mtime = (d / "train.bin").stat().st_mtime_ns
    prepare_data(cfg, 1024, progress=False)  # the model's vocab does not change a pretrained tokenizer's ids
    assert (d / "train.bin").stat().st_mtime_ns == mtime


def test_vocab_mismatch(tmp_path: Path, tiny_corpus: Path, tiny_dataset: Path) -> None:
    cfg = cfg_for(tmp_path, tiny_corpus, tokenizer=str(tiny_dataset / "tokenizer.json"))
    with pytest.raises(DataError, match=r"has 512 tokens but model.vocab_size=500.*>= 512"):
        prepare_data(cfg, 500, progress=False)
    with pytest.raises(DataError, match=r"model.vocab_size=100 is too small .* 257"):
        prepare_data(cfg_for(tmp_path, tiny_corpus), 100, progress=False)
    assert not (tmp_path / "ds").exists()  # refused before touching anything


def test_small_corpus_warns_about_unused_vocab(tmp_path: Path, tiny_corpus: Path) -> None:
    with pytest.warns(UserWarning, match="supports only .* BPE tokens"):
        d = prepare_data(cfg_for(tmp_path, tiny_corpus), 4096, progress=False)
    assert 512 < read_manifest(d)["tokenizer"]["vocab_size"] < 4096


BAD = {  # name → (file written into the source dir, or None for a missing one; expected message)
    "missing path": (None, "", "not found"),
    "empty file only": ("e.txt", "", "empty corpus"),
    "unknown extension": ("u.xml", "<a/>", "cannot read files of type"),
    "too short for a val tail": ("s.txt", "short", "val split is empty"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(tmp_path: Path, case: str) -> None:
    name, text, match = BAD[case]
    (tmp_path / "src").mkdir()
    if name:
        (tmp_path / "src" / name).write_text(text)
    src = str(tmp_path / "src" / (name or "missing.txt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny texts also trigger the "fewer BPE tokens" warning
        with pytest.raises(DataError, match=match):
            prepare_data(DataConfig(source=[src], heldout=[], dir=str(tmp_path / "ds")), 300, progress=False)
    assert not (tmp_path / "ds" / "manifest.json").exists()
    assert not list(tmp_path.glob("ds/.*"))  # no temporary files left behind


def test_bad_heldout_fails_before_work(tmp_path: Path, tiny_corpus: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        prepare_data(cfg_for(tmp_path, tiny_corpus, heldout=[str(tmp_path / "nope")]), 300, progress=False)
    assert not (tmp_path / "ds").exists()


def test_interrupted_build_leaves_no_manifest(tmp_path: Path, tiny_corpus: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfg_for(tmp_path, tiny_corpus)
    d = prepare_data(cfg, 300, progress=False)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "commit", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg_for(tmp_path, tiny_corpus, val_fraction=0.1), 300, progress=False)
    assert not (d / "manifest.json").exists()  # never reused half-built
    with pytest.raises(DataError, match="not a prepared dataset"):
        TokenShard(d, "train")
    monkeypatch.undo()
    prepare_data(cfg, 300, progress=False)
    assert TokenShard(d, "val").n_tokens > 0


def test_token_shard_errors(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a prepared dataset"):
        TokenShard(tmp_path, "train")
    with pytest.raises(DataError, match="no 'test' split"):
        TokenShard(tiny_dataset, "test")
    bad = tmp_path / "old"
    shutil.copytree(tiny_dataset, bad)
    m = read_manifest(bad)
    m["version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="version 99"):
        TokenShard(bad, "train")


def test_uint32_for_large_vocabularies(tmp_path: Path) -> None:
    assert dtype_for(65536) == np.uint16 and dtype_for(65537) == np.uint32
    w = ShardWriter(tmp_path, "train", dtype_for(100_000), eos_id=99_999)
    w.add([[70_000, 1], [2]], n_bytes=7)
    entry = w.commit(["x"])
    assert entry == {"file": "train.bin", "n_tokens": 5, "n_bytes": 7, "n_docs": 2, "sources": ["x"]}
    assert np.fromfile(tmp_path / "train.bin", "<u4").tolist() == [70_000, 1, 99_999, 2, 99_999]
    w = ShardWriter(tmp_path, "val", dtype_for(1000), eos_id=0)
    with pytest.raises(DataError, match="out of range"):
        w.add([[70_000]], 1)
    w.abort()
    assert not list(tmp_path.glob(".val*"))


def test_module_main(tmp_path: Path, tiny_corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([f"data.source=[\"{tiny_corpus}\"]", "data.heldout=[]", f"data.dir=\"{tmp_path / 'ds'}\"",
                 "model.vocab_size=300"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "val" in out and "vocab 300" in out


def test_module_main_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([f"data.source=[\"{tmp_path / 'nope'}\"]", f"data.dir=\"{tmp_path / 'ds'}\""]) == 2
    assert "data source not found" in capsys.readouterr().err


def test_open_split_none_only_for_an_absent_split(tiny_dataset, tmp_path):
    import shutil

    import pytest

    from lowbit.data import DataError, TokenShard, open_split

    assert isinstance(open_split(tiny_dataset, "val"), TokenShard)
    assert open_split(tiny_dataset, "no-such-split") is None
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset, broken)
    f = broken / TokenShard(broken, "heldout").manifest["splits"]["heldout"]["file"]
    f.write_bytes(f.read_bytes()[:-2])  # a truncated shard is an error, never a silently skipped split
    with pytest.raises(DataError, match="size"):
        open_split(broken, "heldout")
    with pytest.raises(DataError, match="not a prepared dataset"):
        open_split(tmp_path / "nothing", "val")
