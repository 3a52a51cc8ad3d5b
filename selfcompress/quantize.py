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
