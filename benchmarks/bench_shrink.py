"""Shrinking while training vs masking only: epoch times, accuracy and size, in one run.

    python benchmarks/bench_shrink.py --epochs 40 --width 64 --out shrink.json --plot benchmarks/plots/shrink_epochs.png

Trains the digits CNN three ways with the same seed and data order: without the callback
(plain), with SelfCompress masking closed channels (``shrink_every=None``), and with
SelfCompress removing them each epoch (the default). Reports per-epoch CPU time, the
whole-run ratio, the callback's overhead over plain training in the first epochs (before
any channel closes), final accuracy and exact size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent / "examples")]

from common import add_run_arguments, header, write_json  # noqa: E402
from digits import Classifier, accuracy, digits_cnn, digits_loaders  # noqa: E402

import selfcompress  # noqa: E402


class EpochTimer(pl.Callback):
    """CPU time of this process for each training epoch, hooks included.

    With one thread, CPU time is what the epoch costs, whatever else the machine runs;
    wall time on a shared machine is not.
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.process_time()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.process_time() - self._start)


def run(mode: str, epochs: int, width: int, gamma: float, seed: int) -> dict:
    pl.seed_everything(seed, verbose=False)
    train_loader, test_loader = digits_loaders(seed=seed)
    # No dropout: its masks depend on layer widths, so a shrinking run would draw other masks.
    model = Classifier(digits_cnn(width, dropout=0.0))
    timer = EpochTimer()
    callbacks: list[pl.Callback] = [timer]
    compress = None
    if mode != "plain":
        compress = selfcompress.SelfCompress(
            gamma=gamma, shrink_every="epoch" if mode == "shrink" else None, print_report=False
        )
        callbacks.insert(0, compress)
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, train_loader)
    result = {"mode": mode, "epoch_seconds": timer.seconds, "total_seconds": sum(timer.seconds)}
    result["accuracy"] = accuracy(model, test_loader)
    if compress is not None:
        size = compress.size()
        result.update(exact_bytes=size.total_bytes, fraction=size.fraction_of_fp32, channels_open=size.channels_open)
    result["parameters"] = sum(
        p.numel() for n, p in model.named_parameters() if not n.endswith(("bits", "exponent"))
    )
    return result


def plot(results: dict[str, dict], path: Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    for mode, result in results.items():
        seconds = result["epoch_seconds"]
        axis.plot(range(1, len(seconds) + 1), seconds, marker=".", label=f"{mode} ({result['total_seconds']:.0f} s)")
    axis.set_xlabel("epoch")
    axis.set_ylabel(f"epoch CPU time (s, {threads} thread(s))")
    axis.set_title("Digits CNN: shrinking while training vs masking")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--gamma", type=float, default=0.05)
    add_run_arguments(parser, smoke_help="two epochs at width 8")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs, width = (2, 8) if args.smoke else (args.epochs, args.width)

    results = {mode: run(mode, epochs, width, args.gamma, args.seed) for mode in ("plain", "mask", "shrink")}
    plain, mask, shrink = results["plain"], results["mask"], results["shrink"]
    warmup = max(1, min(3, epochs // 4))
    overhead = sum(mask["epoch_seconds"][:warmup]) / sum(plain["epoch_seconds"][:warmup]) - 1
    print(header())
    print(f"digits CNN width {width}, {epochs} epochs, gamma {args.gamma}, {args.threads} thread(s)")
    for mode, r in results.items():
        size = f", {r['exact_bytes']:,} bytes ({r['fraction']:.2%} of fp32)" if "exact_bytes" in r else ""
        print(f"{mode:>7}: {r['total_seconds']:7.1f} s, accuracy {r['accuracy']:.2%}, "
              f"{r['parameters']:,} parameters at the end{size}")  # fmt: skip
    print(f"shrink / mask whole run: {shrink['total_seconds'] / mask['total_seconds']:.2f} "
          f"({1 - shrink['total_seconds'] / mask['total_seconds']:.0%} faster)")  # fmt: skip
    print(f"last epoch vs first (shrink): {shrink['epoch_seconds'][-1] / shrink['epoch_seconds'][0]:.2f}")
    print(f"callback overhead over plain training, first {warmup} epoch(s): {overhead:+.1%}")
    summary = {"results": results, "overhead_first_epochs": overhead,
               "shrink_over_mask": shrink["total_seconds"] / mask["total_seconds"]}  # fmt: skip
    write_json(args.out, summary)
    if args.plot:
        plot(results, Path(args.plot), args.threads)
    return summary


if __name__ == "__main__":
    main()
