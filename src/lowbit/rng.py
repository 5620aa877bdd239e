"""Counter-based random numbers: a uniform in [0, 1) that is a pure function of (seed, step, stream, index).

Stochastic rounding in direct quantized training (DQT, METHODS.md §3) needs one uniform per weight element
per step. Drawing them from a stateful generator (``torch.rand``) ties the result to the device (CPU
Mersenne Twister vs CUDA Philox), to the order in which tensors are updated, and to how a tensor is split
across ranks. Here each uniform is instead a hash of its coordinates, so the torch path below, a fused
Triton kernel, a resumed run and a sharded run (which passes the global element indices of its shard)
all produce the same bits.

The function (version 1), all arithmetic on unsigned 32-bit integers (wrapping multiply):

    H(v)   = PCG hash (pcg_hash of Jarzynski & Olano, "Hash Functions for GPU Rendering", JCGT 2020):
             s = v·747796405 + 2891336453;  w = ((s >> ((s >> 28) + 4)) ^ s)·277803737;  H = (w >> 22) ^ w
    key    = H(H(H(H(H(seed_lo) ^ seed_hi) ^ step_lo) ^ step_hi) ^ stream)      (scalar, on the host)
    key2   = H(key ^ 0x9E3779B9)
    x      = H(H(index_lo ^ key) ^ index_hi ^ key2)                              (per element)
    u      = (x >> 8) · 2^-24                                                   (float32, exact, in [0, 1))

``seed``, ``step`` and ``index`` are split into 32-bit halves (lo, hi), so all three may be 64-bit. ``stream``
names the tensor (DQT uses a CRC-32 of the parameter's qualified name; any 32-bit integer works). Two rounds
of H per element keep neighbouring indices and neighbouring steps decorrelated; 24 bits are kept because a
float32 holds exactly that many, so ``u < 1`` always and every value is exact.

Torch has no unsigned 32-bit integers with wrapping arithmetic, so the torch path works in int64 and masks to
32 bits after each multiply: both multipliers are below 2^29, so no int64 product can overflow and the result
equals the wrapping uint32 computation bit for bit (what a Triton kernel computes natively). On CPU the
elements are processed in cache-sized chunks; nothing here allocates at import.
"""

from __future__ import annotations

import zlib

import torch

RNG_VERSION = 1
"""Version of the function above. Bump it (and keep the old one) if the function ever changes: checkpoints
of runs with stochastic rounding depend on it for an exact resume."""

_MASK = 0xFFFFFFFF
_MUL1, _INC, _MUL2 = 747796405, 2891336453, 277803737
_GOLDEN = 0x9E3779B9
_CPU_CHUNK = 1 << 16  # elements per chunk on CPU: the int64 temporaries stay in cache


def _h_int(v: int) -> int:
    """PCG hash on a Python int (exact)."""
    s = (v * _MUL1 + _INC) & _MASK
    w = (((s >> ((s >> 28) + 4)) ^ s) * _MUL2) & _MASK
    return (w >> 22) ^ w


def _h_(x: torch.Tensor) -> torch.Tensor:
    """PCG hash, in place, on an int64 tensor holding uint32 values (products < 2^62: no overflow)."""
    x.mul_(_MUL1).add_(_INC).bitwise_and_(_MASK)
    t = (x >> 28).add_(4)
    x.bitwise_xor_(torch.bitwise_right_shift(x, t))
    x.mul_(_MUL2).bitwise_and_(_MASK)
    torch.bitwise_right_shift(x, 22, out=t)
    return x.bitwise_xor_(t)


def stream_id(name: str) -> int:
    """A stable 32-bit stream number for a tensor name (CRC-32 of its UTF-8 bytes): the same on every rank
    and in every process, independent of the order the tensors are visited in."""
    return zlib.crc32(name.encode())


def counter_key(seed: int, step: int, stream: int) -> tuple[int, int]:
    """The two 32-bit keys of (seed, step, stream) (see the module docstring)."""
    if seed < 0 or step < 0 or stream < 0:
        raise ValueError(f"seed, step and stream must be >= 0, got {seed}, {step}, {stream}")
    k = _h_int(seed & _MASK)
    k = _h_int(k ^ ((seed >> 32) & _MASK))
    k = _h_int(k ^ (step & _MASK))
    k = _h_int(k ^ ((step >> 32) & _MASK))
    k = _h_int(k ^ (stream & _MASK))
    return k, _h_int(k ^ _GOLDEN)


def counter_bits(seed: int, step: int, stream: int, index: torch.Tensor) -> torch.Tensor:
    """The 32-bit hash of every element of ``index`` (int64, ≥ 0), as int64 values in [0, 2^32)."""
    k1, k2 = counter_key(seed, step, stream)
    idx = index.to(torch.int64)
    flat = idx.reshape(-1)
    out = torch.empty_like(flat)
    chunk = _CPU_CHUNK if flat.device.type == "cpu" else max(1, flat.numel())
    for s in range(0, flat.numel(), chunk):
        i = flat[s:s + chunk]
        x = _h_(i & _MASK ^ k1)
        x.bitwise_xor_(i >> 32).bitwise_xor_(k2)
        out[s:s + chunk] = _h_(x)
    return out.reshape(idx.shape)


def counter_uniform(
    seed: int,
    step: int,
    stream: int,
    shape: tuple[int, ...] | torch.Size | None = None,
    *,
    index: torch.Tensor | None = None,
    offset: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniforms in [0, 1) (float32, multiples of 2^-24), a pure function of (seed, step, stream, index).

    Either ``shape`` (elements numbered ``offset, offset+1, …`` in row-major order, reshaped to ``shape``)
    or ``index`` (explicit global element numbers, any shape — e.g. a shard's slice of the full tensor's
    ``arange``). The same coordinates give the same value on any device and in any process."""
    if index is None:
        if shape is None:
            raise ValueError("give shape or index")
        n = 1
        for s in shape:
            n *= int(s)
        index = torch.arange(offset, offset + n, dtype=torch.int64, device=device).reshape(tuple(shape))
    elif offset:
        index = index + offset
    bits = counter_bits(seed, step, stream, index)
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))
