"""Token shard → batches of (x, y) for next-token prediction.

A split of N tokens is cut into W = (N - 1) // T windows of T + 1 tokens starting at multiples of T
(window i = tokens[i·T : i·T + T + 1]). Inputs x = window[:-1] and targets y = window[1:], so the x of
different windows never overlap and every token is a target exactly once per epoch (only the last token of
one window's y is the first of the next window's x). Windows ignore document boundaries: the EOS tokens
between documents tell the model where one ends, as in GPT-2.

Training order: each epoch is a permutation of the windows drawn from ``PCG64(SeedSequence([seed, epoch]))``,
a pure function of (seed, epoch), so the loader's whole state is two integers (epoch, position) and a restored
loader continues with exactly the batches the uninterrupted one would have produced. The windows left over
when W is not a multiple of the batch are skipped for that epoch (a different few each epoch).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from lowbit.data.shards import TokenShard
from lowbit.data.sources import DataError


def _n_windows(shard: TokenShard, seq_len: int) -> int:
    if seq_len <= 0:
        raise DataError(f"seq_len must be > 0, got {seq_len}")
    return max(0, (shard.n_tokens - 1) // seq_len)


def _gather(tokens: np.ndarray, idx: np.ndarray, seq_len: int,
            device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows ``idx`` of ``tokens`` → int64 (x, y) of shape (len(idx), seq_len), on ``device``."""
    offsets = idx.astype(np.int64)[:, None] * seq_len + np.arange(seq_len + 1)  # (B, T+1)
    w = torch.from_numpy(np.asarray(tokens[offsets]).astype(np.int64))
    x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()  # contiguous: callers may .view(-1) the targets
    if device is not None and device.type == "cuda":
        # pinned host memory lets the copy run asynchronously with the compute already queued on the GPU
        x = x.pin_memory().to(device, non_blocking=True)
        y = y.pin_memory().to(device, non_blocking=True)
    elif device is not None and device.type != "cpu":
        x, y = x.to(device), y.to(device)
    return x, y


class BatchLoader:
    """Infinite, seeded, resumable iterator of training batches ``(x, y)``, each int64 of shape (B, T).

    With ``world_size`` > 1 every rank builds the same loader with its own ``rank``: a step consumes
    ``batch_size · world_size`` windows of the shared permutation and rank r takes the r-th slice, so the
    ranks see disjoint data and the state (counted in windows) is the same on all of them.
    """

    def __init__(self, shard: TokenShard, batch_size: int, seq_len: int, seed: int,
                 device: torch.device | str | None = None, rank: int = 0, world_size: int = 1) -> None:
        if batch_size <= 0:
            raise DataError(f"batch_size must be > 0, got {batch_size}")
        if seed < 0:
            raise DataError(f"the data seed must be >= 0, got {seed}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.shard = shard
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.device = torch.device(device) if device is not None else None
        self.rank = rank
        self.world_size = world_size
        self.n_windows = _n_windows(shard, seq_len)
        self._per_step = batch_size * world_size
        if self.n_windows < self._per_step:
            raise DataError(f"the {shard.split!r} split has {shard.n_tokens:,} tokens: {self.n_windows} "
                            f"windows of {seq_len}+1 tokens, fewer than one batch ({self._per_step}); use "
                            f"more text or a smaller batch_size / seq_len")
        self.epoch = 0
        self.position = 0  # windows of the current epoch's permutation already consumed (by all ranks)
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    @property
    def batches_per_epoch(self) -> int:
        return self.n_windows // self._per_step

    def permutation(self, epoch: int) -> np.ndarray:
        """Window order of ``epoch``: a pure function of (seed, epoch). SeedSequence mixes both, so that
        (seed=0, epoch=1) and (seed=1, epoch=0) give unrelated orders."""
        if self._perm_epoch != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._perm, self._perm_epoch = rng.permutation(self.n_windows), epoch
        assert self._perm is not None
        return self._perm

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self._per_step > self.n_windows:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position + self.rank * self.batch_size
        idx = self.permutation(self.epoch)[start : start + self.batch_size]
        self.position += self._per_step
        return _gather(self.shard.tokens, idx, self.seq_len, self.device)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable position in the data stream (plus what must match to resume from it)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "n_windows": self.n_windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`. The batch size or world size may change between runs (the
        position counts windows); the seed, seq_len and data may not."""
        for key in ("seed", "seq_len", "n_windows"):
            if key in state and int(state[key]) != getattr(self, key):
                raise DataError(f"cannot resume the data stream: saved {key}={state[key]}, now "
                                f"{getattr(self, key)} (a different seed, sequence length or dataset)")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.n_windows:
            raise DataError(f"invalid data loader state {state}")
        self.epoch, self.position = epoch, position


def eval_batches(shard: TokenShard, batch_size: int, seq_len: int, n_batches: int | None = None,
                 device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed sequence of evaluation batches: ``n_batches · batch_size`` windows spread evenly over the split
    (window k·W // n for k < n), the same on every call and for every model; ``n_batches=None`` (or more than
    the split holds) takes every window in order. The last batch may be smaller.

    These windows are a sample of the split, so the bytes they cover are estimated with the split's ratio:
    ``bits_per_byte = mean_loss_nats / ln 2 / shard.bytes_per_token`` (exact when all windows are taken, up
    to the final W·T + 1 ... N tail).
    """
    n_avail = _n_windows(shard, seq_len)
    if n_avail == 0:
        raise DataError(f"the {shard.split!r} split has {shard.n_tokens} tokens, fewer than one window of "
                        f"{seq_len}+1; lower seq_len or give more text")
    if batch_size <= 0:
        raise DataError(f"batch_size must be > 0, got {batch_size}")
    total = n_avail if n_batches is None else min(n_avail, n_batches * batch_size)
    idx = np.arange(total, dtype=np.int64) * n_avail // total  # evenly spaced, strictly increasing
    dev = torch.device(device) if device is not None else None
    for b in range(0, total, batch_size):
        yield _gather(shard.tokens, idx[b : b + batch_size], seq_len, dev)
