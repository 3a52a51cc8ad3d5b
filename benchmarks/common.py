"""What every benchmark prints: the command that produced the figures and the machine."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name where Linux tells it, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    # The CPU and the kernels torch picks for it: bf16 and float results differ between them.
    return (
        f"{platform.platform()}, {cpu_name()} ({torch.backends.cpu.get_cpu_capability()} kernels), "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}"
    )


def command() -> str:
    """How this process was started, quoted so that it can be pasted into a shell."""
    return f"python {shlex.join(sys.argv)}"


def header() -> str:
    return f"command: {command()}\nmachine: {machine()}"


def write_json(path: str | None, results: dict) -> None:
    if path:
        Path(path).write_text(json.dumps({"command": command(), "machine": machine(), **results}, indent=2))


def median_seconds(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seed_mean(points: list[dict], means: tuple[str, ...], counts: tuple[str, ...] = ()) -> dict:
    """One point from its runs on several seeds (``points``, one dict each).

    The keys in ``means`` are averaged, those in ``counts`` averaged and rounded, the rest
    taken from the first run; the per-run ``seed`` and ``epochs`` are dropped and each
    run's accuracy is kept in ``seed_accuracies``.
    """
    row = {key: value for key, value in points[0].items() if key not in ("seed", "epochs")}
    for key in means + counts:
        if key in row:
            mean = sum(point[key] for point in points) / len(points)
            row[key] = round(mean) if key in counts else mean
    row["seed_accuracies"] = [point["accuracy"] for point in points]
    return row


def add_run_arguments(
    parser: argparse.ArgumentParser, *, smoke_help: str = "seconds, to check the script runs",
    full_help: str | None = None, plot: bool = True,
) -> None:
    """The options every benchmark shares: seed, threads, smoke (and full), JSON and PNG output."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    if full_help:
        parser.add_argument("--full", action="store_true", help=full_help)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    if plot:
        parser.add_argument("--plot", default=None, help="write a PNG plot here")


@contextmanager
def size_accuracy_axes(
    path: str, title: str, xlabel: str, ylabel: str, *, size: tuple[float, float] = (6.5, 4.2),
    legend: str = "best",
) -> Iterator:
    """Axes for an accuracy-against-size plot (log x), saved as a PNG at ``path`` on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc=legend)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
