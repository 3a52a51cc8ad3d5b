"""Saying the size you want: parsing a target size and steering ``gamma`` towards it.

Pure functions, no state: the callback parses the target once (when it knows the model)
and updates ``gamma`` from the exact size at every optimizer step.
"""

from __future__ import annotations

import math
import re

#: Range ``update_gamma`` keeps ``gamma`` in.
GAMMA_MIN = 1e-6
GAMMA_MAX = 100.0

#: Bytes per unit; units are case-insensitive, ``B`` always means bytes.
_BYTE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_NUMBER = r"(?P<number>\d+(?:\.\d*)?|\.\d+)(?:e(?P<exp>[+-]?\d+))?"
_PATTERN = re.compile(
    _NUMBER + r"\s*(?P<unit>b|kb|mb|gb|kib|mib|gib|%|x|bpw|bits?\s*/\s*weight|bits?\s+per\s+weight)?",
    re.IGNORECASE,
)
ALLOWED = (
    "an int number of bytes (> 0), or a string: a size with a unit ('500B', '64KB', '64 KiB', '1.5MB', "
    "'2MiB', '1GB', '1GiB'; KB = 1000 bytes, KiB = 1024, case-insensitive), bits per original weight "
    "('2bpw', '2 bits/weight'), or a fraction of the float32 size ('3%' or '0.03x')"
)


def parse_target_size(value: int | str, fp32_bits: int, weights: int) -> int:
    """The target size in bits that ``value`` names, for a model of ``fp32_bits`` and ``weights``.

    Accepted forms (whitespace between number and unit optional, units case-insensitive):

    - an ``int``, or a string of digits: bytes (``65536``, ``"65536"``);
    - bytes with a unit: ``"500B"``, ``"64KB"`` (64,000 bytes), ``"64KiB"`` (65,536 bytes),
      ``"1.5MB"``, ``"2MiB"``, ``"1GB"``, ``"1GiB"``;
    - bits per original weight: ``"2bpw"``, ``"2 bits/weight"``, ``"2 bits per weight"``,
      meaning ``2 x weights`` bits (weights of the compressed layers, as they started);
    - a fraction of the model's float32 size: ``"3%"`` or ``"0.03x"`` (both mean 3%).

    A bare ``float`` is refused: ``0.5`` could be bytes or a fraction, so write ``"50%"``
    or ``"0.5x"``. ``B`` always means bytes, never bits.

    Args:
        value: The target, in one of the forms above.
        fp32_bits: Size of the model's parameters at float32, in bits (for ``%`` and ``x``).
        weights: Number of compressed weights (for ``bpw``).

    Returns:
        The target in bits, an int > 0.

    Raises:
        ValueError: ``value`` is not one of the forms above, or not > 0, or a fraction is
            above 100%.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _error(value, "it is neither an int nor a string")
    if isinstance(value, int):
        if value <= 0:
            raise _error(value, "it must be > 0")
        return value * 8
    match = _PATTERN.fullmatch(value.strip())
    if match is None:
        raise _error(value, "it is not a recognised form")
    number = float(match["number"]) * 10 ** int(match["exp"] or 0)
    unit = re.sub(r"\s+", " ", (match["unit"] or "").lower())
    if not math.isfinite(number) or number <= 0:
        raise _error(value, "it must be > 0")
    if unit in ("", *_BYTE_UNITS):
        if not unit and ("." in match["number"] or match["exp"]):
            raise _error(value, "a number without a unit must be a whole number of bytes")
        bits = round(number * _BYTE_UNITS.get(unit, 1) * 8)
    elif unit in ("%", "x"):
        fraction = number / 100 if unit == "%" else number
        if fraction > 1:
            raise _error(value, "a fraction of the float32 size must be at most 100% (1x)")
        bits = round(fraction * fp32_bits)
    else:  # bits per weight
        if number > 32:
            raise _error(value, "bits per weight must be at most 32")
        bits = round(number * weights)
    if bits <= 0:
        raise _error(value, "it names less than one bit for this model")
    return int(bits)


def _error(value: object, why: str) -> ValueError:
    return ValueError(f"`target_size` got {value!r}: {why}. Allowed: {ALLOWED}.")


def update_gamma(gamma: float, size_bits: float, target_bits: float, rate: float) -> float:
    """One multiplicative Lagrange-multiplier step on ``gamma`` towards a target size.

    ``gamma * (size / target) ** rate`` (that is ``gamma * exp(rate * log(size / target))``),
    clipped to ``[GAMMA_MIN, GAMMA_MAX]``: above the target ``gamma`` grows (more pressure
    to shrink), below it decays, at the target it stays. The log ratio treats "twice too
    big" and "half the target" alike and cannot explode the way ``exp(rate * (size -
    target) / target)`` does far above the target (6x the target would multiply ``gamma``
    by e^5 = 148 per step). A ``gamma`` of 0 restarts from ``GAMMA_MIN``; a size below one
    bit counts as one bit.

    Raises:
        ValueError: ``target_bits`` not > 0, ``rate`` < 0, or any argument not finite.
    """
    for name, number in (("gamma", gamma), ("size_bits", size_bits), ("target_bits", target_bits), ("rate", rate)):
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError(f"`{name}` must be a finite number, got {number!r}.")
    if target_bits <= 0:
        raise ValueError(f"`target_bits` must be > 0, got {target_bits!r}.")
    if rate < 0:
        raise ValueError(f"`rate` must be >= 0, got {rate!r}.")
    if gamma < 0:
        raise ValueError(f"`gamma` must be >= 0, got {gamma!r}.")
    log_ratio = math.log(max(size_bits, 1.0)) - math.log(target_bits)
    updated = max(gamma, GAMMA_MIN) * math.exp(min(rate * log_ratio, 700.0))
    return float(min(max(updated, GAMMA_MIN), GAMMA_MAX))


def scheduled_target(start_bits: float, target_bits: float, progress: float) -> float:
    """The size to steer towards at ``progress`` (0 to 1) of the way to ``target_bits``.

    Falls from ``start_bits`` along ``target + (start - target) * (1 - progress) ** 3``,
    the gradual-pruning schedule of Zhu & Gupta (2017): fast while the network has much
    to spare, slowly as it nears the target, which it reaches at ``progress = 1`` and
    keeps after. A ``start_bits`` at or below the target gives the target.
    """
    remaining = 1.0 - min(max(progress, 0.0), 1.0)
    goal = target_bits + max(start_bits - target_bits, 0.0) * remaining**3
    return min(goal, max(start_bits, target_bits))  # never above the start, even by a float rounding
