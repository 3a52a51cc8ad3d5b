"""MNIST CNN: test accuracy against size in bytes, fp32 baseline vs SelfCompress over a gamma sweep.

Reads the standard IDX files from ``--data-dir`` (default ``../shared/datasets/mnist``
beside the repository) and skips cleanly when they are absent. Settings:

- default (short, CPU): 2 epochs of the 60,000 training images at batch 128 (938 steps),
  gammas 0.02 and 0.1;
- ``--full`` (GPU, or hours of CPU): 20,000 steps of batch 512 (the reference notebook's
  budget), gammas 0.005, 0.01, 0.02, 0.05, 0.1;
- ``--smoke`` (seconds): 512 training images, 1 epoch, 1,000 test images, one gamma.

    python benchmarks/bench_mnist.py --out mnist.json --plot benchmarks/plots/mnist_accuracy_vs_bytes.png
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent / "examples")]

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from common import add_run_arguments, header, size_accuracy_axes, write_json  # noqa: E402
from digits import Classifier, accuracy  # noqa: E402
from mnist import mnist, mnist_cnn  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

import selfcompress  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "mnist"
REFERENCE = {"accuracy": 0.9820, "bytes": 18075, "steps": 20000, "batch_size": 512,
             "note": "public notebook, another framework; bytes estimated from bits, not a packed file"}


def have_data(data_dir: Path) -> bool:
    return (Path(data_dir) / "train-images-idx3-ubyte.gz").exists()


def floats(text: str) -> list[float]:
    """``"0.02,0.1"`` -> ``[0.02, 0.1]``, ``""`` -> ``[]`` (an argparse type)."""
    return [float(v) for v in text.split(",")] if text else []


def skip_without_data(data_dir: Path) -> dict | None:
    """None when ``data_dir`` holds MNIST; else says so and returns the benchmark's "skipped" result."""
    if have_data(data_dir):
        return None
    print(f"skipped: no MNIST IDX files in {data_dir} (pass --data-dir)")
    return {"skipped": f"no MNIST data in {data_dir}"}


def loaders(data_dir: Path, batch_size: int, train_subset: int | None, test_subset: int | None, seed: int):
    """Train / test loaders; subsets are the first N images (MNIST is shuffled already)."""
    train, test = mnist(Path(data_dir), "train"), mnist(Path(data_dir), "t10k")
    if train_subset:
        train = Subset(train, range(min(train_subset, len(train))))
    if test_subset:
        test = Subset(test, range(min(test_subset, len(test))))
    generator = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator, drop_last=True),
            DataLoader(test, batch_size=1000))


def trainer(epochs: int | None = None, max_steps: int = -1, callbacks=()) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs if epochs is not None else -1, max_steps=max_steps,
                      callbacks=list(callbacks), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="auto", devices=1)


def make_callback(gamma: float, **kwargs) -> selfcompress.SelfCompress:
    """``SelfCompress(gamma)`` with its defaults, quiet (no end-of-fit report) where the version allows."""
    if "print_report" in inspect.signature(selfcompress.SelfCompress).parameters:
        kwargs.setdefault("print_report", False)
    return selfcompress.SelfCompress(gamma=gamma, **kwargs)


def fixed_bits_callback(bits: int, levels: str = "paper") -> selfcompress.SelfCompress:
    """Fixed-bit quantization-aware training with our quantizer: every channel at ``bits``, scales learned.

    No size penalty (gamma 0) and a bit-depth learning rate too small to move a depth
    (at most 1e-9 a step), so only the exponents and the weights train. ``bits=1`` with
    ``levels="signs"`` holds every weight's sign times its channel's scale.
    """
    return make_callback(0.0, initial_bits=float(bits), levels=levels, bits_lr=1e-9, shrink_every=None)


def fit(train_loader, epochs: int, gamma: float | None, seed: int, max_steps: int = -1, net: nn.Module | None = None,
        extra_callbacks=()):
    """Train ``mnist_cnn`` (or ``net``); ``gamma=None`` trains fp32. Returns model, callback, seconds, steps.

    Runs of one process share ``train_loader``, so each run's shuffle goes on from where the
    previous run's stopped: a figure is reproduced by its whole command, not by its run alone
    (kept so for this benchmark's and ``bench_peers``' recorded figures; ``bench_pareto`` and
    ``bench_cifar`` reseed the shuffle before every run).
    """
    pl.seed_everything(seed, verbose=False)
    model = Classifier(net if net is not None else mnist_cnn())
    callback = make_callback(gamma) if gamma is not None else None
    t = trainer(epochs, max_steps, ([callback] if callback else []) + list(extra_callbacks))
    start = time.perf_counter()
    t.fit(model, train_loader)
    model.cpu()
    return model, callback, time.perf_counter() - start, t.global_step


def state_dict_bytes(module: nn.Module) -> int:
    """Real on-disk bytes of ``torch.save(module.state_dict())``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        torch.save(module.state_dict(), path)
        return path.stat().st_size


def packed_file_bytes(
    net: nn.Module, example: torch.Tensor, entropy_coding: str | None = None
) -> tuple[int | None, str]:
    """Bytes of the file ``selfcompress.io.save`` writes, or (None, reason)."""
    try:
        from selfcompress.io import save
    except ImportError as error:  # pragma: no cover - depends on the installed package
        return None, f"not measured: packed writer unavailable ({error})"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        try:
            save(net, path, entropy_coding=entropy_coding)
        except ValueError:
            save(net, path, inputs=((example,), {}), entropy_coding=entropy_coding)
        return path.stat().st_size, "selfcompress.io.save"


def evaluate_selfcompress(model: Classifier, callback, test_loader, example: torch.Tensor) -> dict:
    size = callback.size()
    compact = selfcompress.finalize(model.net)
    packed, packed_how = packed_file_bytes(model.net, example)
    coded, _ = packed_file_bytes(model.net, example, entropy_coding="lzma")
    return dict(accuracy=accuracy(model, test_loader), finalized_accuracy=accuracy(compact, test_loader),
                exact_bytes=size.total_bytes, packed_file_bytes=packed, packed_file_note=packed_how,
                entropy_file_bytes=coded,
                fraction_of_fp32_bits=size.fraction_of_fp32, bits_per_weight=size.bits_per_weight,
                weights_kept=size.weights_kept, weights_total=size.weights_total,
                params_finalized=sum(p.numel() for p in compact.parameters()),
                channels_open=size.channels_open, channels_total=size.channels_total)


def setting(args) -> dict:
    if args.smoke:
        return dict(name="smoke", epochs=1, max_steps=-1, batch_size=128, train_subset=512, test_subset=1000,
                    gammas=[0.1])
    if args.full:
        return dict(name="full (GPU)", epochs=None, max_steps=20000, batch_size=512, train_subset=None,
                    test_subset=None, gammas=[0.005, 0.01, 0.02, 0.05, 0.1])
    return dict(name="short (CPU)", epochs=args.epochs, max_steps=-1, batch_size=args.batch_size,
                train_subset=args.train_subset, test_subset=None, gammas=args.gammas)


def parser_with_common(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=2, help="short setting: epochs")
    parser.add_argument("--batch-size", type=int, default=128, help="short setting: batch size")
    parser.add_argument("--train-subset", type=int, default=None, help="short setting: first N training images")
    add_run_arguments(parser, full_help="the reference budget; for a GPU")
    return parser


def plot(path: str, rows: list[dict], title: str) -> None:
    with size_accuracy_axes(path, title, "size in bytes (log)", "MNIST test accuracy (%)", size=(6, 4)) as ax:
        for row in rows:
            ax.scatter(row["bytes"], 100 * row["accuracy"], marker=row.get("marker", "o"), label=row["label"], s=40,
                       c=row.get("color"))
        ax.scatter(REFERENCE["bytes"], 100 * REFERENCE["accuracy"], marker="*", s=120, c="k",
                   label="reference notebook (20k steps x 512, estimated bytes)")


def main(argv: list[str] | None = None) -> dict:
    parser = parser_with_common(__doc__)
    parser.add_argument("--gammas", type=floats, default=[0.02, 0.1],
                        help="short setting: comma-separated gammas")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if skipped := skip_without_data(args.data_dir):
        return skipped
    cfg = setting(args)
    train_loader, test_loader = loaders(args.data_dir, cfg["batch_size"], cfg["train_subset"], cfg["test_subset"],
                                        args.seed)
    example = next(iter(test_loader))[0][:2]

    rows = []
    base, _, seconds, steps = fit(train_loader, cfg["epochs"], None, args.seed, cfg["max_steps"])
    params = sum(p.numel() for p in base.net.parameters())
    fp32_bytes = 4 * params
    rows.append(dict(method="fp32", gamma=None, steps=steps, seconds=seconds, accuracy=accuracy(base, test_loader),
                     exact_bytes=fp32_bytes, state_dict_file_bytes=state_dict_bytes(base.net), params=params))
    for gamma in cfg["gammas"]:
        model, callback, seconds, steps = fit(train_loader, cfg["epochs"], gamma, args.seed, cfg["max_steps"])
        rows.append(dict(method="selfcompress", gamma=gamma, steps=steps, seconds=seconds,
                         **evaluate_selfcompress(model, callback, test_loader, example)))

    print(header())
    print(f"MNIST CNN ({params:,} weights), setting {cfg['name']}: {rows[0]['steps']} steps of batch "
          f"{cfg['batch_size']}, {len(train_loader.dataset):,} training images, {len(test_loader.dataset):,} test")
    print(f"{'method':<14}{'gamma':>7}{'steps':>7}{'accuracy':>10}{'finalized':>10}{'exact bytes':>13}"
          f"{'packed file':>13}{'lzma file':>11}{'of fp32':>9}{'seconds':>9}")
    for r in rows:
        gamma = "" if r["gamma"] is None else f"{r['gamma']:g}"
        packed = r.get("packed_file_bytes")
        print(f"{r['method']:<14}{gamma:>7}{r['steps']:>7}{r['accuracy']:>10.2%}"
              f"{r.get('finalized_accuracy', r['accuracy']):>10.2%}{r['exact_bytes']:>13,}"
              f"{packed or r.get('state_dict_file_bytes') or 0:>13,}{r.get('entropy_file_bytes') or 0:>11,}"
              f"{r['exact_bytes'] / fp32_bytes:>9.2%}{r['seconds']:>9.1f}")
    print(f"reference: {REFERENCE['accuracy']:.2%} at ~{REFERENCE['bytes']:,} bytes after "
          f"{REFERENCE['steps']:,} steps of batch {REFERENCE['batch_size']} ({REFERENCE['note']})")
    results = {"benchmark": "mnist", "setting": cfg, "reference": REFERENCE, "fp32_bytes": fp32_bytes, "runs": rows}
    if args.plot:
        points = [dict(bytes=r["exact_bytes"], accuracy=r["accuracy"], color=f"C{i}",
                       label=f"fp32 ({r['steps']} steps)" if r["gamma"] is None
                       else f"SelfCompress gamma {r['gamma']:g} ({r['steps']} steps), exact bytes")
                  for i, r in enumerate(rows)]
        points += [dict(bytes=r["packed_file_bytes"], accuracy=r["finalized_accuracy"], marker="x", color=f"C{i}",
                        label=f"SelfCompress gamma {r['gamma']:g}, packed file")
                   for i, r in enumerate(rows) if r.get("packed_file_bytes")]
        plot(args.plot, points, f"MNIST CNN, {cfg['name']} setting, {rows[0]['steps']} steps of batch "
                               f"{cfg['batch_size']}; {header().splitlines()[1]}")
        results["plot"] = args.plot
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
