"""CIFAR-10 ResNet-9 (Page's fast-training net): accuracy against % of fp32 bits, with the paper's points.

Reads ``cifar10-jpeg.zip`` (``--zip``, default ``../shared/datasets/cifar10-jpeg.zip``),
decodes it once with Pillow into uint8 ``.npy`` arrays under ``--cache-dir`` (default
``/tmp``) and skips cleanly when the zip is absent. Settings:

- default (short, CPU): width multiplier 1/4 (channels 16/32/64/128), 4 epochs (312
  steps of batch 128, flip / pad-4 crop) on a 10,000-image class-balanced training
  subset, 2,000 test images, gammas 0.02 and 0.2.
  Far too short to compare with the paper's figures: it shows the script works and
  where a barely trained net lands, nothing more;
- ``--cpu30`` (about 30 minutes a run on 2 cores): width 1/4, 30 epochs of all 50,000
  images (flip / pad-4 crop), all 10,000 test images, bfloat16 autocast with channels-last
  inputs (faster than float32 on a CPU with bfloat16 units), runs fp32, ``target:5%``,
  ``target:2%`` and ``bits:4``; ``--runs`` picks others (a SelfCompress run may set
  options after commas: ``target:5%,initial_bits=3``; ``bits:<n>`` is fixed-bit QAT, and
  ``bits:1,levels=signs`` a network of weight signs times learned channel scales;
  ``diffq:<penalty>`` trains DiffQ,
  group size 8, biases and batch norms in float32, its bytes those of its packed file),
  ``--combine`` merges the JSON of
  runs made in separate processes (with ``--mean``, the runs of one label on different
  seeds become one point: their mean, the seeds' spread drawn as an error bar);
- ``--full`` (GPU; not feasible on CPU): width 1 (about 6.57M weights), 200 epochs of the
  50,000 images with flip / pad-4 crop, all 10,000 test images, gammas 0.0025 to 0.06;
- ``--smoke`` (seconds): width 1/8, 256 training and 256 test images, one gamma.

The paper's points (Cséfalvay & Imber 2023, read off its Fig. 3, full net, ~850 epochs)
are drawn for reference only, never as our measurement.

Every run records, at each epoch's end, eval-mode accuracy on a class-balanced subset of
the test images against a copy whose batch norms are re-estimated on shuffled training
batches. At the end each run also records the accuracy of its weights with batch norms
re-estimated on plain (not flipped or cropped) training images, and a compressed run its
layers (channels kept, mean code bits, bytes).

    python benchmarks/bench_cifar.py --cpu30 --threads 2 --out cifar30.json --plot benchmarks/plots/cifar_pareto.png
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
import zipfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent / "examples")]

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_bn import EvalVersusReestimated, reestimated_accuracy  # noqa: E402
from bench_mnist import fixed_bits_callback, make_callback  # noqa: E402
from bench_peers import attach_diffq, diffq_file_bytes  # noqa: E402
from common import add_run_arguments, header, seed_mean, size_accuracy_axes, write_json  # noqa: E402
from digits import Classifier, accuracy  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Subset, TensorDataset  # noqa: E402

import selfcompress  # noqa: E402
from selfcompress.quantize import LEVELS, check_levels  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ZIP = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.zip"
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
#: (percent of fp32 bits, accuracy %), read off Fig. 3 of Cséfalvay & Imber 2023.
PAPER_POINTS = [(100.0, 95.69), (3.0, 95.69), (2.0, 95.0), (1.0, 94.3), (0.25, 90.2)]
PAPER_DIFFQ = (8.0, 95.69)


def decode(zip_path: Path, split: str, per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x 32 x 32 x 3 uint8) and labels of ``split``; ``per_class`` takes the first N of each class."""
    from PIL import Image

    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith(f"{split}/") and n.endswith(".jpg"))
        classes = sorted({n.split("/")[1] for n in names})
        if per_class is not None:
            counts: dict[str, int] = {}
            kept = []
            for name in names:
                label = name.split("/")[1]
                if counts.get(label, 0) < per_class:
                    counts[label] = counts.get(label, 0) + 1
                    kept.append(name)
            names = kept
        images = np.empty((len(names), 32, 32, 3), dtype=np.uint8)
        labels = np.empty(len(names), dtype=np.int64)
        for i, name in enumerate(names):
            with Image.open(io.BytesIO(archive.read(name))) as image:
                images[i] = np.asarray(image.convert("RGB"))
            labels[i] = classes.index(name.split("/")[1])
    return images, labels


def cached(zip_path: Path, cache_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The whole split, decoded once and kept as ``cifar10jpeg_<split>_{x,y}.npy``."""
    x_path, y_path = cache_dir / f"cifar10jpeg_{split}_x.npy", cache_dir / f"cifar10jpeg_{split}_y.npy"
    if not (x_path.exists() and y_path.exists()):
        images, labels = decode(zip_path, split)
        cache_dir.mkdir(parents=True, exist_ok=True)
        for path, array in ((x_path, images), (y_path, labels)):
            # Written under a private name, then renamed: a run started beside this one never reads half a file.
            partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npy")
            try:
                np.save(partial, array)
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
    return np.load(x_path), np.load(y_path)


def to_tensors(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    return TensorDataset((x - MEAN) / STD, torch.from_numpy(labels))


def balanced_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    per_class = size // 10
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)]))


def conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.res = nn.Sequential(*conv_bn(channels, channels), *conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res(x)


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def resnet9(width: float = 1.0) -> nn.Sequential:
    """Page's ResNet-9: prep 64, layer1 128 + residual, layer2 256, layer3 512 + residual, pool, fc."""
    c = [max(1, round(k * width)) for k in (64, 128, 256, 512)]
    return nn.Sequential(
        *conv_bn(3, c[0]),
        *conv_bn(c[0], c[1]), nn.MaxPool2d(2), Residual(c[1]),
        *conv_bn(c[1], c[2]), nn.MaxPool2d(2),
        *conv_bn(c[2], c[3]), nn.MaxPool2d(2), Residual(c[3]),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c[3], 10, bias=False), Scale(0.125),
    )  # fmt: skip


class AugmentedClassifier(Classifier):
    """Random horizontal flip (per image) and pad-4 random crop (per batch) on each training batch.

    ``channels_last`` feeds the network NHWC images, which oneDNN's bfloat16 kernels
    run faster on a CPU; it changes no weight.
    """

    def __init__(self, net: nn.Module, augment: bool, channels_last: bool = False, **kwargs) -> None:
        super().__init__(net, **kwargs)
        self.augment = augment
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return super().training_step((augment(x) if self.augment else x, y), batch_idx)


class DiffQClassifier(AugmentedClassifier):
    """DiffQ on the same net and recipe: its differentiable size (MB) times ``penalty`` added to the loss.

    Weights are quantized by groups of 8, biases and batch norms stay float32
    (``bench_peers.attach_diffq``, as for MNIST); in eval mode DiffQ's hooks run the quantized weights.
    """

    def __init__(self, net: nn.Module, penalty: float, augment: bool, channels_last: bool = False, **kwargs) -> None:
        super().__init__(net, augment, channels_last, **kwargs)
        self.penalty = penalty
        self.quantizer = attach_diffq(net, group_size=8)

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + self.penalty * self.quantizer.model_size()

    def configure_optimizers(self):
        # DiffQ adds its bit-depth logits to the optimizer itself, with its own learning rate.
        weights = [p for name, p in self.named_parameters() if not name.endswith(self.quantizer.suffix)]
        optimizer = torch.optim.AdamW(weights, lr=self.lr, weight_decay=self.weight_decay)
        self.quantizer.setup_optimizer(optimizer)
        return [optimizer], [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)]


def augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random horizontal flip per image, then one pad-4 (reflect) random 32x32 crop for the batch."""
    flip = torch.rand(x.shape[0], generator=generator).to(x.device) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    padded = nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    i, j = (int(v) for v in torch.randint(0, 9, (2,), generator=generator))
    return padded[:, :, i : i + 32, j : j + 32]


#: SelfCompress options a run may set after a comma, e.g. ``target:5%,initial_bits=3``.
def _levels(text: str) -> str:
    check_levels(text)
    return text


RUN_OPTIONS = {"initial_bits": float, "bits_lr": float, "exponent_lr": float, "target_ramp": float, "bn_samples": int,
               "levels": _levels, "output_min_bits": float, "exclude": str}


def parse_run(spec: str) -> tuple[str, str | float | None, dict[str, float | int]]:
    """``fp32``, ``gamma:0.02``, ``target:5%``, ``bits:4`` or ``diffq:10``, SelfCompress runs then ``,name=value``
    options -> (kind, value, options)."""
    base, *items = spec.split(",")
    options = {}
    for item in items:
        name, _, text = item.partition("=")
        try:
            options[name] = RUN_OPTIONS[name](text)
        except (KeyError, ValueError):
            raise ValueError(f"`--runs` entry {spec!r}: option {item!r} is not <option>=<value> with an option "
                             f"among {', '.join(RUN_OPTIONS)} (bn_samples a whole number, levels one of "
                             f"{', '.join(LEVELS)}, the others numbers).") from None
    kind, _, value = base.partition(":")
    if kind == "fp32" and not value and not options:
        return "fp32", None, options
    if kind == "gamma" or (kind == "diffq" and not options) or (kind == "bits" and set(options) <= {"levels"}):
        return kind, float(value), options
    if kind == "target" and value:
        return "target", value, options
    raise ValueError(f"`--runs` entry {spec!r} is not one of fp32, gamma:<float>, target:<size>, bits:<int>, "
                     f"diffq:<penalty>, "
                     f"gamma and target optionally followed by ,<option>=<value> "
                     f"with options {', '.join(RUN_OPTIONS)}, bits by ,levels=<levels> alone.")


def compressor(kind: str, value, options: dict[str, float]) -> selfcompress.SelfCompress | None:
    if kind in ("fp32", "diffq"):
        return None
    if "exclude" in options:  # one module-name pattern left uncompressed, e.g. exclude=net.0 (the first conv)
        options = {key: value for key, value in options.items() if key != "exclude"} | {
            "exclude_names": (options["exclude"],)}
    if kind == "gamma":
        return make_callback(value, **options)
    if kind == "target":
        return make_callback(None, target_size=value, **options)
    return fixed_bits_callback(int(value), **options)  # bits:1,levels=signs: every weight its sign


def fit(train_loader, probe_loaders, cfg: dict, spec: str, seed: int):
    """Train one run; returns model, callback (or None), per-epoch probe rows, seconds, steps."""
    pl.seed_everything(seed, verbose=False)
    train_loader.generator.manual_seed(seed)  # shuffles as if the run were alone, whatever ran before it
    kind, value, options = parse_run(spec)
    if kind == "diffq":
        model = DiffQClassifier(resnet9(cfg["width"]), value, cfg["augment"], cfg["channels_last"], lr=cfg["lr"])
    else:
        model = AugmentedClassifier(resnet9(cfg["width"]), cfg["augment"], cfg["channels_last"], lr=cfg["lr"])
    callback = compressor(kind, value, options)
    probe = EvalVersusReestimated(*probe_loaders, callback, reestimate_batches=cfg["probe_batches"], second_twin=True)
    trainer = pl.Trainer(max_epochs=cfg["epochs"], callbacks=([callback] if callback else []) + [probe],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, precision=cfg["precision"])
    start = time.perf_counter()
    trainer.fit(model, train_loader)
    model.cpu()
    return model, callback, probe.rows, time.perf_counter() - start, trainer.global_step


def plain_statistics_accuracy(net: nn.Module, train_loader: DataLoader, test_loader: DataLoader,
                              batches: int = 64) -> float:
    """Test accuracy of ``net`` with batch norms re-estimated on ``batches`` plain training batches (the
    training loader's images without flip or crop, drawn by a generator of their own)."""
    shuffle = DataLoader(train_loader.dataset, batch_size=train_loader.batch_size, shuffle=True,
                         generator=torch.Generator().manual_seed(0))
    return reestimated_accuracy(net, shuffle, test_loader, batches)


def setting(args) -> dict:
    if args.smoke:
        return dict(name="smoke", width=0.125, epochs=1, train_subset=256, test_subset=256, batch_size=64,
                    augment=False, lr=3e-3, precision="32-true", channels_last=False, probe_test=256,
                    probe_batches=2, runs=["fp32", "gamma:0.2"])
    if args.full:
        return dict(name="full (GPU)", width=1.0, epochs=200, train_subset=None, test_subset=None, batch_size=512,
                    augment=True, lr=1e-3, precision="bf16-mixed", channels_last=True, probe_test=2000,
                    probe_batches=32, runs=["fp32"] + [f"gamma:{g}" for g in (0.0025, 0.005, 0.01, 0.015, 0.03, 0.06)])
    if args.cpu30:
        return dict(name="CPU scale: width 1/4, 30 epochs, all 50k / 10k images, bf16 autocast", width=0.25,
                    epochs=30, train_subset=None, test_subset=None, batch_size=128, augment=True, lr=3e-3,
                    precision="bf16-mixed", channels_last=True, probe_test=2000, probe_batches=32,
                    runs=["fp32", "target:5%", "target:2%", "bits:4"])
    return dict(name="short (CPU): width 1/4, 4 epochs, 10k-image subset", width=0.25, epochs=4, train_subset=10000,
                test_subset=2000, batch_size=128, augment=True, lr=3e-3, precision="32-true", channels_last=False,
                probe_test=2000, probe_batches=32, runs=["fp32", "gamma:0.02", "gamma:0.2"])


def label(row: dict) -> str:
    name = {"fp32": "fp32", "gamma": "SelfCompress gamma {}", "target": "SelfCompress target {}",
            "bits": "fixed {:g}-bit QAT", "diffq": "DiffQ penalty {:g}"}[row["kind"]].format(row["value"])
    return name + "".join(f", from {value:g} bits" if key == "initial_bits" else
                          f", {value} levels" if key == "levels" else
                          f", {key} {value}" if isinstance(value, str) else f", {key} {value:g}"
                          for key, value in row.get("options", {}).items())


def seed_means(rows: list[dict]) -> list[dict]:
    """One row per run label, averaged over the rows (each a seed) that carry it, in first-seen order.

    Accuracy, size and seconds are means; ``seed_accuracies`` keeps each row's accuracy. Two rows
    of one label recorded with the same seed are refused (a run counted twice).
    """
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(label(row), []).append(row)
    means = []
    for name, runs in groups.items():
        seeds = [run["seed"] for run in runs if "seed" in run]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"`--combine` holds run {name!r} twice with the same seed ({sorted(seeds)})")
        means.append(seed_mean(runs, ("accuracy", "finalized_accuracy", "fraction_of_fp32_bits", "bits_per_weight",
                                      "seconds"), ("bytes",)))
    return means


def print_means(rows: list[dict]) -> None:
    """The seed means: accuracy with its spread over seeds, and its distance from the fp32 mean."""
    fp32 = next((row["accuracy"] for row in rows if row["kind"] == "fp32"), None)
    print(f"{'run':>40}{'seeds':>6}{'accuracy':>10}{'min-max':>16}{'bytes':>10}{'% fp32 bits':>12}{'vs fp32':>9}")
    for r in rows:
        low, high = min(r["seed_accuracies"]), max(r["seed_accuracies"])
        gap = "" if fp32 is None or r["kind"] == "fp32" else f"{100 * (r['accuracy'] - fp32):+.2f}"
        print(f"{label(r):>40}{len(r['seed_accuracies']):>6}{r['accuracy']:>10.2%}{f'{low:.2%}-{high:.2%}':>16}"
              f"{r['bytes']:>10,}{100 * r['fraction_of_fp32_bits']:>11.2f}%{gap:>9}")


def plot(path: str, rows: list[dict], title: str) -> None:
    with size_accuracy_axes(path, title, "% of fp32 bits (log)", "CIFAR-10 test accuracy (%)",
                            legend="lower right", size=(8.5, 4.5)) as ax:
        xs, ys = zip(*PAPER_POINTS, strict=True)
        ax.plot(xs, ys, "k*--", label="paper, self-compression (read off Fig. 3; full net, ~850 epochs)")
        ax.scatter(*PAPER_DIFFQ, marker="P", c="grey", s=70, label="paper, DiffQ at fp32 accuracy (Fig. 3)")
        for row in rows:
            seeds = row.get("seed_accuracies", [row["accuracy"]])
            spread = [[100 * (row["accuracy"] - min(seeds))], [100 * (max(seeds) - row["accuracy"])]]
            over = f", mean of {len(seeds)} seeds" if len(seeds) > 1 else ""
            ax.errorbar(100 * row["fraction_of_fp32_bits"], 100 * row["accuracy"], yerr=spread, fmt="o", ms=6,
                        capsize=3, label=f"{label(row)} (measured{over})")
        lowest = min([100 * row["accuracy"] for row in rows] + list(ys))
        ax.set_ylim(bottom=lowest - (100 - lowest), top=100)  # room for the legend below the points


def print_table(cfg: dict, rows: list[dict]) -> None:
    print(f"{'run':>28}{'steps':>7}{'accuracy':>10}{'finalized':>10}{'bytes':>12}{'% fp32 bits':>12}"
          f"{'max |eval - re-est.|':>21}{'floor':>9}{'seconds':>9}")
    for r in rows:
        gap = max((abs(e["eval"] - e["twin"]) for e in r["epochs"] if e["twin"] is not None), default=float("nan"))
        # How far two re-estimates on different shuffles differ (runs recorded before it was measured: nan).
        floor = max((abs(e["twin2"] - e["twin"]) for e in r["epochs"] if "twin2" in e), default=float("nan"))
        print(f"{label(r):>28}{r['steps']:>7}{r['accuracy']:>10.2%}{r.get('finalized_accuracy', r['accuracy']):>10.2%}"
              f"{r['bytes']:>12,}{100 * r['fraction_of_fp32_bits']:>11.2f}%{100 * gap:>18.2f} pt"
              f"{100 * floor:>6.2f} pt{r['seconds']:>9.0f}")
    print("per epoch, eval-mode accuracy on the probe images (and its re-estimated twin):")
    for r in rows:
        print(f"  {label(r)}: " + " ".join(
            f"{100 * e['eval']:.0f}" + ("" if e["twin"] is None else f"({100 * e['twin']:.0f})") for e in r["epochs"]))
    print("paper (reference only, not measured here): " + ", ".join(f"{a:.2f} % at {b:g} % of bits"
                                                                    for b, a in PAPER_POINTS))


def load_data(args, cfg: dict) -> tuple[TensorDataset, TensorDataset]:
    if args.smoke:  # decode only what the smoke run uses, no cache
        return (to_tensors(*decode(args.zip, "train", per_class=cfg["train_subset"] // 10)),
                to_tensors(*decode(args.zip, "test", per_class=cfg["test_subset"] // 10)))
    train_x, train_y = cached(args.zip, args.cache_dir, "train")
    test_x, test_y = cached(args.zip, args.cache_dir, "test")
    if cfg["train_subset"]:
        keep = balanced_subset(train_y, cfg["train_subset"], args.seed)
        train_x, train_y = train_x[keep], train_y[keep]
    if cfg["test_subset"]:
        keep = balanced_subset(test_y, cfg["test_subset"], args.seed)
        test_x, test_y = test_x[keep], test_y[keep]
    return to_tensors(train_x, train_y), to_tensors(test_x, test_y)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=DEFAULT_ZIP)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--cpu30", action="store_true", help="width 1/4, 30 epochs, all images (~20-35 min a run)")
    parser.add_argument("--runs", nargs="+", default=None,
                        help="fp32, gamma:<float>, target:<size> (e.g. target:5%%), bits:<int>, diffq:<penalty>; "
                             "default per setting")
    parser.add_argument("--combine", nargs="+", type=Path, default=None,
                        help="print and plot the runs of these --out files instead of training")
    parser.add_argument("--mean", action="store_true",
                        help="with --combine: runs of the same label (different seeds) averaged into one point")
    parser.add_argument("--probe-images", type=int, default=None,
                        help="test images of the per-epoch eval-vs-re-estimated probe, a multiple of 10 (default "
                             "per setting; more resolve smaller gaps at the cost of time)")
    add_run_arguments(parser, full_help="the full net and budget; for a GPU")
    args = parser.parse_args(argv)
    if args.mean and not args.combine:
        parser.error("--mean averages the runs of --combine; give --combine FILE ... with it")
    if args.combine:
        parts = [json.loads(path.read_text()) for path in args.combine]
        rows = [row for part in parts for row in part["runs"]]
        print(header())
        print(f"combined from {', '.join(map(str, args.combine))}; setting {parts[0]['setting']['name']}")
        if args.mean:
            rows = seed_means(rows)
            print_means(rows)
        else:
            print_table(parts[0]["setting"], rows)
        if args.plot:
            kind = "measured, mean over seeds" if args.mean else "measured"
            plot(args.plot, rows, f"ResNet-9, {parts[0]['setting']['name']} ({kind}) vs paper (reference)")
        return {"runs": rows}
    cfg = setting(args)
    if args.probe_images is not None:  # before the data checks: a bad value is an error, not a skip
        most = cfg["test_subset"] or 10_000
        if not (10 <= args.probe_images <= most and args.probe_images % 10 == 0):
            parser.error(f"--probe-images must be a multiple of 10 (the probe is balanced over the classes) "
                         f"from 10 to the test images ({most}), got {args.probe_images}")
        cfg["probe_test"] = args.probe_images
    torch.set_num_threads(args.threads)
    if not args.zip.exists():
        print(f"skipped: no {args.zip} (pass --zip)")
        return {"skipped": f"no CIFAR-10 zip at {args.zip}"}
    try:
        import PIL  # noqa: F401
    except ImportError:
        print("skipped: Pillow is needed to decode the JPEGs (pip install pillow)")
        return {"skipped": "Pillow not installed"}
    specs = args.runs or cfg["runs"]
    for spec in specs:  # every entry checked before any training
        if parse_run(spec)[0] == "diffq":
            try:
                import diffq  # noqa: F401
            except ImportError:
                raise SystemExit(f"`--runs {spec}` needs DiffQ: pip install -e '.[benchmarks]'") from None

    start = time.perf_counter()
    train, test = load_data(args, cfg)
    decode_seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train, batch_size=cfg["batch_size"], shuffle=True, generator=generator, drop_last=True)
    test_loader = DataLoader(test, batch_size=500)
    probe_test = Subset(test, balanced_subset(test.tensors[1].numpy(), cfg["probe_test"], args.seed))
    probe_loaders = (train_loader, DataLoader(probe_test, batch_size=500))
    fp32_params = sum(p.numel() for p in resnet9(cfg["width"]).parameters())

    print(header())
    print(f"CIFAR-10 (JPEG copy) ResNet-9, setting {cfg['name']}: width x{cfg['width']:g} ({fp32_params:,} weights), "
          f"{cfg['epochs']} epoch(s), {len(train):,} training / {len(test):,} test images, batch {cfg['batch_size']}, "
          f"AdamW lr {cfg['lr']:g} cosine, precision {cfg['precision']}, decode/cache {decode_seconds:.1f} s; "
          f"per-epoch probe: {cfg['probe_test']} test images, twin re-estimated on {cfg['probe_batches']} batches",
          flush=True)
    results = {"benchmark": "cifar", "setting": cfg, "paper_points_percent_bits_accuracy": PAPER_POINTS, "runs": [],
               "full_setting_run": bool(args.full)}
    for spec in specs:
        kind, value, options = parse_run(spec)
        model, callback, epochs, seconds, steps = fit(train_loader, probe_loaders, cfg, spec, args.seed)
        row = dict(kind=kind, value=value, options=options, seed=args.seed, steps=steps, seconds=seconds,
                   accuracy=accuracy(model, test_loader),
                   epochs=epochs)
        if kind == "diffq":
            row.update(bytes=diffq_file_bytes(model.quantizer), params=fp32_params)
            row.update(fraction_of_fp32_bits=row["bytes"] / (4 * fp32_params))
        elif callback is None:
            row.update(bytes=4 * fp32_params, fraction_of_fp32_bits=1.0, params=fp32_params)
        else:
            size = callback.size()
            compact = selfcompress.finalize(model.net)
            row.update(finalized_accuracy=accuracy(compact, test_loader), bytes=size.total_bytes,
                       fraction_of_fp32_bits=size.fraction_of_fp32, bits_per_weight=size.bits_per_weight,
                       params=sum(p.numel() for p in compact.parameters()), final_gamma=float(callback.gamma),
                       layers=[dict(name=layer.name, channels=[layer.channels_open, layer.channels_total],
                                    mean_bits=layer.mean_bits, weights_kept=layer.weights_kept, bytes=layer.bytes)
                               for layer in callback.report().layers])
        if kind != "diffq":  # the same weights, batch norms re-estimated on plain (unaugmented) training images
            row.update(plain_statistics_accuracy=plain_statistics_accuracy(model.net, train_loader, test_loader))
        results["runs"].append(row)
        plain = row.get("plain_statistics_accuracy")
        print(f"done {label(row)}: {row['accuracy']:.2%} at {100 * row['fraction_of_fp32_bits']:.2f} % of fp32 bits "
              f"({seconds:.0f} s)" + ("" if plain is None else f"; batch norms from plain images: {plain:.2%}"),
              flush=True)
        write_json(args.out, results)  # after every run, so a long sweep can be read as it goes

    print_table(cfg, results["runs"])
    if args.plot:
        plot(args.plot, results["runs"], f"ResNet-9, {cfg['name']} (measured) vs paper (reference)")
        results["plot"] = args.plot
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
