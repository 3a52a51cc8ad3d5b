"""What SelfCompress costs on the MNIST CNN: step time, finalize / save time, inference latency.

- Training step time with the callback vs without, in the same process: ``--reps``
  interleaved pairs of short fits (fp32 fit, SelfCompress fit, fp32 fit, ...), each of
  ``--steps`` steps of batch 128, the first ``--warmup`` steps of every fit dropped (the
  callback traces the graph on its first step); median per-step time of each arm, ratio.
- A model trained ``--train-steps`` steps with ``SelfCompress(gamma)`` is then finalized
  and saved (median wall time of 3 runs each).
- CPU inference latency (eval, ``torch.no_grad``, median of ``--latency-reps``) at batch
  1 and 256 of: the fp32 net, the prepared (training-form) SelfCompress net, the
  finalized net, and the bitsandbytes export (float32 compute) if it can be built.

Uses MNIST from ``--data-dir`` when present, else random images (timing does not depend
on pixel values; the report says which). ``--smoke`` runs in seconds; there is no
``--full``: the figures are per step, so the short setting is the measurement (on a GPU
the same command times the GPU).

    python benchmarks/bench_cost.py --out cost.json --plot benchmarks/plots/cost.png
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent / "examples")]

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from bench_mnist import DEFAULT_DATA, fit, have_data, loaders  # noqa: E402
from common import add_run_arguments, header, median_seconds, write_json  # noqa: E402
from mnist import mnist_cnn  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import selfcompress  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class StepTimer(pl.Callback):
    """Wall time of each training batch, from its start to the end of every callback's batch-end hook."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)


def latency(module: nn.Module, batch: torch.Tensor, reps: int) -> float:
    module.eval()
    with torch.no_grad():
        return median_seconds(lambda: module(batch), reps, warmup=2)


def main(argv: list[str] | None = None) -> dict:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--gamma", type=float, default=0.02)
    parser.add_argument("--steps", type=int, default=30, help="steps per timed fit")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of each timed fit")
    parser.add_argument("--reps", type=int, default=3, help="interleaved (fp32, SelfCompress) pairs")
    parser.add_argument("--train-steps", type=int, default=400, help="steps of the model that is finalized")
    parser.add_argument("--latency-reps", type=int, default=50)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.steps, args.warmup, args.reps, args.train_steps, args.latency_reps = 4, 1, 1, 8, 3
    batch_size = 128

    if have_data(args.data_dir):
        train_loader, test_loader = loaders(args.data_dir, batch_size, None, 1000, args.seed)
        data = "MNIST"
    else:
        generator = torch.Generator().manual_seed(args.seed)
        images, labels = torch.randn(4096, 1, 28, 28, generator=generator), torch.randint(0, 10, (4096,))
        train_loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True, drop_last=True,
                                  generator=generator)
        test_loader = DataLoader(TensorDataset(images[:1000], labels[:1000]), batch_size=1000)
        data = "random images (no MNIST files found)"

    # 1. Step time, interleaved.
    per_arm: dict[str, list[float]] = {"fp32": [], "selfcompress": []}
    for rep in range(args.reps):
        for arm, gamma in (("fp32", None), ("selfcompress", args.gamma)):
            timer = StepTimer()
            fit(train_loader, None, gamma, args.seed + rep, args.steps, extra_callbacks=[timer])
            per_arm[arm] += timer.times[args.warmup:]
    step = {arm: statistics.median(times) for arm, times in per_arm.items()}
    ratio = step["selfcompress"] / step["fp32"]

    # 2. Finalize and save of a model trained longer.
    base, _, _, _ = fit(train_loader, None, None, args.seed, args.train_steps)
    model, callback, train_seconds, steps = fit(train_loader, None, args.gamma, args.seed, args.train_steps)
    size = callback.size()
    finalize_seconds = median_seconds(lambda: selfcompress.finalize(model.net), 3, warmup=0)
    compact = selfcompress.finalize(model.net)
    try:
        from selfcompress.io import save

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.safetensors"
            save_seconds = median_seconds(lambda: save(model.net, path), 3, warmup=0)
            save_bytes = path.stat().st_size
        save_note = "selfcompress.io.save"
    except ImportError as error:
        save_seconds, save_bytes, save_note = None, None, f"not measured: packed writer unavailable ({error})"

    # 3. Inference latency.
    models: dict[str, nn.Module | str] = {"fp32": base.net, "prepared (training form)": model.net,
                                          "finalized": compact}
    try:
        from selfcompress.bnb import to_bitsandbytes

        models["bitsandbytes (fp32 compute)"] = to_bitsandbytes(model.net, dtype=torch.float32)
    except Exception as error:  # noqa: BLE001 - reported, not hidden
        models["bitsandbytes (fp32 compute)"] = f"not measured: {type(error).__name__}: {error}"
    x = next(iter(test_loader))[0]
    latencies: dict[str, dict[str, float] | str] = {}
    for name, module in models.items():
        if isinstance(module, str):
            latencies[name] = module
            continue
        latencies[name] = {f"batch {b}": latency(module, x[:b].contiguous(), args.latency_reps) for b in (1, 256)}

    print(header())
    print(f"MNIST CNN ({sum(p.numel() for p in mnist_cnn().parameters()):,} weights), {data}, batch {batch_size}, "
          f"{'smoke' if args.smoke else 'short (CPU)'} setting")
    print(f"step time: fp32 {1e3 * step['fp32']:.1f} ms, SelfCompress(gamma={args.gamma:g}) "
          f"{1e3 * step['selfcompress']:.1f} ms, ratio {ratio:.2f}x (median of {len(per_arm['fp32'])} / "
          f"{len(per_arm['selfcompress'])} steps, {args.reps} interleaved pairs of {args.steps}-step fits, "
          f"first {args.warmup} of each dropped)")
    print(f"model for finalize/latency: {steps} steps, {size.total_bytes:,} exact bytes "
          f"({size.fraction_of_fp32:.2%} of fp32), params {sum(p.numel() for p in compact.parameters()):,}")
    print(f"finalize {1e3 * finalize_seconds:.0f} ms; save "
          + (f"{1e3 * save_seconds:.0f} ms ({save_bytes:,} bytes)" if save_seconds is not None else save_note))
    print(f"{'inference latency (ms)':<32}{'batch 1':>10}{'batch 256':>11}")
    for name, value in latencies.items():
        if isinstance(value, str):
            print(f"{name:<32} {value}")
        else:
            print(f"{name:<32}{1e3 * value['batch 1']:>10.2f}{1e3 * value['batch 256']:>11.1f}")
    results = {"benchmark": "cost", "data": data, "smoke": args.smoke, "gamma": args.gamma,
               "step_seconds": step, "step_ratio": ratio, "step_samples": {k: len(v) for k, v in per_arm.items()},
               "trained_steps": steps, "exact_bytes": size.total_bytes,
               "finalized_params": sum(p.numel() for p in compact.parameters()),
               "finalize_seconds": finalize_seconds, "save_seconds": save_seconds, "save_bytes": save_bytes,
               "save_note": save_note, "latency_seconds": latencies}
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        measured = {k: v for k, v in latencies.items() if isinstance(v, dict)}
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
        axes[0].bar(["fp32", "SelfCompress"], [1e3 * step["fp32"], 1e3 * step["selfcompress"]])
        axes[0].set_ylabel("ms per training step (batch 128)")
        for ax, b in zip(axes[1:], ("batch 1", "batch 256"), strict=True):
            ax.bar(range(len(measured)), [1e3 * v[b] for v in measured.values()])
            ax.set_xticks(range(len(measured)), [k.split(" (")[0] for k in measured], rotation=20, fontsize=7)
            ax.set_ylabel(f"inference ms, {b}")
        fig.suptitle(f"MNIST CNN cost on CPU ({torch.get_num_threads()} thread(s)), "
                     f"{'smoke' if args.smoke else 'short'} setting", fontsize=9)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        plt.close(fig)
        results["plot"] = args.plot
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
