"""The quantizer of the paper (eq. 1) and the integer arithmetic around it.

Pure functions: no state, no modules. ``bits`` and ``exponent`` broadcast against the
tensor they quantize, one value per output channel (shape ``(out, 1, ...)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_CODE_BITS = 16


def _round_straight_through(x: Tensor) -> Tensor:
    """Round half to even, with the identity as gradient."""
    return x + (torch.round(x) - x).detach()


#: Quantization grids. ``"paper"``: eq. 1, integers ``[-2^(b-1), 2^(b-1) - 1]`` times the
#: scale. ``"signs"``: the same, except that a channel to which eq. 1 leaves only the codes
#: ``{-1, 0}`` (below ``log2(3)`` bits) holds each weight's sign instead, ``±scale / 2``.
LEVELS = ("paper", "signs")


def quantize(x: Tensor, bits: Tensor, exponent: Tensor, levels: str = "paper") -> Tensor:
    """Quantize ``x`` to ``bits`` signed bits at scale ``2**exponent`` (paper eq. 1).

    ``q = 2^e * round(clamp(2^-e * x, -2^(b-1), 2^(b-1) - 1))`` with ``b = max(bits, 0)``,
    rounding half to even. With ``levels="signs"`` a channel below ``log2(3)`` bits is
    shifted by half a step, ``q = 2^e * (round(clamp(2^-e * x - 1/2, -2^(b-1), 2^(b-1) - 1))
    + 1/2)``, which is ``±2^(e-1)``. Only the rounding is straight-through, so ``bits`` and
    ``exponent`` receive true gradients through the clamp bounds and the scale. A channel
    at zero bits is exactly zero.
    """
    scale = torch.exp2(exponent)
    if levels == "paper":
        return scale * _round_straight_through(_clamp_to_range(x / scale, bits))
    shift = _half_step(bits, levels)
    return scale * (_round_straight_through(_clamp_to_range(x / scale - shift, bits)) + shift) * (bits > 0)


def integer_codes(x: Tensor, bits: Tensor, exponent: Tensor, levels: str = "paper") -> Tensor:
    """The integers :func:`quantize` gives, as int32: multiples of ``2**exponent``, or odd
    multiples of ``2**(exponent - 1)`` in the channels whose grid is shifted by half a step."""
    with torch.no_grad():
        if levels == "paper":
            return torch.round(_clamp_to_range(x / torch.exp2(exponent), bits)).to(torch.int32)
        shift = _half_step(bits, levels)
        steps = torch.round(_clamp_to_range(x / torch.exp2(exponent) - shift, bits))
        return (torch.where(shift > 0, 2 * steps + 1, steps) * (bits > 0)).to(torch.int32)


def check_levels(levels: str) -> None:
    if levels not in LEVELS:
        raise ValueError(f"`levels` must be one of {LEVELS}, got {levels!r}.")


def _half_step(bits: Tensor, levels: str) -> Tensor:
    """Per channel, the shift of its grid: 1/2 where eq. 1's codes would be {-1, 0}, else 0."""
    check_levels(levels)
    # Eq. 1's top code 2^(b-1) - 1 rounds to 0 below log2(3) bits.
    return (torch.exp2(bits.detach().clamp_min(0) - 1) - 1 < 0.5) * 0.5


def _clamp_to_range(x: Tensor, bits: Tensor) -> Tensor:
    half_range = torch.exp2(bits.clamp_min(0) - 1)
    return torch.clamp(x, -half_range, half_range - 1)


def code_bits(codes: Tensor) -> Tensor:
    """Bits each row of ``codes`` needs in two's complement (0 when the row is all zero).

    ``codes`` is an integer tensor whose first dimension is the channel; the result has
    one int64 per channel: the smallest ``w`` with every code in ``[-2^(w-1), 2^(w-1) - 1]``.
    """
    rows = codes.reshape(codes.shape[0], -1).to(torch.int64)
    if rows.shape[1] == 0:
        return torch.zeros(rows.shape[0], dtype=torch.int64)
    # c >= 0 needs 2^(w-1) >= c + 1; c < 0 needs 2^(w-1) >= -c = (-c - 1) + 1.
    magnitude = torch.where(rows < 0, -rows - 1, rows).amax(dim=1)
    width = torch.floor(torch.log2(magnitude.clamp_min(1).double())).to(torch.int64) + 2
    width = torch.where(magnitude > 0, width, torch.ones_like(width))
    return torch.where((rows != 0).any(dim=1), width, torch.zeros_like(width))


def odd_rows(codes: Tensor) -> Tensor:
    """Boolean per row (first dimension) of ``codes``: every code of the row is odd.

    Such a row, ``c = 2k + 1``, is stored as ``k`` (see :func:`stored_codes`), one bit
    narrower: a channel holding signs (``levels="signs"``) has the codes ``±1``.
    """
    rows = codes.reshape(codes.shape[0], -1)
    return (rows.shape[1] > 0) & (rows.remainder(2) == 1).all(dim=1)


def stored_codes(codes: Tensor) -> tuple[Tensor, Tensor]:
    """``(stored, odd)``: the integers a file holds for ``codes``, and which rows are odd.

    Odd rows hold ``(c - 1) / 2``, every other row ``c`` itself; :func:`restored_codes`
    inverts it exactly.
    """
    odd = odd_rows(codes)
    shape = (-1,) + (1,) * (codes.dim() - 1)
    return torch.where(odd.reshape(shape), torch.div(codes - 1, 2, rounding_mode="floor"), codes), odd


def restored_codes(stored: Tensor, odd: Tensor) -> Tensor:
    """Inverse of :func:`stored_codes`: ``2k + 1`` in odd rows, ``k`` elsewhere."""
    shape = (-1,) + (1,) * (stored.dim() - 1)
    return torch.where(odd.reshape(shape), 2 * stored + 1, stored)


def row_widths(codes: Tensor) -> Tensor:
    """Bits per code each row of ``codes`` takes in a packed file.

    :func:`code_bits` of its stored codes (:func:`stored_codes`), at least 1 for an odd
    row, so that width 0 always means an all-zero row.
    """
    stored, odd = stored_codes(codes)
    return torch.where(odd, code_bits(stored).clamp_min(1), code_bits(stored))


def initial_exponent(weight: Tensor, bits: float) -> Tensor:
    """Per-output-channel exponent at which the channel's largest weight just fits.

    With ``b`` bits the largest representable magnitude is ``2^(b-1) * 2^e``; the
    exponent is the smallest (real) one for which ``max |w| <= (2^(b-1) - 1) * 2^e``, so
    attaching a quantizer changes the weights by rounding only.
    """
    reduce_dims = tuple(range(1, weight.dim()))
    largest = weight.detach().abs().amax(dim=reduce_dims, keepdim=True) if reduce_dims else weight.detach().abs()
    top_code = max(2.0 ** (bits - 1) - 1, 0.5)
    tiny = torch.finfo(weight.dtype).tiny
    return torch.log2(largest.clamp_min(tiny) / top_code).to(torch.float32)


#: Scale stored for an all-zero row (its codes are all 0 and its width 0).
ZERO_ROW_SCALE = 1.0


def dequantize(codes: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``codes * scale`` per row (first dimension), in float32 and then ``dtype``."""
    shape = (-1,) + (1,) * (codes.dim() - 1)
    return (codes.float() * scale.float().reshape(shape)).to(dtype)


def integer_form(weight: Tensor) -> tuple[Tensor, Tensor] | None:
    """The integer form of a weight: per output row, codes ``k`` and a float32 scale ``s``.

    ``dequantize(k, s, weight.dtype)`` equals ``weight`` bit for bit (up to the sign of
    zero), every code fits :data:`MAX_CODE_BITS` signed bits, and each row's codes are
    the smallest that do: with ``t`` the code of the row's smallest non-zero magnitude,
    ``t = 1, 2, ...`` is tried until the row is exact. An all-zero row gets codes 0 and
    scale :data:`ZERO_ROW_SCALE`. Vectorised over rows; a pure function of the values.

    Returns:
        ``(codes, scale)``: int32 codes of ``weight``'s shape and float32 scales of shape
        ``(rows,)`` on the CPU; ``None`` when some row is not ``s * k`` with such codes
        (an ordinary float weight), or the tensor is not a floating-point matrix.
    """
    if not weight.is_floating_point() or weight.dim() < 2 or weight.shape[0] == 0:
        return None
    values = weight.detach().cpu()
    rows = values.float().reshape(values.shape[0], -1)
    if not torch.isfinite(rows).all() or (values.dtype == torch.float64 and not torch.equal(rows.double(), values)):
        return None
    magnitude = rows.abs().double()
    smallest = torch.where(magnitude > 0, magnitude, torch.inf).amin(dim=1)
    largest = magnitude.amax(dim=1)
    codes = torch.zeros(rows.shape, dtype=torch.int32)
    scale = torch.full((rows.shape[0],), ZERO_ROW_SCALE, dtype=torch.float32)
    pending = largest > 0
    # |k| <= 2^15 everywhere, and |k| at the largest weight is about t * largest / smallest.
    limit = torch.where(pending, torch.floor(2.0**15 * smallest / largest * (1 + 2.0**-20)), 0.0)
    top = 2 ** (MAX_CODE_BITS - 1)
    t = 1
    while pending.any():
        if (pending & (limit < t)).any():
            return None
        idx = pending.nonzero().flatten()
        ratio = rows[idx].double() * (t / smallest[idx, None])
        k = torch.round(ratio)
        near = ((ratio - k).abs() <= 2.0**-16 + 2.0**-20 * ratio.abs()).all(dim=1)
        near &= ((k >= -top) & (k <= top - 1)).all(dim=1)
        if near.any():
            found, exact = _exact_scale(rows[idx[near]], k[near])
            done = idx[near][exact]
            codes[done] = k[near][exact].to(torch.int32)
            scale[done] = found[exact]
            pending[done] = False
        t += 1
    return codes.reshape(values.shape), scale


def _exact_scale(rows: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, a float32 ``s`` with ``codes.float() * s == rows`` exactly, and whether one was found.

    Each non-zero code ``k`` of value ``w`` allows ``s`` in ``[(w - ulp/2) / k, (w + ulp/2) / k]``
    (float64); the float32 nearest the middle of the rows' intersection and its
    neighbours are checked in float32, the arithmetic of :func:`dequantize`.
    """
    w = rows.double()
    below = torch.nextafter(rows, torch.tensor(-torch.inf)).double()
    above = torch.nextafter(rows, torch.tensor(torch.inf)).double()
    nonzero = codes != 0
    safe = torch.where(nonzero, codes, 1.0)
    ends = torch.stack([(w + below) / 2 / safe, (w + above) / 2 / safe])
    low = torch.where(nonzero, ends.amin(dim=0), -torch.inf).amax(dim=1)
    high = torch.where(nonzero, ends.amax(dim=0), torch.inf).amin(dim=1)
    middle = ((low + high) / 2).float()
    up, down = torch.tensor(torch.inf), torch.tensor(-torch.inf)
    candidates = [middle, torch.nextafter(middle, up), torch.nextafter(middle, down)]
    candidates += [torch.nextafter(candidates[1], up), torch.nextafter(candidates[2], down)]
    codes32 = codes.float()
    found = middle.clone()
    exact = torch.zeros(len(rows), dtype=torch.bool)
    for candidate in candidates:
        fits = ~exact & (codes32 * candidate[:, None] == rows).all(dim=1) & (candidate > 0)
        found = torch.where(fits, candidate, found)
        exact |= fits
    return found, exact
