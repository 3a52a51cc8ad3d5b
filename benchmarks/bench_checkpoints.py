"""Which checkpoint does a monitor pick under compression, and how big is its file?

Trains the digits example (its network, recipe and epochs) with a validation loop and two
``ModelCheckpoint`` callbacks, one on ``val_loss`` and one on ``val_acc``, once under a
``gamma`` and once under a ``target_size``. For each best checkpoint: the epoch it comes
from, the size the callback logged at that epoch, the bytes of the file
``selfcompress.save`` writes from ``MyModule.load_from_checkpoint(best)``, and those of
the model at the end of the fit. The validation split is the example's test split, so
the accuracies of the best checkpoints are read on the images that chose them: compare
their sizes, not their accuracies. Beside each seed's fits, the same network trained
without the callback under the same validation loop (which draws from the global random
state, so dropout masks differ from a fit without one)::

    python benchmarks/bench_checkpoints.py --seeds 3 --out checkpoints.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent / "examples")]

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from common import add_run_arguments, header, write_json  # noqa: E402
from digits import Classifier, accuracy, digits_cnn, digits_loaders  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch import nn  # noqa: E402

import selfcompress  # noqa: E402

MONITORS = {"val_loss": "min", "val_acc": "max"}


class Validated(Classifier):
    """The example's classifier with a validation loop; its network is built from hyperparameters."""

    def __init__(self, width: int = 32) -> None:
        super().__init__(digits_cnn(width))
        self.save_hyperparameters()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())


def file_bytes(model: nn.Module, directory: Path, inputs: torch.Tensor | None = None) -> int:
    path = directory / "net.safetensors"
    with torch.no_grad():
        selfcompress.save(model, path, inputs=inputs)
    return path.stat().st_size


def trainer(epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A quiet Trainer that writes no file but through the ``ModelCheckpoint`` callbacks it is given."""
    checkpointing = any(isinstance(callback, ModelCheckpoint) for callback in callbacks)
    return pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=checkpointing,
                      enable_progress_bar=False, enable_model_summary=False, deterministic=True)


def fp32_accuracy(epochs: int, seed: int) -> float:
    """Test accuracy of the network trained as :func:`run` trains it, without the callback or checkpoints."""
    pl.seed_everything(seed, verbose=False)
    train_loader, test_loader = digits_loaders(seed=seed)
    model = Validated()
    trainer(epochs, []).fit(model, train_loader, test_loader)
    return accuracy(model, test_loader)


def run(mode: str, value: float | str, epochs: int, seed: int) -> dict:
    """One fit under ``gamma=value`` or ``target_size=value``: each monitor's best checkpoint against the end."""
    pl.seed_everything(seed, verbose=False)
    train_loader, test_loader = digits_loaders(seed=seed)
    model = Validated()
    compress = selfcompress.SelfCompress(print_report=False, **{mode: value})
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        checkpoints = {name: ModelCheckpoint(dirpath=scratch / name, monitor=name, mode=order)
                       for name, order in MONITORS.items()}
        trainer(epochs, [compress, *checkpoints.values()]).fit(model, train_loader, test_loader)
        logged = {entry["epoch"]: entry["size_bytes"] for entry in compress.history}
        x = next(iter(test_loader))[0][:2]
        picks = {}
        for name, checkpoint in checkpoints.items():
            best = Validated.load_from_checkpoint(checkpoint.best_model_path)
            epoch = torch.load(checkpoint.best_model_path, weights_only=True)["epoch"]
            picks[name] = dict(epoch=epoch, logged_bytes=logged[epoch], file_bytes=file_bytes(best, scratch, x),
                               accuracy=accuracy(best, test_loader))
        final = dict(epoch=epochs - 1, logged_bytes=logged[epochs - 1], file_bytes=file_bytes(model, scratch),
                     accuracy=accuracy(model, test_loader))
    return dict(mode=mode, value=value, seed=seed, picks=picks, final=final)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--gamma", type=float, default=0.09)
    parser.add_argument("--target", default="1.5%", help="the target_size of the second fit")
    parser.add_argument("--seeds", type=int, default=1, help="seeds from --seed on")
    add_run_arguments(parser, smoke_help="three epochs, one seed", plot=False)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs, seeds = (3, 1) if args.smoke else (args.epochs, args.seeds)

    seed_range = range(args.seed, args.seed + seeds)
    rows = [run(mode, value, epochs, seed) for seed in seed_range
            for mode, value in (("gamma", args.gamma), ("target_size", args.target))]
    fp32 = {seed: fp32_accuracy(epochs, seed) for seed in seed_range}
    print(header())
    print(f"digits example, {epochs} epochs, validation on its test split; file: selfcompress.save of the "
          "checkpoint loaded into the user's class; logged: selfcompress/size_bytes at that epoch")
    print(f"{'fit':>18} {'seed':>4} {'checkpoint':>14} {'epoch':>5} {'logged B':>9} {'file B':>7} "
          f"{'x final file':>12} {'accuracy':>8} {'fp32 twin':>9}")
    for r in rows:
        for name, pick in {**{f"best {k}": v for k, v in r["picks"].items()}, "end of fit": r["final"]}.items():
            print(f"{r['mode'] + ' ' + str(r['value']):>18} {r['seed']:>4} {name:>14} {pick['epoch']:>5} "
                  f"{pick['logged_bytes']:>9,.0f} {pick['file_bytes']:>7,} "
                  f"{pick['file_bytes'] / r['final']['file_bytes']:>12.3f} {pick['accuracy']:>8.2%}"
                  + (f" {fp32[r['seed']]:>9.2%}" if pick is r["final"] else ""))
    results = {"epochs": epochs, "runs": rows, "fp32_accuracy": fp32}
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
