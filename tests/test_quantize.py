import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selfcompress import code_bits, integer_codes, quantize
from selfcompress.quantize import ZERO_ROW_SCALE, dequantize, initial_exponent, integer_form


def reference(x: float, b: float, e: float) -> float:
    """Eq. 1 written out with Python floats; round() in Python is half to even."""
    b = max(b, 0.0)
    y = min(max(x / 2**e, -(2 ** (b - 1))), 2 ** (b - 1) - 1)
    return 2**e * round(y)


@settings(max_examples=200, deadline=None)
@given(
    x=st.floats(-100, 100, allow_nan=False, width=32),
    # Within float32 rounding of b = 0 the bounds -2^(b-1) sit on a tie; that case has its own test.
    b=st.floats(-3, 12, width=32).filter(lambda b: abs(b) > 1e-4),
    e=st.integers(-6, 4),
)
def test_quantize_matches_the_formula(x: float, b: float, e: int) -> None:
    got = quantize(torch.tensor([x]), torch.tensor([b]), torch.tensor([float(e)]))
    assert got.item() == pytest.approx(reference(x, b, e), abs=1e-6 * max(1.0, abs(x)))


def test_ties_round_half_to_even() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    got = quantize(x, torch.tensor(8.0), torch.tensor(0.0))
    assert got.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0]


@pytest.mark.parametrize("bits", [0.0, -0.3, -5.0])
def test_zero_or_negative_bits_give_exact_zero(bits: float) -> None:
    x = torch.randn(4, 7) * 10
    got = quantize(x, torch.full((4, 1), bits), torch.zeros(4, 1))
    assert torch.count_nonzero(got) == 0


def test_clamps_to_the_signed_range() -> None:
    x = torch.tensor([-100.0, -4.0, 3.0, 100.0])
    assert quantize(x, torch.tensor(3.0), torch.tensor(0.0)).tolist() == [-4.0, -4.0, 3.0, 3.0]


def test_broadcasts_one_value_per_output_channel() -> None:
    x = torch.full((2, 3, 2, 2), 3.3)
    bits = torch.tensor([2.0, 8.0]).reshape(2, 1, 1, 1)
    got = quantize(x, bits, torch.zeros(2, 1, 1, 1))
    assert torch.all(got[0] == 1.0) and torch.all(got[1] == 3.0)


def test_gradients_reach_weights_bits_and_exponents() -> None:
    x = torch.tensor([[0.3, -3.0, 5.0]], requires_grad=True)
    bits = torch.tensor([[2.5]], requires_grad=True)
    exponent = torch.tensor([[0.0]], requires_grad=True)
    (quantize(x, bits, exponent) * torch.tensor([[1.0, 1.0, 2.0]])).sum().backward()
    # The in-range entry gets the straight-through gradient; clamped ones do not.
    assert x.grad.tolist() == [[1.0, 0.0, 0.0]]
    assert bits.grad.item() != 0.0
    assert exponent.grad.item() != 0.0


def test_bits_get_no_gradient_once_closed() -> None:
    bits = torch.tensor([[-0.5]], requires_grad=True)
    quantize(torch.tensor([[1.0]]), bits, torch.tensor([[0.0]])).sum().backward()
    assert bits.grad.item() == 0.0


def test_integer_codes_times_scale_is_the_quantized_value() -> None:
    x = torch.randn(5, 9)
    bits = torch.tensor([0.0, 1.0, 2.7, 5.0, 9.0]).reshape(5, 1)
    exponent = torch.tensor([-1.0, -2.0, -3.5, -4.0, -6.0]).reshape(5, 1)
    codes = integer_codes(x, bits, exponent)
    assert codes.dtype == torch.int32
    assert torch.equal(codes.float() * torch.exp2(exponent), quantize(x, bits, exponent))


@pytest.mark.parametrize(
    ("row", "width"),
    [
        ([0, 0], 0),
        ([-1, 0], 1),
        ([1, 0], 2),
        ([-2, 1], 2),
        ([2], 3),
        ([-4, 3], 3),
        ([4], 4),
        ([-32768], 16),
        ([32767], 16),
    ],
)
def test_code_bits_is_the_smallest_signed_width(row: list[int], width: int) -> None:
    assert code_bits(torch.tensor([row])).tolist() == [width]


@given(st.lists(st.integers(-(2**15), 2**15 - 1), min_size=1, max_size=20))
def test_code_bits_fits_every_code(row: list[int]) -> None:
    width = code_bits(torch.tensor([row])).item()
    if width == 0:
        assert all(c == 0 for c in row)
    else:
        assert all(-(2 ** (width - 1)) <= c <= 2 ** (width - 1) - 1 for c in row)
        assert width == 1 or not all(-(2 ** (width - 2)) <= c <= 2 ** (width - 2) - 1 for c in row)


def test_initial_exponent_fits_the_largest_weight_with_rounding_error_only() -> None:
    weight = torch.randn(6, 4, 3, 3)
    exponent = initial_exponent(weight, 8).reshape(6, 1, 1, 1)
    q = quantize(weight, torch.full_like(exponent, 8.0), exponent)
    assert torch.all((q - weight).abs() <= torch.exp2(exponent) / 2 + 1e-7)


@settings(max_examples=150, deadline=None)
@given(
    widths=st.lists(st.integers(0, 16), min_size=1, max_size=6),
    cols=st.integers(1, 40),
    exponents=st.lists(st.floats(-30, 10, allow_nan=False), min_size=6, max_size=6),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_integer_form_reproduces_quantized_weights_with_no_wider_codes(
    widths: list[int], cols: int, exponents: list[float], dtype: torch.dtype, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for width in widths:
        low, high = (-(2 ** (width - 1)), 2 ** (width - 1)) if width else (0, 1)
        rows.append(torch.randint(low, high, (cols,), generator=generator))
    codes = torch.stack(rows)
    # The quantizer's arithmetic: float32 scale 2^e (e real) times the integer codes.
    scale = torch.exp2(torch.tensor(exponents[: len(widths)], dtype=torch.float32))
    weight = dequantize(codes, scale, dtype)
    form = integer_form(weight)
    assert form is not None
    found_codes, found_scale = form
    assert found_codes.dtype == torch.int32 and found_scale.dtype == torch.float32
    assert torch.equal(dequantize(found_codes, found_scale, dtype), weight)
    assert (code_bits(found_codes) <= code_bits(codes)).all()


def test_integer_form_of_special_rows() -> None:
    weight = torch.zeros(3, 4)
    weight[1] = torch.tensor([0.5, -0.25, 0.0, 0.75])
    codes, scale = integer_form(weight)
    assert codes[0].eq(0).all() and codes[2].eq(0).all() and scale[0] == ZERO_ROW_SCALE
    assert codes[1].tolist() == [2, -1, 0, 3] and scale[1] == 0.25  # the smallest codes
    assert integer_form(torch.randn(16, 64, generator=torch.Generator().manual_seed(0))) is None
    assert integer_form(torch.tensor([[1.0, float("nan")]])) is None
    assert integer_form(torch.tensor([[2.0**-20, 1.0]])) is None  # needs 21-bit codes
    assert integer_form(torch.ones(4)) is None  # not a matrix
    with_half = dequantize(torch.tensor([[3, -7, 1]]), torch.tensor([2.0**-9]), torch.float16)
    assert torch.equal(dequantize(*integer_form(with_half), torch.float16), with_half)
