"""Removing channels from a model while it trains: tensors, module attributes, optimizer state.

A sliced parameter becomes a new ``Parameter`` (autograd caches a leaf's shape, so its data
cannot simply shrink) and every optimizer's reference to it is updated in place: the entry
in its param group and its per-parameter state (Adam moments, SGD momentum, ...), sliced
the same way. Schedulers hold the optimizer, not the parameters, and keep working.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from selfcompress.graph import ChannelGraph

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SLICEABLE = (nn.Linear, *_CONV, _BatchNorm)


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
    model: nn.Module, graph: ChannelGraph, channels: Tensor, optimizers: Iterable[torch.optim.Optimizer] = ()
) -> int:
    """Remove the global ``channels`` (a boolean mask) from every tensor that refers to them.

    ``graph`` must describe ``model`` as it is now; it no longer does afterwards.
    Returns the number of channels removed.
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
            _cut_module(modules[name], cut, optimizers)
    return int(channels.sum())


def _cut_module(module: nn.Module, cut: _Cut, optimizers: list[torch.optim.Optimizer]) -> None:
    if isinstance(module, _BatchNorm):
        keep = _keep(module.num_features, cut.out)
        for name in ("weight", "bias", "running_mean", "running_var"):
            _slice(module, name, 0, keep, optimizers)
        module.num_features = len(keep)
        return
    weight_owner, weight_name = _weight_owner(module)
    out_size = getattr(weight_owner, weight_name).shape[0]
    depthwise = isinstance(module, _CONV) and module.groups == module.in_channels == module.out_channels > 1
    if cut.out:
        keep = _keep(out_size, cut.out)
        _slice(weight_owner, weight_name, 0, keep, optimizers)
        _slice(module, "bias", 0, keep, optimizers)
        if parametrize.is_parametrized(module, "weight"):
            for quantizer in module.parametrizations.weight:
                for name in [*quantizer._parameters, *quantizer._buffers]:
                    _slice(quantizer, name, 0, keep, optimizers)
        if isinstance(module, nn.Linear):
            module.out_features = len(keep)
        else:
            module.out_channels = len(keep)
            if depthwise:
                module.in_channels = module.groups = len(keep)
    if cut.into and not depthwise:
        keep = _keep(getattr(weight_owner, weight_name).shape[1], cut.into)
        _slice(weight_owner, weight_name, 1, keep, optimizers)
        if isinstance(module, nn.Linear):
            module.in_features = len(keep)
        else:
            module.in_channels = len(keep)


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


def _slice(owner: nn.Module, name: str, dim: int, keep: Tensor, optimizers: list[torch.optim.Optimizer]) -> None:
    """Keep ``keep`` along ``dim`` of ``owner.name``, of its optimizer state, in every optimizer."""
    tensor = getattr(owner, name)
    if tensor is None:
        return
    keep = keep.to(tensor.device)
    if name in owner._buffers:
        owner._buffers[name] = tensor.index_select(dim, keep)
        return
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
