"""A compression report: per-layer figures, totals, a table (plain or rich) and a plot.

Every figure comes from :func:`selfcompress.size.exact_size`, so the report, the logs and
the packed file agree. Plotting needs matplotlib (``pip install selfcompress[plot]``),
imported only when :meth:`CompressionReport.plot` is called.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfcompress.batchnorm import eval_form_state
from selfcompress.entropy import CODERS, compress, encode_codes
from selfcompress.finalize import LayerCodes, compressed
from selfcompress.layers import quantized_tensors
from selfcompress.packing import packed_nbytes
from selfcompress.quantize import MAX_CODE_BITS
from selfcompress.size import ModelSize, _kept_rows, open_rows, packed_size

#: Keys of the callback's per-epoch history that are size figures, not task metrics.
SIZE_KEYS = ("epoch", "bits_per_weight", "size_fraction", "size_bytes", "weights_kept", "channels_open")


@dataclass(frozen=True)
class LayerRow:
    """One compressed weight in the report."""

    name: str
    channels_open: int
    channels_total: int
    mean_bits: float
    max_bits: int
    weights_kept: int
    weights_total: int
    bytes: int
    share: float
    #: Code width of every output channel (0 for closed or removed channels).
    channel_bits: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class CompressionReport:
    """Per-layer rows and totals of a model's exact packed size.

    ``total_bytes``, ``fp32_bytes``, ``fraction_of_fp32`` and ``bits_per_weight`` are those
    of :class:`~selfcompress.size.ModelSize`; ``other_bytes`` is every tensor that is not a
    compressed weight (batch norms, embeddings, ...). ``history`` is the callback's
    per-epoch list, if one was given.

    ``total_bytes`` is the fixed-width exact size: every code at its channel's width, as a
    packed file (and bitsandbytes storage) holds it. ``entropy_bytes`` is the same model
    with its codes entropy-coded (``save(..., entropy_coding=entropy_coding)``, what goes
    over the wire); ``None`` when not computed (the callback's per-epoch report).
    """

    layers: list[LayerRow]
    other_bytes: int
    total_bytes: int
    fp32_bytes: int
    fraction_of_fp32: float
    bits_per_weight: float
    channels_open: int
    channels_total: int
    weights_kept: int
    weights_total: int
    history: list[dict[str, float]] = field(default_factory=list)
    entropy_bytes: int | None = None
    entropy_coding: str | None = None

    def to_dict(self) -> dict[str, float | int]:
        """Flat figures for a logger: totals, then ``layer/<name>/<figure>`` for every layer."""
        figures: dict[str, float | int] = {
            "total_bytes": int(self.total_bytes),
            "fp32_bytes": int(self.fp32_bytes),
            "other_bytes": int(self.other_bytes),
            "fraction_of_fp32": float(self.fraction_of_fp32),
            "bits_per_weight": float(self.bits_per_weight),
            "channels_open": int(self.channels_open),
            "channels_total": int(self.channels_total),
            "weights_kept": int(self.weights_kept),
            "weights_total": int(self.weights_total),
        }
        if self.entropy_bytes is not None:
            figures["entropy_bytes"] = int(self.entropy_bytes)
        for row in self.layers:
            prefix = f"layer/{row.name}/"
            figures[prefix + "channels_open"] = int(row.channels_open)
            figures[prefix + "mean_bits"] = float(row.mean_bits)
            figures[prefix + "max_bits"] = int(row.max_bits)
            figures[prefix + "weights_kept"] = int(row.weights_kept)
            figures[prefix + "bytes"] = int(row.bytes)
            figures[prefix + "share"] = float(row.share)
        return figures

    def _cells(self) -> tuple[list[str], list[list[str]], list[str]]:
        header = ["layer", "channels", "mean bits", "max bits", "weights kept", "bytes", "share"]
        rows = [
            [
                row.name,
                f"{row.channels_open}/{row.channels_total}",
                f"{row.mean_bits:.2f}",
                str(row.max_bits),
                f"{row.weights_kept:,}/{row.weights_total:,}",
                f"{row.bytes:,}",
                f"{row.share:.1%}",
            ]
            for row in self.layers
        ]
        other_share = self.other_bytes / max(self.total_bytes, 1)
        rows.append(["other tensors", "", "", "", "", f"{self.other_bytes:,}", f"{other_share:.1%}"])
        total = [
            "total",
            f"{self.channels_open}/{self.channels_total}",
            f"{self.bits_per_weight:.2f}",
            "",
            f"{self.weights_kept:,}/{self.weights_total:,}",
            f"{self.total_bytes:,}",
            "100.0%",
        ]
        return header, rows, total

    def summary(self) -> str:
        """One line: total bytes, fraction of fp32, bits per weight, and the entropy-coded bytes if known."""
        line = (
            f"{self.total_bytes:,} bytes = {self.fraction_of_fp32:.2%} of fp32 ({self.fp32_bytes:,} bytes), "
            f"{self.bits_per_weight:.2f} bits per weight"
        )
        if self.entropy_bytes is not None:
            share = self.entropy_bytes / max(self.total_bytes, 1)
            line += f"; {self.entropy_bytes:,} bytes entropy-coded ({self.entropy_coding}, {share:.1%} of fixed-width)"
        return line

    def __str__(self) -> str:
        header, rows, total = self._cells()
        widths = [max(len(line[i]) for line in [header, *rows, total]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            first = cells[0].ljust(widths[0])
            return "  ".join([first, *(cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))])

        rule = "-" * len(line(header))
        return "\n".join([line(header), rule, *(line(r) for r in rows), rule, line(total), self.summary()])

    def rich_table(self) -> Any:
        """A ``rich.table.Table`` of the report, styled like Lightning's ``RichModelSummary``."""
        from rich.table import Table

        header, rows, total = self._cells()
        table = Table(header_style="bold magenta", caption=self.summary(), show_footer=False)
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0)
        for cells in rows:
            table.add_row(*cells)
        table.add_section()
        table.add_row(*total, style="bold")
        return table

    def __rich__(self) -> Any:
        return self.rich_table()

    def plot(self, path: str | Path, *, dpi: int = 120) -> Path:
        """Write a PNG: code bits of every channel per layer, and size (and metrics) per epoch.

        Each layer is one horizontal strip with its channels sorted from widest to narrowest
        (closed channels, at 0 bits, end up on the right in grey). With a ``history``, a
        second panel shows the size as a percentage of fp32 over the epochs and, on a second
        axis, every other metric the history holds (accuracy, ...).

        Raises:
            ImportError: matplotlib is not installed (``pip install selfcompress[plot]``).
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.colors import BoundaryNorm, ListedColormap
            from matplotlib.figure import Figure
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "CompressionReport.plot needs matplotlib: `pip install selfcompress[plot]` "
                "(or `pip install matplotlib`)."
            ) from error
        import numpy as np

        path = Path(path)
        epochs = [entry for entry in self.history if "epoch" in entry]
        n_layers = max(len(self.layers), 1)
        strip_height = 0.32
        bits_height = 1.4 + strip_height * n_layers
        history_height = 2.8 if epochs else 0.0
        figure = Figure(figsize=(10, bits_height + history_height), layout="constrained")
        FigureCanvasAgg(figure)
        if epochs:
            grid = figure.add_gridspec(2, 1, height_ratios=[bits_height, history_height])
            ax_bits = figure.add_subplot(grid[0])
            ax_history = figure.add_subplot(grid[1])
        else:
            ax_bits = figure.add_subplot(1, 1, 1)
            ax_history = None

        observed = max([0, *(max(row.channel_bits, default=0) for row in self.layers)])
        top = min(max(observed, 8), MAX_CODE_BITS)
        colours = ["#d9d9d9"] + [tuple(c) for c in _viridis(top)]
        cmap = ListedColormap(colours)
        norm = BoundaryNorm(np.arange(-0.5, top + 1.5), cmap.N)
        mesh = None
        for i, row in enumerate(self.layers):
            widths = np.sort(np.asarray(row.channel_bits, dtype=float))[::-1]
            if len(widths) == 0:
                continue
            edges = np.linspace(0.0, 1.0, len(widths) + 1)
            lines = dict(edgecolors="white", linewidth=0.4) if len(widths) <= 64 else {}
            mesh = ax_bits.pcolormesh(edges, [i - 0.4, i + 0.4], widths[None, :], cmap=cmap, norm=norm, **lines)
        ax_bits.set_yticks(range(len(self.layers)))
        ax_bits.set_yticklabels(
            [f"{r.name}  {r.channels_open}/{r.channels_total} open, mean {r.mean_bits:.1f} b" for r in self.layers],
            fontsize=8,
        )
        ax_bits.set_ylim(len(self.layers) - 0.5, -0.5)
        ax_bits.set_xlim(0, 1)
        ax_bits.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
        ax_bits.set_xticklabels(["0%", "25%", "50%", "75%", "100%"])
        ax_bits.set_xlabel("output channels of the layer, widest first (grey: closed or removed)")
        ax_bits.set_title(f"Code bits per channel - {self.summary()}", fontsize=9)
        if mesh is not None:
            ticks = list(range(0, top + 1, 2 if top > 10 else 1))
            bar = figure.colorbar(mesh, ax=ax_bits, ticks=ticks, pad=0.01, fraction=0.03)
            bar.set_label("code bits")

        if ax_history is not None:
            _plot_history(ax_history, epochs)
        figure.savefig(path, dpi=dpi)
        return path


def _viridis(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    return [colormaps["viridis"](i / max(n - 1, 1)) for i in range(n)]


def _plot_history(ax: Any, epochs: list[Mapping[str, float]]) -> None:
    x = [entry["epoch"] for entry in epochs]
    handles = []
    if all("size_fraction" in entry for entry in epochs):
        handles += ax.plot(
            x, [100 * entry["size_fraction"] for entry in epochs], "o-", color="C0", label="size (% of fp32)"
        )
        ax.set_ylabel("size (% of fp32)")
        ax.set_ylim(bottom=0)
    elif all("size_bytes" in entry for entry in epochs):
        handles += ax.plot(x, [entry["size_bytes"] for entry in epochs], "o-", color="C0", label="size (bytes)")
        ax.set_ylabel("size (bytes)")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    legend_ax = ax
    metrics = sorted({key for entry in epochs for key in entry if key not in SIZE_KEYS and _is_number(entry[key])})
    if metrics:
        twin = ax.twinx()
        for j, key in enumerate(metrics):
            points = [(entry["epoch"], entry[key]) for entry in epochs if key in entry]
            handles += twin.plot(*zip(*points, strict=True), "s--", color=f"C{j + 1}", label=key)
        twin.set_ylabel(metrics[0] if len(metrics) == 1 else "metrics")
        legend_ax = twin  # drawn last, so its legend stays above every line
    # Above the plot, not inside it: a twin axis hides the first axis' lines from loc="best".
    legend_ax.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=min(len(handles), 4),
        fontsize=8,
        frameon=False,
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def channel_bits(model: nn.Module, graph: Any) -> dict[str, list[int]]:
    """Code width of every output channel of every compressed weight (0 when closed or removed)."""
    tensors = quantized_tensors(model)
    kept = graph.kept_channels(open_rows(tensors))
    widths = {}
    with torch.no_grad():
        for tensor in tensors:
            quantizer = tensor.quantizer
            row_widths = quantizer.row_widths(tensor.raw).cpu()
            live = _kept_rows(tensor, graph, kept) & quantizer.open.cpu()
            widths[tensor.name] = torch.where(live, row_widths, torch.zeros_like(row_widths)).tolist()
    return widths


def report(
    model: nn.Module,
    inputs: Any = None,
    history: Sequence[Mapping[str, float]] | None = None,
    *,
    entropy_coding: str | None = "lzma",
) -> CompressionReport:
    """The compression report of the packed file :func:`selfcompress.save` would write.

    Its figures are those of the compact module :func:`selfcompress.finalize` returns
    (channels and weights as they are there; removed channels are not counted, and the
    fp32 figure is that module's parameters at 32 bits), so every input gives the same
    report. Works under any grad mode.

    Args:
        model: Any model :func:`selfcompress.finalize` accepts: the LightningModule trained
            with the callback, its network, the finalized module, a plain model from a
            checkpoint.
        inputs: One forward call, as for :func:`selfcompress.finalize`.
        history: The callback's ``history`` (per-epoch dicts), for :meth:`plot`.
        entropy_coding: Coder for ``entropy_bytes`` (one of
            :data:`selfcompress.entropy.CODERS`); ``None`` skips it (coding takes about a
            second per million weights).

    Raises:
        ValueError: ``model`` has no compressed weights, no inputs are known for it, or
            ``entropy_coding`` is unknown.
    """
    if entropy_coding is not None and entropy_coding not in CODERS:
        raise ValueError(f"`entropy_coding` must be None or one of {CODERS}, got {entropy_coding!r}.")
    compact, _, layers = compressed(model, inputs)
    widths = {name: layer.widths for name, layer in layers.items()}
    size = packed_size(compact, widths)
    entropy = entropy_size(compact, layers, entropy_coding) if entropy_coding is not None else None
    return from_size(size, widths, history, entropy_bytes=entropy, entropy_coding=entropy_coding)


def entropy_size(compact: nn.Module, layers: Mapping[str, LayerCodes], coder: str = "lzma") -> int:
    """Bytes of ``compact``'s exact size with its codes and its other tensors entropy-coded, as ``save`` does.

    Each part is coded only where that makes it smaller; widths count one byte per row, as
    in the exact size. The file adds only its container (header and manifest).
    """
    codes = [layer.stored[0] for layer in layers.values()]
    widths = [layer.widths for layer in layers.values()]
    packed = sum(packed_nbytes(w, c.shape[1]) for c, w in zip(codes, widths, strict=True))
    code_bytes = min(len(encode_codes(codes, widths, coder)), packed)
    floats = [layer.scale.detach().cpu().to(torch.float32).reshape(-1).view(torch.uint8) for layer in layers.values()]
    state, constants = eval_form_state(compact)
    floats += [
        value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        for name, value in state.items()
        if name not in layers and name not in constants
    ]
    tail = torch.cat(floats).numpy().tobytes() if floats else b""
    return code_bytes + min(len(compress(tail, coder)), len(tail)) + sum(int(w.numel()) for w in widths)


def from_size(
    size: ModelSize,
    widths: Mapping[str, Sequence[int]] | None = None,
    history: Sequence[Mapping[str, float]] | None = None,
    *,
    entropy_bytes: int | None = None,
    entropy_coding: str | None = None,
) -> CompressionReport:
    """A report from an exact size already computed (``widths``: per-channel code bits by layer)."""
    total_bits = max(size.total_bits, 1)
    rows = [
        LayerRow(
            name=layer.name,
            channels_open=layer.channels_open,
            channels_total=layer.channels_total,
            mean_bits=layer.mean_bits,
            max_bits=layer.max_bits,
            weights_kept=layer.weights_kept,
            weights_total=layer.weights_total,
            bytes=(layer.bits + 7) // 8,
            share=layer.bits / total_bits,
            channel_bits=[int(w) for w in (widths or {}).get(layer.name, [])],
        )
        for layer in size.layers
    ]
    return CompressionReport(
        layers=rows,
        other_bytes=(size.other_bits + 7) // 8,
        total_bytes=size.total_bytes,
        fp32_bytes=size.fp32_bits // 8,
        fraction_of_fp32=size.fraction_of_fp32,
        bits_per_weight=size.bits_per_weight,
        channels_open=size.channels_open,
        channels_total=size.channels_total,
        weights_kept=size.weights_kept,
        weights_total=size.weights_total,
        history=[dict(entry) for entry in (history or [])],
        entropy_bytes=entropy_bytes,
        entropy_coding=entropy_coding if entropy_bytes is not None else None,
    )
