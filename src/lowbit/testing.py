"""Helpers for lowbit's own tests and for tests of code built on lowbit: small, fast configurations.

Kept in the package (like ``torch.testing``) so that any test module can import them, whatever directory it
lives in; nothing here runs at import.
"""

from __future__ import annotations

from pathlib import Path


def tiny_run_config(out_dir: Path, corpus: Path, data_dir: Path, **over):
    """A RunConfig of a 2-layer, d=32 model on ``corpus`` that trains a step in milliseconds: 6 steps of 2 × 32
    tokens, evaluation and checkpoints every 3, a JSONL point every step. ``over`` = dotted overrides."""
    import json

    from lowbit.config import load_config

    base = {
        "model.size": "tiny", "model.vocab_size": 320, "model.dim": 32, "model.n_layers": 2,
        "model.n_heads": 2, "model.ffn_dim": 64, "model.max_seq_len": 32,
        "data.source": [str(corpus)], "data.heldout": [], "data.dir": str(data_dir),
        "train.steps": 6, "train.batch_size": 2, "train.seq_len": 32, "train.lr": 3e-3, "train.warmup": 2,
        "train.eval_every": 3, "train.eval_batches": 2, "train.ckpt_every": 3, "train.log_every": 1,
        "train.progress": False, "train.tensorboard": False, "train.out_dir": str(out_dir),
    } | over
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in base.items()])
