"""Does gamma mean the same thing at every scale? One architecture at widths x1, x4 and x16.

Trains the digits CNN and a digits MLP (no batch norm) at three widths under one gamma and
prints the bits per weight (and how they split into weights kept and bits per kept weight),
the size as a fraction of fp32 and the test accuracy of each beside its fp32 twin's::

    python benchmarks/bench_scale.py --epochs 20 --gamma 0.05 --out scale.json

``--kinds mlp-bn`` adds the same MLP with a batch norm after each hidden layer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent / "examples")]

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from common import add_run_arguments, header, write_json  # noqa: E402
from digits import Classifier, accuracy, digits_cnn, digits_loaders  # noqa: E402
from torch import nn  # noqa: E402

import selfcompress  # noqa: E402
from selfcompress.quantize import LEVELS  # noqa: E402


def digits_mlp(hidden: int) -> nn.Sequential:
    """Two hidden linear layers over the 64 pixels, no normalisation."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )


def digits_mlp_bn(hidden: int) -> nn.Sequential:
    """The same MLP with a batch norm after each hidden linear layer."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )


ARCHITECTURES = {"cnn": (digits_cnn, 8), "mlp": (digits_mlp, 32), "mlp-bn": (digits_mlp_bn, 32)}
DEFAULT_KINDS = ["cnn", "mlp"]


def fit(kind: str, scale: int, epochs: int, seed: int, callbacks: list) -> tuple[float, float]:
    """Train one net of ``kind`` at ``scale``: its test accuracy and the seconds it took."""
    build, base = ARCHITECTURES[kind]
    pl.seed_everything(seed, verbose=False)
    train_loader, test_loader = digits_loaders(seed=seed)
    model = Classifier(build(base * scale))
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    start = time.perf_counter()
    trainer.fit(model, train_loader)
    return accuracy(model, test_loader), time.perf_counter() - start


def run(kind: str, scale: int, epochs: int, gamma: float, seed: int, levels: str = "paper") -> dict:
    """One net compressed under ``gamma``, beside its fp32 twin (same seed and epochs)."""
    callback = selfcompress.SelfCompress(gamma=gamma, levels=levels, print_report=False)
    compressed_accuracy, seconds = fit(kind, scale, epochs, seed, [callback])
    fp32_accuracy, _ = fit(kind, scale, epochs, seed, [])
    size = callback.size()
    return dict(
        kind=kind,
        scale=scale,
        width=ARCHITECTURES[kind][1] * scale,
        weights=size.weights_total,
        weights_kept=size.weights_kept / size.weights_total,
        bits_per_weight=size.bits_per_weight,
        bits_per_kept_weight=size.bits_per_weight * size.weights_total / max(size.weights_kept, 1),
        fraction=size.fraction_of_fp32,
        accuracy=compressed_accuracy,
        fp32_accuracy=fp32_accuracy,
        seconds=seconds,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--gamma", type=float, default=0.05)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--kinds", nargs="+", default=DEFAULT_KINDS, choices=list(ARCHITECTURES))
    parser.add_argument("--levels", default="paper", choices=LEVELS, help="SelfCompress(levels=...)")
    add_run_arguments(parser, smoke_help="one epoch at scales 1 and 4", plot=False)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs, scales = (1, [1, 4]) if args.smoke else (args.epochs, args.scales)

    rows = [run(kind, scale, epochs, args.gamma, args.seed, args.levels) for kind in args.kinds for scale in scales]
    print(header())
    print(f"digits, {epochs} epochs, gamma {args.gamma}, levels {args.levels}, seed {args.seed}; kept: share of the "
          "weights left after closing channels; seconds: the compressed run")
    print(f"{'net':>6} {'scale':>5} {'weights':>10} {'kept':>7} {'bits/weight':>11} {'bits/kept':>9} "
          f"{'of fp32':>8} {'accuracy':>9} {'fp32 acc.':>9} {'seconds':>8}")
    for r in rows:
        print(
            f"{r['kind']:>6} {'x' + str(r['scale']):>5} {r['weights']:>10,} {r['weights_kept']:>7.1%} "
            f"{r['bits_per_weight']:>11.3f} {r['bits_per_kept_weight']:>9.3f} {r['fraction']:>8.2%} "
            f"{r['accuracy']:>9.2%} {r['fp32_accuracy']:>9.2%} {r['seconds']:>8.0f}"
        )
    results = {"epochs": epochs, "gamma": args.gamma, "levels": args.levels, "runs": rows}
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
