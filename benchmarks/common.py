"""What every benchmark prints: the command that produced the figures and the machine."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch


def machine() -> str:
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def header() -> str:
    return f"command: python {' '.join(sys.argv)}\nmachine: {machine()}"


def write_json(path: str | None, results: dict) -> None:
    if path:
        Path(path).write_text(json.dumps({"command": " ".join(sys.argv), "machine": machine(), **results}, indent=2))
