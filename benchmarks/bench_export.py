"""Export figures on CPU: packed file size, pack/unpack time, bitsandbytes memory, latency.

    python benchmarks/bench_export.py --out export.json      # digits CNN, ResNet-9, MLP 4096-11008-4096
    python benchmarks/bench_export.py --smoke --out s.json   # tiny versions, a few seconds

Each model stands in for a trained one: every layer gets per-channel bit depths drawn
from 2..8 (exponents set so the largest weight just fits), and a quarter of the channels
of the layers whose channels can be removed are closed with their constants zeroed. The
script prints the command, the machine, and per model: the packed file against a float32
safetensors state dict, the exact size it should match, pack/unpack and save/load time,
the bitsandbytes model's memory against float16, and median latencies (float32 on CPU)
of the original, finalized and bitsandbytes models at batch 1 and a large batch.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings

import safetensors.torch
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import median_seconds  # noqa: E402

from selfcompress.bnb import bitsandbytes_from_codes, storage_bytes
from selfcompress.graph import build_graph
from selfcompress.io import compressed_codes, load, save
from selfcompress.layers import prepare
from selfcompress.packing import pack_codes, unpack_codes
from selfcompress.quantize import initial_exponent
from selfcompress.size import exact_size

warnings.filterwarnings("ignore")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16" on every call


def conv_bn(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.a, self.b = conv_bn(channels, channels), conv_bn(channels, channels)

    def forward(self, x):
        return x + self.b(self.a(x))


def resnet9(width: int = 64, classes: int = 10) -> nn.Module:
    """The CIFAR ResNet-9 (about 6.57M parameters at width 64)."""
    w = width
    return nn.Sequential(
        conv_bn(3, w), conv_bn(w, 2 * w, pool=True), Residual(2 * w),
        conv_bn(2 * w, 4 * w, pool=True), conv_bn(4 * w, 8 * w, pool=True), Residual(8 * w),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8 * w, classes),
    )


def digits_cnn() -> nn.Module:
    """A CNN for 8x8 digit images (sklearn digits sized)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def mlp(d: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))


def simulate_training(model: nn.Module, inputs, seed: int = 0) -> None:
    """Per-channel bits in 2..8, a quarter of removable channels closed and silenced."""
    generator = torch.Generator().manual_seed(seed)
    tensors = prepare(model)
    graph = build_graph(model, inputs)
    with torch.no_grad():
        closed_channels = torch.zeros(graph.num_channels, dtype=torch.bool)
        closed_channels[graph.removable] = torch.rand(int(graph.removable.sum()), generator=generator) < 0.25
        for tensor in tensors:
            q = tensor.quantizer
            rows = q.bits.shape[0]
            bits = torch.randint(2, 9, (rows,), generator=generator).float()
            for b in bits.unique().tolist():
                mask = bits == b
                q.exponent[mask] = initial_exponent(tensor.raw[mask].detach(), b).reshape(q.exponent[mask].shape)
            q.bits.copy_(bits.reshape(q.bits.shape))
            producer = graph.producers.get(tensor.name)
            if producer is not None:
                closed = producer.rows[closed_channels[producer.channels]]
                q.bits.reshape(-1)[closed] = -1
                if tensor.bias is not None:
                    tensor.bias[closed] = 0
        for name, followers in graph.followers.items():
            module = model.get_submodule(name)
            for follower in followers:
                closed = follower.positions[closed_channels[follower.channels]]
                for attr in ("bias", "running_mean"):
                    value = getattr(module, attr, None)
                    if isinstance(value, torch.Tensor) and value.dim() == 1:
                        value[closed] = 0


def median_ms(fn, reps: int) -> float:
    with torch.no_grad():
        return 1000 * median_seconds(fn, reps)


def tensor_bytes(module: nn.Module, dtype_bytes: int | None = None) -> int:
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        size = dtype_bytes if dtype_bytes is not None and t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total


def bench(name: str, make, example_shape, big_batch: int, reps: int, tmp: str) -> dict:
    torch.manual_seed(0)
    original = make().eval()
    inputs = ((torch.randn(2, *example_shape),), {})
    model = copy.deepcopy(original)
    simulate_training(model, inputs)

    fp32_path = os.path.join(tmp, f"{name}.fp32.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in original.state_dict().items()}, fp32_path)
    packed_path = os.path.join(tmp, f"{name}.sc.safetensors")
    start = time.perf_counter()
    save(model, packed_path, inputs)
    save_s = time.perf_counter() - start
    exact = exact_size(model, build_graph(model, inputs)).total_bytes

    compact, report, layers = compressed_codes(model, inputs)
    compact.eval()
    flat = {k: (v.codes.reshape(v.codes.shape[0], -1), v.widths) for k, v in layers.items()}
    start = time.perf_counter()
    packed = {k: pack_codes(c, w) for k, (c, w) in flat.items()}
    pack_s = time.perf_counter() - start
    start = time.perf_counter()
    unpacked = {k: unpack_codes(packed[k], w, c.shape[1]) for k, (c, w) in flat.items()}
    unpack_s = time.perf_counter() - start
    assert all(torch.equal(unpacked[k], flat[k][0]) for k in flat)
    start = time.perf_counter()
    loaded = load(packed_path, make()).eval()
    load_s = time.perf_counter() - start
    x1 = torch.randn(1, *example_shape)
    with torch.no_grad():
        bit_exact = bool(torch.equal(loaded(x1), compact(x1)))

    exported = bitsandbytes_from_codes(copy.deepcopy(compact), layers, dtype=torch.float32).eval()
    exported16 = bitsandbytes_from_codes(copy.deepcopy(compact), layers, dtype=torch.float16).eval()
    kinds: dict[str, int] = {}
    for module in exported.modules():
        kind = type(module).__name__
        if kind in ("Int8Linear", "FP4Linear", "BnbConv", "Linear", "Conv2d"):
            kind = f"{kind}[{module.bits}bit]" if kind == "BnbConv" else kind
            kinds[kind] = kinds.get(kind, 0) + 1
    xb = torch.randn(big_batch, *example_shape)
    with torch.no_grad():
        reference = compact(xb)
        bnb_diff = float((exported(xb) - reference).abs().max()) / max(float(reference.abs().max()), 1e-12)

    latency = {}
    for label, module in (("original", original), ("finalized", compact), ("bitsandbytes", exported)):
        latency[label] = {
            "batch_1": median_ms(lambda m=module: m(x1), reps),
            f"batch_{big_batch}": median_ms(lambda m=module: m(xb), max(3, reps // 4)),
        }
    weights = sum(v.codes.numel() for v in layers.values())
    return {
        "model": name,
        "parameters": sum(p.numel() for p in original.parameters()),
        "compressed_weights_kept": weights,
        "channels_removed": report.channels_removed,
        "fp32_state_dict_bytes": os.path.getsize(fp32_path),
        "file_bytes": os.path.getsize(packed_path),
        "exact_size_bytes": exact,
        "save_seconds": save_s,
        "load_seconds": load_s,
        "pack_seconds": pack_s,
        "unpack_seconds": unpack_s,
        "load_bit_exact": bit_exact,
        "bnb_layers": kinds,
        "bnb_bytes": storage_bytes(exported16),
        "fp16_finalized_bytes": tensor_bytes(compact, 2),
        "fp16_original_bytes": tensor_bytes(original, 2),
        "bnb_max_rel_diff": bnb_diff,
        "latency_ms": latency,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few seconds")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--mlp-hidden", type=int, default=11008)
    parser.add_argument("--mlp-dim", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 by default: on a shared, loaded machine more threads "
                             "make small ops wait for descheduled workers)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("command: python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), CPU only")
    if args.smoke:
        configs = [
            ("digits-cnn", digits_cnn, (1, 8, 8), 32, 3),
            ("mlp-128-344-128", lambda: mlp(128, 344), (128,), 16, 3),
        ]
    else:
        configs = [
            ("digits-cnn", digits_cnn, (1, 8, 8), 512, 50),
            ("resnet9", resnet9, (3, 32, 32), 128, 10),
            (f"mlp-{args.mlp_dim}-{args.mlp_hidden}-{args.mlp_dim}", lambda: mlp(args.mlp_dim, args.mlp_hidden),
             (args.mlp_dim,), 64, 8),
        ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make, shape, big, reps in configs:
            r = bench(name, make, shape, big, reps, tmp)
            results.append(r)
            lat = r["latency_ms"]
            print(f"\n== {name}: {r['parameters']:,} parameters, {r['channels_removed']} channels removed")
            print(f"  file bytes {r['file_bytes']:,} vs fp32 state_dict {r['fp32_state_dict_bytes']:,} "
                  f"({r['file_bytes'] / r['fp32_state_dict_bytes']:.1%}); exact_size {r['exact_size_bytes']:,}")
            print(f"  pack {r['pack_seconds'] * 1000:.1f} ms, unpack {r['unpack_seconds'] * 1000:.1f} ms "
                  f"({r['compressed_weights_kept']:,} codes); save {r['save_seconds']:.2f} s, "
                  f"load {r['load_seconds']:.2f} s, load bit-exact: {r['load_bit_exact']}")
            print(f"  bitsandbytes layers {r['bnb_layers']}; memory {r['bnb_bytes']:,} B vs fp16 finalized "
                  f"{r['fp16_finalized_bytes']:,} B, fp16 original {r['fp16_original_bytes']:,} B; "
                  f"max rel. output diff (fp32, eval) {r['bnb_max_rel_diff']:.2e}")
            for label, figures in lat.items():
                print(f"  latency {label:<13}" + "  ".join(f"{k} {v:8.2f} ms" for k, v in figures.items()))
    report = {
        "command": " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "models": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
