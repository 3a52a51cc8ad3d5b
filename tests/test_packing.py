"""Bit packing of per-row-width signed codes: exact round trips, sizes and errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selfcompress.packing import pack_codes, packed_nbytes, unpack_codes
from selfcompress.quantize import code_bits


def _random_codes(widths: torch.Tensor, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    half = (1 << widths) >> 1
    low, high = -half, (half - 1).clamp_min(0)
    unit = torch.rand(len(widths), cols, generator=generator, dtype=torch.float64)
    codes = (low[:, None] + torch.floor(unit * (high - low + 1)[:, None])).to(torch.int64)
    if cols:
        codes[:, 0] = low  # the extremes of every row
        codes[:, -1] = high
    return codes


@pytest.mark.parametrize("width", range(17))
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (13, 33), (5, 0), (0, 4), (2, 65)])
def test_round_trip_every_width(width, shape):
    rows, cols = shape
    widths = torch.full((rows,), width, dtype=torch.int64)
    codes = _random_codes(widths, cols, seed=width)
    packed = pack_codes(codes, widths)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (rows * cols * width + 7) // 8 == packed_nbytes(widths, cols)
    assert torch.equal(unpack_codes(packed, widths, cols), codes.to(torch.int32))


@settings(max_examples=50, deadline=None)
@given(
    widths=st.lists(st.integers(0, 16), min_size=0, max_size=12),
    cols=st.integers(0, 41),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_mixed_widths(widths, cols, seed):
    widths = torch.tensor(widths, dtype=torch.int64).reshape(-1)
    codes = _random_codes(widths, cols, seed)
    packed = pack_codes(codes.to(torch.int32), widths)
    assert packed.numel() == (int(widths.sum()) * cols + 7) // 8
    assert torch.equal(unpack_codes(packed, widths, cols), codes.to(torch.int32))


def test_layout_is_rows_concatenated_lsb_first():
    codes = torch.tensor([[1, -1], [0, 0], [-2, 1]])
    widths = torch.tensor([2, 0, 3])
    # row 0: 01, 11 -> bits 1,0,1,1 ; row 2: 110 (=-2), 001 -> bits 0,1,1,1,0,0
    bits = [1, 0, 1, 1, 0, 1, 1, 1, 0, 0]
    expected = [sum(b << i for i, b in enumerate(bits[k : k + 8])) for k in range(0, len(bits), 8)]
    assert pack_codes(codes, widths).tolist() == expected


def test_code_bits_widths_round_trip():
    torch.manual_seed(0)
    codes = torch.randint(-3000, 3000, (64, 50))
    codes[::4] //= 700
    codes[::9] = 0
    widths = code_bits(codes)
    packed = pack_codes(codes, widths)
    assert packed.numel() < codes.numel() * 2
    assert torch.equal(unpack_codes(packed, widths, 50), codes.to(torch.int32))


def test_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        pack_codes(torch.tensor([[2, 0]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="does not fit"):
        pack_codes(torch.tensor([[0, -3]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="width 0|does not fit"):
        pack_codes(torch.tensor([[0, 1], [0, 0]]), torch.tensor([0, 0]))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(2, 2, 2, dtype=torch.int32), torch.tensor([1, 1]))
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(2, 2), torch.tensor([1, 1]))
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(2, 2, dtype=torch.int32), torch.tensor([1, 17]))
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), torch.tensor([4, 4]), 2)


def test_round_trip_across_chunks(monkeypatch):
    import selfcompress.packing as packing

    monkeypatch.setattr(packing, "_CHUNK_CODES", 37)  # many chunks, boundaries mid-word
    widths = torch.tensor([0, 3, 16, 1, 7, 0, 12, 5, 9, 2, 16, 4])
    codes = _random_codes(widths, 29, seed=3)
    packed = pack_codes(codes, widths)
    monkeypatch.setattr(packing, "_CHUNK_CODES", 1 << 22)
    assert torch.equal(packed, pack_codes(codes, widths))  # chunking does not change the bytes
    monkeypatch.setattr(packing, "_CHUNK_CODES", 50)
    assert torch.equal(unpack_codes(packed, widths, 29), codes.to(torch.int32))
