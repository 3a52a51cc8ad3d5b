"""Closed channels leave the network while it trains, without changing its function."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging

import selfcompress
from selfcompress import SelfCompress
from tests.helpers import Classifier, random_loader, small_cnn, tiny_trainer


def closing_run(optimizer: str = "adamw", epochs: int = 4, **callback_kwargs):
    pl.seed_everything(0, verbose=False)
    model = Classifier(small_cnn(dropout=0.0), optimizer=optimizer)
    callback = SelfCompress(gamma=1.0, bits_lr=1.0, ramp_steps=2, **callback_kwargs)
    trainer = tiny_trainer(epochs, callbacks=[callback])
    trainer.fit(model, random_loader())
    return model, callback, trainer


def parameter_count(model: torch.nn.Module) -> int:
    """Weights, biases and batch-norm parameters (bit depths and exponents left out)."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.endswith(("bits", "exponent")))


def assert_optimizers_follow_the_model(model, trainer, callback) -> None:
    params = {id(p): p for p in model.parameters()}
    for optimizer in [*trainer.optimizers, callback._optimizer]:
        for group in optimizer.param_groups:
            assert all(id(p) in params for p in group["params"])
        for param, state in optimizer.state.items():
            assert id(param) in params
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    assert value.shape == param.shape


def test_shrinking_removes_closed_channels_and_keeps_the_function() -> None:
    model, callback, trainer = closing_run(shrink_every=None)
    callback._shrinking = True  # masked during the run; now shrink once, by hand
    x = next(iter(random_loader()))[0]
    model.eval()
    with torch.no_grad():
        before = model(x)
    count_before = parameter_count(model)
    removed = callback.shrink(trainer.optimizers)
    with torch.no_grad():
        after = model(x)
    assert removed > 0
    assert parameter_count(model) < count_before
    assert (after - before).abs().max() <= 1e-6 * before.abs().max()
    assert_optimizers_follow_the_model(model, trainer, callback)


def test_the_report_counts_against_the_network_as_built() -> None:
    """After shrinking, each row reads "open / as built", so the rows add up to the total."""
    model, callback, _ = closing_run(shrink_every=1)
    built = dict(small_cnn(dropout=0.0).named_parameters())  # the report names the network's own tensors
    found = callback.report()
    assert parameter_count(model) < parameter_count(Classifier(small_cnn(dropout=0.0)))  # channels did leave
    for row in found.layers:
        assert (row.channels_total, row.weights_total) == (built[row.name].shape[0], built[row.name].numel())
        assert row.channels_open <= row.channels_total and row.weights_kept <= row.weights_total
    assert found.weights_total == sum(row.weights_total for row in found.layers) == callback._num_weights
    assert found.channels_total == sum(built[row.name].shape[0] for row in found.layers)
    assert f"{found.layers[0].channels_open}/{built[found.layers[0].name].shape[0]}" in str(found)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd-onecycle"])
def test_training_goes_on_after_shrinking_every_few_steps(optimizer: str) -> None:
    model, callback, trainer = closing_run(optimizer, epochs=5, shrink_every=2)
    assert parameter_count(model) < parameter_count(Classifier(small_cnn()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_optimizers_follow_the_model(model, trainer, callback)
    assert trainer.global_step == 5 * 4


def test_never_removes_an_open_channel() -> None:
    model, callback, _ = closing_run(shrink_every=1)
    graph = callback.graph
    for tensor in callback._tensors:
        producer = graph.producers.get(tensor.name)
        if producer is not None:
            # Every channel still present is either open or held back for a reason.
            opened = tensor.quantizer.open[producer.rows]
            assert opened.any() or not graph.removable[producer.channels].all() or len(producer.rows) == 1


def test_resume_after_shrinking_equals_the_uninterrupted_run(tmp_path) -> None:
    full, _, _ = closing_run(epochs=4)
    assert parameter_count(full) < parameter_count(Classifier(small_cnn()))

    pl.seed_everything(0, verbose=False)
    first = Classifier(small_cnn(dropout=0.0))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    tiny_trainer(
        3, callbacks=[SelfCompress(gamma=1.0, bits_lr=1.0, ramp_steps=2), checkpoint], enable_checkpointing=True
    ).fit(first, random_loader())
    assert parameter_count(first) < parameter_count(Classifier(small_cnn()))

    resumed = Classifier(small_cnn(dropout=0.0))  # freshly built: full size
    tiny_trainer(4, callbacks=[SelfCompress(gamma=1.0, bits_lr=1.0, ramp_steps=2)]).fit(
        resumed, random_loader(), ckpt_path=tmp_path / "last.ckpt"
    )
    expected, actual = full.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def test_compiled_models_are_refused_while_shrinking() -> None:
    model = torch.compile(Classifier(small_cnn()))
    with pytest.raises(ValueError, match="torch.compile"):
        tiny_trainer(1, callbacks=[SelfCompress(gamma=0.1)]).fit(model, random_loader())


def test_stochastic_weight_averaging_is_refused_while_shrinking() -> None:
    """Its average copy keeps the old shapes; refused before the model is touched."""
    model = Classifier(small_cnn())
    swa = StochasticWeightAveraging(swa_lrs=1e-2)
    with pytest.raises(ValueError, match="StochasticWeightAveraging.*shrink_every=None"):
        tiny_trainer(1, callbacks=[SelfCompress(gamma=0.1), swa]).fit(model, random_loader())
    assert not selfcompress.quantized_tensors(model)
    masking = SelfCompress(gamma=0.1, shrink_every=None)
    tiny_trainer(1, callbacks=[masking, swa]).fit(Classifier(small_cnn()), random_loader())


def test_bad_shrink_every_is_refused() -> None:
    with pytest.raises(ValueError, match="`shrink_every`"):
        SelfCompress(shrink_every=0)
