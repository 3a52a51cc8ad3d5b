"""Checkpoints written while SelfCompress trains (and shrinks) load like any Lightning checkpoint."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from selfcompress import SelfCompress, quantized_tensors
from selfcompress.checkpoint import pad, plain_state_dict
from selfcompress.quantize import initial_exponent
from tests.helpers import small_cnn, tiny_trainer
from tests.models import DenseNet, MobileNetV2, ResNet9

#: name -> (network factory, input channels, gamma that removes some channels but not all)
NETS = {
    "resnet9": (lambda: ResNet9(dict(prep=4, l1=8, l1r=8, l2=8, l3=8, l3r=8), num_classes=4), 3, 0.005),
    "small_cnn": (lambda: small_cnn(dropout=0.0), 1, 0.05),
    "densenet": (lambda: DenseNet(num_classes=4), 3, 0.005),
    "mobilenetv2": (lambda: MobileNetV2(num_classes=4), 3, 0.005),
}


class Module(pl.LightningModule):
    """What a user writes: one network, a validation loss, a test loss, predictions."""

    def __init__(self, arch: str = "small_cnn") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = NETS[arch][0]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def data(arch: str, seed: int, n: int = 64) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, NETS[arch][1], 8, 8, generator=generator)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return TensorDataset(x, y)


def train_loader(arch: str) -> DataLoader:
    return DataLoader(data(arch, seed=0), batch_size=8, shuffle=False)


def eval_loader(arch: str) -> DataLoader:
    """One batch, so that the logged loss is the loss of the whole set."""
    return DataLoader(data(arch, seed=1), batch_size=64, shuffle=False)


def eval_outputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    training = module.training
    module.eval()
    with torch.no_grad():
        out = module(x)
    module.train(training)
    return out


class Snapshots(Callback):
    """Remembers what the model computes (eval mode) on the evaluation set at every checkpoint."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.outputs: dict[int, torch.Tensor] = {}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.outputs[checkpoint["global_step"]] = eval_outputs(pl_module, self.x)


def compressing(arch: str = "small_cnn", **kwargs) -> SelfCompress:
    """Channels close within the first epoch and leave at the next step."""
    settings = {"gamma": NETS[arch][2], "initial_bits": 3.0, "bits_lr": 1.0, "ramp_steps": 2, "shrink_every": 1}
    return SelfCompress(**{**settings, **kwargs})


def channel_count(module: nn.Module) -> int:
    return sum(t.raw.shape[0] for t in quantized_tensors(module))


def fresh_channel_count(arch: str) -> int:
    return sum(m.weight.shape[0] for m in Module(arch).modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def assert_same_outputs(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= 1e-6 * expected.abs().max()


def expected_loss(outputs: torch.Tensor, arch: str) -> float:
    return float(nn.functional.cross_entropy(outputs, data(arch, seed=1).tensors[1]))


def quiet_trainer(**kwargs) -> pl.Trainer:
    return tiny_trainer(1, **kwargs)


class Run:
    """One training run with SelfCompress and ModelCheckpoint(monitor="val_loss", save_last=True)."""

    def __init__(self, arch: str, directory: Path, epochs: int = 5, save_top_k: int = 1, **options) -> None:
        pl.seed_everything(0, verbose=False)
        self.arch = arch
        self.x = data(arch, seed=1).tensors[0]
        self.model = Module(arch)
        self.callback = compressing(arch, **options)
        self.snapshots = Snapshots(self.x)
        self.checkpoint = ModelCheckpoint(dirpath=directory, monitor="val_loss", save_last=True, save_top_k=save_top_k)
        self.trainer = tiny_trainer(
            epochs, callbacks=[self.callback, self.snapshots, self.checkpoint], enable_checkpointing=True
        )
        self.trainer.fit(self.model, train_loader(arch), eval_loader(arch))
        self.best, self.last = Path(self.checkpoint.best_model_path), Path(self.checkpoint.last_model_path)

    def outputs_at(self, path: Path) -> torch.Tensor:
        return self.snapshots.outputs[torch.load(path, weights_only=True)["global_step"]]


@pytest.fixture(scope="module", params=["resnet9", "small_cnn"])
def run(request, tmp_path_factory) -> Run:
    run = Run(request.param, tmp_path_factory.mktemp(request.param))
    # Channels left the network during fit, the best checkpoint was written after they did, and
    # the network still computes something that depends on its input (a network whose channels
    # all closed gives one output for every input: a spread of 0).
    assert channel_count(run.model) < fresh_channel_count(run.arch)
    saved = torch.load(run.best, weights_only=True)["selfcompress"]
    assert sum(v.shape[0] for k, v in saved["state_dict"].items() if k.endswith(".bits")) < fresh_channel_count(
        run.arch
    )
    assert run.outputs_at(run.best).std(dim=0).mean() > 0.01
    return run


def test_checkpoints_hold_the_plain_state_dict_and_load_without_pickle(run: Run) -> None:
    fresh = Module(run.arch).state_dict()
    for path in (run.best, run.last):
        checkpoint = torch.load(path, weights_only=True)
        plain = checkpoint["state_dict"]
        assert plain.keys() == fresh.keys()
        assert all(plain[key].shape == fresh[key].shape for key in fresh)
        assert any(key.endswith(".bits") for key in checkpoint["selfcompress"]["state_dict"])


def test_load_from_checkpoint_computes_what_the_trained_model_computed(run: Run) -> None:
    for path in (run.best, run.last):
        loaded = Module.load_from_checkpoint(path)
        assert_same_outputs(eval_outputs(loaded, run.x), run.outputs_at(path))
    # `last.ckpt` is a copy of the latest checkpoint written, which need not be the end of fit; the end
    # of fit is `test_save_checkpoint_after_fit_loads_into_the_plain_module`.


@pytest.mark.parametrize("arch", ["densenet", "mobilenetv2"])
def test_concatenations_and_depthwise_convolutions_are_padded_back(arch: str, tmp_path: Path) -> None:
    run = Run(arch, tmp_path, epochs=3)
    assert channel_count(run.model) < fresh_channel_count(arch)
    assert torch.load(run.last, weights_only=True)["selfcompress"]["removed"]
    assert_same_outputs(eval_outputs(Module.load_from_checkpoint(run.last), run.x), run.outputs_at(run.last))


def test_trainer_without_the_callback_tests_the_checkpoint(run: Run) -> None:
    metrics = quiet_trainer().test(Module(run.arch), eval_loader(run.arch), ckpt_path=run.best, verbose=False)
    assert metrics[0]["test_loss"] == pytest.approx(expected_loss(run.outputs_at(run.best), run.arch), rel=1e-6)


@pytest.mark.parametrize("stage", ["test", "validate", "predict"])
def test_trainer_with_the_callback_restores_the_training_form(run: Run, stage: str) -> None:
    module = Module(run.arch)
    trainer = quiet_trainer(callbacks=[compressing(run.arch, gamma=0.5)])
    result = getattr(trainer, stage)(module, eval_loader(run.arch), ckpt_path=run.best)
    expected = run.outputs_at(run.best)
    if stage == "predict":
        assert_same_outputs(result[0], expected)
    else:
        name = "test_loss" if stage == "test" else "val_loss"
        assert result[0][name] == pytest.approx(expected_loss(expected, run.arch), rel=1e-6)
    # The exact state that trained, shrunken shapes, bit depths and exponents included.
    saved = torch.load(run.best, weights_only=True)["selfcompress"]["state_dict"]
    actual = module.state_dict()
    assert actual.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=0, msg=key)


def test_save_checkpoint_after_fit_loads_into_the_plain_module(run: Run, tmp_path: Path) -> None:
    run.trainer.save_checkpoint(tmp_path / "manual.ckpt")
    loaded = Module.load_from_checkpoint(tmp_path / "manual.ckpt")
    assert_same_outputs(eval_outputs(loaded, run.x), eval_outputs(run.model, run.x))


def test_the_same_trainer_tests_a_checkpoint_after_fit(tmp_path: Path) -> None:
    run = Run("small_cnn", tmp_path, save_top_k=-1)
    shrunken = channel_count(run.model)
    assert shrunken < fresh_channel_count("small_cnn")
    first = next(tmp_path.glob("epoch=0-*.ckpt"))
    saved = torch.load(first, weights_only=True)["selfcompress"]["state_dict"]
    assert saved["net.0.parametrizations.weight.0.bits"].shape[0] > run.model.net[0].weight.shape[0]  # grows back
    # Loading `first` also restores ModelCheckpoint's state of then ("best" = epoch 0): name the path.
    for ckpt_path, path in [("best", run.best), (first, first), (run.best, run.best)]:
        metrics = run.trainer.test(run.model, eval_loader("small_cnn"), ckpt_path=ckpt_path, verbose=False)
        assert metrics[0]["test_loss"] == pytest.approx(expected_loss(run.outputs_at(path), "small_cnn"), rel=1e-6)
        assert_same_outputs(eval_outputs(run.model, run.x), run.outputs_at(path))
    assert channel_count(run.model) == shrunken


def test_resume_from_a_checkpoint_written_after_shrinking_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    full = Run("small_cnn", tmp_path / "full", epochs=5)

    pl.seed_everything(0, verbose=False)
    first = Module()
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "first", monitor="val_loss", save_top_k=-1, filename="{epoch}")
    tiny_trainer(3, callbacks=[compressing(), every_epoch], enable_checkpointing=True).fit(
        first, train_loader("small_cnn"), eval_loader("small_cnn")
    )
    middle = tmp_path / "first" / "epoch=1.ckpt"
    saved = torch.load(middle, weights_only=True)["selfcompress"]
    assert saved["removed"], "no channel had left the network when the checkpoint was written"

    resumed, callback = Module(), compressing()
    trainer = tiny_trainer(5, callbacks=[callback])
    trainer.fit(resumed, train_loader("small_cnn"), eval_loader("small_cnn"), ckpt_path=middle)
    expected, actual = full.model.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
    assert callback._removed == full.callback._removed
    # The optimizers' state followed the shrunken parameters through the checkpoint.
    for mine, theirs in [
        (trainer.optimizers[0], full.trainer.optimizers[0]),
        (callback._optimizer, full.callback._optimizer),
    ]:
        torch.testing.assert_close(mine.state_dict()["state"], theirs.state_dict()["state"], rtol=0, atol=0)


def test_a_plain_checkpoint_loads_with_the_callback(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    trainer = tiny_trainer(1, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(Module(), train_loader("small_cnn"))
    path = trainer.checkpoint_callback.best_model_path
    weights = torch.load(path, weights_only=True)["state_dict"]

    module, callback = Module(), compressing(initial_bits=6.0)
    quiet_trainer(callbacks=[callback]).test(module, eval_loader("small_cnn"), ckpt_path=path, verbose=False)
    for tensor in quantized_tensors(module):
        # As `prepare` would have made them for these weights: fine-tuning starts from here.
        torch.testing.assert_close(tensor.raw, weights[tensor.name], rtol=0, atol=0)
        expected = initial_exponent(weights[tensor.name], 6.0).reshape(tensor.quantizer.exponent.shape)
        torch.testing.assert_close(tensor.quantizer.exponent, expected, rtol=0, atol=0)
        assert bool((tensor.quantizer.bits == 6.0).all()) and not tensor.quantizer.closed_steps.any()


def test_a_weights_only_checkpoint_loads_with_the_callback(run: Run, tmp_path: Path) -> None:
    # Lightning calls no callback for `weights_only=True`: the training form is saved as is.
    run.trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    module = Module(run.arch)
    quiet_trainer(callbacks=[compressing(run.arch)]).test(
        module, eval_loader(run.arch), ckpt_path=tmp_path / "weights.ckpt", verbose=False
    )
    assert_same_outputs(eval_outputs(module, run.x), eval_outputs(run.model, run.x))


def test_pad_puts_entries_back_at_their_original_positions() -> None:
    tensor = torch.arange(1.0, 5.0).reshape(2, 2)
    padded = pad(tensor, [3, 4], [[0, 2], [1, 3]])
    assert padded.tolist() == [[0, 1, 0, 2], [0, 0, 0, 0], [0, 3, 0, 4]]
    with pytest.raises(ValueError, match="`kept\\[0\\]`"):
        pad(tensor, [3, 4], [[0], None])


def test_plain_state_dict_of_a_model_never_shrunk_is_its_quantized_weights() -> None:
    model = Module()
    SelfCompress().setup(quiet_trainer(), model, "fit")
    plain = plain_state_dict(model)
    assert plain.keys() == Module().state_dict().keys()
    for tensor in quantized_tensors(model):
        assert torch.equal(plain[tensor.name], getattr(tensor.module, tensor.attr))
