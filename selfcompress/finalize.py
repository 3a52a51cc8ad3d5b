"""From a trained model to a plain compact one: bake the quantized weights, remove closed channels."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from selfcompress.graph import (
    ExampleInputs,
    build_graph,
    example_inputs,
    run_forward,
    stop_recording,
    traced_module,
)
from selfcompress.layers import bake, quantized_tensors
from selfcompress.size import open_rows

log = logging.getLogger(__name__)


@dataclass
class RemovalReport:
    """What :func:`finalize` removed and what it kept, and why.

    Attributes:
        removed: Per group (named by its root layer), the removed output-channel indices
            of that layer, in the numbering before removal.
        kept: Per group, why its channels (or some closed ones) were kept: the group is
            not removable at all (outputs, a normalisation over channels, attention), or a
            closed channel still passes a non-zero constant.
        kept_closed: Per group, the closed channels (every writer at zero bits) that were
            kept anyway, in the root layer's numbering; ``kept`` says why.
        max_abs_difference: Largest difference between the outputs of the trained model
            and of the finalized one on the example inputs (eval mode).
        output_scale: Largest absolute output of the trained model on those inputs.
    """

    removed: dict[str, list[int]] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    kept_closed: dict[str, list[int]] = field(default_factory=dict)
    max_abs_difference: float = 0.0
    output_scale: float = 0.0

    @property
    def channels_removed(self) -> int:
        return sum(len(idxs) for idxs in self.removed.values())


def finalize(
    model: nn.Module,
    inputs: ExampleInputs | None = None,
    *,
    return_report: bool = False,
    tolerance: float | None = 1e-5,
) -> nn.Module | tuple[nn.Module, RemovalReport]:
    """A plain copy of a trained ``model``: quantized weights baked in, closed channels removed.

    Channels are removed group by group (see :mod:`selfcompress.graph`): a channel goes
    only when every layer writing it has zero bits for it and it provably reaches every
    reader as exactly zero. Everything else is kept, and the report says why.

    Args:
        model: A model prepared by :func:`selfcompress.prepare` (or the callback), or any
            submodule of it. It is not modified.
        inputs: ``(args, kwargs)`` of one forward call; by default those recorded during
            training or the module's ``example_input_array``. A model whose training
            step calls a submodule (``self.net(x)``) is traced through that submodule.
        return_report: Also return a :class:`RemovalReport`.
        tolerance: Largest allowed difference between the outputs of ``model`` and of the
            result (eval mode, on ``inputs``), relative to the largest output magnitude.
            ``None`` skips the check (the report still holds the difference).

    Raises:
        ValueError: ``model`` has no quantized weights, or no example inputs are known.
        RuntimeError: The finalized model's outputs differ from the trained model's by
            more than ``tolerance``: a dependency the channel groups missed.
    """
    tensors = quantized_tensors(model)
    if not tensors:
        raise ValueError("`model` has no quantized weights: call `selfcompress.prepare` or train with `SelfCompress`.")
    traced, path = model, ""
    inputs = inputs if inputs is not None else example_inputs(model)
    if inputs is None:
        # A LightningModule whose training_step calls `self.net(x)`: trace `self.net`.
        found = traced_module(model)
        if found is not None:
            traced, inputs = found
            path = next(name for name, module in model.named_modules() if module is traced)
    if inputs is None:
        raise ValueError(
            "`inputs` is required: no forward call of this model was recorded and it has no "
            "`example_input_array`; pass `(args, kwargs)` of one forward call."
        )
    stop_recording(model)
    open_mask = open_rows(quantized_tensors(traced))
    compact = _plain_copy(model)
    bake(compact)
    compact_traced = compact.get_submodule(path) if path else compact
    report = RemovalReport()
    remove_closed_channels(compact_traced, open_mask, inputs, report)
    if path:
        report.removed = {f"{path}.{k}": v for k, v in report.removed.items()}
        report.kept = {f"{path}.{k}": v for k, v in report.kept.items()}
        report.kept_closed = {f"{path}.{k}": v for k, v in report.kept_closed.items()}

    was_training = model.training
    model.eval()
    compact.eval()
    with torch.no_grad():
        expected, actual = run_forward(traced, inputs), run_forward(compact_traced, inputs)
    model.train(was_training)
    report.max_abs_difference, report.output_scale = _compare(expected, actual)
    if tolerance is not None and report.max_abs_difference > tolerance * max(report.output_scale, 1e-12):
        raise RuntimeError(
            f"finalize changed the model's outputs by {report.max_abs_difference:.3g} (largest output "
            f"{report.output_scale:.3g}, tolerance {tolerance:g} relative); removed {report.removed}. "
            "This is a bug in the channel groups: please report it with the model."
        )
    for root, reason in report.kept.items():
        log.info("finalize kept closed channels of '%s': %s", root, reason)
    return (compact, report) if return_report else compact


def remove_closed_channels(
    model: nn.Module, open_mask: dict[str, Tensor], inputs: ExampleInputs, report: RemovalReport
) -> None:
    """Remove, in place, every channel of a baked ``model`` that is closed and provably silent."""
    graph = build_graph(model, inputs)
    kept = graph.kept_channels(open_mask)
    candidates = graph.removable & ~kept
    silent = silent_channels(model, graph, inputs)
    modules = dict(model.named_modules())
    dg = graph.dependency
    for root_name, offset, size in graph.roots:
        closed = candidates[offset : offset + size]
        if not closed.any():
            continue
        removable = closed & silent[offset : offset + size]
        if (closed & ~removable).any():
            report.kept[root_name] = "a closed channel still passes a non-zero constant (bias or batch-norm shift)"
            report.kept_closed[root_name] = (closed & ~removable).nonzero().flatten().tolist()
        idxs = removable.nonzero().flatten().tolist()
        if len(idxs) == size:
            # PyTorch layers cannot have zero channels: keep one (exactly zero) channel.
            report.kept.setdefault(root_name, "every channel is closed; one is kept so that the layers stay valid")
            report.kept_closed.setdefault(root_name, []).append(idxs.pop(0))
        if not idxs:
            continue
        root = modules[root_name]
        group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, idxs)
        group.prune()
        report.removed[root_name] = idxs
    closed_whole = ~graph.removable & ~graph.writers_open(open_mask)
    for root_name, offset, size in graph.roots:
        reason = graph.reasons.get(root_name)
        if reason is None:
            continue
        report.kept.setdefault(root_name, reason)
        closed = closed_whole[offset : offset + size].nonzero().flatten().tolist()
        if closed:
            report.kept_closed[root_name] = closed


@torch.no_grad()
def silent_channels(model: nn.Module, graph, inputs: ExampleInputs) -> Tensor:
    """Per global channel: whether every reader sees it as exactly zero on ``inputs``.

    A channel whose writers have zero weights is the same constant for every input, so
    one forward pass decides it.
    """
    peak = torch.zeros(graph.num_channels)
    modules = dict(model.named_modules())
    handles = []
    for name, consumer in graph.consumers.items():
        module = modules[name.rpartition(".")[0]]

        def record(module, args, kwargs, consumer=consumer):
            x = args[0] if args else next(iter(kwargs.values()))
            channel_dim = 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1
            magnitude = x.detach().abs().float().movedim(channel_dim, 0)
            per_position = magnitude.reshape(x.shape[channel_dim], -1).amax(dim=1)
            peak.scatter_reduce_(0, consumer.channels, per_position.cpu()[consumer.positions], reduce="amax")

        handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        run_forward(model, inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return peak == 0


def _plain_copy(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` that leaves behind any Trainer it is attached to."""
    memo = {}
    for module in model.modules():
        for attr in ("_trainer", "_fabric"):
            value = module.__dict__.get(attr)
            if value is not None:
                memo[id(value)] = None
    return copy.deepcopy(model, memo)


def _flat_tensors(value) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _flat_tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _flat_tensors(item)]
    return []


def _compare(expected, actual) -> tuple[float, float]:
    """(largest absolute difference, largest absolute expected value) over all output tensors."""
    expected, actual = _flat_tensors(expected), _flat_tensors(actual)
    if len(expected) != len(actual) or any(a.shape != b.shape for a, b in zip(expected, actual, strict=True)):
        raise RuntimeError(
            "finalize changed the shape of the model's outputs: "
            f"{[tuple(t.shape) for t in expected]} -> {[tuple(t.shape) for t in actual]}."
        )
    pairs = zip(expected, actual, strict=True)
    difference = max((float((a.float() - b.float()).abs().max()) for a, b in pairs if a.numel()), default=0.0)
    scale = max((float(a.float().abs().max()) for a in expected if a.numel()), default=0.0)
    return difference, scale
