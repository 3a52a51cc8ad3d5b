"""Removing channels from a model while it trains: tensors, module attributes, optimizer state.

A sliced parameter becomes a new ``Parameter`` (autograd caches a leaf's shape, so its data
cannot simply shrink) and every optimizer's reference to it is updated in place: the entry
in its param group and its per-parameter state (Adam moments, SGD momentum, ...), sliced
the same way. Schedulers hold the optimizer, not the parameters, and keep working.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from selfcompress.graph import ChannelGraph

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SLICEABLE = (nn.Linear, *_CONV, _BatchNorm)

#: What the surgery removed, by state-dict name: ``{"shape": original shape, "kept": per dim,
#: the original indices still present (``None`` for a dim never sliced)}``. Plain lists and
#: ints, so that it travels in checkpoints loaded with ``weights_only=True``.
RemovalRecord = dict[str, dict[str, Any]]


@dataclass
class _Cut:
    """Positions to drop from one module, along its output and input channel dimensions."""

    out: set[int] = field(default_factory=set)
    into: set[int] = field(default_factory=set)


def keep_one_per_group(channels: Tensor, graph: ChannelGraph) -> Tensor:
    """``channels`` without the first channel of any group it would empty (layers need one)."""
    channels = channels.clone()
    for _, offset, size in graph.roots:
        if size and channels[offset : offset + size].all():
            channels[offset] = False
    return channels


def supported_channels(model: nn.Module, graph: ChannelGraph) -> Tensor:
    """Per global channel: whether every module in its group can be sliced here."""
    modules = dict(model.named_modules())
    ok = torch.ones(graph.num_channels, dtype=torch.bool)
    for name, followers in graph.followers.items():
        module = modules[name]
        if not isinstance(module, _BatchNorm) and any(True for _ in module.parameters(recurse=False)):
            for follower in followers:
                ok[follower.channels] = False
    for name in [*graph.producers, *graph.consumers]:
        module = modules[name.rpartition(".")[0]]
        if not isinstance(module, _SLICEABLE) or (isinstance(module, _CONV) and 1 < module.groups < module.in_channels):
            members = [graph.producers.get(name), graph.consumers.get(name)]
            for member in filter(None, members):
                ok[member.channels] = False
    return ok


@torch.no_grad()
def remove_channels(
    model: nn.Module,
    graph: ChannelGraph,
    channels: Tensor,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    record: RemovalRecord | None = None,
    prefix: str = "",
) -> int:
    """Remove the global ``channels`` (a boolean mask) from every tensor that refers to them.

    ``graph`` must describe ``model`` as it is now; it no longer does afterwards.

    Args:
        model: The model to shrink, in place.
        graph: Its channel groups.
        channels: Boolean mask over the global channels of ``graph``.
        optimizers: Optimizers whose references and per-parameter state follow the slices.
        record: Updated in place with every tensor sliced, under ``prefix`` + its state-dict
            name in ``model`` (see :data:`RemovalRecord`), so that the original shapes can be
            restored with zeros later.
        prefix: Prepended to the names in ``record`` (``model``'s name in a larger module).

    Returns:
        The number of channels removed.
    """
    cuts: dict[str, _Cut] = {}
    for name, producer in graph.producers.items():
        rows = producer.rows[channels[producer.channels]]
        cuts.setdefault(name.rpartition(".")[0], _Cut()).out.update(rows.tolist())
    for name, consumer in graph.consumers.items():
        positions = consumer.positions[channels[consumer.channels]]
        cuts.setdefault(name.rpartition(".")[0], _Cut()).into.update(positions.tolist())
    for name, followers in graph.followers.items():
        for follower in followers:
            cuts.setdefault(name, _Cut()).out.update(follower.positions[channels[follower.channels]].tolist())
    modules = dict(model.named_modules())
    optimizers = list(optimizers)
    for name, cut in cuts.items():
        if cut.out or cut.into:
            for key, shape, dim, keep in _cut_module(modules[name], cut, optimizers):
                if record is not None:
                    note_slice(record, f"{prefix}{name}.{key}" if name else f"{prefix}{key}", shape, dim, keep)
    return int(channels.sum())


def note_slice(record: RemovalRecord, key: str, shape: torch.Size, dim: int, keep: Tensor) -> None:
    """Add to ``record`` that tensor ``key``, of shape ``shape``, kept positions ``keep`` along ``dim``."""
    entry = record.setdefault(key, {"shape": list(shape), "kept": [None] * len(shape)})
    positions = keep.tolist()
    before = entry["kept"][dim]
    entry["kept"][dim] = positions if before is None else [before[i] for i in positions]


def _cut_module(
    module: nn.Module, cut: _Cut, optimizers: list[torch.optim.Optimizer]
) -> list[tuple[str, torch.Size, int, Tensor]]:
    """Slice one module; returns ``(state-dict name in module, shape before, dim, kept)`` per slice."""
    done = []

    def cut_tensor(owner: nn.Module, key: str, dim: int, keep: Tensor) -> None:
        name = key.rpartition(".")[2]
        shape = _slice(owner, name, dim, keep, optimizers)
        if shape is not None:
            done.append((key, shape, dim, keep))

    if isinstance(module, _BatchNorm):
        keep = _keep(module.num_features, cut.out)
        for name in ("weight", "bias", "running_mean", "running_var"):
            cut_tensor(module, name, 0, keep)
        module.num_features = len(keep)
        return done
    weight_owner, weight_name = _weight_owner(module)
    weight_key = "parametrizations.weight.original" if weight_owner is not module else "weight"
    out_size = getattr(weight_owner, weight_name).shape[0]
    depthwise = isinstance(module, _CONV) and module.groups == module.in_channels == module.out_channels > 1
    if cut.out:
        keep = _keep(out_size, cut.out)
        cut_tensor(weight_owner, weight_key, 0, keep)
        cut_tensor(module, "bias", 0, keep)
        if parametrize.is_parametrized(module, "weight"):
            for index, quantizer in enumerate(module.parametrizations.weight):
                for name in [*quantizer._parameters, *quantizer._buffers]:
                    cut_tensor(quantizer, f"parametrizations.weight.{index}.{name}", 0, keep)
        if isinstance(module, nn.Linear):
            module.out_features = len(keep)
        else:
            module.out_channels = len(keep)
            if depthwise:
                module.in_channels = module.groups = len(keep)
    if cut.into and not depthwise:
        keep = _keep(getattr(weight_owner, weight_name).shape[1], cut.into)
        cut_tensor(weight_owner, weight_key, 1, keep)
        if isinstance(module, nn.Linear):
            module.in_features = len(keep)
        else:
            module.in_channels = len(keep)
    return done


def _weight(module: nn.Module) -> nn.Parameter:
    owner, name = _weight_owner(module)
    return getattr(owner, name)


def _weight_owner(module: nn.Module) -> tuple[nn.Module, str]:
    """The module and attribute holding the trained weight (under a parametrization or not)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight, "original"
    return module, "weight"


def _keep(size: int, drop: set[int]) -> Tensor:
    return torch.tensor([i for i in range(size) if i not in drop], dtype=torch.int64)


def _slice(
    owner: nn.Module, name: str, dim: int, keep: Tensor, optimizers: list[torch.optim.Optimizer]
) -> torch.Size | None:
    """Keep ``keep`` along ``dim`` of ``owner.name``, of its optimizer state, in every optimizer.

    Returns the tensor's shape before slicing, or None when ``owner`` has no such tensor.
    """
    tensor = getattr(owner, name)
    if tensor is None:
        return None
    shape = tensor.shape
    keep = keep.to(tensor.device)
    if name in owner._buffers:
        owner._buffers[name] = tensor.index_select(dim, keep)
        return shape
    sliced = nn.Parameter(tensor.detach().index_select(dim, keep), requires_grad=tensor.requires_grad)
    owner._parameters[name] = sliced
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [sliced if p is tensor else p for p in group["params"]]
        if tensor in optimizer.state:
            state = optimizer.state.pop(tensor)
            optimizer.state[sliced] = {
                key: value.index_select(dim, keep)
                if isinstance(value, Tensor) and value.shape == tensor.shape
                else value
                for key, value in state.items()
            }
    return shape


@torch.no_grad()
def resize_to_state_dict(model: nn.Module, state_dict: dict[str, Tensor], prefix: str = "") -> list[str]:
    """Give ``model``'s parameters and buffers the shapes they have in ``state_dict``.

    For resuming a run whose model shrank: the values are loaded afterwards as usual.
    Module attributes (channels, features) follow the new shapes. Returns the names of
    the tensors that were resized.
    """
    resized = []
    for module_name, module in model.named_modules():
        changed = False
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            key = f"{prefix}{module_name}.{name}" if module_name else f"{prefix}{name}"
            saved = state_dict.get(key)
            if saved is not None and saved.shape != tensor.shape and saved.dim() == tensor.dim():
                tensor.data = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
                resized.append(key)
                changed = True
        if changed:
            _fit_attributes(module)
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            _fit_attributes(module)
    return resized


def _fit_attributes(module: nn.Module) -> None:
    if isinstance(module, _BatchNorm):
        module.num_features = (
            module.running_mean.shape[0] if module.running_mean is not None else module.weight.shape[0]
        )
    elif isinstance(module, (nn.Linear, *_CONV)):
        weight = _weight(module)
        depthwise = isinstance(module, _CONV) and module.groups == module.in_channels == module.out_channels > 1
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = weight.shape[0], weight.shape[1]
        else:
            module.out_channels = weight.shape[0]
            module.in_channels = weight.shape[0] if depthwise else weight.shape[1] * module.groups
            if depthwise:
                module.groups = weight.shape[0]
