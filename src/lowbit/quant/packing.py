"""Storage of integer codes in as few bits as the grid needs: pure functions, documented bit by bit.

A quantized tensor is stored as its codes (see :mod:`lowbit.quant.grids`: value = (code + offset)·Δ,
code ∈ [qmin, qmax]) plus its step Δ. This module turns int8 codes into bytes and back; the scale and the
grid live next to the bytes (``DirectQuantLinear`` keeps them as buffers, with this format's version).

Storage width (``storage_bits``): the smallest of 1, 2, 4, 8 bits that holds ``levels`` values —

    levels ≤ 2  → 1 bit   (binary)                8 codes per byte
    levels ≤ 4  → 2 bits  (ternary, 2-bit)        4 codes per byte
    levels ≤ 16 → 4 bits  (3-bit, 4-bit)          2 codes per byte   (3-bit codes use 4-bit storage)
    otherwise   → 8 bits  (5…8-bit)               1 code per byte

8-bit storage keeps the signed code itself as ``torch.int8`` (two's complement, no offset): the tensor is
directly usable as an int8 GEMM operand. Narrower storage packs the **unsigned** code ``u = code − qmin``
(0 ≤ u < levels) into ``torch.uint8`` bytes, along the last dimension, each row on its own:

    codes (…, K) int8  →  bytes (…, ceil(K / p)) uint8,     p = 8 / storage_bits codes per byte

    code j of a row goes to byte j // p, bits [s·(j % p), s·(j % p) + s), s = storage_bits:
    the first code of a byte sits in its least significant bits (little-endian within the byte).

    2-bit, ternary (qmin = −1; u = code + 1 ∈ {0, 1, 2}), codes c0 c1 c2 c3 of one byte:

        bit   7 6 | 5 4 | 3 2 | 1 0
              u3  | u2  | u1  | u0

    4-bit (qmin = −8 for int_asym 4-bit, −4 for 3-bit), codes c0 c1:

        bit   7 6 5 4 | 3 2 1 0
              u1      | u0

Rows are padded to a whole byte with u = 0 (pad bits are zero and ignored when unpacking), so a row
always starts on a byte boundary: a tensor can be sharded or sliced by rows without re-packing, and
``unpack`` only needs the original K. Format version :data:`PACK_VERSION` covers exactly this layout.

**Base-3 (1.6 bits per ternary code)** — :func:`pack_base3` / :func:`unpack_base3`, an inference storage
option for three-level grids (``lowbit convert --to packed --ternary-format base3``, BitNet's "1.58-bit"
weights). Five ternary digits u ∈ {0, 1, 2} (u = code − qmin) make one byte, as the digits of a base-3
number, the first code in the least significant digit (the analogue of the little-endian bit order above):

    byte = u0 + 3·u1 + 9·u2 + 27·u3 + 81·u4        ∈ [0, 242]   (3⁵ = 243 ≤ 256: 8/5 = 1.6 bits per code)

    code j of a row goes to byte j // 5, digit j % 5;   u_i = (byte // 3^i) mod 3

    e.g. codes −1 0 1 1 0 → u = 0 1 2 2 1 → 0 + 3 + 18 + 54 + 81 = 156 = 0b1001_1100

Rows are padded to a multiple of 5 codes with u = 0, so a row is ceil(K / 5) bytes and starts on a byte
boundary, as above. Byte values 243 … 255 never occur (``unpack_base3`` with ``check`` rejects them). The
layout is versioned together with the rest of this module (:data:`PACK_VERSION`).
"""

from __future__ import annotations

import torch

PACK_VERSION = 1
"""Version of the layout above; stored with every packed tensor (``DirectQuantLinear.weight_format``)."""


def storage_bits(levels: int) -> int:
    """Bits per stored code for a grid of ``levels`` values (1, 2, 4 or 8)."""
    if not 2 <= levels <= 256:
        raise ValueError(f"a code grid needs 2 to 256 levels, got {levels}")
    for b in (1, 2, 4):
        if levels <= 1 << b:
            return b
    return 8


def packed_shape(shape: tuple[int, ...] | torch.Size, levels: int) -> tuple[int, ...]:
    """Shape of the stored tensor for codes of ``shape``: (…, ceil(K / p)); unchanged at 8 bits."""
    sb = storage_bits(levels)
    if not shape:
        raise ValueError("packing needs at least one dimension")
    per = 8 // sb
    return (*shape[:-1], -(-shape[-1] // per))


def storage_dtype(levels: int) -> torch.dtype:
    """``torch.int8`` (signed codes) at 8-bit storage, else ``torch.uint8`` (packed unsigned codes)."""
    return torch.int8 if storage_bits(levels) == 8 else torch.uint8


def pack(codes: torch.Tensor, qmin: int, levels: int, *, check: bool = True) -> torch.Tensor:
    """int8 codes in [qmin, qmin + levels) → stored tensor (see the module docstring). Pure. ``check``
    verifies the range first (a host sync; the optimizer's hot path, whose codes come out of a clamp,
    skips it)."""
    if codes.dim() == 0:
        raise ValueError("pack needs at least one dimension")
    sb = storage_bits(levels)
    c = codes.to(torch.int16)
    if check and c.numel() and (int(c.min()) < qmin or int(c.max()) > qmin + levels - 1):
        raise ValueError(f"codes outside [{qmin}, {qmin + levels - 1}]: min {int(c.min())}, max {int(c.max())}")
    if sb == 8:
        return c.to(torch.int8)  # int16 → int8: always a new tensor
    per = 8 // sb
    k = c.shape[-1]
    pad = (-k) % per
    u = (c - qmin).to(torch.uint8)
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))  # pad codes are u = 0
    u = u.reshape(*u.shape[:-1], -1, per)  # (…, K/p, p): code j → byte j // p, slot j % p
    out = torch.zeros(u.shape[:-1], dtype=torch.uint8, device=u.device)
    for slot in range(per):
        out |= u[..., slot] << (sb * slot)
    return out


def unpack(stored: torch.Tensor, qmin: int, levels: int, k: int) -> torch.Tensor:
    """Stored tensor → int8 codes of last dimension ``k`` (exact inverse of :func:`pack`)."""
    sb = storage_bits(levels)
    if sb == 8:
        if stored.shape[-1] != k:
            raise ValueError(f"8-bit storage has last dimension {stored.shape[-1]}, expected {k}")
        return stored.to(torch.int8, copy=True)  # a new tensor, never a view of the storage
    per = 8 // sb
    if stored.shape[-1] != -(-k // per):
        raise ValueError(f"packed last dimension {stored.shape[-1]} does not hold K={k} codes of {sb} bits")
    mask = (1 << sb) - 1
    shifts = torch.arange(0, 8, sb, dtype=torch.uint8, device=stored.device)  # (p,)
    u = (stored.unsqueeze(-1) >> shifts) & mask  # (…, K/p, p)
    u = u.reshape(*stored.shape[:-1], -1)[..., :k]
    return (u.to(torch.int16) + qmin).to(torch.int8)


# ----------------------------------------------------------------------------------------------------------
# base 3: five ternary codes per byte (see the module docstring)
# ----------------------------------------------------------------------------------------------------------

BASE3_PER_BYTE = 5
"""Ternary codes per byte in the base-3 layout (3⁵ = 243 ≤ 256)."""


def _pow3(device: torch.device) -> torch.Tensor:
    return torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16, device=device)  # 3^i, i = digit index


def base3_packed_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """Shape of the base-3 stored tensor for ternary codes of ``shape``: (…, ceil(K / 5))."""
    if not shape:
        raise ValueError("packing needs at least one dimension")
    return (*shape[:-1], -(-shape[-1] // BASE3_PER_BYTE))


def pack_base3(codes: torch.Tensor, qmin: int = -1, *, check: bool = True) -> torch.Tensor:
    """int8 codes in [qmin, qmin + 2] (a three-level grid) → uint8 bytes of five base-3 digits each, along the
    last dimension (see the module docstring). Pure; exact inverse: :func:`unpack_base3`."""
    if codes.dim() == 0:
        raise ValueError("pack needs at least one dimension")
    c = codes.to(torch.int16)
    if check and c.numel() and (int(c.min()) < qmin or int(c.max()) > qmin + 2):
        raise ValueError(f"codes outside [{qmin}, {qmin + 2}]: min {int(c.min())}, max {int(c.max())} "
                         f"(base-3 packing holds three-level grids only)")
    u = c - qmin
    pad = (-u.shape[-1]) % BASE3_PER_BYTE
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))  # pad codes are u = 0
    u = u.reshape(*u.shape[:-1], -1, BASE3_PER_BYTE)  # (…, K/5, 5): code j → byte j // 5, digit j % 5
    return (u * _pow3(u.device)).sum(-1).to(torch.uint8)  # ≤ 2·(1 + 3 + 9 + 27 + 81) = 242


def unpack_base3(stored: torch.Tensor, k: int, qmin: int = -1, *, check: bool = False) -> torch.Tensor:
    """uint8 bytes of :func:`pack_base3` → int8 codes of last dimension ``k``. ``check`` rejects bytes above
    242 (a host sync), which no packed row contains."""
    if stored.dtype != torch.uint8:
        raise ValueError(f"base-3 storage is uint8, got {stored.dtype}")
    if stored.shape[-1] != -(-k // BASE3_PER_BYTE):
        raise ValueError(f"packed last dimension {stored.shape[-1]} does not hold K={k} base-3 codes")
    if check and stored.numel() and int(stored.max()) > 242:
        raise ValueError(f"base-3 byte {int(stored.max())} > 242: not a base-3 packed tensor")
    b = stored.to(torch.int16).unsqueeze(-1)  # (…, K/5, 1)
    u = torch.div(b, _pow3(stored.device), rounding_mode="floor") % 3  # (…, K/5, 5): digit i = (b // 3^i) mod 3
    u = u.reshape(*stored.shape[:-1], -1)[..., :k]
    return (u + qmin).to(torch.int8)
