"""Channel dependency groups: which tensors must lose channel ``k`` together.

Torch-Pruning's dependency graph (DepGraph) traces the model once and groups every
prunable channel with everything that refers to it: the layers that write it (several
for a residual add), batch norms and element-wise ops on the way, the layers that read it
(with flatten and concatenation offsets), depthwise convolutions that tie input to output,
and attention. This module turns those groups into plain index tensors over one global
channel numbering, which the size accounting, the gates and the surgery all share.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from selfcompress.layers import COMPRESSIBLE, quantized_tensors, shared_parameters

#: Modules that normalise across channels: a channel they see cannot be removed exactly.
CHANNEL_NORMALISERS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)

#: Traced operations (autograd node names) that multiply two activations along channels:
#: ``q @ k.T``, ``attn @ v``, fused attention. Torch-Pruning couples every channel that
#: meets there index by index, but the layer after ``reshape(b, t, heads, -1)`` sees a head
#: size (and often a ``1/sqrt(head size)`` scale) that removing channels would change.
CHANNEL_PRODUCTS: tuple[str, ...] = ("Bmm", "Baddbmm", "MatMul", "ScaledDotProduct", "Attention", "Einsum")

ExampleInputs = tuple[tuple[Any, ...], dict[str, Any]]
#: Where a module keeps the inputs recorded for it: a plain attribute, so that a copy of the
#: module (``copy.deepcopy``, pickling) knows them too.
_EXAMPLES = "_selfcompress_example_inputs"
_recording: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


@dataclass
class Producer:
    """Rows of a layer's weight that write group channels (``rows[i]`` writes ``channels[i]``)."""

    name: str
    rows: Tensor
    channels: Tensor


@dataclass
class Consumer:
    """Input positions of a layer that read group channels."""

    name: str
    positions: Tensor
    channels: Tensor


@dataclass
class Follower:
    """A channel-wise module (batch norm, ...) whose entries follow group channels."""

    name: str
    positions: Tensor
    channels: Tensor


@dataclass
class ChannelGraph:
    """All channel groups of a model over one global channel numbering.

    Attributes:
        num_channels: Number of global channels (sum of the group sizes).
        removable: Per global channel, whether removing it is allowed at all.
        reasons: Why a group is kept whole, by the name of its first producer.
        producers / consumers / followers: Index tensors, keyed by tensor or module name.
        roots: For each group, (root module name, first global channel, size), as
            Torch-Pruning needs it to remove channels.
        outputs: Names of compressed weights whose channels leave the model.
    """

    num_channels: int
    removable: Tensor
    reasons: dict[str, str] = field(default_factory=dict)
    producers: dict[str, Producer] = field(default_factory=dict)
    consumers: dict[str, Consumer] = field(default_factory=dict)
    followers: dict[str, list[Follower]] = field(default_factory=dict)
    roots: list[tuple[str, int, int]] = field(default_factory=list)
    outputs: set[str] = field(default_factory=set)
    dependency: tp.DependencyGraph | None = field(default=None, repr=False)

    def writers_open(self, open_rows: dict[str, Tensor]) -> Tensor:
        """Per global channel: whether some producer row writing it is open.

        ``open_rows`` maps each compressed weight's name to its boolean open mask;
        producers that are not compressed are always open.
        """
        any_open = torch.zeros(self.num_channels, dtype=torch.bool)
        for name, producer in self.producers.items():
            if name in open_rows:
                rows_open = open_rows[name][producer.rows].cpu()
            else:
                rows_open = torch.ones_like(producer.rows, dtype=torch.bool)
            any_open.index_put_((producer.channels,), rows_open, accumulate=True)
        return any_open

    def kept_channels(self, open_rows: dict[str, Tensor]) -> Tensor:
        """Per global channel: kept unless removable and every producer row is closed."""
        return ~self.removable | self.writers_open(open_rows)


def record_example_inputs(model: nn.Module) -> None:
    """Remember the arguments of the next forward call of ``model`` and of its submodules.

    The first two samples of every batched tensor are kept (detached), so that
    :func:`build_graph` and ``finalize`` can trace the model later without being given
    inputs.
    """
    stop_recording(model)
    handles = _recording.setdefault(model, [])

    def remember(module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Lightning's DDP wrapper points a module's forward at training_step: not real inputs.
        if _EXAMPLES not in module.__dict__ and "forward" not in module.__dict__:
            set_example_inputs(module, (args, kwargs))

    def done(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        stop_recording(model)

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(remember, with_kwargs=True))
    handles.append(model.register_forward_hook(done, with_kwargs=True))


def stop_recording(model: nn.Module) -> None:
    """Remove the hooks left by :func:`record_example_inputs` (if it has not fired yet)."""
    for handle in _recording.pop(model, []):
        handle.remove()


def example_inputs(model: nn.Module) -> ExampleInputs | None:
    """Inputs recorded for ``model`` by :func:`record_example_inputs`, if any."""
    recorded = model.__dict__.get(_EXAMPLES)
    if recorded is None and getattr(model, "example_input_array", None) is not None:
        array = model.example_input_array
        if isinstance(array, tuple):
            recorded = (array, {})
        elif isinstance(array, dict):
            recorded = ((), array)
        else:
            recorded = ((array,), {})
    return recorded


def traced_module(model: nn.Module) -> tuple[nn.Module, ExampleInputs] | None:
    """The outermost module of ``model`` with known inputs that holds all its quantized weights.

    A LightningModule whose ``training_step`` calls ``self.net(x)`` rather than ``self(x)``
    is traced through ``self.net``.
    """
    wanted = {id(t.raw) for t in quantized_tensors(model)}
    for module in model.modules():
        inputs = example_inputs(module)
        if inputs is not None and wanted <= {id(t.raw) for t in quantized_tensors(module)}:
            return module, inputs
    return None


def set_example_inputs(model: nn.Module, inputs: ExampleInputs) -> None:
    model.__dict__[_EXAMPLES] = _first_samples(inputs)


def forget_example_inputs(model: nn.Module) -> None:
    """Drop the inputs recorded for ``model`` and its submodules (stale once channels left)."""
    for module in model.modules():
        module.__dict__.pop(_EXAMPLES, None)


def map_tensors(fn: Callable[[Tensor], Tensor], value: Any) -> Any:
    """``value`` with ``fn`` applied to every tensor in it, through lists, (named) tuples and dicts."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(map_tensors(fn, item) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(fn, item) for item in value)
    if isinstance(value, dict):
        return {key: map_tensors(fn, item) for key, item in value.items()}
    return value


def _first_samples(value: Any) -> Any:
    return map_tensors(lambda t: t.detach()[:2].clone() if t.dim() > 0 else t.detach().clone(), value)


def run_forward(model: nn.Module, inputs: ExampleInputs) -> Any:
    args, kwargs = inputs
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return model(*_to_device(args, device), **_to_device(kwargs, device))


def _to_device(value: Any, device: torch.device) -> Any:
    return map_tensors(lambda t: t.to(device), value)


@contextmanager
def autograd_enabled() -> Iterator[None]:
    """Grad on and inference mode off inside; the caller's modes are restored on exit."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def clone_inputs(value: Any) -> Any:
    """A copy of every tensor in ``value`` (detached; ordinary tensors, not inference tensors)."""
    with torch.inference_mode(False):
        return map_tensors(lambda t: t.detach().clone(), value)


def as_inputs(inputs: Any) -> ExampleInputs:
    """``inputs`` as ``(args, kwargs)``: a tensor, a tuple of positional args, or ``(args, kwargs)``."""
    if isinstance(inputs, Tensor):
        return (inputs,), {}
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    if isinstance(inputs, tuple):
        if len(inputs) == 2 and isinstance(inputs[0], (tuple, list)) and isinstance(inputs[1], dict):
            return tuple(inputs[0]), dict(inputs[1])
        return inputs, {}
    raise ValueError(
        f"`inputs` must be a tensor, a tuple of positional arguments or `(args, kwargs)`, got {type(inputs).__name__}."
    )


def first_calls(model: nn.Module, inputs: ExampleInputs) -> dict[nn.Module, ExampleInputs]:
    """The arguments of the first call of every submodule during one eval forward of ``model``."""
    calls: dict[nn.Module, ExampleInputs] = {}

    def remember(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.setdefault(module, clone_inputs((args, kwargs)))

    handles = [module.register_forward_pre_hook(remember, with_kwargs=True) for module in model.modules()]
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            run_forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in training.items():
            module.training = mode
    return calls


def dependency_graph(model: nn.Module, inputs: ExampleInputs) -> tp.DependencyGraph:
    """Trace ``model`` with Torch-Pruning, in eval mode, leaving no trace in its state.

    Tracing follows autograd, so it runs with grad enabled, outside inference mode and with
    every floating-point parameter requiring grad, whatever the caller's modes and flags.
    """
    training = {module: module.training for module in model.modules()}
    flags = {param: param.requires_grad for param in model.parameters()}
    model.eval()
    try:
        with autograd_enabled(), torch.random.fork_rng(devices=[]):
            inputs = clone_inputs(inputs)
            for param in flags:
                if param.is_floating_point():
                    param.requires_grad_(True)
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=inputs, forward_fn=lambda m, x: run_forward(m, x)
            )
    finally:
        for module, mode in training.items():
            module.training = mode
        for param, flag in flags.items():
            param.requires_grad_(flag)


def build_graph(model: nn.Module, inputs: ExampleInputs | None = None) -> ChannelGraph:
    """Group the channels of ``model`` (prepared or not) by what must be removed together.

    Args:
        model: The model, traced once on ``inputs``.
        inputs: ``(args, kwargs)`` of one forward call; by default those recorded by
            :func:`record_example_inputs` or the model's ``example_input_array``.

    Raises:
        ValueError: No example inputs are known for ``model``.
    """
    inputs = inputs if inputs is not None else example_inputs(model)
    if inputs is None:
        raise ValueError(
            "`inputs` is required: no forward call of this model was recorded and it has no "
            "`example_input_array`; pass `(args, kwargs)` of one forward call."
        )
    dg = dependency_graph(model, inputs)
    names = {module: name for name, module in model.named_modules()}
    weight_names = {(t.module, t.attr): t.name for t in quantized_tensors(model)}
    root_types = tuple(COMPRESSIBLE)
    tied = shared_parameters(model)

    producers: dict[str, list[tuple[Tensor, Tensor]]] = {}
    consumers: dict[str, list[tuple[Tensor, Tensor]]] = {}
    followers: dict[str, list[Follower]] = {}
    removable: list[Tensor] = []
    reasons: dict[str, str] = {}
    roots: list[tuple[str, int, int]] = []
    offset = 0
    for group in dg.get_all_groups(root_module_types=root_types):
        root = group[0].dep.target.module
        size = len(group[0].idxs)
        roots.append((names[root], offset, size))
        reason = None
        has_consumer = False
        for item in group:
            module = item.dep.target.module
            if module not in names:
                # A traced operation (add, concat, reshape, matmul), not a module.
                grad_fn = str(getattr(module, "_grad_fn", ""))
                if any(op in grad_fn for op in CHANNEL_PRODUCTS):
                    reason = reason or (
                        f"these channels meet in a product of activations ({grad_fn}, e.g. attention "
                        "split into heads): removing them would change the head size and its scaling"
                    )
                continue
            idxs = torch.as_tensor(item.idxs, dtype=torch.int64)
            channels = torch.as_tensor(item.root_idxs, dtype=torch.int64) + offset
            handler = item.dep.handler
            shared = next((tied[id(p)] for p in module.parameters(recurse=False) if id(p) in tied), None)
            if shared is not None:
                reason = reason or (
                    f"{' and '.join(shared)} are one shared (tied) parameter: slicing it for one "
                    "module would change the others"
                )
            if isinstance(module, CHANNEL_NORMALISERS):
                reason = reason or f"{type(module).__name__} '{names[module]}' normalises over these channels"
            elif isinstance(module, nn.MultiheadAttention):
                reason = reason or f"attention '{names[module]}' mixes these channels across its heads"
            if _is_grouped(module):
                reason = reason or (
                    f"grouped convolution '{names[module]}' (groups={module.groups}) needs the same number of "
                    "channels in every group"
                )
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                key = weight_names.get((module, "weight"), f"{names[module]}.weight" if names[module] else "weight")
                if dg.is_out_channel_pruning_fn(handler):
                    producers.setdefault(key, []).append((idxs, channels))
                else:
                    consumers.setdefault(key, []).append((idxs, channels))
                    has_consumer = True
            elif isinstance(module, nn.MultiheadAttention):
                key = weight_names.get((module, "in_proj_weight"), f"{names[module]}.in_proj_weight")
                consumers.setdefault(key, []).append((idxs, channels))
                has_consumer = True
            else:
                followers.setdefault(names[module], []).append(Follower(names[module], idxs, channels))
        if not has_consumer:
            reason = reason or "its channels are outputs of the model"
        if reason:
            reasons[names[root]] = reason
        removable.append(torch.full((size,), reason is None))
        offset += size

    graph = ChannelGraph(
        num_channels=offset,
        removable=torch.cat(removable) if removable else torch.zeros(0, dtype=torch.bool),
        reasons=reasons,
        producers={k: Producer(k, *_cat(v)) for k, v in producers.items()},
        consumers={k: Consumer(k, *_cat(v)) for k, v in consumers.items()},
        followers=followers,
        roots=roots,
        dependency=dg,
    )
    consumed = torch.zeros(graph.num_channels, dtype=torch.bool)
    for consumer in graph.consumers.values():
        consumed[consumer.channels] = True
    # Layers whose every channel belongs to a group with no consumer write the model's outputs.
    graph.outputs = {name for name, producer in graph.producers.items() if not consumed[producer.channels].any()}
    return graph


def _is_grouped(module: nn.Module) -> bool:
    """A grouped convolution other than a depthwise one (which Torch-Pruning handles exactly).

    Torch-Pruning indexes a grouped convolution's input channels as if it were dense and
    keeps ``groups`` unchanged, so removing channels there would corrupt it.
    """
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or module.groups == 1:
        return False
    return not (module.groups == module.in_channels == module.out_channels)


def _cat(pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
