"""MNIST CNN: accuracy against real file bytes, SelfCompress and every peer swept, in one run.

Same data, batch, optimizer (AdamW 3e-3, cosine) and training steps for every method:

- SelfCompress over a gamma sweep (``--gammas 0.002,0.01@4``: a point may start its bit
  depths elsewhere than ``--initial-bits``); bytes of the file ``selfcompress.save``
  writes (its default, fixed-width codes; the lzma file is printed beside it);
- fixed-bit quantization-aware training at 8, 4 and 2 bits: our quantizer with frozen bit
  depths and learned scales (``bench_mnist.fixed_bits_callback``); same file writer;
- DiffQ over a sweep of its size penalty; bytes of
  ``torch.save(quantizer.get_quantized_state(packed=True))``;
- Torch-Pruning at several channel ratios of the trained fp32 net, each then fine-tuned
  for one more epoch (so it gets more steps than the rest); bytes of
  ``torch.save(state_dict)``.

A peer point is *matched* when some SelfCompress point has at least its accuracy in a
file of no more bytes; with ``--seeds N`` every point is trained on N seeds and accuracy
and bytes are their means. Settings: default (short, CPU) 2 epochs of the 60,000 images at
batch 128 (936 steps); ``--smoke`` 512 images, 1 epoch, one point of each method. Every
run of a seed starts the training shuffle afresh from that seed, so all methods see the
same batches in the same order, and a point does not depend on which points ran before it:
``--combine`` merges files of different seeds or of different points of one sweep.

    python benchmarks/bench_pareto.py --threads 2 --out pareto.json --plot benchmarks/plots/mnist_pareto.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent / "examples")]

import torch  # noqa: E402
from bench_mnist import (  # noqa: E402
    evaluate_selfcompress,
    fit,
    fixed_bits_callback,
    floats,
    loaders,
    make_callback,
    packed_file_bytes,
    parser_with_common,
    skip_without_data,
    state_dict_bytes,
)
from bench_peers import params, prune, run_diffq  # noqa: E402
from common import header, seed_mean, size_accuracy_axes, write_json  # noqa: E402
from digits import accuracy  # noqa: E402

import selfcompress  # noqa: E402
from selfcompress.layers import INITIAL_BITS  # noqa: E402
from selfcompress.quantize import LEVELS  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

MARKERS = {"fp32": ("k", "x"), "selfcompress": ("C0", "o"), "fixed-bit QAT": ("C1", "s"), "diffq": ("C2", "^"),
           "torch-pruning + fine-tune": ("C3", "v")}


DEFAULT_GAMMAS = "0.002,0.005,0.01,0.02,0.03,0.05,0.08"

#: Accuracies closer than this are equal: they come from float32 metrics, and one test image
#: in 10,000, averaged over three seeds, is 3e-5.
SAME_ACCURACY = 1e-6


def matched(rows: list[dict]) -> None:
    """Mark each peer row with the best SelfCompress accuracy in a file of no more bytes."""
    ours = [r for r in rows if r["method"] == "selfcompress"]
    for row in rows:
        if row["method"] in ("selfcompress", "fp32"):
            continue
        fitting = [r["accuracy"] for r in ours if r["file_bytes"] <= row["file_bytes"]]
        row["selfcompress_best_at_no_more_bytes"] = max(fitting, default=None)
        row["matched"] = bool(fitting) and max(fitting) >= row["accuracy"] - SAME_ACCURACY


def plot(path: str, rows: list[dict], title: str) -> None:
    with size_accuracy_axes(path, title, "real file bytes (log)", "MNIST test accuracy (%)", size=(7, 4.5),
                            legend="lower right") as ax:
        for method, (color, marker) in MARKERS.items():
            points = sorted((r["file_bytes"], 100 * r["accuracy"]) for r in rows if r["method"] == method)
            if points:
                ax.plot(*zip(*points, strict=True), marker=marker, color=color, label=method,
                        linestyle="-" if method == "selfcompress" else ":")


def gamma_points(text: str) -> list[tuple[float, float | None]]:
    """``"0.002,0.01@4"`` -> ``[(0.002, None), (0.01, 4.0)]``: gammas, each with its own start bits or None.

    ``""`` gives no points (the peers alone).
    """
    points = []
    for item in text.split(",") if text else []:
        gamma, at, bits = item.partition("@")
        try:
            points.append((float(gamma), float(bits) if at else None))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--gammas item {item!r} is not GAMMA or GAMMA@BITS (e.g. 0.01 or 0.01@4)") from None
    return points


def sweep(args, cfg: dict, seed: int, add) -> tuple[list[dict], str | None]:
    """Every method's points for one seed, in a fixed order, and why DiffQ was not measured (None if it was).

    ``add`` is called with each row as it is measured.
    """
    train_loader, test_loader = loaders(args.data_dir, cfg["batch_size"], cfg["train_subset"], cfg["test_subset"], seed)
    example = next(iter(test_loader))[0][:2]
    rows: list[dict] = []
    diffq_not_measured = None

    def measured(row: dict) -> None:
        rows.append(row | {"seed": seed})
        add(rows[-1])

    def run(epochs: int, **kwargs):
        train_loader.generator.manual_seed(seed)  # the same batches for every method
        return fit(train_loader, epochs, None, seed, **kwargs)

    base, _, seconds, steps = run(cfg["epochs"])
    measured(dict(method="fp32", config="", steps=steps, seconds=seconds, accuracy=accuracy(base, test_loader),
                  file_bytes=state_dict_bytes(base.net), params=params(base.net)))

    (levels,) = cfg["levels"]
    for gamma, own_bits in cfg["gammas"]:
        start_bits = cfg["initial_bits"] if own_bits is None else own_bits
        callback = make_callback(gamma, initial_bits=start_bits, levels=levels)
        model, _, seconds, steps = run(cfg["epochs"], extra_callbacks=[callback])
        sc = evaluate_selfcompress(model, callback, test_loader, example)
        config = (f"gamma {gamma:g}" + ("" if start_bits == INITIAL_BITS else f", from {start_bits:g} bits")
                  + ("" if levels == "paper" else f", {levels} levels"))
        measured(dict(method="selfcompress", config=config, steps=steps, seconds=seconds,
                      accuracy=sc["finalized_accuracy"], file_bytes=sc["packed_file_bytes"],
                      lzma_file_bytes=sc["entropy_file_bytes"], exact_bytes=sc["exact_bytes"],
                      params=sc["params_finalized"]))

    for bits in cfg["bits"]:
        callback = fixed_bits_callback(int(bits))
        model, _, seconds, steps = run(cfg["epochs"], extra_callbacks=[callback])
        compact = selfcompress.finalize(model.net)
        measured(dict(method="fixed-bit QAT", config=f"{bits:g} bits", steps=steps, seconds=seconds,
                      accuracy=accuracy(compact, test_loader), file_bytes=packed_file_bytes(model.net, example)[0],
                      exact_bytes=callback.size().total_bytes, bits_per_weight=callback.size().bits_per_weight,
                      params=params(compact)))

    for penalty in cfg["diffq_penalties"]:
        train_loader.generator.manual_seed(seed)
        row = run_diffq(train_loader, test_loader, cfg["epochs"], -1, seed, penalty, 8)
        if "not_measured" in row:
            diffq_not_measured = row["not_measured"]
            print(f"DiffQ not measured: {diffq_not_measured}")
            break
        row["config"] = f"penalty {penalty:g}"
        measured(row)

    for ratio in cfg["pruning_ratios"]:
        start = time.perf_counter()
        pruned = prune(base.net, ratio, example)
        tuned, _, ft_seconds, ft_steps = run(1, net=pruned)
        measured(dict(method="torch-pruning + fine-tune", config=f"ratio {ratio:g}", steps=rows[0]["steps"] + ft_steps,
                      seconds=rows[0]["seconds"] + time.perf_counter() - start, accuracy=accuracy(tuned, test_loader),
                      file_bytes=state_dict_bytes(tuned.net), params=params(tuned.net)))
    return rows, diffq_not_measured


def averaged(per_seed: list[list[dict]]) -> list[dict]:
    """One row per point: accuracy, bytes, parameters and seconds averaged over the seeds, each seed's accuracy kept."""
    return [seed_mean(list(points), ("accuracy", "seconds"), ("file_bytes", "lzma_file_bytes", "exact_bytes", "params"))
            for points in zip(*per_seed, strict=True)]


def main(argv: list[str] | None = None) -> dict:
    parser = parser_with_common(__doc__)
    parser.add_argument("--gammas", type=gamma_points, default=None,
                        help="comma-separated gammas; GAMMA@BITS starts that point's bit depths at BITS; '' for none "
                             f"(default {DEFAULT_GAMMAS}; --smoke: 0.05)")
    parser.add_argument("--bits", type=floats, default=[8, 4, 2], help="fixed-bit QAT depths")
    parser.add_argument("--diffq-penalties", type=floats, default=[3, 10, 30, 100])
    parser.add_argument("--pruning-ratios", type=floats, default=[0.3, 0.5, 0.7, 0.85])
    parser.add_argument("--seeds", type=int, default=1, help="seeds from --seed on; points are averaged over them")
    parser.add_argument("--initial-bits", type=float, default=INITIAL_BITS,
                        help="SelfCompress(initial_bits=...) for the gamma sweep (default: the library's)")
    parser.add_argument("--levels", default="paper", choices=LEVELS,
                        help="SelfCompress(levels=...) for the gamma sweep")
    parser.add_argument("--combine", nargs="+", type=Path, default=None,
                        help="average the seeds of these --out files (same settings) instead of training")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.combine:
        return combine(args)
    if skipped := skip_without_data(args.data_dir):
        return skipped
    if args.smoke:
        cfg = dict(name="smoke", epochs=1, batch_size=128, train_subset=512, test_subset=1000)
        args.gammas = [(0.05, None)] if args.gammas is None else args.gammas
        args.bits, args.diffq_penalties, args.pruning_ratios = [4], [10], [0.5]
    else:
        cfg = dict(name="short (CPU)", epochs=args.epochs, batch_size=args.batch_size,
                   train_subset=args.train_subset, test_subset=None)
    args.gammas = gamma_points(DEFAULT_GAMMAS) if args.gammas is None else args.gammas
    seeds = list(range(args.seed, args.seed + args.seeds))
    cfg.update(gammas=args.gammas, initial_bits=args.initial_bits, levels=[args.levels], bits=args.bits,
               diffq_penalties=args.diffq_penalties, pruning_ratios=args.pruning_ratios, seeds=seeds)
    print(header(), flush=True)
    results = {"benchmark": "pareto", "setting": cfg, "runs": [], "seed_runs": []}

    def add(row: dict) -> None:
        results["seed_runs"].append(row)
        print(f"done seed {row['seed']} {row['method']} {row['config']}: {row['accuracy']:.2%}, "
              f"{row['file_bytes']:,} bytes ({row['seconds']:.0f} s)", flush=True)
        write_json(args.out, results)

    swept = [sweep(args, cfg, seed, add) for seed in seeds]
    if reason := next((why for _, why in swept if why), None):
        results["diffq_not_measured"] = reason
    return report(args, results, [rows for rows, _ in swept])


#: Settings that list a sweep's seeds and points: ``--combine`` files may differ in these.
POINT_LISTS = ("seeds", "gammas", "levels", "bits", "diffq_penalties", "pruning_ratios")


def combine(args) -> dict:
    """The runs of several ``--out`` files, averaged over every seed.

    The files share their settings but may hold different seeds or different points of
    one sweep: every run reshuffles from its seed, so a point does not depend on what ran
    beside it. A point run in two files must have the same accuracy and bytes in both.
    """
    files = [json.loads(path.read_text()) for path in args.combine]
    settings = [{k: v for k, v in f["setting"].items() if k not in POINT_LISTS} for f in files]
    if any(setting != settings[0] for setting in settings):
        raise ValueError(f"`--combine` files {[str(p) for p in args.combine]} were not run with the same settings.")
    runs: dict[tuple, dict] = {}
    for row in (row for f in files for row in f["seed_runs"]):
        key = (row["seed"], row["method"], row["config"])
        first = runs.setdefault(key, row)
        if (first["accuracy"], first["file_bytes"]) != (row["accuracy"], row["file_bytes"]):
            raise ValueError(f"`--combine` files disagree on seed {key[0]} {key[1]} {key[2]!r}: "
                             f"{first['accuracy']:.4%} in {first['file_bytes']:,} bytes against "
                             f"{row['accuracy']:.4%} in {row['file_bytes']:,}.")
    seeds = sorted({seed for seed, _, _ in runs})
    methods = list(MARKERS)
    points = sorted(dict.fromkeys(key[1:] for key in runs), key=lambda point: methods.index(point[0]))
    if missing := [(seed, *point) for seed in seeds for point in points if (seed, *point) not in runs]:
        raise ValueError(f"`--combine` files have no run of {missing[0][1]} {missing[0][2]!r} on seed {missing[0][0]}.")
    setting = {**files[0]["setting"], "seeds": seeds}
    for key in POINT_LISTS[1:]:
        merged: list = []
        for f in files:
            merged += [v for v in f["setting"].get(key, []) if v not in merged]
        setting[key] = merged
    per_seed = [[runs[(seed, *point)] for point in points] for seed in seeds]
    results = {"benchmark": "pareto", "setting": setting, "runs": [],
               "seed_runs": [row for rows in per_seed for row in rows],
               "combined": [str(path) for path in args.combine]}
    print(header(), flush=True)
    for path, f in zip(args.combine, files, strict=True):
        print(f"{path}: {f.get('command')}; {f.get('machine')}")
    return report(args, results, per_seed)


def report(args, results: dict, per_seed: list[list[dict]]) -> dict:
    """Average over the seeds, mark the peer points SelfCompress matches, print the table, plot, write."""
    cfg, seeds = results["setting"], results["setting"]["seeds"]
    rows = results["runs"] = averaged(per_seed)
    matched(rows)
    test_images = 10_000 if cfg["test_subset"] is None else cfg["test_subset"]
    print(f"\nMNIST CNN ({rows[0]['params']:,} weights), setting {cfg['name']}, batch {cfg['batch_size']}, "
          f"{test_images:,} test images, seeds {seeds[0]}-{seeds[-1]} (accuracy, bytes: mean over seeds)")
    width = max(26, *(len(r["config"]) + 1 for r in rows))
    print(f"{'method':<27}{'config':<{width}}{'steps':>6}{'accuracy':>10}{'file bytes':>12}{'params':>8}"
          f"{'seeds (min-max)':>17}  SelfCompress at <= bytes")
    for r in rows:
        best = r.get("selfcompress_best_at_no_more_bytes")
        verdict = "" if "matched" not in r else (
            f"{best:.2%} {'matched' if r['matched'] else 'NOT matched'}" if best is not None
            else "NOT matched (no point that small)")
        spread = f"{min(r['seed_accuracies']):.2%}-{max(r['seed_accuracies']):.2%}"
        print(f"{r['method']:<27}{r['config']:<{width}}{r['steps']:>6}{r['accuracy']:>10.2%}{r['file_bytes']:>12,}"
              f"{r['params']:>8,}{spread:>17}  {verdict}")
    peers = [r for r in rows if "matched" in r]
    results["matched"] = sum(r["matched"] for r in peers)
    print(f"peer points matched: {results['matched']} of {len(peers)}")
    if args.plot:
        plot(args.plot, rows, f"MNIST CNN, {cfg['name']}, real file bytes, mean of {len(seeds)} seed(s); "
                              f"{header().splitlines()[1]}")
        results["plot"] = args.plot
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
