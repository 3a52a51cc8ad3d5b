"""Gates: a channel is open while its bit depth is above zero.

A closed channel still passes a constant downstream (its bias, and the shift of a batch
norm after it). Once every writer of a removable channel is closed, that constant is
ramped to exactly zero over ``ramp_steps`` optimizer steps, after which the channel
contributes nothing and can be removed without changing any output.
"""

from __future__ import annotations

import torch
from torch import nn

from selfcompress.graph import ChannelGraph
from selfcompress.layers import QuantizedTensor

#: Batch-norm-like tensors that carry a closed channel's constant downstream.
_SHIFT_TENSORS = ("bias", "running_mean")


@torch.no_grad()
def count_closed_steps(tensors: list[QuantizedTensor]) -> None:
    """Advance each channel's count of steps spent closed (reset when it is open)."""
    for tensor in tensors:
        quantizer = tensor.quantizer
        quantizer.closed_steps.add_(1).mul_((~quantizer.open).to(quantizer.closed_steps.dtype))


@torch.no_grad()
def channel_closed_steps(tensors: list[QuantizedTensor], graph: ChannelGraph) -> torch.Tensor:
    """Per global channel: steps since its last writer closed (0 while one is open or it is kept whole)."""
    steps = torch.zeros(graph.num_channels, dtype=torch.int64)
    steps[graph.removable] = torch.iinfo(torch.int64).max
    by_name = {t.name: t for t in tensors}
    for name, producer in graph.producers.items():
        tensor = by_name.get(name)
        rows_steps = (
            tensor.quantizer.closed_steps.cpu()[producer.rows]
            if tensor is not None
            else torch.zeros_like(producer.rows)
        )
        steps.scatter_reduce_(0, producer.channels, rows_steps, reduce="amin")
    steps[steps == torch.iinfo(torch.int64).max] = 0
    return steps


@torch.no_grad()
def drive_closed_to_zero(
    model: nn.Module, tensors: list[QuantizedTensor], graph: ChannelGraph, ramp_steps: int
) -> None:
    """Scale the constants of fully closed removable channels towards zero.

    The factor falls linearly from 1 to 0 as a channel spends ``ramp_steps`` optimizer
    steps closed, and stays exactly 0 afterwards.
    """
    steps = channel_closed_steps(tensors, graph)
    closing = steps > 0
    if not closing.any():
        return
    factor = (1 - steps.double() / ramp_steps).clamp(0, 1).float()
    by_name = {t.name: t for t in tensors}
    for name, producer in graph.producers.items():
        tensor = by_name.get(name)
        if tensor is None or tensor.bias is None:
            continue
        _scale_entries(tensor.bias, producer.rows, factor[producer.channels], closing[producer.channels])
    modules = dict(model.named_modules())
    for module_name, followers in graph.followers.items():
        module = modules[module_name]
        for follower in followers:
            for attr in _SHIFT_TENSORS:
                value = getattr(module, attr, None)
                if isinstance(value, torch.Tensor) and value.dim() == 1:
                    _scale_entries(value, follower.positions, factor[follower.channels], closing[follower.channels])


def _scale_entries(value: torch.Tensor, positions: torch.Tensor, factor: torch.Tensor, where: torch.Tensor) -> None:
    positions, factor = positions[where].to(value.device), factor[where].to(value.device, value.dtype)
    value.data[positions] = value.data[positions] * factor


@torch.no_grad()
def protect_outputs(tensors: list[QuantizedTensor], graph: ChannelGraph, min_bits: float) -> None:
    """Keep the channels of layers that write the model's outputs at ``min_bits`` or more."""
    for tensor in tensors:
        if tensor.name in graph.outputs:
            tensor.quantizer.bits.clamp_(min=min_bits)
