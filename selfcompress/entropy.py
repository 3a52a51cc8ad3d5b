"""Lossless entropy coding of per-row integer codes, for the wire.

The codes of every row of width ``w`` (all layers together, in file order) form one
class; classes follow each other by increasing width, each code one signed byte (``w <=
8``) or one signed little-endian 16-bit word (``w > 8``); rows of width 0 hold nothing.
That byte stream is compressed with a general-purpose stdlib coder. Grouping by width
lets the coder learn one distribution per width; on trained networks raw LZMA2 over it
beats both the bit-packed stream and the order-0 entropy of each class (neighbouring
weights of a kernel are correlated), and decodes in milliseconds.

Decoding never writes more than the byte count the widths and row lengths imply (a
bomb stops at one byte past it), and checks that the stream ends exactly there and that
every code fits its row's width. Every problem raises :class:`ValueError`.
"""

from __future__ import annotations

import lzma
import zlib

import torch
from torch import Tensor

from selfcompress.quantize import MAX_CODE_BITS

#: Coders :func:`encode_codes` accepts.
CODERS = ("lzma", "zlib")

# Raw LZMA2 (no container: the file has its own checksum), literal context off: the bytes
# are codes, not text. The dictionary only needs to cover the stream; 16 MiB bounds the
# decoder's memory.
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": 1 << 24, "lc": 0, "lp": 0, "pb": 0}]
_WIDE = 8  # widths above this take two bytes per code


def _check_coder(coder: str) -> None:
    if coder not in CODERS:
        raise ValueError(f"`coder` must be one of {CODERS}, got {coder!r}.")


def _layout(widths: list[Tensor], cols: list[int]) -> list[tuple[int, int, Tensor]]:
    """``(width, layer, row indices)`` of every non-empty class, by width then layer."""
    order = []
    for width in range(1, MAX_CODE_BITS + 1):
        for layer, row_widths in enumerate(widths):
            rows = (row_widths.to(torch.int64) == width).nonzero().reshape(-1)
            if rows.numel() and cols[layer]:
                order.append((width, layer, rows))
    return order


def raw_nbytes(widths: list[Tensor], cols: list[int]) -> int:
    """Bytes of the uncompressed class stream for these rows (what decoding may produce)."""
    total = 0
    for layer, row_widths in enumerate(widths):
        row_widths = row_widths.to(torch.int64)
        total += cols[layer] * (
            int(((row_widths > 0) & (row_widths <= _WIDE)).sum()) + 2 * int((row_widths > _WIDE).sum())
        )
    return total


def _check_rows(codes: list[Tensor], widths: list[Tensor], cols: list[int] | None = None) -> list[int]:
    if len(codes) != len(widths):
        raise ValueError(f"`codes` and `widths` must have one entry per layer, got {len(codes)} and {len(widths)}.")
    found = []
    for layer, (layer_codes, row_widths) in enumerate(zip(codes, widths, strict=True)):
        if layer_codes.dim() != 2 or row_widths.dim() != 1 or layer_codes.shape[0] != row_widths.shape[0]:
            raise ValueError(
                f"layer {layer}: `codes` must be (rows, cols) and `widths` (rows,), got "
                f"{tuple(layer_codes.shape)} and {tuple(row_widths.shape)}."
            )
        if row_widths.numel() and (int(row_widths.min()) < 0 or int(row_widths.max()) > MAX_CODE_BITS):
            raise ValueError(f"layer {layer}: `widths` must lie in [0, {MAX_CODE_BITS}].")
        found.append(int(layer_codes.shape[1]))
    return found


def _fits(values: Tensor, width: int) -> bool:
    half = 1 << (width - 1)
    return not values.numel() or (int(values.min()) >= -half and int(values.max()) <= half - 1)


def encode_codes(codes: list[Tensor], widths: list[Tensor], coder: str = "lzma") -> bytes:
    """The compressed class stream of several layers' codes.

    Args:
        codes: Per layer, integer codes ``(rows, cols)``; row ``r`` must fit ``widths[r]``
            bits of two's complement (only zeros at width 0).
        widths: Per layer, the width of each row, ``(rows,)`` in ``[0, 16]``.
        coder: One of :data:`CODERS`.

    Raises:
        ValueError: Unknown coder, bad shapes, or a code that does not fit its row's width.
    """
    _check_coder(coder)
    cols = _check_rows(codes, widths)
    for layer, (layer_codes, row_widths) in enumerate(zip(codes, widths, strict=True)):
        closed = layer_codes[row_widths.to(torch.int64) == 0]
        if closed.numel() and bool((closed != 0).any()):
            raise ValueError(f"layer {layer}: `codes` holds non-zero values in rows of width 0.")
    parts = []
    for width, layer, rows in _layout(widths, cols):
        values = codes[layer][rows].reshape(-1).to(torch.int64)
        if not _fits(values, width):
            raise ValueError(f"layer {layer}: a row of `codes` does not fit in its width {width}.")
        dtype = torch.int16 if width > _WIDE else torch.int8
        parts.append(values.to(dtype).numpy().tobytes())  # little-endian on every supported platform
    return compress(b"".join(parts), coder)


def compress(raw: bytes, coder: str = "lzma") -> bytes:
    """``raw`` compressed by ``coder`` (one of :data:`CODERS`), as :func:`decompress` reads it."""
    _check_coder(coder)
    if coder == "lzma":
        return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    return zlib.compress(raw, 9)


def decompress(data: bytes, coder: str, size: int) -> bytes:
    """Exactly ``size`` bytes decompressed from ``data``; never produces more than ``size + 1``.

    Raises:
        ValueError: Unknown coder, or a corrupted stream, one that expands to more or fewer
            than ``size`` bytes, or one with trailing data.
    """
    _check_coder(coder)
    try:
        if coder == "lzma":
            decoder = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
            raw = decoder.decompress(data, max_length=size + 1)
            ended, rest = decoder.eof, decoder.unused_data
        else:
            decoder = zlib.decompressobj()
            raw = decoder.decompress(data, size + 1)
            ended, rest = decoder.eof, decoder.unused_data + decoder.unconsumed_tail
    except (lzma.LZMAError, zlib.error) as error:
        raise ValueError(f"the {coder} code stream is corrupted: {error}") from error
    if len(raw) > size:
        raise ValueError(f"the {coder} code stream expands to more than the {size} bytes the shapes and widths allow.")
    if len(raw) < size:
        raise ValueError(f"the {coder} code stream is truncated: {len(raw)} bytes, the shapes and widths need {size}.")
    if not ended:
        raise ValueError(f"the {coder} code stream does not end after the {size} bytes the shapes and widths allow.")
    if rest:
        raise ValueError(f"the {coder} code stream has {len(rest)} bytes of trailing data.")
    return raw


def decode_codes(data: bytes, widths: list[Tensor], cols: list[int], coder: str = "lzma") -> list[Tensor]:
    """Inverse of :func:`encode_codes`: per layer, the int32 codes ``(rows, cols)``.

    Raises:
        ValueError: Unknown coder, a corrupted or truncated stream, one that expands to
            more or fewer bytes than ``widths`` and ``cols`` allow, or a code outside its
            row's width.
    """
    _check_coder(coder)
    if len(widths) != len(cols):
        raise ValueError(f"`widths` and `cols` must have one entry per layer, got {len(widths)} and {len(cols)}.")
    cols = [int(c) for c in cols]
    if any(c < 0 for c in cols):
        raise ValueError(f"`cols` must be >= 0, got {cols}.")
    size = raw_nbytes(widths, cols)
    raw = decompress(bytes(data), coder, size)
    stream = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
    out = [torch.zeros(w.shape[0], c, dtype=torch.int32) for w, c in zip(widths, cols, strict=True)]
    at = 0
    for width, layer, rows in _layout(widths, cols):
        count = rows.numel() * cols[layer]
        step = 2 if width > _WIDE else 1
        chunk = stream[at : at + count * step]
        at += count * step
        values = (chunk.clone().view(torch.int16) if step == 2 else chunk.view(torch.int8)).to(torch.int32)
        if not _fits(values, width):
            raise ValueError(f"layer {layer}: the code stream holds a code outside its row's width {width}.")
        out[layer][rows] = values.reshape(rows.numel(), cols[layer])
    return out
