"""Checkpoints of a model that compresses itself, in the form any copy of the model loads.

A model being trained holds its weights under ``parametrizations`` (with bit depths and
exponents beside them) and, once channels have left it, at smaller shapes than it was
built with. :func:`plain_state_dict` gives the state dict of the model as constructed: the
same keys, the original shapes, each compressed weight at its quantized value and the
removed channels back in as exact zeros, so the plain model computes what the trained one
computes. :func:`accept_state_dict` goes the other way for a prepared model that is
loading a state dict, plain or not. :func:`size_as_built` counts a size's channels and
weights against the shapes the model was built with.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, MutableMapping, Sequence

import torch
from torch import Tensor, nn

from selfcompress.layers import INITIAL_BITS, ChannelQuantizer, QuantizedTensor, quantized_tensors
from selfcompress.size import ModelSize
from selfcompress.surgery import RemovalRecord, resize_to_state_dict

#: The value a removed channel's entry takes when padded back, by state-dict name ending
#: (0 otherwise): a batch norm's variance as freshly built; with weight and bias 0 the
#: channel outputs exactly zero.
PAD_VALUES: dict[str, float] = {".running_var": 1.0}


def _chain_prefix(tensor: QuantizedTensor) -> str:
    """``"net.0.parametrizations.weight."``: where a compressed weight's chain lives in the state dict."""
    module_prefix = tensor.name[: len(tensor.name) - len(tensor.attr)]
    return f"{module_prefix}parametrizations.{tensor.attr}."


def pad(tensor: Tensor, shape: list[int], kept: list[list[int] | None], value: float = 0.0) -> Tensor:
    """``tensor`` placed at the ``kept`` original indices of a new tensor of ``shape`` filled with ``value``.

    Args:
        tensor: The sliced tensor.
        shape: Its original shape.
        kept: Per dimension, the original indices of ``tensor``'s entries, or None where
            the dimension was never sliced.
        value: What the removed entries hold.

    Raises:
        ValueError: ``shape`` or ``kept`` does not fit ``tensor``.
    """
    if len(shape) != tensor.dim() or len(kept) != tensor.dim():
        raise ValueError(
            f"`shape` {shape} and `kept` (length {len(kept)}) must match the tensor's {tensor.dim()} dimensions."
        )
    for dim, indices in enumerate(kept):
        if indices is None:
            continue
        if len(indices) != tensor.shape[dim]:
            raise ValueError(f"`kept[{dim}]` has {len(indices)} indices for a dimension of size {tensor.shape[dim]}.")
        grown = list(tensor.shape)
        grown[dim] = shape[dim]
        index = torch.tensor(indices, dtype=torch.int64, device=tensor.device)
        tensor = torch.full(grown, value, dtype=tensor.dtype, device=tensor.device).index_copy_(dim, index, tensor)
    return tensor


@torch.no_grad()
def plain_state_dict(
    model: nn.Module, removed: RemovalRecord | None = None, state_dict: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """The state dict of ``model`` as constructed, computing what ``model`` computes.

    Exactly the keys a freshly built copy of ``model`` has: each compressed weight holds
    its quantized value (what ``module.weight`` returns, bit for bit), no bit depths or
    exponents; every tensor listed in ``removed`` is back at its original shape with the
    removed channels as zeros (unit running variance), so that they output exactly zero.

    Args:
        model: A model prepared by :func:`selfcompress.prepare` (or not).
        removed: What the surgery removed from ``model``, by state-dict name.
        state_dict: ``model.state_dict()`` if already at hand.
    """
    state = model.state_dict() if state_dict is None else state_dict
    removed = removed or {}
    chains = {_chain_prefix(tensor): tensor for tensor in quantized_tensors(model)}
    plain: dict[str, Tensor] = {}
    for key, value in state.items():
        chain = next((prefix for prefix in chains if key.startswith(prefix)), None)
        if chain is not None:
            if key != chain + "original":
                continue
            tensor = chains[chain]
            name, value = tensor.name, getattr(tensor.module, tensor.attr).detach()
        else:
            name = key
        entry = removed.get(key)
        if entry is not None:
            fill = next((v for end, v in PAD_VALUES.items() if name.endswith(end)), 0.0)
            value = pad(value, entry["shape"], entry["kept"], fill)
        plain[name] = value
    return plain


@torch.no_grad()
def accept_state_dict(
    model: nn.Module, state_dict: MutableMapping[str, Tensor], prefix: str = "", initial_bits: float = INITIAL_BITS
) -> None:
    """Make a prepared ``model`` ready to load ``state_dict`` strictly; edits ``state_dict`` in place.

    A plain entry ``x.weight`` of a compressed weight moves to
    ``x.parametrizations.weight.original``, and its quantizer entries are added as
    :func:`selfcompress.prepare` would make them for that weight (``initial_bits``, the
    exponent at which the largest weight just fits, nothing closed). Then ``model``'s
    tensors take the shapes they have in ``state_dict`` (see
    :func:`selfcompress.surgery.resize_to_state_dict`).

    Args:
        model: The prepared model about to load.
        state_dict: What it loads, with ``prefix`` before ``model``'s own names.
        prefix: ``model``'s prefix in ``state_dict`` (as ``load_state_dict`` hooks get it).
        initial_bits: Bit depth given to the channels of a plain weight.
    """
    for tensor in quantized_tensors(model):
        name, chain = prefix + tensor.name, prefix + _chain_prefix(tensor)
        if name not in state_dict or chain + "original" in state_dict:
            continue
        weight = state_dict.pop(name)
        state_dict[chain + "original"] = weight
        parametrizations = getattr(tensor.module.parametrizations, tensor.attr)
        for index, parametrization in enumerate(parametrizations):
            if isinstance(parametrization, ChannelQuantizer):
                fresh = ChannelQuantizer(weight, initial_bits).state_dict()
                for key, value in fresh.items():
                    state_dict.setdefault(f"{chain}{index}.{key}", value)
    resize_to_state_dict(model, state_dict, prefix)


def size_as_built(
    size: ModelSize, tensors: Sequence[QuantizedTensor], removed: RemovalRecord, prefix: str = ""
) -> ModelSize:
    """``size`` with each layer's ``channels_total`` and ``weights_total``, and the total weights, as built.

    Args:
        size: The exact size of a model that shrinking may have made smaller.
        tensors: Its compressed weights.
        removed: What the surgery removed from it, by state-dict name.
        prefix: The model's prefix in ``removed``'s names.
    """
    shapes = {
        tensor.name: removed[key]["shape"]
        for tensor in tensors
        if (key := f"{prefix}{_chain_prefix(tensor)}original") in removed
    }
    layers = [
        dataclasses.replace(layer, channels_total=shape[0], weights_total=math.prod(shape))
        if (shape := shapes.get(layer.name)) is not None
        else layer
        for layer in size.layers
    ]
    return dataclasses.replace(size, layers=layers, weights_total=sum(layer.weights_total for layer in layers))
