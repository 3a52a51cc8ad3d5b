"""One pipeline after training: every form of the trained model, any grad mode, the same results.

The forms: (a) the LightningModule trained with the callback (channels removed during fit),
(b) the network inside it, (c) ``finalize``'s output, (d) a plain model of the original
shapes whose removed channels are zero rows (as loaded from a Lightning checkpoint).
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import selfcompress
from selfcompress import SelfCompress, SelfCompressFormatError, bake, finalize, load, report, save
from selfcompress.graph import forget_example_inputs
from selfcompress.layers import quantized_tensors
from tests.helpers import Classifier, small_cnn, tiny_trainer
from tests.models import ResNet9

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

RESNET9_WIDTHS = {"prep": 4, "l1": 6, "l1r": 6, "l2": 8, "l3": 8, "l3r": 8}
ARCHITECTURES = {
    "small_cnn": (lambda: small_cnn(), (1, 8, 8)),
    "resnet9": (lambda: ResNet9(RESNET9_WIDTHS, num_classes=4), (3, 8, 8)),
}
MODES = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
FORMS = ("lightning_module", "network", "finalized", "plain")


class CloseEveryOtherChannel(pl.Callback):
    """Starts every other channel at 1 bit, so that part of each group closes (and leaves) early."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            for tensor in quantized_tensors(pl_module):
                tensor.quantizer.bits[1::2] = 1.0


def loader(shape: tuple[int, ...], seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, *shape, generator=generator)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16)


def train(arch: str, shrink_every: int | None) -> Classifier:
    torch.set_num_threads(1)
    factory, shape = ARCHITECTURES[arch]
    pl.seed_everything(0, verbose=False)
    callback = SelfCompress(gamma=1.0, bits_lr=1.0, ramp_steps=2, shrink_every=shrink_every, print_report=False)
    model = Classifier(factory())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_trainer(1, max_steps=4, callbacks=[CloseEveryOtherChannel(), callback]).fit(model, loader(shape))
    return model


def channels(net: nn.Module) -> int:
    return sum(m.weight.shape[0] for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def zero_padded(net: nn.Module, fresh: nn.Module) -> nn.Module:
    """``fresh`` holding ``net``'s baked tensors in its leading slices, zeros elsewhere (running_var 1)."""
    baked = bake(copy.deepcopy(net)).state_dict()
    state = {}
    for name, value in fresh.state_dict().items():
        padded = torch.ones_like(value) if name.endswith("running_var") else torch.zeros_like(value)
        small = baked[name]
        padded[tuple(slice(0, n) for n in small.shape)] = small
        state[name] = padded
    fresh.load_state_dict(state)
    return fresh


@contextlib.contextmanager
def mode(name: str):
    with MODES[name]():
        before = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        yield
        assert (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) == before


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def journey(request):
    arch = request.param
    factory, shape = ARCHITECTURES[arch]
    model = train(arch, shrink_every=1)
    compact = finalize(model.net)
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(1))
    # As a Lightning checkpoint loads: the user's LightningModule, original shapes, no recorded inputs.
    plain = Classifier(zero_padded(model.net, factory()))
    plain.example_input_array = x[:2]
    forms = {"lightning_module": model, "network": model.net, "finalized": compact, "plain": plain}
    return arch, factory, forms, compact.eval(), x


def outputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(x)


def test_channels_leave_the_network_during_fit(journey) -> None:
    _, factory, forms, compact, x = journey
    assert channels(forms["network"]) < channels(factory())
    assert channels(forms["plain"]) == channels(factory())
    assert not quantized_tensors(forms["plain"])
    with torch.no_grad():  # the finalized module computes what the trained one does
        expected = forms["lightning_module"].eval()(x)
    torch.testing.assert_close(outputs(compact, x), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("grad_mode", list(MODES))
def test_finalize_gives_the_same_module_from_every_form(journey, grad_mode: str) -> None:
    _, _, forms, compact, x = journey
    expected = outputs(compact, x)
    for form in FORMS:
        with mode(grad_mode):
            found = finalize(forms[form])
        assert repr(found) == repr(compact), form
        state = found.state_dict()
        assert all(torch.equal(state[k], v) for k, v in compact.state_dict().items()), form
        assert all(not p.is_inference() for p in found.parameters())
        assert torch.equal(outputs(found, x), expected), form


@pytest.mark.parametrize("grad_mode", list(MODES))
def test_save_writes_the_same_file_from_every_form(journey, grad_mode: str, tmp_path) -> None:
    _, _, forms, compact, _ = journey
    save(compact, tmp_path / "reference.sc")
    reference = (tmp_path / "reference.sc").read_bytes()
    for form in FORMS:
        with mode(grad_mode):
            save(forms[form], tmp_path / f"{form}.sc")
        assert (tmp_path / f"{form}.sc").read_bytes() == reference, form


@pytest.mark.parametrize("grad_mode", list(MODES))
def test_load_into_a_fresh_instance_is_bit_identical(journey, grad_mode: str, tmp_path) -> None:
    _, factory, forms, compact, x = journey
    save(forms["lightning_module"], tmp_path / "net.sc")
    fresh = factory()
    with mode(grad_mode):
        loaded = load(tmp_path / "net.sc", fresh)
        built_here = load(tmp_path / "net.sc", factory())  # tensors made in this mode
    assert loaded is fresh and repr(loaded) == repr(compact)
    assert all(not p.is_inference() for p in loaded.parameters())
    assert torch.equal(outputs(built_here, x), outputs(compact, x))
    assert torch.equal(outputs(loaded, x), outputs(compact, x))
    assert torch.equal(outputs(loaded, 3 * x), outputs(compact, 3 * x))


def test_bad_files_still_raise_and_leave_the_model_untouched(journey, tmp_path) -> None:
    arch, factory, forms, _, _ = journey
    save(forms["network"], tmp_path / "net.sc")
    data = bytearray((tmp_path / "net.sc").read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "flipped.sc").write_bytes(bytes(data))
    other_arch = next(name for name in ARCHITECTURES if name != arch)
    save(finalize(train(other_arch, shrink_every=1).net), tmp_path / "foreign.sc")
    for bad, match in (("flipped.sc", "checksum"), ("foreign.sc", "does not match")):
        fresh = factory()
        before = repr(fresh), {k: v.clone() for k, v in fresh.state_dict().items()}
        with pytest.raises(SelfCompressFormatError, match=match):
            load(tmp_path / bad, fresh)
        assert repr(fresh) == before[0]
        assert all(torch.equal(v, before[1][k]) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("grad_mode", list(MODES))
def test_report_is_the_same_from_every_form(journey, grad_mode: str) -> None:
    _, _, forms, compact, _ = journey
    expected = report(compact).to_dict()
    assert expected["channels_total"] == channels(compact)
    for form in FORMS:
        with mode(grad_mode):
            assert report(forms[form]).to_dict() == expected, form


@pytest.mark.parametrize("grad_mode", list(MODES))
def test_to_bitsandbytes_takes_every_form_and_float32_cpu_input(journey, grad_mode: str) -> None:
    _, _, forms, compact, x = journey
    reference = outputs(compact, x)
    first = None
    for form in FORMS:
        with mode(grad_mode):
            exported = selfcompress.to_bitsandbytes(forms[form])
        found = outputs(exported, x)  # float32 on the CPU, as the input arrives
        assert found.dtype == torch.float32
        first = found if first is None else first
        assert torch.equal(found, first), form
    torch.testing.assert_close(first, reference, rtol=0, atol=2e-2 * float(reference.abs().max()))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_a_plain_model_baked_from_training_without_shrinking(arch: str, tmp_path) -> None:
    factory, shape = ARCHITECTURES[arch]
    model = train(arch, shrink_every=None)
    assert channels(model.net) == channels(factory())
    plain = bake(copy.deepcopy(model.net))  # as a checkpoint of this run would load
    compact, removal = finalize(model, return_report=True)
    assert removal.channels_removed > 0 and channels(compact) < channels(factory())
    save(compact, tmp_path / "reference.sc")
    x = torch.randn(4, *shape)
    for form, value in {"lightning_module": model, "network": model.net, "plain": plain}.items():
        with torch.inference_mode():
            found = finalize(value, x if form == "plain" else None)
            save(value, tmp_path / f"{form}.sc", x if form == "plain" else None)
        assert torch.equal(outputs(found, x), outputs(compact, x)), form
        assert (tmp_path / f"{form}.sc").read_bytes() == (tmp_path / "reference.sc").read_bytes(), form
    loaded = load(tmp_path / "plain.sc", factory())
    assert torch.equal(outputs(loaded, x), outputs(compact, x))


def test_inputs_may_be_a_tensor_positional_args_or_args_and_kwargs() -> None:
    model = train("small_cnn", shrink_every=1)
    plain = bake(copy.deepcopy(model.net))
    forget_example_inputs(plain)  # a copy knows the inputs recorded in training: as loaded from elsewhere, it would not
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="`inputs`"):
        finalize(plain)
    with pytest.raises(ValueError, match="`inputs`"):
        finalize(plain, [1, 2, 3][0])
    found = [finalize(plain, given) for given in (x, (x,), ((x,), {}), ((), {"input": x}))]
    expected = outputs(found[0], x)
    for compact in found[1:]:
        assert torch.equal(outputs(compact, x), expected)


def test_the_finalized_module_exports_with_torch_export(journey) -> None:
    _, _, _, compact, x = journey
    exported = torch.export.export(compact, (x,))
    with torch.no_grad():
        assert torch.equal(exported.module()(x), compact(x))


def test_the_finalized_module_exports_to_onnx(journey) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    _, _, _, compact, x = journey
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(compact, (x,), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (found,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    expected = outputs(compact, x)
    torch.testing.assert_close(torch.from_numpy(found), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
