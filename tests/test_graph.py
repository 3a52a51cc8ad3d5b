"""Channel groups from Torch-Pruning's DepGraph on the test architectures."""

from __future__ import annotations

import torch
from models import ARCHITECTURES, group_of
from torch import nn

from selfcompress.graph import build_graph
from selfcompress.layers import prepare


def graph_of(name: str):
    factory, _, shape = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = factory().eval()
    prepare(model)
    return model, build_graph(model, ((torch.randn(*shape),), {}))


def root_of(graph, channels: torch.Tensor) -> str:
    return next(root for root, offset, size in graph.roots if offset <= int(channels.min()) < offset + size)


def test_residual_add_joins_every_branch_and_the_shortcut() -> None:
    _, graph = graph_of("resnet18")
    stream = group_of(graph, "stages.2.shortcut.0.weight")
    for weight in ("stages.2.conv2.0.weight", "stages.3.conv2.0.weight"):
        assert torch.equal(group_of(graph, weight), stream)
    for follower in ("stages.2.shortcut.1", "stages.2.conv2.1", "stages.3.conv2.1"):
        assert set(torch.cat([f.channels for f in graph.followers[follower]]).tolist()) == set(stream.tolist())
    readers = {name for name, c in graph.consumers.items() if torch.isin(c.channels, stream).any()}
    assert readers == {"stages.3.conv1.0.weight", "stages.4.conv1.0.weight", "stages.4.shortcut.0.weight"}
    assert graph.removable[stream].all()
    # the identity shortcut of stage 0 ties the stem to both blocks' second convolutions
    assert torch.equal(group_of(graph, "stem.0.weight"), group_of(graph, "stages.1.conv2.0.weight"))


def test_concatenation_offsets() -> None:
    _, graph = graph_of("densenet")
    sizes = {"stem.0.weight": (0, 8), "layers.0.0.weight": (8, 6), "layers.1.0.weight": (14, 6),
             "layers.2.0.weight": (20, 6)}
    norm = graph.followers["norm"]
    for weight, (start, size) in sizes.items():
        channels = group_of(graph, weight)
        assert len(channels) == size
        trans = graph.consumers["trans.weight"]
        positions = trans.positions[torch.isin(trans.channels, channels)]
        assert sorted(positions.tolist()) == list(range(start, start + size))
        positions = torch.cat([f.positions[torch.isin(f.channels, channels)] for f in norm])
        assert sorted(positions.tolist()) == list(range(start, start + size))
    layer2 = graph.consumers["layers.2.0.weight"]
    assert sorted(layer2.positions.tolist()) == list(range(20))


def test_depthwise_convolution_ties_its_input_to_its_output() -> None:
    _, graph = graph_of("mobilenetv2")
    hidden = group_of(graph, "block1.expand.0.weight")
    assert torch.equal(group_of(graph, "block1.depthwise.0.weight"), hidden)
    expand, depthwise = graph.producers["block1.expand.0.weight"], graph.producers["block1.depthwise.0.weight"]
    assert torch.equal(expand.channels[expand.rows.argsort()], depthwise.channels[depthwise.rows.argsort()])
    assert "block1.depthwise.0.weight" not in graph.consumers  # read channel-by-channel, it is not a reader
    # the inverted residual's identity joins the stem to the projection
    assert torch.equal(group_of(graph, "stem.0.weight"), group_of(graph, "block1.project.0.weight"))


def test_flatten_into_linear_maps_each_channel_to_its_block_of_features() -> None:
    _, graph = graph_of("convflatten")
    channels = group_of(graph, "conv2.weight")
    fc1 = graph.consumers["fc1.weight"]
    for rank, channel in enumerate(channels.tolist()):
        assert sorted(fc1.positions[fc1.channels == channel].tolist()) == list(range(16 * rank, 16 * rank + 16))


def test_transformer_groups_and_reasons() -> None:
    _, graph = graph_of("transformer")
    stream = group_of(graph, "embed.weight")
    assert torch.equal(group_of(graph, "fc2.weight"), stream)
    assert torch.equal(group_of(graph, "attn.out.weight"), stream)
    assert not graph.removable[stream].any()
    assert "LayerNorm" in graph.reasons[root_of(graph, stream)]
    qkv = group_of(graph, "attn.q.weight")
    assert torch.equal(group_of(graph, "attn.k.weight"), qkv)
    assert not graph.removable[qkv].any()
    assert "product of activations" in graph.reasons[root_of(graph, qkv)]
    ffn = group_of(graph, "fc1.weight")
    assert graph.removable[ffn].all() and len(ffn) == 32
    assert graph.outputs == {"head.weight"}


def test_multihead_attention_keeps_its_embedding() -> None:
    _, graph = graph_of("mha")
    stream = group_of(graph, "embed.weight")
    assert not graph.removable[stream].any()
    assert "attn.attn.in_proj_weight" in graph.consumers
    assert graph.removable[group_of(graph, "fc1.weight")].all()


def test_group_norm_keeps_its_channels() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    prepare(model)
    graph = build_graph(model, ((torch.randn(1, 3, 8, 8),), {}))
    channels = group_of(graph, "0.weight")
    assert not graph.removable[channels].any()
    assert "GroupNorm" in graph.reasons["0"]
    assert graph.outputs == {"3.weight"}


def test_groups_partition_the_channels() -> None:
    for name in ARCHITECTURES:
        _, graph = graph_of(name)
        assert sum(size for _, _, size in graph.roots) == graph.num_channels
        written = torch.zeros(graph.num_channels, dtype=torch.long)
        for producer in graph.producers.values():
            written.index_add_(0, producer.channels, torch.ones_like(producer.channels))
        assert (written >= 1).all(), name  # every channel has a writer


def test_grouped_convolution_keeps_its_channels() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3, groups=2), nn.ReLU(),
                          nn.Conv2d(6, 12, 1, groups=6), nn.Flatten(), nn.Linear(12 * 4 * 4, 2))
    prepare(model)
    graph = build_graph(model, ((torch.randn(1, 3, 8, 8),), {}))
    for weight, layer in (("0.weight", "2"), ("2.weight", "2"), ("4.weight", "4")):
        channels = group_of(graph, weight)
        assert not graph.removable[channels].any(), weight
        assert f"grouped convolution '{layer}'" in graph.reasons[root_of(graph, channels)]
