"""The grid where one-bit channels hold signs (``levels="signs"``): quantizer, codes, files, journey."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import selfcompress
from selfcompress import SelfCompress, integer_codes, quantize
from selfcompress.io import SelfCompressFormatError, read_manifest
from selfcompress.quantize import _half_step, code_bits, dequantize, restored_codes, row_widths, stored_codes
from tests.helpers import tiny_trainer
from tests.test_checkpoints import (
    NETS,
    Module,
    Run,
    assert_same_outputs,
    compressing,
    eval_loader,
    eval_outputs,
    train_loader,
)
from tests.test_io import _rewrite_manifest

LOG2_3 = math.log2(3)


def reference(x: float, b: float, e: float) -> float:
    """``levels="signs"`` written out: eq. 1, or below log2(3) bits the levels (k + 1/2) 2^e.

    The shift by a half is taken in float32, as the quantizer does, so that ties agree.
    """
    if b <= 0:
        return 0.0
    h = 0.5 if b < LOG2_3 else 0.0
    shifted = float(np.float32(x / 2**e) - np.float32(h))
    k = min(max(shifted, -(2 ** (b - 1))), 2 ** (b - 1) - 1)
    return 2**e * (round(k) + h)


@settings(max_examples=300, deadline=None)
@given(
    x=st.floats(-100, 100, allow_nan=False, width=32),
    b=st.floats(-3, 12, width=32).filter(lambda b: abs(b) > 1e-4 and abs(b - LOG2_3) > 1e-4),
    e=st.integers(-6, 4),
)
def test_signs_grid_matches_the_formula(x: float, b: float, e: int) -> None:
    got = quantize(torch.tensor([x]), torch.tensor([b]), torch.tensor([float(e)]), "signs")
    assert got.item() == pytest.approx(reference(x, b, e), abs=1e-6 * max(1.0, abs(x)))
    codes = integer_codes(torch.tensor([[x]]), torch.tensor([[b]]), torch.tensor([[float(e)]]), "signs")
    assert row_widths(codes).item() <= max(math.ceil(b), 0)  # never wider than the bit depth


def test_one_bit_holds_signs_and_wider_channels_keep_eq_1() -> None:
    x = torch.tensor([-3.0, -0.1, 0.1, 3.0])
    for bits in (0.3, 1.0, 1.5):
        assert quantize(x, torch.tensor(bits), torch.tensor(1.0), "signs").tolist() == [-1.0, -1.0, 1.0, 1.0]
        # eq. 1 there: {-2^e, 0}, the positive weights lost
        assert quantize(x, torch.tensor(bits), torch.tensor(1.0)).tolist() == [-2.0, 0.0, 0.0, 0.0]
    wide = torch.linspace(-20, 20, 81)
    for bits in (1.6, 2.0, 3.0, 7.5):
        b, e = torch.tensor(bits), torch.tensor(0.0)
        assert torch.equal(quantize(wide, b, e, "signs"), quantize(wide, b, e))


def test_closed_channels_are_zero_and_gradients_flow() -> None:
    x = torch.tensor([[0.3, -3.0, 5.0], [1.0, 2.0, 3.0], [0.3, -3.0, 5.0]], requires_grad=True)
    bits = torch.tensor([[1.2], [-0.5], [2.5]], requires_grad=True)
    exponent = torch.zeros(3, 1, requires_grad=True)
    q = quantize(x, bits, exponent, "signs")
    assert q[1].eq(0).all()
    (q * torch.tensor([[1.0, 1.0, 2.0]])).sum().backward()
    assert x.grad[0].tolist() == [1.0, 0.0, 0.0] and x.grad[1].eq(0).all()
    assert bits.grad[0].item() != 0.0 and bits.grad[1].item() == 0.0 and bits.grad[2].item() != 0.0
    assert exponent.grad[0].item() != 0.0


def test_codes_of_sign_channels_are_odd_and_stored_in_one_bit() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 50) * 4
    bits = torch.tensor([-1.0, 0.5, 1.0, 1.5, 2.6, 5.0]).reshape(6, 1)
    exponent = torch.zeros(6, 1)
    codes = integer_codes(x, bits, exponent, "signs")
    scale = torch.tensor([1.0, 0.5, 0.5, 0.5, 1.0, 1.0])  # odd codes count halves
    assert torch.equal(dequantize(codes, scale), quantize(x, bits, exponent, "signs"))
    assert codes[0].eq(0).all() and codes[1:4].abs().eq(1).all()
    assert row_widths(codes).tolist() == [0, 1, 1, 1, 3, 5]  # ceil of the bit depth, 0 when closed
    assert code_bits(codes).tolist() == [0, 2, 2, 2, 3, 5]  # signs take 2 bits without the halving


@given(st.lists(st.lists(st.integers(-(2**14), 2**14), min_size=3, max_size=3), min_size=1, max_size=6), st.booleans())
def test_stored_codes_round_trip(rows: list[list[int]], make_odd: bool) -> None:
    codes = torch.tensor(rows)
    if make_odd:
        codes = 2 * codes + 1
    stored, odd = stored_codes(codes)
    assert torch.equal(restored_codes(stored, odd), codes)
    assert bool(odd.all()) or not make_odd
    widths = row_widths(codes)
    assert (widths <= code_bits(codes)).all() and ((widths == 0) == codes.eq(0).all(dim=1)).all()
    assert (code_bits(stored) <= widths).all()


@pytest.mark.parametrize("bad", ["Signs", "symmetric", 1, None])
def test_bad_levels_are_refused(bad) -> None:
    with pytest.raises(ValueError, match=f"`levels` must be one of .*got {bad!r}"):
        SelfCompress(gamma=0.1, levels=bad)
    with pytest.raises(ValueError, match="`levels`"):
        quantize(torch.ones(1), torch.ones(1), torch.zeros(1), bad)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    return Run("small_cnn", tmp_path_factory.mktemp("signs"), levels="signs", save_top_k=-1)


def one_bit_channels(path: Path) -> int:
    """Channels of a checkpoint in the one-bit range, where ``levels="signs"`` holds signs."""
    saved = torch.load(path, weights_only=True)["selfcompress"]["state_dict"]
    bits = torch.cat([value.flatten() for key, value in saved.items() if key.endswith(".bits")])
    return int(((bits > 0) & (_half_step(bits, "signs") > 0)).sum())  # the rule `quantize` applies


def run_step(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def test_signs_journey_from_a_checkpoint_to_file(run: Run, tmp_path) -> None:
    """The README's journey with ``levels="signs"``: the file holds sign channels in one bit."""
    assert {t.quantizer.levels for t in selfcompress.quantized_tensors(run.model)} == {"signs"}
    # One-bit channels come and go as they close or climb back: the latest checkpoint holding one.
    checkpoints = sorted(run.best.parent.glob("epoch=*.ckpt"), key=run_step)
    chosen = [path for path in checkpoints if one_bit_channels(path)][-1]
    expected = run.outputs_at(chosen)
    loaded = Module.load_from_checkpoint(chosen)
    # Within float rounding: the trained model holds fewer channels than the plain one it loads into.
    assert_same_outputs(eval_outputs(loaded, run.x), expected)
    with torch.inference_mode():
        compact = selfcompress.finalize(loaded, inputs=run.x[:2])
    assert (eval_outputs(compact, run.x) - expected).abs().max() <= 1e-5 * expected.abs().max()
    path = tmp_path / "net.safetensors"
    with torch.no_grad():
        selfcompress.save(compact, path)
    manifest = read_manifest(path)[0]
    assert manifest["version"] == 5  # batch norms in eval form
    digits = "".join(
        spec[2]
        for _, _, specs, *_ in manifest["modules"]
        for spec in specs.values()
        if len(spec) == 3 and isinstance(spec[2], str)
    )
    assert set(digits) & set("hijklmnopqrstuvwx")  # some channel holds signs
    fresh = selfcompress.load(path, NETS[run.arch][0]())
    assert torch.equal(eval_outputs(fresh, run.x), eval_outputs(compact, run.x))
    found = selfcompress.report(compact, inputs=run.x[:2])
    assert found.total_bytes <= path.stat().st_size <= found.total_bytes * 1.01 + 512
    trained = tmp_path / "trained.safetensors"
    selfcompress.save(run.model, trained)
    exact = run.callback.size().total_bytes  # the size the callback steers and reports
    assert selfcompress.report(run.model).total_bytes == exact
    assert exact <= trained.stat().st_size <= exact * 1.01 + 512


def test_sign_files_entropy_coded_and_version_gated(run: Run, tmp_path) -> None:
    compact = selfcompress.finalize(run.model)
    plain, coded = tmp_path / "plain.sc", tmp_path / "coded.sc"
    selfcompress.save(compact, plain)
    selfcompress.save(compact, coded, entropy_coding="lzma")
    for path in (plain, coded):
        loaded = selfcompress.load(path, NETS[run.arch][0]())
        assert torch.equal(eval_outputs(loaded, run.x), eval_outputs(compact, run.x))
    # Odd rows' digits mean nothing in a version 3 file: such a file is refused, not misread.
    older = tmp_path / "older.sc"
    _rewrite_manifest(plain, older, lambda manifest: manifest.update(version=3))
    with pytest.raises(SelfCompressFormatError, match="corrupted"):
        selfcompress.load(older, NETS[run.arch][0]())


def test_resuming_with_another_grid_is_refused(run: Run) -> None:
    trainer = tiny_trainer(6, callbacks=[compressing()])
    with pytest.raises(ValueError, match="trained with `levels='signs'`.*`levels='paper'`"):
        trainer.fit(Module(), train_loader("small_cnn"), eval_loader("small_cnn"), ckpt_path=run.last)
    resumed = Module()
    trainer = tiny_trainer(6, callbacks=[compressing(levels="signs")])
    trainer.fit(resumed, train_loader("small_cnn"), eval_loader("small_cnn"), ckpt_path=run.last)
    assert trainer.global_step > torch.load(run.last, weights_only=True)["global_step"]
    assert {t.quantizer.levels for t in selfcompress.quantized_tensors(resumed)} == {"signs"}
