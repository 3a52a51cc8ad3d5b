"""Entropy coding of per-row codes: round trips at every width, and every bad stream."""

import lzma
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selfcompress.entropy import CODERS, decode_codes, encode_codes, raw_nbytes
from selfcompress.packing import pack_codes, unpack_codes


@st.composite
def layers(draw):
    """1 to 3 layers of random codes, each row at a random width in [0, 16] and filled within it."""
    found = []
    for _ in range(draw(st.integers(1, 3))):
        rows, cols = draw(st.integers(0, 6)), draw(st.integers(0, 12))
        widths = torch.tensor(draw(st.lists(st.integers(0, 16), min_size=rows, max_size=rows)), dtype=torch.int64)
        seed = draw(st.integers(0, 2**31 - 1))
        generator = torch.Generator().manual_seed(seed)
        low = -((1 << widths) >> 1)  # -2^(w-1), 0 at width 0
        span = torch.where(widths == 0, 1, 1 << widths)  # values per row (1 at width 0: only zero)
        codes = low[:, None] + (torch.rand(rows, cols, generator=generator) * span[:, None]).long()
        if rows and cols and draw(st.booleans()):  # the extremes of each row's range
            codes[:, 0] = low
            codes[:, -1] = low + span - 1
        found.append((codes.to(torch.int32), widths))
    return found


@settings(max_examples=150, deadline=None)
@given(layers(), st.sampled_from(CODERS))
def test_round_trip_both_forms(found, coder):
    codes, widths = [c for c, _ in found], [w for _, w in found]
    cols = [c.shape[1] for c in codes]
    stream = encode_codes(codes, widths, coder)
    decoded = decode_codes(stream, widths, cols, coder)
    for original, got, w, c in zip(codes, decoded, widths, cols, strict=True):
        assert got.dtype == torch.int32 and torch.equal(got, original)
        assert torch.equal(unpack_codes(pack_codes(original, w), w, c), original)


def test_a_trained_like_layer_codes_smaller_than_packed():
    generator = torch.Generator().manual_seed(0)
    codes = (torch.randn(64, 576, generator=generator) * 2).round().clamp(-8, 7).to(torch.int32)
    widths = torch.full((64,), 4)
    packed = pack_codes(codes, widths).numel()
    assert len(encode_codes([codes], [widths], "lzma")) < 0.85 * packed


def _one_layer():
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(-4, 4, (16, 50), generator=generator, dtype=torch.int32)
    return [codes], [torch.full((16,), 3)], [50]


@pytest.mark.parametrize("coder", CODERS)
def test_bad_streams_raise(coder):
    codes, widths, cols = _one_layer()
    stream = encode_codes(codes, widths, coder)
    corrupt = bytearray(stream)
    corrupt[len(corrupt) // 2] ^= 0x5A
    corrupt[len(corrupt) // 3] ^= 0xA5
    for bad in (bytes(corrupt), stream[: len(stream) // 2], stream[:-1], stream + b"\0", b"", b"\0" * 7):
        with pytest.raises(ValueError, match="code stream"):
            decode_codes(bad, widths, cols, coder)


@pytest.mark.parametrize("coder", CODERS)
def test_a_bomb_stops_at_the_allowed_size(coder):
    """A small stream that expands to 64 MiB: decoding stops one byte past what the widths allow."""
    raw_size = 1 << 26
    if coder == "lzma":
        encoder = lzma.LZMACompressor(format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}])
    else:
        encoder = zlib.compressobj(9)
    chunk = b"\0" * (1 << 20)
    bomb = b"".join(encoder.compress(chunk) for _ in range(raw_size >> 20)) + encoder.flush()
    assert len(bomb) < 100_000
    codes, widths, cols = _one_layer()
    with pytest.raises(ValueError, match="more than the 800 bytes"):
        decode_codes(bomb, widths, cols, coder)


def test_codes_outside_their_width():
    codes, widths, cols = _one_layer()
    wider = encode_codes(codes, [torch.full((16,), 8)], "lzma")  # a stream of 8-bit codes
    loud = [codes[0] * 16]  # codes that need 7 bits
    stream = encode_codes(loud, [torch.full((16,), 8)], "lzma")
    decode_codes(wider, widths, cols, "lzma")  # same bytes: the codes fit 3 bits
    with pytest.raises(ValueError, match="outside its row's width 3"):
        decode_codes(stream, widths, cols, "lzma")


def test_bad_arguments_name_what_is_allowed():
    codes, widths, cols = _one_layer()
    with pytest.raises(ValueError, match="`coder` must be one of .*'brotli'"):
        encode_codes(codes, widths, "brotli")
    with pytest.raises(ValueError, match="does not fit in its width 2"):
        encode_codes(codes, [torch.full((16,), 2)], "lzma")
    with pytest.raises(ValueError, match="rows of width 0"):
        encode_codes(codes, [torch.zeros(16, dtype=torch.int64)], "lzma")
    with pytest.raises(ValueError, match=r"`widths` must lie in \[0, 16\]"):
        encode_codes(codes, [torch.full((16,), 17)], "lzma")
    with pytest.raises(ValueError, match="one entry per layer"):
        decode_codes(b"", widths, [], "lzma")
    assert raw_nbytes([torch.tensor([0, 3, 9, 16])], [5]) == 5 * 5
