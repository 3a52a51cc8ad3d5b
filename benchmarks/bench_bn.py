"""Eval-mode accuracy during a compressed fit against the same model with re-estimated batch norms.

At every epoch end (after the callback's own hooks) the test accuracy of the model in eval
mode is compared with that of a copy whose batch-norm statistics are re-estimated on the
whole training set with the current weights. With ``bn_samples=0`` (no re-estimation) the
gap is what a validation loop or a checkpoint would have seen. A second copy, re-estimated
on another shuffle of the same images, shows how far two equally valid re-estimates differ:
the floor under which the gap cannot be read.

    python benchmarks/bench_bn.py --nets digits resnet9 mobilenetv2 --bn-samples 0 2048

``--gammas`` sweeps gamma instead of each network's default, and ``--fp32`` also trains
each network without the callback (same seed, data and epochs), so that the final
accuracies can be read against the uncompressed network's.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from common import header  # noqa: E402
from digits import Classifier, accuracy, digits_cnn, digits_loaders  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import selfcompress  # noqa: E402
from selfcompress.batchnorm import reestimate_batch_norm  # noqa: E402
from selfcompress.layers import INITIAL_BITS  # noqa: E402
from selfcompress.quantize import LEVELS  # noqa: E402
from tests.models import MobileNetV2, ResNet9  # noqa: E402

#: name -> (network factory, input channels, epochs, gamma)
NETS = {
    "digits": (lambda: digits_cnn(32), 1, 60, 0.09),  # the example's default
    "resnet9": (lambda: ResNet9(), 3, 20, 0.1),
    "mobilenetv2": (lambda: MobileNetV2(), 3, 20, 0.1),
}


def loaders(channels: int, seed: int) -> tuple[DataLoader, DataLoader]:
    """The digits loaders, with the image repeated over ``channels``."""
    train, test = digits_loaders(seed=seed)
    if channels == 1:
        return train, test

    def widen(dataset: TensorDataset) -> TensorDataset:
        x, y = dataset.tensors
        return TensorDataset(x.expand(-1, channels, -1, -1).contiguous(), y)

    generator = torch.Generator().manual_seed(seed)
    return (
        DataLoader(widen(train.dataset), batch_size=train.batch_size, shuffle=True, generator=generator),
        DataLoader(widen(test.dataset), batch_size=test.batch_size),
    )


class EvalVersusReestimated(pl.Callback):
    """At each epoch end: eval accuracy of the model as it is, and of a copy with re-estimated batch norms."""

    def __init__(
        self,
        train: DataLoader,
        test: DataLoader,
        compress: selfcompress.SelfCompress | None,
        reestimate_batches: int | None = None,
        second_twin: bool = False,
    ) -> None:
        # Shuffled by its own generator (drawing from the training loader's would change the run):
        # a dataset stored in class order would otherwise give batch norms one class's statistics.
        # A second twin, re-estimated on another shuffle, measures how far two re-estimates differ.
        self.shuffles = [
            DataLoader(
                train.dataset, batch_size=train.batch_size, shuffle=True, generator=torch.Generator().manual_seed(i)
            )
            for i in range(2 if second_twin else 1)
        ]
        self.test, self.compress, self.reestimate_batches = test, compress, reestimate_batches
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = pl_module.net
        was_training = net.training
        with torch.random.fork_rng(devices=[]):
            eval_acc = accuracy(net, self.test)
            twins = [reestimated_accuracy(net, shuffle, self.test, self.reestimate_batches)
                     for shuffle in self.shuffles]
        net.train(was_training)
        compressing = self.compress is not None and self.compress.graph is not None
        size = self.compress.size().fraction_of_fp32 if compressing else 1.0
        row = dict(epoch=trainer.current_epoch, size=size, eval=eval_acc, twin=twins[0])
        self.rows.append(row | ({"twin2": twins[1]} if len(twins) > 1 else {}))


def reestimated_accuracy(net: torch.nn.Module, train: DataLoader, test: DataLoader, batches: int | None) -> float:
    """Test accuracy of a copy of ``net`` whose batch norms are re-estimated on the first ``batches`` batches of
    ``train`` (all of them when None)."""
    twin = copy.deepcopy(net)
    reestimate_batch_norm(twin, [((x,), {}) for x, _ in itertools.islice(train, batches)])
    return accuracy(twin, test)


def run(
    name: str,
    bn_samples: int,
    seed: int,
    epochs: int | None = None,
    initial_bits: float = INITIAL_BITS,
    levels: str = "paper",
    gamma: float | None = None,
) -> list[dict[str, float]]:
    factory, channels, default_epochs, default_gamma = NETS[name]
    epochs = epochs or default_epochs
    gamma = default_gamma if gamma is None else gamma
    pl.seed_everything(seed, verbose=False)
    train, test = loaders(channels, seed)
    model = Classifier(factory())
    compress = selfcompress.SelfCompress(
        gamma=gamma, bn_samples=bn_samples, initial_bits=initial_bits, levels=levels, print_report=False
    )
    probe = EvalVersusReestimated(train, test, compress, second_twin=True)
    quiet_trainer(epochs, [compress, probe]).fit(model, train)
    return probe.rows


def quiet_trainer(epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, deterministic=True)


def fp32_accuracy(name: str, seed: int, epochs: int | None = None) -> float:
    """Final eval accuracy of network ``name`` trained without the callback, as :func:`run` trains it."""
    factory, channels, default_epochs, _ = NETS[name]
    pl.seed_everything(seed, verbose=False)
    train, test = loaders(channels, seed)
    model = Classifier(factory())
    quiet_trainer(epochs or default_epochs, []).fit(model, train)
    return accuracy(model, test)


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--bn-samples", nargs="+", type=int, default=[0, 2048])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="instead of each network's default")
    parser.add_argument("--initial-bits", type=float, default=INITIAL_BITS, help="SelfCompress(initial_bits=...)")
    parser.add_argument("--levels", default="paper", choices=LEVELS, help="SelfCompress(levels=...)")
    parser.add_argument("--gammas", nargs="+", type=float, default=None, help="instead of each network's gamma")
    parser.add_argument("--fp32", action="store_true", help="also train each network without the callback")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--smoke", action="store_true", help="one epoch, to check the script runs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    epochs = 1 if args.smoke else args.epochs
    print(header())
    results = {}
    if args.gammas is not None and not all(g > 0 for g in args.gammas):
        parser.error(f"--gammas must all be > 0, got {args.gammas}")
    for name in args.nets:
        if args.fp32:
            start = time.perf_counter()
            results[f"{name}/fp32"] = fp32 = fp32_accuracy(name, args.seed, epochs)
            print(f"\n{name}, fp32 (no callback), seed {args.seed} ({time.perf_counter() - start:.0f} s): "
                  f"final eval {fp32:.2%}")
        for bn_samples, gamma in itertools.product(args.bn_samples, args.gammas or [NETS[name][3]]):
            start = time.perf_counter()
            key = f"{name}/{bn_samples}" + (f"/{gamma:g}" if args.gammas else "")
            rows = results[key] = run(name, bn_samples, args.seed, epochs, args.initial_bits, args.levels, gamma)
            print(
                f"\n{name}, gamma {gamma}, bn_samples {bn_samples}, levels {args.levels}, seed {args.seed} "
                f"({time.perf_counter() - start:.0f} s)"
            )
            print(f"{'epoch':>5} {'size':>7} {'eval acc':>9} {'re-est.':>8} {'gap':>6} {'re-est. 2':>9} {'2 - 1':>6}")
            for r in rows:
                print(
                    f"{r['epoch']:>5} {r['size']:>7.2%} {r['eval']:>9.2%} {r['twin']:>8.2%} "
                    f"{100 * (r['eval'] - r['twin']):>+6.2f} {r['twin2']:>9.2%} {100 * (r['twin2'] - r['twin']):>+6.2f}"
                )
            gaps = [abs(r["eval"] - r["twin"]) for r in rows]
            floor = [abs(r["twin2"] - r["twin"]) for r in rows]
            print(
                f"max |gap| {100 * max(gaps):.2f} points (two re-estimates on other shuffles differ by up to "
                f"{100 * max(floor):.2f}); final eval {rows[-1]['eval']:.2%} at {rows[-1]['size']:.1%} of fp32"
            )
            sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
