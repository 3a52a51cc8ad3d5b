"""Time ``finalize`` on a ResNet-50-sized bottleneck network (about 25.5M parameters).

    python benchmarks/bench_finalize.py            # ResNet-50 widths, input 1x3x64x64
    python benchmarks/bench_finalize.py --smoke    # a tiny version, for the test suite

A third of the channels of every removable group are closed directly (all their writers
at -1 bits, their constants zeroed); the script prints how long each step takes, what was
removed, the largest output difference, the command and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch
from torch import Tensor, nn

from selfcompress.finalize import finalize
from selfcompress.graph import build_graph
from selfcompress.layers import prepare, quantized_tensors


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """torchvision's ResNet-50 layout: stem, bottleneck stages [3, 4, 6, 3], pool, linear."""

    def __init__(self, base: int = 64, blocks: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        layers, cin = [], base
        for i, count in enumerate(blocks):
            width = base * 2**i
            for j in range(count):
                layers.append(Bottleneck(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width * 4
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


@torch.no_grad()
def close_third(model: nn.Module, graph, generator: torch.Generator) -> int:
    """Close a random third of every removable group; return how many channels."""
    closing = torch.zeros(graph.num_channels, dtype=torch.bool)
    for _, offset, size in graph.roots:
        if graph.removable[offset]:
            closing[offset + torch.randperm(size, generator=generator)[: size // 3]] = True
    tensors = {t.name: t for t in quantized_tensors(model)}
    modules = dict(model.named_modules())
    for name, producer in graph.producers.items():
        rows = producer.rows[closing[producer.channels]]
        tensors[name].quantizer.bits[rows] = -1.0
        if tensors[name].bias is not None:
            tensors[name].bias[rows] = 0.0
    for module_name, followers in graph.followers.items():
        for follower in followers:
            for attr in ("bias", "running_mean"):
                value = getattr(modules[module_name], attr, None)
                if isinstance(value, Tensor) and value.dim() == 1:
                    value[follower.positions[closing[follower.channels]]] = 0.0
    return int(closing.sum())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny widths and one block per stage")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = ResNet50(8, (1, 1, 1, 1), 10) if args.smoke else ResNet50()
    size = 32 if args.smoke else args.size
    x = torch.randn(1, 3, size, size)
    params = sum(p.numel() for p in model.parameters())
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # non-trivial statistics, as after training
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)

    start = time.perf_counter()
    prepare(model)
    prepared = time.perf_counter()
    graph = build_graph(model, ((x,), {}))
    built = time.perf_counter()
    closed = close_third(model, graph, torch.Generator().manual_seed(0))
    start_finalize = time.perf_counter()
    compact, report = finalize(model, ((x,), {}), return_report=True)
    done = time.perf_counter()

    figures = {
        "parameters": params,
        "parameters_after": sum(p.numel() for p in compact.parameters()),
        "channels_closed": closed,
        "channels_removed": report.channels_removed,
        "prepare_s": prepared - start,
        "build_graph_s": built - prepared,
        "finalize_s": done - start_finalize,
        "max_abs_difference": report.max_abs_difference,
        "output_scale": report.output_scale,
    }
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"model: ResNet-50-like, {params:,} parameters, input {tuple(x.shape)}")
    print(f"prepare: {figures['prepare_s']:.2f} s   build_graph: {figures['build_graph_s']:.2f} s   "
          f"finalize: {figures['finalize_s']:.2f} s")
    print(f"closed {closed} channels, removed {report.channels_removed} in {len(report.removed)} groups; "
          f"parameters {params:,} -> {figures['parameters_after']:,}")
    print(f"max abs difference {report.max_abs_difference:.3g} (output scale {report.output_scale:.3g})")
    return figures


if __name__ == "__main__":
    main()
