"""Batches: shapes, targets, deterministic order, exact resume, rank slicing, evaluation windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.data import BatchLoader, DataError, TokenShard, eval_batches


@pytest.fixture(scope="module")
def train(tiny_dataset: Path) -> TokenShard:
    return TokenShard(tiny_dataset, "train")


def take(loader: BatchLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2)
                                    for (x1, y1), (x2, y2) in zip(a, b, strict=True))


def test_shapes_and_targets(train: TokenShard) -> None:
    loader = BatchLoader(train, batch_size=4, seq_len=16, seed=0)
    x, y = next(loader)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x[:, 1:], y[:, :-1])
    for i, w in enumerate(loader.permutation(0)[:4]):  # row i is window perm[i]: tokens[16w : 16w + 17]
        window = train.tokens[16 * w : 16 * w + 17].astype(np.int64).tolist()
        assert x[i].tolist() == window[:-1] and y[i].tolist() == window[1:]


def test_an_epoch_covers_every_window_once(train: TokenShard) -> None:
    loader = BatchLoader(train, batch_size=8, seq_len=64, seed=3)
    n = loader.batches_per_epoch
    assert n == loader.n_windows // 8 and loader.n_windows == (train.n_tokens - 1) // 64
    firsts = [int(x[i, 0]) for x, _ in take(loader, n) for i in range(8)]
    assert loader.epoch == 0
    perm = loader.permutation(0)[: n * 8]
    assert firsts == [int(train.tokens[w * 64]) for w in perm]
    assert len(set(perm.tolist())) == n * 8
    next(loader)
    assert loader.epoch == 1 and loader.position == 8


def test_same_seed_same_batches_other_seed_other_batches(train: TokenShard) -> None:
    a = take(BatchLoader(train, 4, 32, seed=1), 5)
    b = take(BatchLoader(train, 4, 32, seed=1), 5)
    c = take(BatchLoader(train, 4, 32, seed=2), 5)
    assert same(a, b) and not same(a, c)
    # (seed, epoch) are mixed, not added: seed 0's second epoch is not seed 1's first
    l0, l1 = BatchLoader(train, 4, 32, seed=0), BatchLoader(train, 4, 32, seed=1)
    assert not np.array_equal(l0.permutation(1), l1.permutation(0))


@pytest.mark.parametrize("stop", ["mid_epoch", "epoch_end", "next_epoch"])
def test_exact_resume(train: TokenShard, stop: str) -> None:
    ref = BatchLoader(train, 8, 64, seed=7)
    per_epoch = ref.batches_per_epoch
    k = {"mid_epoch": per_epoch // 2, "epoch_end": per_epoch, "next_epoch": per_epoch + 3}[stop]
    total = 2 * per_epoch + 5
    expected = take(ref, total)

    first = BatchLoader(train, 8, 64, seed=7)
    got = take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert all(isinstance(v, int) for v in state.values())
    resumed = BatchLoader(train, 8, 64, seed=7)
    resumed.load_state_dict(state)
    got += take(resumed, total - k)
    assert same(got, expected)


def test_resume_refuses_other_stream(train: TokenShard) -> None:
    state = BatchLoader(train, 8, 64, seed=7).state_dict()
    with pytest.raises(DataError, match="seed"):
        BatchLoader(train, 8, 64, seed=8).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len"):
        BatchLoader(train, 8, 32, seed=7).load_state_dict(state)
    BatchLoader(train, 4, 64, seed=7).load_state_dict(state)  # another batch size is allowed


def test_ranks_split_each_global_batch(train: TokenShard) -> None:
    whole = take(BatchLoader(train, 8, 32, seed=0), 3)
    r0 = take(BatchLoader(train, 4, 32, seed=0, rank=0, world_size=2), 3)
    r1 = take(BatchLoader(train, 4, 32, seed=0, rank=1, world_size=2), 3)
    for (x, _), (x0, _), (x1, _) in zip(whole, r0, r1, strict=True):
        assert torch.equal(x, torch.cat([x0, x1]))


def test_too_small_and_bad_arguments(train: TokenShard) -> None:
    with pytest.raises(DataError, match="fewer than one batch"):
        BatchLoader(train, batch_size=10_000, seq_len=64, seed=0)
    with pytest.raises(DataError, match="seed"):
        BatchLoader(train, 4, 64, seed=-1)
    with pytest.raises(DataError, match="rank"):
        BatchLoader(train, 4, 64, seed=0, rank=2, world_size=2)
    with pytest.raises(DataError, match="fewer than one window"):
        next(eval_batches(train, 4, train.n_tokens))


def test_eval_batches_fixed_and_evenly_spaced(tiny_dataset: Path) -> None:
    val = TokenShard(tiny_dataset, "val")
    seq = 16
    n_windows = (val.n_tokens - 1) // seq
    a = list(eval_batches(val, 4, seq, n_batches=3))
    b = list(eval_batches(val, 4, seq, n_batches=3))
    assert len(a) == 3 and same(a, b)
    starts = [w * seq for w in (np.arange(12) * n_windows // 12)]
    xs = torch.cat([x for x, _ in a])
    assert xs.tolist() == [val.tokens[s : s + seq].tolist() for s in starts]
    assert starts[-1] >= (n_windows - n_windows // 12 - 1) * seq  # reaches the end of the split
    # asking for more than the split holds gives every window once, in order; the last batch may be short
    full = list(eval_batches(val, 5, seq, n_batches=10_000))
    assert sum(len(x) for x, _ in full) == n_windows and len(full[-1][0]) == (n_windows % 5 or 5)
    assert same(full, list(eval_batches(val, 5, seq)))
    for x, y in full:
        assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.needs_cuda
def test_cuda_batches(train: TokenShard) -> None:
    x, y = next(BatchLoader(train, 2, 16, seed=0, device="cuda"))
    assert x.is_cuda and y.is_cuda
    cpu = next(BatchLoader(train, 2, 16, seed=0))
    assert torch.equal(x.cpu(), cpu[0])
