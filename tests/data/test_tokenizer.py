"""The tokenizer wrapper: exact round trip, EOS handling, persistence, hashing, exact piece-wise encoding."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.data.sources import DataError, iter_documents
from lowbit.data.tokenizer import EOS_TOKEN, Tokenizer, _split_long

# any Unicode except lone surrogates, which are not text (no UTF-8 encoding exists for them)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
# text made mostly of words and single spaces, so that _split_long has many cut points to choose from
PARTS = ["the", "ab", "x1", "42", "é", "日本", "!?", " ", "  ", "\n", "\t", " \n", "'s", "\u00a0", "🙂",
         EOS_TOKEN]
WORDY = st.lists(st.sampled_from(PARTS), max_size=400).map("".join)


@pytest.fixture(scope="module")
def tok(tiny_corpus: Path) -> Tokenizer:
    return Tokenizer.train_bpe(iter_documents([str(tiny_corpus)]), 400)


def test_trained_bpe_shape(tok: Tokenizer) -> None:
    assert tok.vocab_size == 400
    assert tok.eos_id == 0 and tok.kind == "bpe"
    assert len(tok.sha256) == 64
    assert tok.encode("") == []
    assert len(tok.encode("The old king sees the castle.")) < len("The old king sees the castle.") / 2


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_round_trip_any_unicode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_eos_in_text_is_text(tok: Tokenizer) -> None:
    """A document quoting the separator must not produce the separator id."""
    s = f"a {EOS_TOKEN} b"
    ids = tok.encode(s)
    assert tok.eos_id not in ids
    assert tok.decode(ids) == s
    assert tok.decode([tok.eos_id]) == EOS_TOKEN


def test_encode_batch_matches_encode(tok: Tokenizer, tiny_corpus: Path) -> None:
    docs = list(iter_documents([str(tiny_corpus)]))
    assert tok.encode_batch(docs) == [tok.encode(d) for d in docs]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=WORDY, size=st.integers(1, 40))
def test_piecewise_encoding_is_exact(tok: Tokenizer, text: str, size: int) -> None:
    """Cutting long texts before a lone space between non-spaces never changes the ids (the speed-up of
    encode_batch relies on it)."""
    pieces = _split_long(text, size)
    assert "".join(pieces) == text
    whole = tok._encode_hf([text])[0].ids
    assert [i for p in pieces for i in tok._encode_hf([p])[0].ids] == whole


def test_save_load_same_hash_and_ids(tok: Tokenizer, tmp_path: Path) -> None:
    f = tok.save(tmp_path)
    assert f.name == "tokenizer.json"
    for src in (f, tmp_path):
        t2 = Tokenizer.load(src)
        assert t2.sha256 == tok.sha256 and t2.eos_id == 0 and t2.vocab_size == 400
        assert t2.encode("Rosa sings.") == tok.encode("Rosa sings.")


def test_training_is_deterministic(tiny_corpus: Path, tok: Tokenizer) -> None:
    again = Tokenizer.train_bpe(iter_documents([str(tiny_corpus)]), 400)
    assert again.sha256 == tok.sha256


def test_small_corpus_gives_smaller_vocab() -> None:
    t = Tokenizer.train_bpe(["abab abab"], 1000)
    assert 257 < t.vocab_size < 1000


def test_vocab_below_bytes_refused() -> None:
    with pytest.raises(DataError, match="vocab_size >= 257"):
        Tokenizer.train_bpe(["x"], 100)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        Tokenizer.load(tmp_path / "nope.json")
    with pytest.raises(DataError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="not a valid"):
        Tokenizer.load(tmp_path / "bad.json")
    (tmp_path / "t.vocab").write_text("x")
    with pytest.raises(DataError, match="unknown tokenizer file type"):
        Tokenizer.load(tmp_path / "t.vocab")


def test_tokenizer_json_without_eos(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    hf = HF(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel()
    hf.save(str(tmp_path / "t.json"))
    with pytest.raises(DataError, match="end-of-text"):
        Tokenizer.load(tmp_path / "t.json")


def test_sentencepiece(tmp_path: Path, tiny_corpus: Path) -> None:
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(input=str(tiny_corpus / "doc_000.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=300, model_type="bpe", minloglevel=2)
    t = Tokenizer.load(tmp_path / "sp.model")
    assert t.kind == "sentencepiece" and t.vocab_size == 300 and t.eos_id == 2
    s = "The old king sees the castle."
    assert t.decode(t.encode(s)) == s
    assert t.encode_batch([s, s]) == [t.encode(s)] * 2
    f = t.save(tmp_path / "out")
    assert f.name == "tokenizer.model" and Tokenizer.load(tmp_path / "out").sha256 == t.sha256


def test_sentencepiece_missing_is_actionable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    (tmp_path / "m.model").write_bytes(b"x")
    with pytest.raises(DataError, match="pip install 'lowbit\\[sentencepiece\\]'"):
        Tokenizer.load(tmp_path / "m.model")
