"""Export figures on CPU: packed file size, entropy coding, pack/unpack time, bitsandbytes memory, latency.

    python benchmarks/bench_export.py --out export.json      # digits CNN, ResNet-9, MLP 4096-11008-4096
    python benchmarks/bench_export.py --smoke --out s.json   # tiny versions, a few seconds
    python benchmarks/bench_export.py --trained --skip-latency --out files.json   # trained codes, file figures

With ``--trained`` the networks are trained briefly with ``SelfCompress`` instead: the
digits CNN by ``examples/digits.py``'s ``train`` (real digits, ``--digits-epochs``), the
MNIST CNN (``examples/mnist.py``) and the ResNet-9 of ``tests/models.py`` (default widths)
for ``--train-steps`` steps on synthetic data labelled by a random teacher of the same
architecture (no dataset download): real learned bit depths and weight distributions.

Each model stands in for a trained one: every layer gets per-channel bit depths drawn
from 2..8 (exponents set so the largest weight just fits), and a quarter of the channels
of the layers whose channels can be removed are closed with their constants zeroed. The
script prints the command, the machine, and per model: the packed file against a float32
safetensors state dict, the exact size it should match, the entropy-coded file and code
stream (``save(..., entropy_coding="lzma")``) with its encode and decode time, pack/unpack
and save/load time,
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
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from common import header, median_seconds  # noqa: E402

from selfcompress.bnb import bitsandbytes_from_codes, storage_bytes  # noqa: E402
from selfcompress.entropy import decode_codes, encode_codes  # noqa: E402
from selfcompress.finalize import compressed  # noqa: E402
from selfcompress.graph import build_graph  # noqa: E402
from selfcompress.io import load, save  # noqa: E402
from selfcompress.layers import prepare  # noqa: E402
from selfcompress.packing import pack_codes, unpack_codes  # noqa: E402
from selfcompress.quantize import initial_exponent  # noqa: E402
from selfcompress.report import entropy_size  # noqa: E402
from selfcompress.size import exact_size, packed_size  # noqa: E402

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
        conv_bn(3, w),
        conv_bn(w, 2 * w, pool=True),
        Residual(2 * w),
        conv_bn(2 * w, 4 * w, pool=True),
        conv_bn(4 * w, 8 * w, pool=True),
        Residual(8 * w),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(8 * w, classes),
    )


def digits_cnn() -> nn.Module:
    """A CNN for 8x8 digit images (sklearn digits sized)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 2 * 2, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
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


def bench(
    name: str, make, example_shape, big_batch: int, reps: int, tmp: str, trained=None, latency: bool = True
) -> dict:
    """Figures of one network; ``trained`` (a trained network and its inputs) replaces simulated training."""
    torch.manual_seed(0)
    original = make().eval()
    if trained is None:
        inputs = ((torch.randn(2, *example_shape),), {})
        model = copy.deepcopy(original)
        simulate_training(model, inputs)
    else:
        model, inputs = trained

    fp32_path = os.path.join(tmp, f"{name}.fp32.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in original.state_dict().items()}, fp32_path)
    packed_path = os.path.join(tmp, f"{name}.sc.safetensors")
    start = time.perf_counter()
    save(model, packed_path, inputs)
    save_s = time.perf_counter() - start
    exact = exact_size(model, build_graph(model, inputs)).total_bytes

    compact, report, layers = compressed(model, inputs)
    compact.eval()
    flat = {k: (v.stored[0], v.widths) for k, v in layers.items()}
    start = time.perf_counter()
    packed = {k: pack_codes(c, w) for k, (c, w) in flat.items()}
    pack_s = time.perf_counter() - start
    start = time.perf_counter()
    unpacked = {k: unpack_codes(packed[k], w, c.shape[1]) for k, (c, w) in flat.items()}
    unpack_s = time.perf_counter() - start
    assert all(torch.equal(unpacked[k], flat[k][0]) for k in flat)
    codes, widths = [c for c, _ in flat.values()], [w for _, w in flat.values()]
    start = time.perf_counter()
    stream = encode_codes(codes, widths, "lzma")
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    decoded = decode_codes(stream, widths, [c.shape[1] for c in codes], "lzma")
    decode_s = time.perf_counter() - start
    assert all(torch.equal(a, b) for a, b in zip(decoded, codes, strict=True))
    coded_path = os.path.join(tmp, f"{name}.lzma.safetensors")
    save(model, coded_path, inputs, entropy_coding="lzma")
    start = time.perf_counter()
    coded = load(coded_path, make()).eval()
    load_coded_s = time.perf_counter() - start
    start = time.perf_counter()
    loaded = load(packed_path, make()).eval()
    load_s = time.perf_counter() - start
    x1 = torch.randn(1, *example_shape)
    with torch.no_grad():
        bit_exact = bool(torch.equal(loaded(x1), compact(x1))) and bool(torch.equal(coded(x1), compact(x1)))
    weights = sum(v.codes.numel() for v in layers.values())
    figures = {
        "model": name,
        "codes": "trained" if trained is not None else "simulated",
        "parameters": sum(p.numel() for p in original.parameters()),
        "compressed_weights_kept": weights,
        "channels_removed": report.channels_removed,
        "fp32_state_dict_bytes": os.path.getsize(fp32_path),
        "file_bytes": os.path.getsize(packed_path),
        "exact_size_bytes": exact,
        "compact_exact_bytes": packed_size(compact, {k: v.widths for k, v in layers.items()}).total_bytes,
        "entropy_bytes": entropy_size(compact, layers, "lzma"),
        "entropy_file_bytes": os.path.getsize(coded_path),
        "packed_code_bytes": sum(p.numel() for p in packed.values()),
        "entropy_code_bytes": len(stream),
        "encode_seconds": encode_s,
        "decode_seconds": decode_s,
        "load_entropy_seconds": load_coded_s,
        "save_seconds": save_s,
        "load_seconds": load_s,
        "pack_seconds": pack_s,
        "unpack_seconds": unpack_s,
        "load_bit_exact": bit_exact,
    }
    if not latency:
        return figures

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
    return {
        **figures,
        "bnb_layers": kinds,
        "bnb_bytes": storage_bytes(exported16),
        "fp16_finalized_bytes": tensor_bytes(compact, 2),
        "fp16_original_bytes": tensor_bytes(original, 2),
        "bnb_max_rel_diff": bnb_diff,
        "latency_ms": latency,
    }


def train_teacher(make, shape, steps: int, seed: int = 0):
    """``make()`` trained ``steps`` steps with SelfCompress on inputs labelled by a random teacher."""
    import lightning.pytorch as pl
    from digits import Classifier
    from torch.utils.data import DataLoader, TensorDataset

    import selfcompress

    pl.seed_everything(seed, verbose=False)
    teacher = make().eval()
    xs = torch.randn(2048, *shape)
    with torch.no_grad():
        ys = teacher(xs).argmax(1)
    model = Classifier(make())
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[selfcompress.SelfCompress(gamma=0.05)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(xs, ys), batch_size=64, shuffle=True))
    return model.net.cpu().eval(), ((xs[:2],), {})


def trained_configs(steps: int, digits_epochs: int) -> list:
    """(name, make, shape, big batch, reps, trained) of the briefly trained networks."""
    from digits import digits_cnn as example_digits_cnn
    from digits import train as train_digits
    from mnist import mnist_cnn

    from tests.models import ResNet9

    digits_model, _, _ = train_digits(digits_epochs, gamma=0.06)
    digits = (digits_model.net.cpu().eval(), ((torch.randn(2, 1, 8, 8),), {}))
    return [
        ("digits-cnn-trained", example_digits_cnn, (1, 8, 8), 256, 20, digits),
        ("mnist-cnn-trained", mnist_cnn, (1, 28, 28), 128, 10, train_teacher(mnist_cnn, (1, 28, 28), steps)),
        ("resnet9-small-trained", ResNet9, (3, 32, 32), 128, 10, train_teacher(ResNet9, (3, 32, 32), steps)),
    ]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few seconds")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--mlp-hidden", type=int, default=11008)
    parser.add_argument("--mlp-dim", type=int, default=4096)
    parser.add_argument(
        "--trained",
        action="store_true",
        help="briefly trained digits CNN, MNIST CNN and small ResNet-9 instead of simulated codes",
    )
    parser.add_argument("--train-steps", type=int, default=400, help="with --trained: steps per synthetic-data run")
    parser.add_argument("--digits-epochs", type=int, default=15, help="with --trained: digits CNN epochs")
    parser.add_argument("--models", default=None, help="comma-separated names: run only these networks")
    parser.add_argument("--skip-latency", action="store_true", help="file figures only: no bitsandbytes or latency")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 by default: on a shared, loaded machine more threads "
        "make small ops wait for descheduled workers)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(header() + ", CPU only")
    if args.trained:
        sys.path.insert(0, os.path.join(ROOT, "examples"))
        sys.path.insert(0, ROOT)
        configs = trained_configs(args.train_steps, args.digits_epochs)
    elif args.smoke:
        configs = [
            ("digits-cnn", digits_cnn, (1, 8, 8), 32, 3),
            ("mlp-128-344-128", lambda: mlp(128, 344), (128,), 16, 3),
        ]
    else:
        configs = [
            ("digits-cnn", digits_cnn, (1, 8, 8), 512, 50),
            ("resnet9", resnet9, (3, 32, 32), 128, 10),
            (
                f"mlp-{args.mlp_dim}-{args.mlp_hidden}-{args.mlp_dim}",
                lambda: mlp(args.mlp_dim, args.mlp_hidden),
                (args.mlp_dim,),
                64,
                8,
            ),
        ]
    if args.models:
        configs = [config for config in configs if config[0] in args.models.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make, shape, big, reps, *trained in configs:
            r = bench(name, make, shape, big, reps, tmp, trained[0] if trained else None, not args.skip_latency)
            results.append(r)
            print(
                f"\n== {name} ({r['codes']} codes): {r['parameters']:,} parameters, "
                f"{r['channels_removed']} channels removed"
            )
            exact = r["compact_exact_bytes"]
            print(
                f"  file bytes {r['file_bytes']:,} vs fp32 state_dict {r['fp32_state_dict_bytes']:,} "
                f"({r['file_bytes'] / r['fp32_state_dict_bytes']:.1%}); exact bytes {exact:,} "
                f"(training model's exact_size {r['exact_size_bytes']:,}) "
                f"(container +{r['file_bytes'] - exact:,} B, {(r['file_bytes'] - exact) / exact:+.1%})"
            )
            print(
                f"  entropy-coded file bytes {r['entropy_file_bytes']:,} ({r['entropy_file_bytes'] / exact:.3f}x "
                f"exact; report's entropy bytes {r['entropy_bytes']:,}); "
                f"codes {r['packed_code_bytes']:,} B packed -> {r['entropy_code_bytes']:,} B lzma, "
                f"encode {r['encode_seconds'] * 1000:.1f} ms, decode {r['decode_seconds'] * 1000:.1f} ms, "
                f"load {r['load_entropy_seconds'] * 1000:.1f} ms"
            )
            if args.skip_latency:
                print(
                    f"  save {r['save_seconds']:.2f} s, load {r['load_seconds']:.2f} s, "
                    f"load bit-exact: {r['load_bit_exact']}"
                )
                continue
            lat = r["latency_ms"]
            print(
                f"  pack {r['pack_seconds'] * 1000:.1f} ms, unpack {r['unpack_seconds'] * 1000:.1f} ms "
                f"({r['compressed_weights_kept']:,} codes); save {r['save_seconds']:.2f} s, "
                f"load {r['load_seconds']:.2f} s, load bit-exact: {r['load_bit_exact']}"
            )
            print(
                f"  bitsandbytes layers {r['bnb_layers']}; memory {r['bnb_bytes']:,} B vs fp16 finalized "
                f"{r['fp16_finalized_bytes']:,} B, fp16 original {r['fp16_original_bytes']:,} B; "
                f"max rel. output diff (fp32, eval) {r['bnb_max_rel_diff']:.2e}"
            )
            for label, figures in lat.items():
                print(f"  latency {label:<13}" + "  ".join(f"{k} {v:8.2f} ms" for k, v in figures.items()))
    report = {
        "command": " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "models": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
