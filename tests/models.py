"""Small test architectures (no torchvision) and a helper that closes channels directly.

Every factory takes a ``widths`` dict, so that a test can build the architecture that
removing ``c`` channels of one group should leave (``widths[key] - c``) and compare
parameter counts: the count depends only on how many channels each group keeps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfcompress.graph import ChannelGraph
from selfcompress.layers import quantized_tensors


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU
            ) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act is not None else nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


# ----------------------------------------------------------------------------- ResNet-9
RESNET9 = {"prep": 8, "l1": 16, "l1r": 16, "l2": 32, "l3": 64, "l3r": 64}


class ResNet9(nn.Module):
    """Page's fast CIFAR-10 net (prep 64, layer1 128 + res, layer2 256, layer3 512 + res) at 1/8 width."""

    def __init__(self, widths: dict[str, int] | None = None, num_classes: int = 10) -> None:
        super().__init__()
        w = {**RESNET9, **(widths or {})}
        self.prep = conv_bn(3, w["prep"])
        self.layer1 = nn.Sequential(conv_bn(w["prep"], w["l1"]), nn.MaxPool2d(2))
        self.res1 = Residual(nn.Sequential(conv_bn(w["l1"], w["l1r"]), conv_bn(w["l1r"], w["l1"])))
        self.layer2 = nn.Sequential(conv_bn(w["l1"], w["l2"]), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(conv_bn(w["l2"], w["l3"]), nn.MaxPool2d(2))
        self.res3 = Residual(nn.Sequential(conv_bn(w["l3"], w["l3r"]), conv_bn(w["l3r"], w["l3"])))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(w["l3"], num_classes, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.res1(self.layer1(self.prep(x)))
        x = self.res3(self.layer3(self.layer2(x)))
        return self.head(self.pool(x).flatten(1)) * 0.125


# ----------------------------------------------------------------------------- ResNet-18
RESNET18 = {"stem": 8, "s1": 16, "s2": 24, **{f"b{i}{j}": 8 * (i + 1) for i in range(3) for j in range(2)}}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, inner: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, inner, stride=stride)
        self.conv2 = conv_bn(inner, cout, act=None)
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 layout (three stages of two basic blocks here) with 1x1 downsampling shortcuts."""

    def __init__(self, widths: dict[str, int] | None = None, num_classes: int = 10) -> None:
        super().__init__()
        w = {**RESNET18, **(widths or {})}
        self.stem = conv_bn(3, w["stem"])
        stages, cin = [], w["stem"]
        for i, key in enumerate(["stem", "s1", "s2"]):
            stride = 1 if i == 0 else 2
            stages.append(BasicBlock(cin, w[f"b{i}0"], w[key], stride))
            stages.append(BasicBlock(w[key], w[f"b{i}1"], w[key], 1))
            cin = w[key]
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ----------------------------------------------------------------------------- DenseNet
DENSE = {"stem": 8, "g0": 6, "g1": 6, "g2": 6, "trans": 12}


class DenseNet(nn.Module):
    """A dense block (each layer's output concatenated to its input) and a BN'd transition."""

    def __init__(self, widths: dict[str, int] | None = None, num_classes: int = 10) -> None:
        super().__init__()
        w = {**DENSE, **(widths or {})}
        self.stem = conv_bn(3, w["stem"])
        channels, layers = w["stem"], []
        for i in range(3):
            layers.append(conv_bn(channels, w[f"g{i}"]))
            channels += w[f"g{i}"]
        self.layers = nn.ModuleList(layers)
        self.norm = nn.BatchNorm2d(channels)
        self.trans = nn.Conv2d(channels, w["trans"], 1)
        self.fc = nn.Linear(w["trans"], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        x = self.trans(F.relu(self.norm(x)))
        return self.fc(F.relu(F.adaptive_avg_pool2d(x, 1)).flatten(1))


# ----------------------------------------------------------------------------- MobileNetV2
MOBILE = {"stem": 8, "h1": 24, "c2": 12, "h2": 32, "head": 32}


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, stride: int) -> None:
        super().__init__()
        self.expand = conv_bn(cin, hidden, 1, act=nn.ReLU6)
        self.depthwise = conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6)
        self.project = conv_bn(hidden, cout, 1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    def __init__(self, widths: dict[str, int] | None = None, num_classes: int = 10) -> None:
        super().__init__()
        w = {**MOBILE, **(widths or {})}
        self.stem = conv_bn(3, w["stem"], stride=2, act=nn.ReLU6)
        self.block1 = InvertedResidual(w["stem"], w["h1"], w["stem"], 1)
        self.block2 = InvertedResidual(w["stem"], w["h2"], w["c2"], 2)
        self.head = conv_bn(w["c2"], w["head"], 1, act=nn.ReLU6)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(w["head"], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.block2(self.block1(self.stem(x))))
        return self.fc(self.dropout(F.adaptive_avg_pool2d(x, 1).flatten(1)))


# ----------------------------------------------------------------------------- conv -> flatten -> linear
CONVFLAT = {"c1": 8, "c2": 6, "hidden": 16}


class ConvFlatten(nn.Module):
    def __init__(self, widths: dict[str, int] | None = None, num_classes: int = 10) -> None:
        super().__init__()
        w = {**CONVFLAT, **(widths or {})}
        self.conv1 = conv_bn(3, w["c1"])
        self.conv2 = nn.Conv2d(w["c1"], w["c2"], 3, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(w["c2"] * 16, w["hidden"])
        self.fc2 = nn.Linear(w["hidden"], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.conv2(self.conv1(x)))).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


# ----------------------------------------------------------------------------- MLP
MLP_WIDTHS = {"h1": 32, "h2": 24}


class MLP(nn.Module):
    def __init__(self, widths: dict[str, int] | None = None, num_inputs: int = 20, num_classes: int = 5) -> None:
        super().__init__()
        w = {**MLP_WIDTHS, **(widths or {})}
        self.net = nn.Sequential(
            nn.Linear(num_inputs, w["h1"]), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(w["h1"], w["h2"]), nn.Tanh(),
            nn.Linear(w["h2"], num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------- transformers
TRANSFORMER = {"dim": 16, "heads": 2, "ffn": 32}


class HandAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections reshaped into heads."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.heads, -1).transpose(1, 2)
        k = self.k(x).reshape(b, t, self.heads, -1).transpose(1, 2)
        v = self.v(x).reshape(b, t, self.heads, -1).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, t, -1))


class TorchAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block over a token embedding, with a mean-pooled head."""

    def __init__(self, widths: dict[str, int] | None = None, hand_written: bool = True, num_inputs: int = 8,
                 num_classes: int = 4) -> None:
        super().__init__()
        w = {**TRANSFORMER, **(widths or {})}
        self.embed = nn.Linear(num_inputs, w["dim"])
        self.norm1 = nn.LayerNorm(w["dim"])
        self.attn = (HandAttention if hand_written else TorchAttention)(w["dim"], w["heads"])
        self.norm2 = nn.LayerNorm(w["dim"])
        self.fc1 = nn.Linear(w["dim"], w["ffn"])
        self.fc2 = nn.Linear(w["ffn"], w["dim"])
        self.head = nn.Linear(w["dim"], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(dim=1))


# ----------------------------------------------------------------------------- registry
#: name -> (factory, default widths, example input shape)
ARCHITECTURES = {
    "resnet9": (ResNet9, RESNET9, (2, 3, 32, 32)),
    "resnet18": (ResNet18, RESNET18, (2, 3, 32, 32)),
    "densenet": (DenseNet, DENSE, (2, 3, 16, 16)),
    "mobilenetv2": (MobileNetV2, MOBILE, (2, 3, 32, 32)),
    "convflatten": (ConvFlatten, CONVFLAT, (2, 3, 16, 16)),
    "mlp": (MLP, MLP_WIDTHS, (4, 20)),
    "transformer": (lambda widths=None: EncoderBlock(widths, hand_written=True), TRANSFORMER, (2, 5, 8)),
    "mha": (lambda widths=None: EncoderBlock(widths, hand_written=False), TRANSFORMER, (2, 5, 8)),
}


def randomize_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Give every batch norm non-trivial affine parameters and running statistics."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, 0.1, generator=generator)
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)


def group_of(graph: ChannelGraph, weight_name: str) -> Tensor:
    """Global channels written by the rows of ``weight_name`` (sorted, unique)."""
    return graph.producers[weight_name].channels.unique()


def close_channels(model: nn.Module, graph: ChannelGraph, channels: Tensor, zero_constants: bool = True) -> None:
    """Close global ``channels``: -1 bits in every producer row writing them; zero their constants.

    With ``zero_constants`` the producers' biases and the followers' ``bias`` and
    ``running_mean`` entries of these channels are set to zero, so each closed channel is
    exactly zero wherever it is read.
    """
    closing = torch.zeros(graph.num_channels, dtype=torch.bool)
    closing[channels] = True
    tensors = {t.name: t for t in quantized_tensors(model)}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, producer in graph.producers.items():
            rows = producer.rows[closing[producer.channels]]
            if not len(rows):
                continue
            tensor = tensors[name]
            tensor.quantizer.bits[rows] = -1.0
            if zero_constants and tensor.bias is not None:
                tensor.bias[rows] = 0.0
        if zero_constants:
            for module_name, followers in graph.followers.items():
                module = modules[module_name]
                for follower in followers:
                    positions = follower.positions[closing[follower.channels]]
                    for attr in ("bias", "running_mean"):
                        value = getattr(module, attr, None)
                        if isinstance(value, Tensor) and value.dim() == 1 and len(positions):
                            value[positions] = 0.0


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
