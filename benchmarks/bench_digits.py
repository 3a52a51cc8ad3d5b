"""Digits CNN: accuracy and exact size with SelfCompress against the same net in fp32.

Beside the exact size: the real packed file, and the bytes the same model took before
batch norms were stored in eval form (their running mean and variance as float32 too).

python benchmarks/bench_digits.py --epochs 60 --gamma 0.09 --seeds 5 --out digits.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent / "examples")]

import torch  # noqa: E402
from common import header, write_json  # noqa: E402
from digits import accuracy, digits_loaders, train  # noqa: E402

import selfcompress  # noqa: E402
from selfcompress.batchnorm import STATISTICS, has_eval_form  # noqa: E402
from selfcompress.layers import INITIAL_BITS  # noqa: E402
from selfcompress.quantize import LEVELS  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--gamma", type=float, default=0.09)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--bn-samples", type=int, default=2048, help="SelfCompress(bn_samples=...); 0 turns it off")
    parser.add_argument("--initial-bits", type=float, default=INITIAL_BITS, help="SelfCompress(initial_bits=...)")
    parser.add_argument("--levels", default="paper", choices=LEVELS, help="SelfCompress(levels=...)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--smoke", action="store_true", help="two epochs, to check the script runs")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    epochs = 2 if args.smoke else args.epochs

    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        start = time.perf_counter()
        baseline, baseline_acc, _ = train(epochs, gamma=None, seed=seed)
        compressed, compressed_acc, callback = train(
            epochs, gamma=args.gamma, seed=seed, bn_samples=args.bn_samples, initial_bits=args.initial_bits,
            levels=args.levels,
        )
        size = callback.size()
        compact = selfcompress.finalize(compressed.net)
        compact_acc = accuracy(compact, digits_loaders(seed=seed)[1])
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "net.safetensors"
            selfcompress.save(compact, path)
            file_bytes = path.stat().st_size
        fp32_bytes = 4 * sum(p.numel() for p in baseline.parameters())
        rows.append(
            dict(
                seed=seed,
                fp32_accuracy=baseline_acc,
                accuracy=compressed_acc,
                finalized_accuracy=compact_acc,
                fp32_bytes=fp32_bytes,
                exact_bytes=size.total_bytes,
                fraction=size.total_bytes / fp32_bytes,
                file_bytes=file_bytes,
                statistics_bytes=statistics_bytes(compact),
                seconds=time.perf_counter() - start,
            )
        )
        print(f"seed {seed} done: {rows[-1]}", flush=True)
    print(header())
    print(f"digits CNN, {epochs} epochs, gamma {args.gamma}, bn_samples {args.bn_samples}, "
          f"initial_bits {args.initial_bits:g}, levels {args.levels}")
    print("exact bytes with statistics: the same model with its batch norms' mean and variance stored too")
    print(f"{'seed':>4} {'fp32 acc':>9} {'compressed':>11} {'finalized':>10} {'exact bytes':>12} {'of fp32':>8}"
          f" {'file bytes':>11} {'with statistics':>16} {'ratio':>6}")
    for r in rows:
        before = r["exact_bytes"] + r["statistics_bytes"]
        print(
            f"{r['seed']:>4} {r['fp32_accuracy']:>9.2%} {r['accuracy']:>11.2%} {r['finalized_accuracy']:>10.2%} "
            f"{r['exact_bytes']:>12,} {r['fraction']:>8.2%} {r['file_bytes']:>11,} {before:>16,} "
            f"{r['exact_bytes'] / before:>6.3f}"
        )
    results = {"epochs": epochs, "gamma": args.gamma, "bn_samples": args.bn_samples,
               "initial_bits": args.initial_bits, "levels": args.levels, "runs": rows}
    write_json(args.out, results)
    return results


def statistics_bytes(model: torch.nn.Module) -> int:
    """Bytes of the running statistics that eval form leaves out of ``model``'s file."""
    return sum(
        getattr(module, stat).numel() * 4 for module in model.modules() if has_eval_form(module) for stat in STATISTICS
    )


if __name__ == "__main__":
    main()
