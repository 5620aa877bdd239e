"""Shared fixtures and markers.

* ``tiny_corpus``: a directory of generated English-like ``.txt`` documents (no network, same bytes on every
  machine); ``tiny_heldout``: a smaller one of other documents; ``tiny_dataset``: the two prepared into a
  dataset directory with a byte-level BPE of ``TINY_VOCAB`` tokens. All three are built once per session and
  shared: treat them as read-only (copy before modifying).
* ``needs_cuda`` tests are skipped when no CUDA GPU is present; ``network`` tests skip themselves when the
  package registry cannot be reached.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lowbit.testing import tiny_run_config

TINY_VOCAB = 512
"""Vocabulary of ``tiny_dataset``'s tokenizer (the generated corpus supports BPE vocabularies up to 878)."""


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 generated documents of ~40 kB (~160 kB, ~45k tokens at a 512 BPE), ``doc_000.txt`` ... Read-only."""
    from lowbit.data.synthetic import write_synthetic_corpus

    return write_synthetic_corpus(tmp_path_factory.mktemp("tiny_corpus"), n_files=4, chars_per_file=40_000,
                                  seed=0)


@pytest.fixture(scope="session")
def tiny_heldout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 generated document of ~20 kB, disjoint from ``tiny_corpus`` (another seed). Read-only."""
    from lowbit.data.synthetic import write_synthetic_corpus

    return write_synthetic_corpus(tmp_path_factory.mktemp("tiny_heldout"), n_files=1, chars_per_file=20_000,
                                  seed=1)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path, tiny_heldout: Path) -> Path:
    """Prepared dataset directory of the tiny corpus: train / val / heldout shards and a ``tokenizer.json`` of
    ``TINY_VOCAB`` tokens. Read-only."""
    from lowbit.config import DataConfig
    from lowbit.data import prepare_data

    cfg = DataConfig(source=[str(tiny_corpus)], heldout=[str(tiny_heldout)],
                     dir=str(tmp_path_factory.mktemp("tiny_dataset")))
    return prepare_data(cfg, TINY_VOCAB, progress=False)


@pytest.fixture
def run_config():
    """:func:`tiny_run_config`, for tests that build runs."""
    return tiny_run_config


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs_cuda = [item for item in items if "needs_cuda" in item.keywords]
    if not needs_cuda:
        return
    import torch  # only when such a test was collected: keeps `pytest tests/data` light

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in needs_cuda:
        item.add_marker(skip)
