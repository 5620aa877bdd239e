"""Loss, perplexity and bits per byte on a token split.

Bits per byte makes models with different tokenizers comparable: the summed negative log-likelihood in bits
divided by the UTF-8 bytes of the text it covers. The evaluation windows are a fixed, evenly spaced sample of
the split, so the bytes they cover are estimated with the split's own bytes-per-token ratio:
``bpb = mean_loss_nats · (n_tokens / n_bytes) / ln 2``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


def evaluate(model: nn.Module, shard, batch_size: int, seq_len: int, n_batches: int, device: torch.device,
             amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Mean next-token loss (nats), perplexity and bits/byte of ``model`` on ``shard`` (a TokenShard)."""
    from lowbit.data import eval_batches

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with torch.no_grad(), amp:
        for x, y in eval_batches(shard, batch_size, seq_len, n_batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = model(x, y)
            total += float(loss) * y.numel()
            count += y.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluation split is too short for a single window; lower train.seq_len")
    loss = total / count
    bytes_per_token = shard.n_bytes / max(1, shard.n_tokens)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": loss / bytes_per_token / math.log(2),
            "tokens": count}
