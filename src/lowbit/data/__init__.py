"""The data path: text → tokenizer → token shards → batches.

``import lowbit.data`` is cheap: the names below are imported on first use (PEP 562), so neither torch,
tokenizers nor pyarrow load until something needs them.

Typical use (this is what the trainer does)::

    from lowbit.data import BatchLoader, TokenShard, eval_batches, prepare_data

    d = prepare_data(cfg.data, cfg.model.vocab_size)          # build or reuse cfg.data.dir
    train = BatchLoader(TokenShard(d, "train"), batch_size, seq_len, seed=cfg.data.seed, device=device)
    x, y = next(train)                                         # int64 (B, T) each
    for x, y in eval_batches(TokenShard(d, "val"), batch_size, seq_len, n_batches=20): ...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DataError": "lowbit.data.sources",
    "iter_documents": "lowbit.data.sources",
    "fetch_default_corpus": "lowbit.data.sources",
    "cache_dir": "lowbit.data.sources",
    "Tokenizer": "lowbit.data.tokenizer",
    "EOS_TOKEN": "lowbit.data.tokenizer",
    "TokenShard": "lowbit.data.shards",
    "read_manifest": "lowbit.data.shards",
    "open_split": "lowbit.data.shards",
    "prepare_data": "lowbit.data.prepare",
    "load_tokenizer": "lowbit.data.prepare",
    "BatchLoader": "lowbit.data.loader",
    "eval_batches": "lowbit.data.loader",
    "write_synthetic_corpus": "lowbit.data.synthetic",
}

__all__ = [
    "EOS_TOKEN", "BatchLoader", "DataError", "TokenShard", "Tokenizer", "cache_dir", "eval_batches",
    "fetch_default_corpus", "iter_documents", "load_tokenizer", "open_split", "prepare_data", "read_manifest",
    "write_synthetic_corpus",
]

if TYPE_CHECKING:
    from lowbit.data.loader import BatchLoader, eval_batches
    from lowbit.data.prepare import load_tokenizer, prepare_data
    from lowbit.data.shards import TokenShard, open_split, read_manifest
    from lowbit.data.sources import DataError, cache_dir, fetch_default_corpus, iter_documents
    from lowbit.data.synthetic import write_synthetic_corpus
    from lowbit.data.tokenizer import EOS_TOKEN, Tokenizer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lowbit.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
