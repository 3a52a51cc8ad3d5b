"""CIFAR-10 ResNet-9: how far the callback's batch-norm statistics are from other honest estimates.

Trains one compressing run (``--run``, default ``target:2%,initial_bits=2``, the most
compressed net of ``bench_cifar``; ``bits:<n>`` for fixed-bit QAT) for ``--epochs`` with
bfloat16 autocast, then measures
on all test images the accuracy of the model as the callback left it (statistics from the
epoch's last 2,048 augmented training samples, under autocast) against copies whose batch
norms are re-estimated on shuffled training images:

- plain or augmented (flip / pad-4 crop, as in training) images;
- statistics computed in float32 or under bfloat16 autocast;
- 2,048 or 8,192 samples, each on ``--shuffles`` different shuffles (the spread is the
  estimate's own noise);

each evaluated in float32 and under bfloat16 autocast. ``bench_cifar``'s per-epoch probe
compares with plain, float32 re-estimates on 2,000 test images; this says which of these
differences move accuracy, on five times the images. ``--schedule-epochs N`` stops after
``--epochs`` of an N-epoch learning-rate schedule: for ``bits:<n>`` runs, the first epochs of
``bench_cifar --cpu30`` on the same seed, weight for weight (a target's ramp follows the
shorter run).

    python benchmarks/bench_bn_sources.py --epochs 6 --threads 1 --out bn_sources.json
    python benchmarks/bench_bn_sources.py --run bits:2 --epochs 2 --schedule-epochs 30 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent / "examples")]

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from bench_cifar import DEFAULT_ZIP, AugmentedClassifier, augment, compressor, load_data, parse_run, resnet9  # noqa: E402
from common import add_run_arguments, header, write_json  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from selfcompress.batchnorm import reestimate_batch_norm  # noqa: E402


def accuracy(net: nn.Module, loader: DataLoader, bf16: bool) -> float:
    """Eval-mode accuracy, channels-last inputs, under bfloat16 autocast when ``bf16``."""
    net.eval()
    right = total = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for x, y in loader:
            right += int((net(x.contiguous(memory_format=torch.channels_last)).argmax(1) == y).sum())
            total += len(y)
    return right / total


def reestimated(net: nn.Module, train: TensorDataset, batch_size: int, samples: int, shuffle: int,
                augmented: bool, bf16: bool) -> nn.Module:
    """A copy of ``net`` with batch norms re-estimated on ``samples`` shuffled training images."""
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(shuffle))
    crops = torch.Generator().manual_seed(1000 + shuffle)
    batches = [augment(x, crops) if augmented else x for x, _ in itertools.islice(loader, samples // batch_size)]
    twin = copy.deepcopy(net)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        reestimate_batch_norm(twin, [((x.contiguous(memory_format=torch.channels_last),), {}) for x in batches])
    return twin


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=DEFAULT_ZIP)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--run", default="target:2%,initial_bits=2", help="a bench_cifar --runs entry that compresses")
    parser.add_argument("--schedule-epochs", type=int, default=None,
                        help="length of the learning-rate schedule, in epochs (default: --epochs)")
    parser.add_argument("--shuffles", type=int, default=3)
    add_run_arguments(parser, plot=False)
    args = parser.parse_args(argv)
    if parse_run(args.run)[0] not in ("gamma", "target", "bits"):
        raise ValueError(f"`--run` must be a gamma:<float>, target:<size> or bits:<n> entry, got {args.run!r}.")
    schedule_epochs = args.schedule_epochs or args.epochs
    if schedule_epochs < args.epochs:
        raise ValueError(f"`--schedule-epochs` must be at least --epochs ({args.epochs}), got {schedule_epochs}.")
    torch.set_num_threads(args.threads)
    if not args.zip.exists():
        print(f"skipped: no {args.zip} (pass --zip)")
        return {"skipped": f"no CIFAR-10 zip at {args.zip}"}
    cfg = dict(train_subset=256, test_subset=256, width=0.125, batch_size=64, sample_counts=(128, 256)) if args.smoke \
        else dict(train_subset=None, test_subset=None, width=0.25, batch_size=128, sample_counts=(2048, 8192))
    train, test = load_data(args, cfg)
    test_loader = DataLoader(test, batch_size=500)

    pl.seed_everything(args.seed, verbose=False)
    loader = DataLoader(train, batch_size=cfg["batch_size"], shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    model = AugmentedClassifier(resnet9(cfg["width"]), augment=True, channels_last=True)
    callback = compressor(*parse_run(args.run))
    trainer = pl.Trainer(max_epochs=schedule_epochs, max_steps=args.epochs * len(loader), callbacks=[callback],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, precision="bf16-mixed")
    start = time.perf_counter()
    trainer.fit(model, loader)
    net = model.net.cpu()
    print(header())
    print(f"CIFAR-10 ResNet-9 width x{cfg['width']:g}, {args.run}, {args.epochs} epoch(s) of a {schedule_epochs}-epoch "
          f"schedule on {len(train):,} images "
          f"({time.perf_counter() - start:.0f} s), {100 * callback.size().fraction_of_fp32:.2f} % of fp32 bits; "
          f"accuracy on {len(test):,} test images (float32 eval / bfloat16 eval)")
    rows = [dict(source="callback (last samples of training, augmented, bf16)", samples=callback.bn_samples,
                 fp32_eval=[accuracy(net, test_loader, False)], bf16_eval=[accuracy(net, test_loader, True)])]
    for samples, augmented, bf16 in itertools.product(cfg["sample_counts"], (False, True), (False, True)):
        twins = [reestimated(net, train, cfg["batch_size"], samples, shuffle, augmented, bf16)
                 for shuffle in range(args.shuffles)]
        rows.append(dict(source=f"re-estimated, {'augmented' if augmented else 'plain'}, {'bf16' if bf16 else 'fp32'}",
                         samples=samples, fp32_eval=[accuracy(t, test_loader, False) for t in twins],
                         bf16_eval=[accuracy(t, test_loader, True) for t in twins]))
    print(f"{'statistics':>55}{'samples':>9}  {'float32 eval':<26}{'bfloat16 eval':<26}")
    for row in rows:
        cells = ["/".join(f"{100 * a:.2f}" for a in row[key]) for key in ("fp32_eval", "bf16_eval")]
        print(f"{row['source']:>55}{row['samples']:>9,}  {cells[0]:<26}{cells[1]:<26}")
    results = {"benchmark": "bn_sources", "run": args.run, "epochs": args.epochs, "schedule_epochs": trainer.max_epochs,
               "seed": args.seed, "steps": trainer.global_step,
               "fraction_of_fp32_bits": callback.size().fraction_of_fp32, "rows": rows}
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
