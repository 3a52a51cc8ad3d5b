import copy
import importlib.util
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from selfcompress import SelfCompress
from selfcompress.batchnorm import RecentInputs, batch_norms, reestimate_batch_norm, sample_count
from tests.helpers import Classifier, fit, random_loader, small_cnn, tiny_trainer

#: Eval outputs of the trained model against its re-estimated twin: relative to the output scale.
TOLERANCE = 1e-5


def eval_outputs(net: nn.Module) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        return torch.cat([net(x) for x, _ in random_loader()])


def reestimated_twin(net: nn.Module, last_batches: int | None = None) -> nn.Module:
    """A copy of ``net`` with batch-norm statistics re-estimated on the last training batches (all by default)."""
    twin = copy.deepcopy(net)
    batches = [((x,), {}) for x, _ in random_loader()]
    reestimate_batch_norm(twin, batches[-last_batches:] if last_batches else batches)
    return twin


def relative_gap(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


class Scaled(nn.Module):
    """Conv -> BN -> dropout -> Linear -> BN1d, with a keyword argument, to replay ``(args, kwargs)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
        self.drop, self.fc, self.norm1d = nn.Dropout(0.5), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5, momentum=0.3)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.norm1d(self.fc(self.drop(self.norm(self.conv(x * scale))).flatten(1)))


def test_reestimation_gives_the_batch_statistics_and_leaves_the_random_state_alone() -> None:
    torch.manual_seed(0)
    model = Scaled().eval()
    model.drop.train()  # a submodule mode of the user's own: kept
    batches = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    inputs = [((x,), {"scale": 2.0}) for x in batches]
    torch.manual_seed(1)
    expected_next = torch.rand(5)
    torch.manual_seed(1)
    assert reestimate_batch_norm(model, inputs)
    assert torch.equal(torch.rand(5), expected_next)  # training randomness untouched

    with torch.no_grad():
        features = [model.conv(2.0 * x) for x in batches]
    expected_mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in features]).mean(0)
    expected_var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in features]).mean(0)
    torch.testing.assert_close(model.norm.running_mean, expected_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.norm.running_var, expected_var, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.norm1d.running_mean, torch.zeros(5))
    # Modes, momenta and counters as before.
    assert not model.training and not model.norm.training and model.drop.training
    assert model.norm.momentum == 0.1 and model.norm1d.momentum == 0.3
    assert all(int(norm.num_batches_tracked) == 0 for norm in batch_norms(model))
    assert not reestimate_batch_norm(model, [])


def test_eval_model_is_the_model_that_trained() -> None:
    # Fast-falling bit depths: the running averages of a plain fit lag far behind the weights.
    model, _ = fit(SelfCompress(gamma=0.5, bits_lr=0.5))
    gap = relative_gap(eval_outputs(model.net), eval_outputs(reestimated_twin(model.net)))
    assert gap <= TOLERANCE


def test_without_reestimation_the_eval_model_is_stale() -> None:
    # The same fit with re-estimation off: what the previous test guards against.
    model, _ = fit(SelfCompress(gamma=0.5, bits_lr=0.5, bn_samples=0))
    gap = relative_gap(eval_outputs(model.net), eval_outputs(reestimated_twin(model.net)))
    assert gap > 0.05


def test_reestimation_does_not_change_training() -> None:
    # With dropout: the re-estimation pass must not move the random state the training draws from.
    on, _ = fit(SelfCompress(gamma=0.5, bn_samples=8))
    off, _ = fit(SelfCompress(gamma=0.5, bn_samples=0))
    for (name, actual), expected in zip(on.named_parameters(), off.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)


class Validated(Classifier):
    """Keeps the eval outputs its validation loop saw at the last epoch, and the running statistics of each."""

    stats: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_epoch_start(self) -> None:
        self.seen = []

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.seen.append(logits)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))

    def on_validation_epoch_end(self) -> None:
        stats = {name: value.clone() for name, value in self.state_dict().items() if "running_" in name}
        self.stats = {**self.stats, self.current_epoch: stats}


def test_validation_and_checkpoints_see_the_reestimated_model(tmp_path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1, filename="{epoch}")
    model = Validated(small_cnn())
    loader = random_loader()
    pl.seed_everything(0, verbose=False)
    trainer = tiny_trainer(3, callbacks=[SelfCompress(gamma=0.5, bits_lr=0.5), checkpoint], enable_checkpointing=True)
    trainer.fit(model, loader, loader)
    expected = eval_outputs(reestimated_twin(model.net))
    assert relative_gap(torch.cat(model.seen), expected) <= TOLERANCE
    # Checkpoints are written after validation (before the epoch-end shrinking): the same statistics.
    for epoch in range(3):
        saved = torch.load(tmp_path / f"epoch={epoch}.ckpt", weights_only=False)["state_dict"]
        for name, value in model.stats[epoch].items():
            torch.testing.assert_close(saved[name], value, rtol=0, atol=0)


def test_statistics_come_from_the_last_batches_holding_bn_samples() -> None:
    # Batches of 16: 20 samples need the last two batches of the epoch's four.
    model, _ = fit(SelfCompress(gamma=0.05, bn_samples=20))
    outputs = eval_outputs(model.net)
    assert relative_gap(outputs, eval_outputs(reestimated_twin(model.net, last_batches=2))) <= TOLERANCE
    assert relative_gap(outputs, eval_outputs(reestimated_twin(model.net))) > 10 * TOLERANCE


def test_recent_inputs_keep_whole_calls_until_they_hold_the_samples() -> None:
    recent = RecentInputs(samples=10)
    calls = [((torch.zeros(size, 3),), {}) for size in (4, 4, 4, 4, 8, 2)]
    held = []
    for call in calls:
        recent.add(call)
        held.append([inputs[0][0].shape[0] for inputs in recent.inputs])
    # Oldest first; the oldest call goes once the others hold 10 samples without it.
    assert held == [[4], [4, 4], [4, 4, 4], [4, 4, 4], [4, 8], [8, 2]]
    assert recent.inputs[-1] is calls[-1]  # kept as given, not copied
    recent.clear()
    assert len(recent) == 0 and recent.inputs == []


def test_sample_count_reads_the_first_batched_tensor() -> None:
    assert sample_count(((torch.zeros(7, 2),), {})) == 7
    assert sample_count(((torch.tensor(1.0), [torch.zeros(5)]), {"mask": torch.zeros(9)})) == 5
    assert sample_count((("text",), {"ids": {"a": torch.zeros(3, 4)}})) == 3
    assert sample_count((("no tensors",), {})) == 1


@pytest.mark.parametrize("bn_samples", [-1, 1.5, True, "8", None])
def test_bad_bn_samples_is_refused(bn_samples) -> None:
    with pytest.raises(ValueError, match="`bn_samples` must be an int >= 0"):
        SelfCompress(bn_samples=bn_samples)


def test_benchmark_smoke(capsys) -> None:
    spec = importlib.util.spec_from_file_location(
        "bench_bn", Path(__file__).parent.parent / "benchmarks" / "bench_bn.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--smoke", "--nets", "digits", "--bn-samples", "256"])
    (row,) = results["digits/256"]
    assert abs(row["eval"] - row["twin"]) <= 0.01
    assert "machine:" in capsys.readouterr().out


def test_benchmark_sweeps_gamma_beside_the_fp32_network() -> None:
    spec = importlib.util.spec_from_file_location(
        "bench_bn", Path(__file__).parent.parent / "benchmarks" / "bench_bn.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--smoke", "--nets", "digits", "--bn-samples", "256", "--gammas", "0.05", "2", "--fp32"])
    assert set(results) == {"digits/fp32", "digits/256/0.05", "digits/256/2"}
    assert 0.0 <= results["digits/fp32"] <= 1.0
    assert results["digits/256/2"][-1]["size"] < results["digits/256/0.05"][-1]["size"]
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--nets", "digits", "--gammas", "0"])
