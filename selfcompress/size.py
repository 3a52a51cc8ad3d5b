"""The one size function: a differentiable penalty for the loss and the exact figure.

Both read the same channel groups, so a channel counts as gone exactly when it can be
removed. The exact figure is what a packed file holds: for every kept channel its integer
codes at the width they need, a float32 scale, a one-byte width and its float32 bias; and
every other parameter or buffer at its own precision, except the running statistics of
batch norms stored in eval form (:func:`selfcompress.batchnorm.eval_form`), which the
file rebuilds as constants.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from selfcompress.batchnorm import STATISTICS, has_eval_form
from selfcompress.graph import ChannelGraph
from selfcompress.layers import _BIAS_OF, QuantizedTensor, quantized_tensors

SCALE_BITS = 32
WIDTH_BITS = 8
BIAS_BITS = 32


@dataclass(frozen=True)
class LayerSize:
    """Exact figures of one compressed weight."""

    name: str
    channels_open: int
    channels_kept: int
    channels_total: int
    weights_kept: int
    weights_total: int
    mean_bits: float
    max_bits: int
    code_bits: int
    overhead_bits: int

    @property
    def bits(self) -> int:
        """Codes plus per-channel scale, width and bias."""
        return self.code_bits + self.overhead_bits


@dataclass(frozen=True)
class ModelSize:
    """Exact size of a model as it would be packed, with per-layer detail."""

    layers: list[LayerSize]
    other_bits: int
    fp32_bits: int
    weights_total: int
    other_tensors: dict[str, int] = field(default_factory=dict)

    @property
    def total_bits(self) -> int:
        return sum(layer.bits for layer in self.layers) + self.other_bits

    @property
    def total_bytes(self) -> int:
        return (self.total_bits + 7) // 8

    @property
    def fraction_of_fp32(self) -> float:
        return self.total_bits / self.fp32_bits

    @property
    def weights_kept(self) -> int:
        return sum(layer.weights_kept for layer in self.layers)

    @property
    def bits_per_weight(self) -> float:
        """Code bits per weight of the compressed layers as they started."""
        return sum(layer.code_bits for layer in self.layers) / max(self.weights_total, 1)

    @property
    def channels_open(self) -> int:
        return sum(layer.channels_open for layer in self.layers)

    @property
    def channels_total(self) -> int:
        return sum(layer.channels_total for layer in self.layers)


def _row_fan_in(tensor: QuantizedTensor, live_inputs: Tensor) -> Tensor:
    """Live weights per output row, given a boolean mask over the layer's input channels."""
    rows = tensor.raw.shape[0]
    groups = tensor.groups
    per_input = tensor.raw[0].numel() * groups // tensor.in_channels  # kernel positions
    live_per_group = live_inputs.reshape(groups, -1).sum(dim=1)
    return live_per_group.repeat_interleave(rows // groups) * per_input


def _live_inputs(tensor: QuantizedTensor, graph: ChannelGraph, kept: Tensor) -> Tensor:
    live = torch.ones(tensor.in_channels, dtype=torch.bool)
    consumer = graph.consumers.get(tensor.name)
    if consumer is not None:
        live[consumer.positions] = kept[consumer.channels]
    return live


def _kept_rows(tensor: QuantizedTensor, graph: ChannelGraph, kept: Tensor) -> Tensor:
    rows = torch.ones(tensor.raw.shape[0], dtype=torch.bool)
    producer = graph.producers.get(tensor.name)
    if producer is not None:
        rows[producer.rows] = kept[producer.channels]
    return rows


def open_rows(tensors: list[QuantizedTensor]) -> dict[str, Tensor]:
    return {t.name: t.quantizer.open.cpu() for t in tensors}


def penalty(tensors: list[QuantizedTensor], graph: ChannelGraph, num_weights: int) -> Tensor:
    """Differentiable size in bits per original weight (paper eq. 5 over channel groups).

    Each layer costs ``live fan-in x sum of its channel bit depths`` plus, so that a
    producer learns what closing saves downstream, ``live outputs x kernel x bits of the
    producers of each live input``. The live counts carry no gradient.
    """
    kept = graph.kept_channels(open_rows(tensors))
    device = tensors[0].quantizer.bits.device
    channel_bits = torch.zeros(graph.num_channels, device=device)
    bits = {t.name: t.quantizer.bits.reshape(-1).clamp_min(0) for t in tensors}
    for name, producer in graph.producers.items():
        if name in bits:
            channel_bits = channel_bits.index_add(0, producer.channels.to(device), bits[name][producer.rows.to(device)])
    total = torch.zeros((), device=device)
    for tensor in tensors:
        live_inputs = _live_inputs(tensor, graph, kept)
        fan_in = _row_fan_in(tensor, live_inputs).to(device, torch.float32)
        total = total + (fan_in * bits[tensor.name]).sum()
        consumer = graph.consumers.get(tensor.name)
        if consumer is not None:
            rows_live = _kept_rows(tensor, graph, kept) & tensor.quantizer.open.cpu()
            per_input = tensor.raw[0].numel() * tensor.groups / tensor.in_channels
            upstream = channel_bits[consumer.channels.to(device)].sum()
            total = total + float(rows_live.sum()) * per_input / tensor.groups * upstream
    return total / num_weights


@torch.no_grad()
def exact_size(model: nn.Module, graph: ChannelGraph) -> ModelSize:
    """The exact packed size of a prepared ``model``, per layer and in total."""
    tensors = quantized_tensors(model)
    kept = graph.kept_channels(open_rows(tensors))
    layers = []
    counted: set[int] = set()
    for tensor in tensors:
        quantizer = tensor.quantizer
        widths = quantizer.row_widths(tensor.raw).cpu()
        rows_kept = _kept_rows(tensor, graph, kept)
        fan_in = _row_fan_in(tensor, _live_inputs(tensor, graph, kept))
        overhead_per_row = SCALE_BITS + WIDTH_BITS + (BIAS_BITS if tensor.bias is not None else 0)
        overhead = int(rows_kept.sum()) * overhead_per_row
        code = int((widths * fan_in)[rows_kept].sum())
        open_mask = quantizer.open.cpu() & rows_kept
        layer = LayerSize(
            name=tensor.name,
            channels_open=int(open_mask.sum()),
            channels_kept=int(rows_kept.sum()),
            channels_total=len(rows_kept),
            weights_kept=int(fan_in[rows_kept].sum()),
            weights_total=tensor.raw.numel(),
            mean_bits=float(widths[open_mask].float().mean()) if open_mask.any() else 0.0,
            max_bits=int(widths.max()) if len(widths) else 0,
            code_bits=code,
            overhead_bits=overhead,
        )
        layers.append(layer)
        counted.update(id(p) for p in (tensor.raw, tensor.bias) if p is not None)
        counted.update(id(p) for p in quantizer.parameters())
        counted.update(id(b) for b in quantizer.buffers())

    other_tensors = {}
    for name, value in _state_tensors(model):
        if id(value) in counted or _folded_statistic(model, name):
            continue
        other_tensors[name] = _kept_elements(name, value, graph, kept) * value.element_size() * 8
    quantizer_params = {id(p) for t in tensors for p in t.quantizer.parameters()}
    fp32_bits = 32 * sum(p.numel() for p in model.parameters() if id(p) not in quantizer_params)
    return ModelSize(
        layers=layers,
        other_bits=sum(other_tensors.values()),
        fp32_bits=fp32_bits,
        weights_total=sum(layer.weights_total for layer in layers),
        other_tensors=other_tensors,
    )


def packed_size(model: nn.Module, widths: Mapping[str, Tensor]) -> ModelSize:
    """The exact size of a plain ``model`` saved packed, per layer and in total.

    ``widths`` maps each packed weight (its ``state_dict`` name) to the code width of
    each of its rows; each row costs its codes, a float32 scale, a one-byte width and, if
    the layer has one, its float32 bias. Every other tensor counts at its own precision,
    except batch-norm statistics stored in eval form.
    The figures describe the model as it is (``channels_total`` and ``weights_total`` are
    its current ones).
    """
    state = dict(_state_tensors(model))
    layers, counted = [], set()
    for name, row_widths in widths.items():
        weight = state[name]
        module_name, _, attr = name.rpartition(".")
        bias_attr = _BIAS_OF.get(attr)
        bias_name = (f"{module_name}.{bias_attr}" if module_name else bias_attr) if bias_attr else None
        bias = state.get(bias_name) if bias_name else None
        row_widths = row_widths.to(torch.int64).cpu()
        rows, fan_in = weight.shape[0], weight[0].numel() if weight.shape[0] else 0
        open_mask = row_widths > 0
        layers.append(
            LayerSize(
                name=name,
                channels_open=int(open_mask.sum()),
                channels_kept=rows,
                channels_total=rows,
                weights_kept=weight.numel(),
                weights_total=weight.numel(),
                mean_bits=float(row_widths[open_mask].float().mean()) if open_mask.any() else 0.0,
                max_bits=int(row_widths.max()) if rows else 0,
                code_bits=int(row_widths.sum()) * fan_in,
                overhead_bits=rows * (SCALE_BITS + WIDTH_BITS + (BIAS_BITS if bias is not None else 0)),
            )
        )
        counted.update({name, bias_name} if bias is not None else {name})
    other_tensors = {
        n: v.numel() * v.element_size() * 8
        for n, v in state.items()
        if n not in counted and not _folded_statistic(model, n)
    }
    return ModelSize(
        layers=layers,
        other_bits=sum(other_tensors.values()),
        fp32_bits=32 * sum(p.numel() for p in model.parameters()),
        weights_total=sum(layer.weights_total for layer in layers),
        other_tensors=other_tensors,
    )


def _state_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    seen: set[int] = set()
    found = []
    for name, value in [*model.named_parameters(), *model.named_buffers()]:
        if id(value) not in seen:
            seen.add(id(value))
            found.append((name, value))
    return found


def _folded_statistic(model: nn.Module, name: str) -> bool:
    """Whether tensor ``name`` is a running statistic of a batch norm the file stores in eval form."""
    module_name, _, attr = name.rpartition(".")
    return attr in STATISTICS and has_eval_form(model.get_submodule(module_name))


def _kept_elements(name: str, value: Tensor, graph: ChannelGraph, kept: Tensor) -> int:
    """Elements of a follower's per-channel tensor that stay; other tensors stay whole."""
    module_name, _, _ = name.rpartition(".")
    followers = graph.followers.get(module_name)
    if not followers or value.dim() == 0:
        return value.numel()
    positions = torch.cat([f.positions for f in followers])
    channels = torch.cat([f.channels for f in followers])
    if value.shape[0] <= int(positions.max()):
        return value.numel()
    removed = int((~kept[channels]).sum())
    return value.numel() // value.shape[0] * (value.shape[0] - removed)
