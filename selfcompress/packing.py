"""Bit packing of signed integer codes at a per-row width.

Row ``r`` of a ``(rows, cols)`` code matrix is stored in two's complement at
``widths[r]`` bits per code, rows one after the other, bit by bit: row ``r`` occupies
``widths[r] * cols`` bits and a row of width 0 occupies nothing. Bit ``i`` of the stream
is bit ``i % 8`` (least significant first) of byte ``i // 8``; the last byte is padded
with zeros.

Both directions are vectorised over all codes at once (no Python loop per row). Packing
shifts each code into 32-bit words held in int64; codes never overlap, so a scatter *add*
is a bitwise *or*. Unpacking reads a 24-bit window at each code's first byte (a code of
at most 16 bits shifted by at most 7 always fits) and sign-extends it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfcompress.quantize import MAX_CODE_BITS

_WORD_BITS = 32
_WORD_SHIFT = 5
_WORD_MASK = (1 << _WORD_BITS) - 1


def packed_bits(widths: Tensor, cols: int) -> int:
    """Number of bits the packed stream of ``widths`` rows of ``cols`` codes holds."""
    return int(widths.to(torch.int64).sum()) * int(cols)


def packed_nbytes(widths: Tensor, cols: int) -> int:
    """Bytes :func:`pack_codes` returns for these widths (bits rounded up to a byte)."""
    return (packed_bits(widths, cols) + 7) // 8


def _check_widths(widths: Tensor, rows: int) -> Tensor:
    if widths.dim() != 1 or widths.shape[0] != rows:
        raise ValueError(f"`widths` must have shape ({rows},), got {tuple(widths.shape)}.")
    if widths.dtype.is_floating_point or widths.dtype == torch.bool:
        raise ValueError(f"`widths` must be an integer tensor, got {widths.dtype}.")
    widths = widths.to(torch.int64).cpu()
    if rows and (int(widths.min()) < 0 or int(widths.max()) > MAX_CODE_BITS):
        raise ValueError(f"`widths` must lie in [0, {MAX_CODE_BITS}].")
    return widths


_CHUNK_CODES = 1 << 22  # codes handled at once: bounds the int64 temporaries


def _row_chunks(widths: Tensor, cols: int):
    """Row ranges of at most about ``_CHUNK_CODES`` codes, with each row's first bit."""
    row_bits = widths * cols
    row_start = torch.cumsum(row_bits, 0) - row_bits
    step = max(1, _CHUNK_CODES // max(cols, 1))
    for first in range(0, widths.shape[0], step):
        yield first, min(first + step, widths.shape[0]), row_start


def _offsets(widths: Tensor, row_start: Tensor, cols: int) -> Tensor:
    """Per code of these rows: its bit offset in the stream (int64, row-major)."""
    col = torch.arange(cols, dtype=torch.int64)
    return (row_start[:, None] + col[None, :] * widths[:, None]).reshape(-1)


def pack_codes(codes: Tensor, widths: Tensor) -> Tensor:
    """Pack signed integer ``codes`` of shape ``(rows, cols)`` at one width per row.

    Args:
        codes: Integer tensor ``(rows, cols)``; row ``r`` must fit in ``widths[r]`` bits
            of two's complement (``[-2^(w-1), 2^(w-1) - 1]``, only 0 at width 0).
        widths: Integer tensor ``(rows,)`` with values in ``[0, 16]``.

    Returns:
        A 1-D uint8 tensor of :func:`packed_nbytes` bytes.

    Raises:
        ValueError: Bad shapes or dtypes, or a code that does not fit its row's width.
    """
    if codes.dim() != 2:
        raise ValueError(f"`codes` must be 2-D (rows, cols), got shape {tuple(codes.shape)}.")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"`codes` must be an integer tensor, got {codes.dtype}.")
    rows, cols = codes.shape
    widths = _check_widths(widths, rows)
    total_bits = packed_bits(widths, cols)
    if total_bits == 0:
        if codes.numel() and bool((codes != 0).any()):
            raise ValueError("`codes` holds non-zero values in rows of width 0.")
        return torch.zeros(0, dtype=torch.uint8)
    values = codes.detach().cpu().to(torch.int64)
    half = (torch.ones_like(widths) << widths) >> 1  # 2^(w-1), 0 at width 0
    low, high = values.amin(dim=1), values.amax(dim=1)
    if bool(((low < -half) | (high > half - 1) & (high > 0)).any()):
        bad = int(((low < -half) | (high > half - 1) & (high > 0)).nonzero()[0])
        raise ValueError(f"row {bad} of `codes` does not fit in {int(widths[bad])} bits.")

    masks = ((torch.ones_like(widths) << widths) - 1)[:, None]
    n_words = total_bits // _WORD_BITS + 2
    words = torch.zeros(n_words, dtype=torch.int64)
    for first, last, row_start in _row_chunks(widths, cols):
        offsets = _offsets(widths[first:last], row_start[first:last], cols)
        shifted = (values[first:last] & masks[first:last]).reshape(-1) << (offsets & (_WORD_BITS - 1))
        word = offsets >> _WORD_SHIFT
        words.index_add_(0, word, shifted & _WORD_MASK)
        words.index_add_(0, word + 1, shifted >> _WORD_BITS)
    as_bytes = torch.stack([(words >> (8 * k)) & 0xFF for k in range(4)], dim=1).reshape(-1)
    return as_bytes[: (total_bits + 7) // 8].to(torch.uint8)


def unpack_codes(packed: Tensor, widths: Tensor, cols: int) -> Tensor:
    """Inverse of :func:`pack_codes`: the int32 codes ``(rows, cols)``.

    Raises:
        ValueError: ``packed`` is not uint8 or does not hold exactly the bytes these
            widths need.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"`packed` must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}.")
    cols = int(cols)
    if cols < 0:
        raise ValueError(f"`cols` must be >= 0, got {cols}.")
    widths = _check_widths(widths, widths.shape[0] if widths.dim() == 1 else -1)
    rows = widths.shape[0]
    total_bits = packed_bits(widths, cols)
    if packed.numel() != (total_bits + 7) // 8:
        raise ValueError(f"`packed` holds {packed.numel()} bytes; these widths need {(total_bits + 7) // 8}.")
    if total_bits == 0:
        return torch.zeros(rows, cols, dtype=torch.int32)
    # Every code lies within 3 consecutive bytes (width <= 16, shifted by <= 7 bits):
    # read a 24-bit little-endian window at each code's first byte.
    data = torch.zeros(packed.numel() + 2, dtype=torch.int32)
    data[: packed.numel()] = packed.cpu().to(torch.int32)
    windows = data[:-2] | (data[1:-1] << 8) | (data[2:] << 16)
    masks = ((torch.ones_like(widths) << widths) - 1).to(torch.int32)[:, None]
    half = masks - (masks >> 1)  # 2^(w-1), 0 at width 0: subtract 2^w where that bit is set
    out = torch.empty(rows, cols, dtype=torch.int32)
    for first, last, row_start in _row_chunks(widths, cols):
        offsets = _offsets(widths[first:last], row_start[first:last], cols)
        start = (offsets >> 3).clamp_max(packed.numel() - 1)
        shift = (offsets & 7).to(torch.int32)
        values = (windows[start] >> shift).reshape(last - first, cols) & masks[first:last]
        out[first:last] = values - ((values & half[first:last]) << 1)
    return out
