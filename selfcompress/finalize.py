"""From whatever the user holds to one plain compact module and the integer form of its weights.

Every consumer (``finalize``, ``save``, ``report``, ``to_bitsandbytes``) goes through
:func:`compressed`: it turns its input (a LightningModule trained with the callback, the
network inside it, a finalized module, a plain model loaded from a checkpoint) into a
baked plain copy, removes closed channels, and reads each weight's integer codes with
:func:`selfcompress.quantize.integer_form`, a pure function of the weight's values. So
the results of every input agree by construction.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from selfcompress.graph import (
    ExampleInputs,
    as_inputs,
    autograd_enabled,
    build_graph,
    clone_inputs,
    example_inputs,
    first_calls,
    forget_example_inputs,
    run_forward,
    set_example_inputs,
    stop_recording,
    traced_module,
)
from selfcompress.layers import bake, compressible_weights
from selfcompress.quantize import dequantize, integer_form, row_widths, stored_codes

log = logging.getLogger(__name__)

#: Attribute marking a module returned by ``finalize`` or ``load``: no closed channel is left in it.
COMPACT = "_selfcompress_compact"


@dataclass
class RemovalReport:
    """What :func:`finalize` removed and what it kept, and why.

    Attributes:
        removed: Per group (named by its root layer in the returned module), the removed
            output-channel indices of that layer, in the numbering before removal.
        kept: Per group, why its channels (or some closed ones) were kept: the group is
            not removable at all (outputs, a normalisation over channels, attention), or a
            closed channel still passes a non-zero constant.
        kept_closed: Per group, the closed channels (every writer row exactly zero) that
            were kept anyway, in the root layer's numbering; ``kept`` says why.
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


@dataclass(frozen=True)
class LayerCodes:
    """The integer form of one weight of a finalized model.

    ``weight == dequantize(codes, scale, dtype)`` bit for bit.
    """

    name: str
    codes: Tensor  # int32, the weight's shape
    scale: Tensor  # float32 (rows,)
    widths: Tensor  # int64 (rows,): bits each row's codes take in a file, 0 to 16 (quantize.row_widths)
    dtype: torch.dtype

    def weight(self) -> Tensor:
        return dequantize(self.codes, self.scale, self.dtype)

    @property
    def stored(self) -> tuple[Tensor, Tensor]:
        """``(codes, odd)``: the ``(rows, cols)`` integers a file holds, odd rows halved, and which rows are odd."""
        return stored_codes(self.codes.reshape(self.codes.shape[0], -1))


def finalize(
    model: nn.Module,
    inputs: Any = None,
    *,
    return_report: bool = False,
    tolerance: float | None = 1e-5,
) -> nn.Module | tuple[nn.Module, RemovalReport]:
    """A plain compact copy of a trained ``model``: quantized weights baked in, closed channels removed.

    A channel is closed when every layer writing it has an all-zero row for it; it is
    removed, group by group (see :mod:`selfcompress.graph`), only when it also provably
    reaches every reader as exactly zero. Everything else is kept, and the report says
    why. Works under any grad mode (``no_grad``, ``inference_mode``) and leaves it as it was.

    Args:
        model: Any of: a LightningModule trained with ``SelfCompress`` (its network is
            finalized: the innermost submodule called by its forward that holds all of its
            state), the prepared network inside it, the output of ``finalize``, or a plain
            model whose compressed weights hold their quantized values (removed channels
            as zero rows), e.g. as loaded from a checkpoint. It is not modified.
        inputs: One forward call: a tensor, a tuple of positional arguments, or
            ``(args, kwargs)``. By default those recorded during training (or by a
            previous ``finalize``), or the module's ``example_input_array``.
        return_report: Also return a :class:`RemovalReport`.
        tolerance: Largest allowed difference between the outputs before and after channel
            removal (eval mode, on ``inputs``), relative to the largest output magnitude.
            ``None`` skips the check (the report still holds the difference).

    Raises:
        ValueError: No weight of ``model`` is in integer form (an untrained plain model),
            or no example inputs are known.
        RuntimeError: Removing channels changed the outputs by more than ``tolerance``:
            a dependency the channel groups missed.
    """
    compact, report, _ = compressed(model, inputs, tolerance=tolerance)
    return (compact, report) if return_report else compact


def compressed(
    model: nn.Module, inputs: Any = None, *, tolerance: float | None = 1e-5
) -> tuple[nn.Module, RemovalReport, dict[str, LayerCodes]]:
    """The one pipeline: ``(compact module, removal report, integer form of its weights)``.

    ``model`` and ``inputs`` are as for :func:`finalize`. Every Linear/Conv (and attention
    projection) weight whose rows are all exactly ``scale * codes`` with codes of at most
    16 bits is in the returned mapping, keyed by its ``state_dict`` name; the compact
    module's weights are set to exactly ``dequantize(codes, scale)``. The compact module
    remembers ``inputs``, so it is itself a valid input later.
    """
    compact = _compact_form(model) if inputs is None and example_inputs(model) is None else None
    if compact is not None:
        # Written by `load` (or `finalize`): nothing left to remove, so no forward call is needed.
        plain = bake(_plain_copy(compact))
        layers = layer_codes(plain)
        if layers:
            mark_compact(plain)
            return plain, RemovalReport(), layers
    with autograd_enabled():
        plain, inputs = plain_module(model, inputs)
        was_training = plain.training
        plain.eval()
        with torch.no_grad():
            expected = run_forward(plain, inputs)
        report = RemovalReport()
        remove_closed_channels(plain, open_weight_rows(plain), inputs, report)
        layers = layer_codes(plain)
        if not layers:
            raise ValueError(
                "`model` has no compressed weights: no Linear/Conv weight is 2^e x integer codes. Call "
                "`selfcompress.prepare` or train with `SelfCompress` first."
            )
        with torch.no_grad():
            actual = run_forward(plain, inputs)
        plain.train(was_training)
    report.max_abs_difference, report.output_scale = _compare(expected, actual)
    if tolerance is not None and report.max_abs_difference > tolerance * max(report.output_scale, 1e-12):
        raise RuntimeError(
            f"finalize changed the model's outputs by {report.max_abs_difference:.3g} (largest output "
            f"{report.output_scale:.3g}, tolerance {tolerance:g} relative); removed {report.removed}. "
            "This is a bug in the channel groups: please report it with the model."
        )
    for root, reason in report.kept.items():
        log.info("finalize kept closed channels of '%s': %s", root, reason)
    forget_example_inputs(plain)
    set_example_inputs(plain, inputs)
    mark_compact(plain)
    return plain, report, layers


def _compact_form(model: nn.Module) -> nn.Module | None:
    """``model`` if ``load`` or ``finalize`` wrote it, or the network of a LightningModule ``load`` wrote."""
    if not getattr(model, COMPACT, False) and is_lightning_module(model):
        model = state_network(model)
    return model if getattr(model, COMPACT, False) else None


def mark_compact(module: nn.Module) -> None:
    """Remember that ``module`` is already compact (a plain attribute: it survives copies and pickling)."""
    module.__dict__[COMPACT] = True


def plain_module(model: nn.Module, inputs: Any = None) -> tuple[nn.Module, ExampleInputs]:
    """A baked plain copy of the module of ``model`` to compress, and one forward call of it.

    A prepared model is copied and baked; a LightningModule gives way to its network.
    """
    traced = model
    if inputs is not None:
        inputs = as_inputs(inputs)
    else:
        inputs = example_inputs(model)
        if inputs is None:
            # A LightningModule whose training_step calls `self.net(x)`: trace `self.net`.
            found = traced_module(model)
            if found is not None:
                traced, inputs = found
    if inputs is None:
        raise ValueError(
            "`inputs` is required: no forward call of this model was recorded and it has no "
            "`example_input_array`; pass one call's inputs (a tensor, a tuple of positional "
            "arguments, or `(args, kwargs)`)."
        )
    stop_recording(model)
    plain = bake(_plain_copy(traced))
    inputs = clone_inputs(inputs)
    if is_lightning_module(plain):
        plain, inputs = _network(plain, inputs)
    return plain, inputs


def is_lightning_module(module: nn.Module) -> bool:
    # By name: Lightning is imported only by the callback.
    return any(
        cls.__name__ == "LightningModule" and cls.__module__.split(".")[0] in ("lightning", "pytorch_lightning")
        for cls in type(module).__mro__
    )


def _network(module: nn.Module, inputs: ExampleInputs) -> tuple[nn.Module, ExampleInputs]:
    """The innermost submodule called in ``module``'s forward that holds all of its state."""
    calls = first_calls(module, inputs)
    state = _state(module)
    found = module, inputs
    for sub in module.modules():
        if sub in calls and state <= _state(sub):
            found = sub, calls[sub]
    return found


def state_network(module: nn.Module) -> nn.Module:
    """The innermost submodule of ``module`` that holds all of its state (``module`` if none).

    A fresh LightningModule's network, found without a forward call: the module a file
    written from the trained one holds (see :func:`_network`), as long as its forward calls it.
    """
    state = _state(module)
    holders = [sub for sub in module.modules() if state <= _state(sub)]
    return holders[-1] if state else module


def _state(module: nn.Module) -> set[int]:
    return {id(t) for t in [*module.parameters(), *module.buffers()]}


def _compressible_weights(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(state_dict name, module, attribute)`` of every Linear/Conv/attention weight."""
    found = []
    for module_name, module in model.named_modules():
        for attr in compressible_weights(module):
            found.append((f"{module_name}.{attr}" if module_name else attr, module, attr))
    return found


def open_weight_rows(model: nn.Module) -> dict[str, Tensor]:
    """Per compressible weight of a plain ``model``: the rows that are not all exactly zero."""
    return {
        name: getattr(module, attr).detach().reshape(getattr(module, attr).shape[0], -1).ne(0).any(dim=1).cpu()
        for name, module, attr in _compressible_weights(model)
    }


@torch.no_grad()
def layer_codes(model: nn.Module) -> dict[str, LayerCodes]:
    """The integer form of every weight of a plain ``model`` that has one; sets the weight to it.

    Setting the weight to ``dequantize(codes, scale)`` changes at most the sign of a zero.
    """
    layers = {}
    for name, module, attr in _compressible_weights(model):
        weight = getattr(module, attr)
        form = integer_form(weight)
        if form is None:
            continue
        codes, scale = form
        layers[name] = LayerCodes(name, codes, scale, row_widths(codes), weight.dtype)
        weight.copy_(dequantize(codes, scale, weight.dtype))
    return layers


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
