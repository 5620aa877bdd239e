"""Concatenating linear layers that read the same input (q/k/v, gate/up) into one, for inference.

:func:`concat_linears` is what :func:`lowbit.models.llama.fuse_projections` calls per group: plain
``nn.Linear`` layers of one dtype and device concatenate their weights; a layer type with a ``concat``
classmethod (:class:`lowbit.export.packed.PackedLinear`) concatenates itself; anything else (training layers
such as QuantLinear, mixed types) is not fused.
"""

from __future__ import annotations

import torch
from torch import nn


def concat_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One layer whose output is ``torch.cat([m(x) for m in layers], -1)``, or None when they cannot be
    concatenated (types differ, input sizes or formats differ)."""
    kind = type(layers[0])
    if any(type(m) is not kind for m in layers):
        return None
    if kind is nn.Linear:
        a = layers[0]
        if any(m.in_features != a.in_features or m.weight.dtype != a.weight.dtype or m.weight.device != a.weight.device
               or (m.bias is None) != (a.bias is None) for m in layers):
            return None
        n = sum(m.out_features for m in layers)
        new = nn.Linear(a.in_features, n, bias=a.bias is not None, device="meta", dtype=a.weight.dtype)
        with torch.no_grad():
            new.weight = nn.Parameter(torch.cat([m.weight for m in layers]), requires_grad=a.weight.requires_grad)
            if a.bias is not None:
                new.bias = nn.Parameter(torch.cat([m.bias for m in layers]), requires_grad=a.bias.requires_grad)
        return new.train(a.training)
    concat = getattr(kind, "concat", None)
    return concat(layers) if callable(concat) else None


__all__ = ["concat_linears"]
