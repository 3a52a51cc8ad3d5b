"""Finalize on real architectures: closed channels go across residual adds, concatenation,
depthwise convolutions and flatten; channel normalisers and attention heads are kept."""

from __future__ import annotations

import importlib
import importlib.util
import io
import pickle
from pathlib import Path

import pytest
import torch
from models import (
    ARCHITECTURES,
    MLP,
    ResNet9,
    close_channels,
    group_of,
    parameter_count,
    randomize_norms,
)
from torch import nn

from selfcompress.finalize import finalize
from selfcompress.graph import build_graph
from selfcompress.layers import prepare, quantized_tensors
from selfcompress.size import exact_size

finalize_module = importlib.import_module("selfcompress.finalize")  # the package re-exports the function

#: For each architecture: width key -> a weight that writes that group's channels.
GROUPS = {
    "resnet9": {"prep": "prep.0.weight", "l1": "layer1.0.0.weight", "l1r": "res1.body.0.0.weight",
                "l2": "layer2.0.0.weight", "l3": "layer3.0.0.weight", "l3r": "res3.body.0.0.weight"},
    "resnet18": {"stem": "stem.0.weight", "s1": "stages.2.shortcut.0.weight", "s2": "stages.4.shortcut.0.weight",
                 **{f"b{i}{j}": f"stages.{2 * i + j}.conv1.0.weight" for i in range(3) for j in range(2)}},
    "densenet": {"stem": "stem.0.weight", "g0": "layers.0.0.weight", "g1": "layers.1.0.weight",
                 "g2": "layers.2.0.weight", "trans": "trans.weight"},
    "mobilenetv2": {"stem": "stem.0.weight", "h1": "block1.expand.0.weight", "c2": "block2.project.0.weight",
                    "h2": "block2.expand.0.weight", "head": "head.0.weight"},
    "convflatten": {"c1": "conv1.0.weight", "c2": "conv2.weight", "hidden": "fc1.weight"},
    "mlp": {"h1": "net.0.weight", "h2": "net.3.weight"},
    "transformer": {"ffn": "fc1.weight"},
    "mha": {"ffn": "fc1.weight"},
}


def trained(name: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    factory, _, shape = ARCHITECTURES[name]
    torch.manual_seed(seed)
    model = factory()
    randomize_norms(model, torch.Generator().manual_seed(seed))
    prepare(model)
    return model.eval(), torch.randn(*shape)


def check_same_outputs(model: nn.Module, compact: nn.Module, x: torch.Tensor, report) -> None:
    assert report.max_abs_difference <= 1e-5 * report.output_scale
    fresh = torch.randn_like(x) * 2
    with torch.no_grad():
        expected, actual = model.eval()(fresh), compact.eval()(fresh)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_closed_channels_are_removed(name: str, seed: int) -> None:
    model, x = trained(name, seed)
    graph = build_graph(model, ((x,), {}))
    generator = torch.Generator().manual_seed(seed)
    _, widths, _ = ARCHITECTURES[name]
    expected_widths, closing, expected_removed = dict(widths), [], {}
    for key, weight in GROUPS[name].items():
        channels = group_of(graph, weight)
        count = int(torch.randint(1, len(channels), (), generator=generator))
        closing.append(channels[torch.randperm(len(channels), generator=generator)[:count]])
        expected_widths[key] -= count
        expected_removed[weight] = count
    close_channels(model, graph, torch.cat(closing))

    compact, report = finalize(model, ((x,), {}), return_report=True)

    check_same_outputs(model, compact, x, report)
    factory = ARCHITECTURES[name][0]
    assert parameter_count(compact) == parameter_count(factory(expected_widths))
    assert parameter_count(compact) < parameter_count(factory())
    assert report.channels_removed == sum(expected_removed.values())
    assert not report.kept_closed


@pytest.mark.parametrize("name", ["resnet9", "mlp"])
def test_result_is_plain_picklable_and_exportable(name: str) -> None:
    model, x = trained(name, 0)
    graph = build_graph(model, ((x,), {}))
    weight = next(iter(GROUPS[name].values()))
    close_channels(model, graph, group_of(graph, weight)[:3])
    compact, report = finalize(model, ((x,), {}), return_report=True)
    assert report.channels_removed == 3

    for module in compact.modules():
        assert not type(module).__module__.startswith("selfcompress")
        assert "parametrizations" not in module._modules
    assert not quantized_tensors(compact)

    buffer = io.BytesIO()
    torch.save(compact, buffer)
    restored = pickle.loads(pickle.dumps(compact))
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    exported = torch.export.export(compact, (x,))
    with torch.no_grad():
        reference = compact(x)
        for other in (restored(x), loaded(x), exported.module()(x)):
            torch.testing.assert_close(other, reference)


def test_closed_channel_with_bias_is_kept_and_reported() -> None:
    model, x = trained("mlp", 0)
    graph = build_graph(model, ((x,), {}))
    channels = group_of(graph, "net.0.weight")
    with torch.no_grad():
        model.net[0].bias.fill_(0.5)  # relu(0.5) reaches the next layer: not removable
    close_channels(model, graph, channels[:4], zero_constants=False)
    close_channels(model, graph, group_of(graph, "net.3.weight")[:2])

    compact, report = finalize(model, ((x,), {}), return_report=True)

    check_same_outputs(model, compact, x, report)
    assert "non-zero constant" in report.kept["net.0"]
    assert report.kept_closed["net.0"] == [0, 1, 2, 3]
    assert "net.0" not in report.removed
    assert report.removed["net.3"] == [0, 1]
    assert compact.net[0].out_features == MLP().net[0].out_features
    assert compact.net[3].out_features == MLP().net[3].out_features - 2


@pytest.mark.parametrize(("name", "reason"), [("transformer", "LayerNorm"), ("mha", "attention")])
def test_residual_stream_of_transformer_is_kept(name: str, reason: str) -> None:
    model, x = trained(name, 0)
    graph = build_graph(model, ((x,), {}))
    stream = group_of(graph, "fc2.weight")
    close_channels(model, graph, stream[:3])
    close_channels(model, graph, group_of(graph, "fc1.weight")[:5])

    compact, report = finalize(model, ((x,), {}), return_report=True)

    check_same_outputs(model, compact, x, report)
    root = next(root for root, offset, size in graph.roots if offset == int(stream.min()))
    assert reason in report.kept[root]
    assert report.kept_closed[root] == [0, 1, 2]
    assert compact.fc2.out_features == compact.embed.out_features == 16
    assert compact.fc1.out_features == 32 - 5


def test_hand_written_attention_heads_are_kept() -> None:
    model, x = trained("transformer", 0)
    graph = build_graph(model, ((x,), {}))
    qkv = group_of(graph, "attn.q.weight")
    assert torch.equal(qkv, group_of(graph, "attn.v.weight"))
    close_channels(model, graph, qkv[[0, 1, 8, 9]])  # same positions in both heads

    compact, report = finalize(model, ((x,), {}), return_report=True)

    check_same_outputs(model, compact, x, report)
    root = next(root for root, offset, size in graph.roots if offset == int(qkv.min()))
    assert "product of activations" in report.kept[root]
    assert report.kept_closed[root] == [0, 1, 8, 9]
    assert compact.attn.q.out_features == compact.attn.k.out_features == 16


def test_exact_size_counts_what_finalize_keeps() -> None:
    model, x = trained("resnet9", 0)
    graph = build_graph(model, ((x,), {}))
    closing = [group_of(graph, "layer1.0.0.weight")[:5], group_of(graph, "res3.body.0.0.weight")[:7]]
    close_channels(model, graph, torch.cat(closing))
    size = exact_size(model, graph)
    compact = finalize(model, ((x,), {}))
    modules = dict(compact.named_modules())
    for layer in size.layers:
        weight = modules[layer.name.rpartition(".")[0]].weight
        assert layer.weights_kept == weight.numel(), layer.name
        assert layer.channels_kept == weight.shape[0], layer.name


def test_finalize_refuses_to_change_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = trained("mlp", 0)
    graph = build_graph(model, ((x,), {}))
    with torch.no_grad():
        model.net[0].bias.fill_(0.5)
    close_channels(model, graph, group_of(graph, "net.0.weight")[:4], zero_constants=False)
    # Pretend the closed channels are silent: removing them now changes the outputs.
    monkeypatch.setattr(finalize_module, "silent_channels", lambda m, g, i: torch.ones(g.num_channels, dtype=bool))
    with pytest.raises(RuntimeError, match="changed the model's outputs"):
        finalize(model, ((x,), {}))
    compact, report = finalize(model, ((x,), {}), return_report=True, tolerance=None)
    assert report.max_abs_difference > 1e-3


def test_resnet9_has_page_layout_at_full_width() -> None:
    full = ResNet9({"prep": 64, "l1": 128, "l1r": 128, "l2": 256, "l3": 512, "l3r": 512})
    convs = [m.out_channels for m in full.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [64, 128, 128, 128, 256, 512, 512, 512]
    assert full.head.in_features == 512


def test_benchmark_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).parents[1] / "benchmarks" / "bench_finalize.py"
    spec = importlib.util.spec_from_file_location("bench_finalize", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    figures = bench.main(["--smoke"])
    assert figures["channels_removed"] == figures["channels_closed"] > 0
    assert figures["parameters_after"] < figures["parameters"]
    assert figures["max_abs_difference"] <= 1e-5 * figures["output_scale"]
    assert "finalize:" in capsys.readouterr().out


def test_a_fully_closed_group_keeps_one_channel() -> None:
    model, x = trained("convflatten", 0)
    graph = build_graph(model, ((x,), {}))
    close_channels(model, graph, group_of(graph, "conv2.weight"))
    compact, report = finalize(model, ((x,), {}), return_report=True)
    check_same_outputs(model, compact, x, report)
    assert compact.conv2.out_channels == 1
    assert compact.fc1.in_features == 16
    assert len(report.kept_closed["conv2"]) == 1 and "one is kept" in report.kept["conv2"]
    assert len(report.removed["conv2"]) == 5
