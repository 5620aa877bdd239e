"""Packed code storage: exact round trips on odd shapes, the documented bit layout, range checks."""

from __future__ import annotations

import pytest
import torch

from lowbit.quant import QuantSpec, quantize
from lowbit.quant.packing import PACK_VERSION, pack, packed_shape, storage_bits, storage_dtype, unpack


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """Restore torch's global RNG after each test: tests collected later see the same stream."""
    with torch.random.fork_rng():
        yield


GRIDS = [  # (qmin, levels): binary, ternary, int2, int3, int4, int5, int8, centered 8-bit
    (-1, 2), (-1, 3), (-2, 4), (-4, 8), (-8, 16), (-16, 32), (-128, 256), (-128, 256),
]
SHAPES = [(1,), (7,), (5, 7), (3, 1), (1, 13), (2, 3, 9), (4, 5, 6, 3), (11, 17)]


@pytest.mark.parametrize("qmin, levels", GRIDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_exact(qmin: int, levels: int, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(levels * 31 + len(shape))
    codes = torch.randint(qmin, qmin + levels, shape, generator=g).to(torch.int8)
    stored = pack(codes, qmin, levels)
    assert stored.dtype == storage_dtype(levels)
    assert tuple(stored.shape) == packed_shape(shape, levels)
    assert torch.equal(unpack(stored, qmin, levels, shape[-1]), codes)
    # extremes of the grid survive too
    ends = torch.full(shape, qmin + levels - 1, dtype=torch.int8)
    ends.view(-1)[::2] = qmin
    assert torch.equal(unpack(pack(ends, qmin, levels), qmin, levels, shape[-1]), ends)


def test_storage_widths() -> None:
    assert [storage_bits(n) for n in (2, 3, 4, 5, 8, 9, 16, 17, 256)] == [1, 2, 2, 4, 4, 4, 4, 8, 8]
    assert packed_shape((10, 9), 3) == (10, 3)  # 4 ternary codes per byte, each row padded on its own
    assert packed_shape((10, 9), 8) == (10, 5)  # 3-bit codes in 4-bit storage: 2 per byte
    assert packed_shape((10, 9), 256) == (10, 9)
    assert PACK_VERSION == 1


def test_documented_bit_layout() -> None:
    # ternary, qmin = -1: u = code + 1; first code in the least significant bits
    codes = torch.tensor([[-1, 0, 1, 1, 0]], dtype=torch.int8)  # u = 0, 1, 2, 2 | 1 (+ 3 pad codes u = 0)
    stored = pack(codes, -1, 3)
    assert stored.tolist() == [[0b10_10_01_00, 0b00_00_00_01]]
    # 4-bit, qmin = -8: u = code + 8, two per byte, low nibble first
    assert pack(torch.tensor([-8, 7, 0], dtype=torch.int8), -8, 16).tolist() == [0xF0, 0x08]
    # 8-bit: the signed code itself, int8
    c8 = torch.tensor([-128, -1, 0, 127], dtype=torch.int8)
    assert torch.equal(pack(c8, -128, 256), c8) and pack(c8, -128, 256).dtype == torch.int8


def test_unpack_is_a_new_tensor() -> None:
    c8 = torch.tensor([1, 2, 3], dtype=torch.int8)
    stored = pack(c8, -128, 256)
    out = unpack(stored, -128, 256, 3)
    out.zero_()
    assert stored.tolist() == [1, 2, 3]


def test_errors() -> None:
    with pytest.raises(ValueError, match="outside"):
        pack(torch.tensor([2], dtype=torch.int8), -1, 3)
    with pytest.raises(ValueError, match="does not hold"):
        unpack(torch.zeros(3, dtype=torch.uint8), -1, 3, 20)
    with pytest.raises(ValueError, match="levels"):
        storage_bits(1)


@pytest.mark.parametrize("bits, grid", [(1.58, "ternary"), (2, "int_asym"), (3, "int_asym"), (4, "centered"),
                                        (8, "int_asym")])
def test_quantizer_codes_pack(bits: float, grid: str) -> None:
    spec = QuantSpec(bits, grid, "absmean" if grid != "centered" else "absmax", "row")
    codes, _ = quantize(torch.randn(6, 33), spec)
    info = spec.info
    assert torch.equal(unpack(pack(codes, info.qmin, info.levels), info.qmin, info.levels, 33), codes)


# ---- base 3: five ternary codes per byte --------------------------------------------------------------------

BASE3_SHAPES = [(1,), (4,), (5,), (6,), (9,), (3, 7), (2, 10), (5, 11), (2, 3, 13), (1, 1), (7, 129)]


@pytest.mark.parametrize("shape", BASE3_SHAPES)
@pytest.mark.parametrize("qmin", [-1, 0])
def test_base3_round_trip_exact(shape: tuple[int, ...], qmin: int) -> None:
    from lowbit.quant.packing import base3_packed_shape, pack_base3, unpack_base3

    g = torch.Generator().manual_seed(sum(shape) * 7 + qmin)
    codes = torch.randint(qmin, qmin + 3, shape, generator=g).to(torch.int8)
    stored = pack_base3(codes, qmin)
    assert stored.dtype == torch.uint8
    assert tuple(stored.shape) == base3_packed_shape(shape) == (*shape[:-1], -(-shape[-1] // 5))
    assert int(stored.max()) <= 242
    assert torch.equal(unpack_base3(stored, shape[-1], qmin, check=True), codes)
    for v in (qmin, qmin + 2):  # constant rows at both ends of the grid
        full = torch.full(shape, v, dtype=torch.int8)
        assert torch.equal(unpack_base3(pack_base3(full, qmin), shape[-1], qmin), full)


def test_base3_documented_layout() -> None:
    from lowbit.quant.packing import pack_base3

    # u = code + 1 = 0 1 2 2 1, first code in the least significant base-3 digit
    assert pack_base3(torch.tensor([-1, 0, 1, 1, 0], dtype=torch.int8)).tolist() == [0 + 3 + 18 + 54 + 81]
    # every byte value 0..242 is reached by exactly one 5-digit word; padding codes are u = 0
    assert pack_base3(torch.tensor([[1, 1, 1, 1, 1, 1]], dtype=torch.int8)).tolist() == [[242, 2]]
    digits = torch.cartesian_prod(*[torch.arange(3)] * 5).flip(-1) - 1  # digit 0 varies fastest
    assert pack_base3(digits.to(torch.int8)).view(-1).tolist() == list(range(243))


def test_base3_errors() -> None:
    from lowbit.quant.packing import pack_base3, unpack_base3

    with pytest.raises(ValueError, match="outside"):
        pack_base3(torch.tensor([2], dtype=torch.int8))
    with pytest.raises(ValueError, match="does not hold"):
        unpack_base3(torch.zeros(2, dtype=torch.uint8), 11)
    with pytest.raises(ValueError, match="242"):
        unpack_base3(torch.tensor([243], dtype=torch.uint8), 5, check=True)
    with pytest.raises(ValueError, match="uint8"):
        unpack_base3(torch.zeros(1, dtype=torch.int8), 5)
