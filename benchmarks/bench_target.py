"""Target-size mode: train to three size targets without choosing gamma; report size reached.

    python benchmarks/bench_target.py --epochs 60 --targets 12KB 8KiB 2%
    python benchmarks/bench_target.py --dataset mnist --epochs 3 --targets 16KB 12KiB 3%
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent / "examples")]

from bench_mnist import DEFAULT_DATA, have_data  # noqa: E402
from bench_mnist import loaders as mnist_loaders  # noqa: E402
from common import add_run_arguments, header, write_json  # noqa: E402
from digits import Classifier, accuracy, digits_cnn, digits_loaders  # noqa: E402
from mnist import mnist_cnn  # noqa: E402

import selfcompress  # noqa: E402


def run(target: str, epochs: int, seed: int, dataset: str = "digits", data_dir: Path = DEFAULT_DATA) -> dict:
    pl.seed_everything(seed, verbose=False)
    if dataset == "mnist":
        train_loader, test_loader = mnist_loaders(data_dir, 128, None, None, seed)
        model = Classifier(mnist_cnn())
    else:
        train_loader, test_loader = digits_loaders(seed=seed)
        model = Classifier(digits_cnn())
    callback = selfcompress.SelfCompress(target_size=target, print_report=False)
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, train_loader)
    size = callback.size()
    target_bits = selfcompress.parse_target_size(target, size.fp32_bits, size.weights_total)
    return {
        "target": target,
        "target_bytes": target_bits / 8,
        "reached_bytes": size.total_bytes,
        "relative_gap": size.total_bits / target_bits - 1,
        "accuracy": accuracy(model, test_loader),
        "final_gamma": callback.gamma,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--targets", nargs="+", default=["12KB", "8KiB", "2%"])
    parser.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="MNIST IDX files (for --dataset mnist)")
    add_run_arguments(parser, smoke_help="two epochs, one target", plot=False)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.dataset == "mnist" and not have_data(args.data_dir):
        parser.error(f"--data-dir {args.data_dir} holds no MNIST IDX files")
    epochs, targets = (2, args.targets[:1]) if args.smoke else (args.epochs, args.targets)
    rows = [run(target, epochs, args.seed, args.dataset, args.data_dir) for target in targets]
    print(header())
    print(f"{args.dataset} CNN, {epochs} epochs, target-size mode")
    print(f"{'target':>8} {'target bytes':>13} {'reached':>9} {'gap':>7} {'accuracy':>9} {'gamma':>9}")
    for r in rows:
        print(f"{r['target']:>8} {r['target_bytes']:>13,.0f} {r['reached_bytes']:>9,} {r['relative_gap']:>+7.1%} "
              f"{r['accuracy']:>9.2%} {r['final_gamma']:>9.4f}")  # fmt: skip
    results = {"dataset": args.dataset, "epochs": epochs, "runs": rows}
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
