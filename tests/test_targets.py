import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfcompress.targets import GAMMA_MAX, GAMMA_MIN, parse_target_size, scheduled_target, update_gamma

FP32_BITS = 32 * 10_000
WEIGHTS = 9_000


def parse(value):
    return parse_target_size(value, fp32_bits=FP32_BITS, weights=WEIGHTS)


@pytest.mark.parametrize(
    ("value", "bits"),
    [
        (65536, 65536 * 8),
        ("65536", 65536 * 8),
        ("500B", 500 * 8),
        ("500 b", 500 * 8),
        ("64KB", 64_000 * 8),
        ("64 kb", 64_000 * 8),
        ("64KiB", 65_536 * 8),
        ("64 KIB", 65_536 * 8),
        ("1.5MB", 1_500_000 * 8),
        ("2MiB", 2 * 1024**2 * 8),
        ("1GB", 10**9 * 8),
        ("1gib", 1024**3 * 8),
        (" 0.5KiB ", 512 * 8),
    ],
)
def test_byte_sizes_with_decimal_and_binary_units(value, bits) -> None:
    assert parse(value) == bits


@pytest.mark.parametrize("value", ["2bpw", "2 bpw", "2BPW", "2 bits/weight", "2bit/weight", "2 bits per weight"])
def test_bits_per_weight(value) -> None:
    assert parse(value) == 2 * WEIGHTS


def test_fractional_bits_per_weight_rounds_to_whole_bits() -> None:
    assert parse("0.5bpw") == WEIGHTS // 2
    assert parse("1.25 bits/weight") == round(1.25 * WEIGHTS)


@pytest.mark.parametrize("value", ["3%", "3 %", "0.03x", "0.03X", "3.0%"])
def test_fraction_of_fp32(value) -> None:
    assert parse(value) == round(0.03 * FP32_BITS)


def test_the_whole_fp32_size_is_allowed() -> None:
    assert parse("100%") == parse("1x") == FP32_BITS


@pytest.mark.parametrize(
    "value",
    [
        0.05,  # a bare float is ambiguous
        True,
        None,
        0,
        -5,
        "",
        "abc",
        "64 KQ",
        "64KiBs",
        "-3%",
        "0%",
        "150%",
        "2x",
        "0bpw",
        "40bpw",
        "1.5",  # bytes must be whole without a unit
        "3 % %",
    ],
)
def test_bad_targets_name_the_argument_the_value_and_the_forms(value) -> None:
    with pytest.raises(ValueError, match="target_size") as error:
        parse(value)
    message = str(error.value)
    assert repr(value) in message
    assert "KiB" in message and "bpw" in message and "%" in message


def test_a_target_under_one_bit_is_refused() -> None:
    with pytest.raises(ValueError, match="less than one bit"):
        parse_target_size("0.0001%", fp32_bits=100, weights=10)


def test_gamma_grows_above_the_target_and_shrinks_below_it() -> None:
    assert update_gamma(0.1, size_bits=4000, target_bits=1000, rate=0.5) == pytest.approx(0.2)
    assert update_gamma(0.1, size_bits=250, target_bits=1000, rate=0.5) == pytest.approx(0.05)
    assert update_gamma(0.1, size_bits=3000, target_bits=1000, rate=1.0) == pytest.approx(0.3)
    assert update_gamma(0.1, size_bits=1000, target_bits=1000, rate=0.5) == pytest.approx(0.1)
    assert update_gamma(0.1, size_bits=2000, target_bits=1000, rate=0.0) == pytest.approx(0.1)


def test_gamma_stays_in_range_and_recovers_from_zero() -> None:
    assert update_gamma(50.0, size_bits=1e12, target_bits=1.0, rate=10.0) == GAMMA_MAX
    assert update_gamma(1e-5, size_bits=0.0, target_bits=1e6, rate=100.0) == GAMMA_MIN
    assert update_gamma(0.0, size_bits=2.0, target_bits=1.0, rate=1.0) > GAMMA_MIN


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(target_bits=0.0), "target_bits"),
        (dict(rate=-1.0), "rate"),
        (dict(gamma=-0.1), "gamma"),
        (dict(size_bits=math.nan), "size_bits"),
        (dict(gamma=math.inf), "gamma"),
    ],
)
def test_update_gamma_refuses_bad_arguments(kwargs, name) -> None:
    arguments = dict(gamma=0.1, size_bits=100.0, target_bits=50.0, rate=0.5) | kwargs
    with pytest.raises(ValueError, match=name):
        update_gamma(**arguments)


@given(
    gamma=st.floats(0.0, 100.0),
    size=st.floats(0.0, 1e300),
    target=st.floats(1.0, 1e9),
    rate=st.floats(0.0, 5.0),
)
def test_update_moves_gamma_towards_the_target_and_stays_in_range(gamma, size, target, rate) -> None:
    updated = update_gamma(gamma, size, target, rate)
    assert GAMMA_MIN <= updated <= GAMMA_MAX
    start = min(max(gamma, GAMMA_MIN), GAMMA_MAX)
    if size > target:
        assert updated >= start * (1 - 1e-12)
    elif size < target:
        assert updated <= start * (1 + 1e-12)


def test_scheduled_target_falls_from_the_start_to_the_target_and_stays() -> None:
    assert scheduled_target(1000.0, 100.0, 0.0) == 1000.0
    assert scheduled_target(1000.0, 100.0, 0.5) == 100.0 + 900.0 * 0.125
    assert scheduled_target(1000.0, 100.0, 1.0) == scheduled_target(1000.0, 100.0, 7.0) == 100.0
    assert scheduled_target(50.0, 100.0, 0.2) == 100.0  # already below: the target itself


@given(start=st.floats(1.0, 1e12), target=st.floats(1.0, 1e12), a=st.floats(-1.0, 2.0), b=st.floats(-1.0, 2.0))
def test_scheduled_target_never_rises_and_stays_between_target_and_start(start, target, a, b) -> None:
    early, late = sorted((a, b))
    assert scheduled_target(start, target, early) >= scheduled_target(start, target, late)
    assert target <= scheduled_target(start, target, late) <= max(start, target)
