"""Does gamma mean the same thing at every scale? One architecture at widths x1, x4 and x16.

Trains the digits CNN and a digits MLP (no batch norm) at three widths under one gamma and
prints the bits per weight, the size as a fraction of fp32 and the test accuracy of each::

    python benchmarks/bench_scale.py --epochs 20 --gamma 0.05 --out scale.json
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


def digits_mlp(hidden: int) -> nn.Sequential:
    """Two hidden linear layers over the 64 pixels, no normalisation."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )


ARCHITECTURES = {"cnn": (digits_cnn, 8), "mlp": (digits_mlp, 32)}


def run(kind: str, scale: int, epochs: int, gamma: float, seed: int) -> dict:
    build, base = ARCHITECTURES[kind]
    pl.seed_everything(seed, verbose=False)
    train_loader, test_loader = digits_loaders(seed=seed)
    model = Classifier(build(base * scale))
    callback = selfcompress.SelfCompress(gamma=gamma, print_report=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    start = time.perf_counter()
    trainer.fit(model, train_loader)
    size = callback.size()
    return dict(
        kind=kind,
        scale=scale,
        width=base * scale,
        weights=size.weights_total,
        bits_per_weight=size.bits_per_weight,
        fraction=size.fraction_of_fp32,
        accuracy=accuracy(model, test_loader),
        seconds=time.perf_counter() - start,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--gamma", type=float, default=0.05)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--kinds", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    add_run_arguments(parser, smoke_help="one epoch at scales 1 and 4", plot=False)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs, scales = (1, [1, 4]) if args.smoke else (args.epochs, args.scales)

    rows = [run(kind, scale, epochs, args.gamma, args.seed) for kind in args.kinds for scale in scales]
    print(header())
    print(f"digits, {epochs} epochs, gamma {args.gamma}, seed {args.seed}")
    print(f"{'net':>4} {'scale':>5} {'weights':>10} {'bits/weight':>11} {'of fp32':>8} {'accuracy':>9} {'seconds':>8}")
    for r in rows:
        print(
            f"{r['kind']:>4} {'x' + str(r['scale']):>5} {r['weights']:>10,} {r['bits_per_weight']:>11.3f} "
            f"{r['fraction']:>8.2%} {r['accuracy']:>9.2%} {r['seconds']:>8.0f}"
        )
    results = {"epochs": epochs, "gamma": args.gamma, "runs": rows}
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
