"""Training-memory breakdown, measured rather than estimated.

Components: weights (parameters and persistent buffers, e.g. low-bit codes and scales), gradients, optimizer
state, and the activation peak of one forward/backward. Direct quantized training (DQT) counts the same way:
its packed codes, scales and format words are buffers (weights), the gradients its layers stash until the
optimizer step are gradients, and the DQT moments are entries of the optimizer's ``state`` (optimizer).

* On CUDA the activation peak is ``torch.cuda.max_memory_allocated`` during a training step minus what was
  allocated before it (weights, gradients, optimizer state).
* On CPU there is no allocator counter, so activations are measured by tensor accounting: every tensor
  autograd saves for backward during one forward is recorded through ``saved_tensors_hooks`` and its storage
  counted once. This is the memory that must live until backward, i.e. the activation peak of training.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
        return id(t), _bytes(t)


def weight_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for _, b in model.named_buffers() if b is not None]:
        k = _storage_key(t)
        if k not in seen:
            seen.add(k)
            total += k[1]
    # non-persistent derived buffers (RoPE tables) are counted too: they occupy memory all the same
    return total


def grad_bytes(model: nn.Module) -> int:
    """Parameter gradients plus the weight gradients that direct-quantized (DQT) layers stash until the
    optimizer step (``weight_grad``; none exist with dqt.update_in_backward)."""
    total = sum(_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    for m in model.modules():
        g = getattr(m, "weight_grad", None) if getattr(m, "direct", False) else None
        if isinstance(g, torch.Tensor):
            total += _bytes(g)
    return total


def param_count(model: nn.Module) -> int:
    """Trainable numbers: parameters plus the weights DQT layers hold as codes (buffers, not parameters)."""
    direct = [m for m in model.modules() if getattr(m, "direct", False)]
    codes = {id(m.weight_codes) for m in direct}  # FSDP2 makes them frozen Parameters: counted as weight_numel
    n = sum(p.numel() for p in model.parameters() if id(p) not in codes)
    return n + sum(m.weight_numel for m in direct)


def optimizer_bytes(opt: torch.optim.Optimizer | None) -> int:
    if opt is None:
        return 0
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += _bytes(v)
    return total


@contextlib.contextmanager
def count_saved_activations(model: nn.Module):
    """Context manager yielding a dict whose "bytes" is the storage saved for backward inside it, each
    storage once, the model's own parameters and buffers excluded (they are counted as weights)."""
    out = {"bytes": 0}
    seen: set[tuple[int, int]] = set()
    own = {_storage_key(t)[0] for t in list(model.parameters()) + list(model.buffers())}

    def pack(t: torch.Tensor):
        k = _storage_key(t)
        if k not in seen and k[0] not in own:
            seen.add(k)
            out["bytes"] += k[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


@dataclass
class MemoryReport:
    n_params: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    method: str

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    def per_param(self) -> dict[str, float]:
        n = max(1, self.n_params)
        return {k: getattr(self, k) / n for k in ("weights", "grads", "optimizer", "activations")} | {
            "total": self.total / n}

    def to_dict(self) -> dict:
        return {"n_params": self.n_params, "weights": self.weights, "grads": self.grads,
                "optimizer": self.optimizer, "activations": self.activations, "total": self.total,
                "method": self.method, "bytes_per_param": self.per_param()}

    def format(self) -> str:
        pp = self.per_param()
        rows = [f"memory ({self.method}), bytes per parameter over {self.n_params:,} parameters:"]
        for k in ("weights", "grads", "optimizer", "activations", "total"):
            b = getattr(self, k) if k != "total" else self.total
            rows.append(f"  {k:<12} {pp[k]:8.2f} B/param  {b / 2**20:10.1f} MiB")
        return "\n".join(rows)
