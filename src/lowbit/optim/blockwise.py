"""8-bit blockwise optimizer states (lowbit's own format; the idea is bitsandbytes' 8-bit Adam, the map is not).

A state tensor is flattened, padded with zeros to a multiple of ``BLOCK`` = 256 and cut into blocks; each
block keeps one float32 absmax ``a`` and 256 one-byte codes. The map is a *square-root companded linear* map
(a power-law "dynamic" map: more resolution near zero, where most moment values are):

* signed states (the first moment m, SGD momentum), ``int8`` codes q ∈ [−127, 127]:

      r = x / a ∈ [−1, 1],   q = round(127 · sign(r) · √|r|),   x̂ = a · q·|q| / 127²

  smallest non-zero magnitude a/16129; relative error ≤ about 1/127 near the top of a block.

* the second moment v ≥ 0 is stored as s = √v (halving its dynamic range), ``uint8`` codes q ∈ [0, 255]
  with **zero excluded** from the map:

      r = s / a ∈ [0, 1],    q = clamp(round(256 · √r) − 1, 0, 255),   ŝ = a · ((q + 1) / 256)²,   v̂ = ŝ²

  A zero v would turn Adam's m/(√v + ε) into m/ε, one huge step; here the smallest ŝ is a/65536, and
  anything below it decodes to it (a *smaller* step, the safe side) — the "zero-point" problem of 8-bit
  second moments (Li et al., "Memory efficient optimizers with 4-bit states", 2023).

Rounding: nearest by default; given ``noise`` (uniforms in [0, 1), one per value), stochastic in the code
domain, q = ⌊c + u⌋ for the real-valued code c. The optimizer re-encodes its moments every step and passes
counter-based noise: with nearest rounding a slowly changing moment never moves (a code q with
round(q·√β) = q is stuck — m stops decaying below |q| ≈ 10, v relative to its block's absmax never decays at
β₂ = 0.999), stochastic rounding lets it drift down at the right rate on average. Cost: 1 byte + 4/256 bytes
per value, i.e. 2.03 bytes per parameter for Adam's two moments, vs 8 in float32.
"""

from __future__ import annotations

import torch

BLOCK = 256
"""Values per absmax block."""
_TINY = 1e-30


def _blocks(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(-1, BLOCK)  # (n_blocks, BLOCK)


def _round(c: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """Nearest, or stochastic ⌊c + u⌋ with ``noise`` u (flat, at least one value per padded code)."""
    if noise is None:
        return torch.round(c)
    return torch.floor(c + noise.reshape(-1)[: c.numel()].reshape(c.shape).to(c.device))


def encode_signed(x: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape) → (int8 codes, flat and padded to whole blocks; float32 absmax per block)."""
    b = _blocks(x)
    a = b.abs().amax(1, keepdim=True).clamp_min(_TINY)
    r = b / a
    q = _round(127.0 * r.sign() * r.abs().sqrt(), noise)
    return q.to(torch.int8).reshape(-1), a.reshape(-1)


def decode_signed(q: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`encode_signed` (up to the map's rounding): float32 of ``shape``."""
    qf = q.float().reshape(-1, BLOCK)
    x = qf * qf.abs() * (absmax.reshape(-1, 1) / (127.0 * 127.0))
    n = 1
    for s in shape:
        n *= s
    return x.reshape(-1)[:n].reshape(shape)


def encode_second_moment(v: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """v ≥ 0 → (uint8 codes of √v, zero excluded; float32 absmax of √v per block)."""
    s = _blocks(v).clamp_min(0).sqrt()
    a = s.amax(1, keepdim=True).clamp_min(_TINY)
    q = _round(256.0 * (s / a).sqrt() - 1.0, noise).clamp_(0, 255)
    return q.to(torch.uint8).reshape(-1), a.reshape(-1)


def decode_second_moment(q: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`encode_second_moment`: v̂ = (a·((q+1)/256)²)², float32 of ``shape``."""
    r = (q.float().reshape(-1, BLOCK) + 1.0) / 256.0
    s = r.square() * absmax.reshape(-1, 1)
    n = 1
    for d in shape:
        n *= d
    return s.square().reshape(-1)[:n].reshape(shape)
