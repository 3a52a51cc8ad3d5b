"""finalize on plain layer chains: equal outputs, closed channels really gone."""

import pickle

import pytest
import torch
from torch import nn

from selfcompress import build_graph, finalize, prepare
from selfcompress.layers import ChannelQuantizer

CHAINS = {
    "mlp": (
        lambda: nn.Sequential(
            nn.Linear(10, 12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 8), nn.GELU(), nn.Linear(8, 3)
        ),
        (4, 10),
    ),
    "conv1d": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 6, 3),
            nn.BatchNorm1d(6),
            nn.ReLU(),
            nn.AvgPool1d(2),
            nn.Conv1d(6, 5, 3),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(5 * 3, 4),
        ),
        (3, 2, 12),
    ),
    "conv2d": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 6, 3, padding=1, groups=2),
            nn.BatchNorm2d(6),
            nn.LeakyReLU(),
            nn.Dropout2d(0.1),
            nn.Flatten(),
            nn.Linear(6 * 4 * 4, 5),
        ),
        (2, 3, 8, 8),
    ),
    "depthwise": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 1),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        ),
        (2, 3, 6, 6),
    ),
    "conv3d": (
        lambda: nn.Sequential(
            nn.Conv3d(1, 4, 3, padding=1),
            nn.BatchNorm3d(4),
            nn.SiLU(),
            nn.Conv3d(4, 4, 1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4 * 4, 2),
        ),
        (2, 1, 4, 4, 4),
    ),
}


def close(model: nn.Module, inputs, fraction: float, seed: int) -> int:
    """Close a random share of the removable channels, as training would leave them."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {t.name: t for t in prepare(model)}
    graph = build_graph(model, inputs)
    chosen = graph.removable & (torch.rand(graph.num_channels, generator=generator) < fraction)
    with torch.no_grad():
        for name, producer in graph.producers.items():
            rows = producer.rows[chosen[producer.channels]]
            tensors[name].quantizer.bits[rows] = -1.0
            tensors[name].bias[rows] = 0.0
        for followers in graph.followers.values():
            for follower in followers:
                module = dict(model.named_modules())[follower.name]
                for attr in ("bias", "running_mean"):
                    value = getattr(module, attr, None)
                    if isinstance(value, torch.Tensor):
                        value[follower.positions[chosen[follower.channels]]] = 0.0
    return int(chosen.sum())


@pytest.mark.parametrize("name", list(CHAINS))
@pytest.mark.parametrize("seed", [0, 1])
def test_finalize_equals_the_trained_model_and_removes_closed_channels(name: str, seed: int) -> None:
    build, shape = CHAINS[name]
    torch.manual_seed(seed)
    model = build()
    x = torch.randn(*shape)
    model.train()
    model(x)  # fill batch-norm statistics
    inputs = ((x,), {})
    closed = close(model, inputs, fraction=0.4, seed=seed)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    compact, report = finalize(model, inputs, return_report=True)
    compact.eval()
    with torch.no_grad():
        actual = compact(x)
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert report.channels_removed == closed
    assert not any(isinstance(m, ChannelQuantizer) for m in compact.modules())
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in build().parameters()) or closed == 0
    pickle.loads(pickle.dumps(compact))


def test_finalize_leaves_the_trained_model_untouched() -> None:
    model = CHAINS["mlp"][0]()
    x = torch.randn(3, 10)
    close(model, ((x,), {}), fraction=0.5, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    finalize(model, ((x,), {}))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_closed_channel_with_a_non_zero_bias_is_kept_and_reported() -> None:
    model = CHAINS["mlp"][0]()
    x = torch.randn(3, 10)
    tensors = {t.name: t for t in prepare(model)}
    with torch.no_grad():
        tensors["0.weight"].quantizer.bits[[0, 1]] = -1.0
        model[0].bias[0] = 0.0
        model[0].bias[1] = 0.7
    compact, report = finalize(model, ((x,), {}), return_report=True)
    assert report.removed["0"] == [0]
    assert "non-zero constant" in report.kept["0"]
    assert compact[0].out_features == 11


def test_finalize_without_inputs_says_what_is_missing() -> None:
    model = CHAINS["mlp"][0]()
    prepare(model)
    with pytest.raises(ValueError, match="`inputs` is required"):
        finalize(model)


def test_finalize_of_an_untrained_plain_model_fails() -> None:
    # A plain model is accepted when its weights are in integer form; float weights are not.
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="no compressed weights"):
        finalize(nn.Linear(32, 8), torch.randn(1, 32))
