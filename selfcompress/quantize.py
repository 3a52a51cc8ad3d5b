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


def quantize(x: Tensor, bits: Tensor, exponent: Tensor) -> Tensor:
    """Quantize ``x`` to ``bits`` signed bits at scale ``2**exponent`` (paper eq. 1).

    ``q = 2^e * round(clamp(2^-e * x, -2^(b-1), 2^(b-1) - 1))`` with ``b = max(bits, 0)``,
    rounding half to even. Only the rounding is straight-through, so ``bits`` and
    ``exponent`` receive true gradients through the clamp bounds and the scale. A channel
    at zero bits is exactly zero.
    """
    scale = torch.exp2(exponent)
    return scale * _round_straight_through(_clamp_to_range(x / scale, bits))


def integer_codes(x: Tensor, bits: Tensor, exponent: Tensor) -> Tensor:
    """The integers that :func:`quantize` multiplies by ``2**exponent``, as int32."""
    with torch.no_grad():
        return torch.round(_clamp_to_range(x / torch.exp2(exponent), bits)).to(torch.int32)


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
