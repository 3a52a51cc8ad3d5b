"""Attaching per-channel bit depths and exponents to a model's weights.

Each compressible weight gets a :class:`ChannelQuantizer` through
``torch.nn.utils.parametrize``: the module keeps its class, its forward and its weight
``Parameter`` object; reading ``module.weight`` returns the quantized weight.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from selfcompress.quantize import check_levels, initial_exponent, integer_codes, quantize, row_widths

#: Module types whose weights are compressed, and the weight attributes of each.
COMPRESSIBLE: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Linear: ("weight",),
    nn.Conv1d: ("weight",),
    nn.Conv2d: ("weight",),
    nn.Conv3d: ("weight",),
    nn.MultiheadAttention: ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
}


def compressible_weights(module: nn.Module) -> list[str]:
    """The attributes of ``module`` holding a weight this package compresses (own parameters only)."""
    attrs = next((attrs for cls, attrs in COMPRESSIBLE.items() if isinstance(module, cls)), ())
    return [attr for attr in attrs if isinstance(getattr(module, attr, None), nn.Parameter)]


#: Starting bit depth of every channel. Measured better than 8 on digits, MNIST, CIFAR-10
#: and a wide MLP (on a depthwise CNN: smaller, as accurate within seeds): from 8 bits the
#: depths spend training falling and settle with a fine grid and a clipped range (about
#: 5 bits in an MLP), from 3 they start with the coarse grid and full range that the size
#: term is heading for.
INITIAL_BITS = 3.0

_BIAS_OF = {"weight": "bias", "in_proj_weight": "in_proj_bias"}


class ChannelQuantizer(nn.Module):
    """Parametrization giving each output channel of a weight its own bits and exponent."""

    def __init__(self, weight: Tensor, initial_bits: float, levels: str = "paper") -> None:
        super().__init__()
        check_levels(levels)
        self.levels = levels
        shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
        self.bits = nn.Parameter(torch.full(shape, float(initial_bits), device=weight.device))
        self.exponent = nn.Parameter(initial_exponent(weight, initial_bits).reshape(shape))
        # Optimizer steps each channel has spent closed; drives its constant output to zero.
        self.register_buffer("closed_steps", torch.zeros(weight.shape[0], dtype=torch.int64, device=weight.device))

    def forward(self, weight: Tensor) -> Tensor:
        return quantize(weight.float(), self.bits, self.exponent, self.levels).to(weight.dtype)

    def row_widths(self, weight: Tensor) -> Tensor:
        """Bits per code each row of ``weight``, quantized as now, takes in a packed file."""
        return row_widths(integer_codes(weight.float(), self.bits, self.exponent, self.levels))

    @property
    def open(self) -> Tensor:
        """Boolean mask of the channels whose bit depth is above zero."""
        return self.bits.detach().reshape(-1) > 0


@dataclass(frozen=True)
class QuantizedTensor:
    """One compressed weight: where it lives and its quantizer."""

    name: str
    module: nn.Module
    attr: str
    quantizer: ChannelQuantizer

    @property
    def raw(self) -> nn.Parameter:
        """The float weight the optimizer trains (before quantization)."""
        return getattr(self.module.parametrizations, self.attr).original

    @property
    def bias(self) -> nn.Parameter | None:
        bias_attr = _BIAS_OF.get(self.attr)
        return getattr(self.module, bias_attr, None) if bias_attr else None

    @property
    def in_channels(self) -> int:
        """Channels of this weight's input (the embedding width for attention)."""
        module = self.module
        for attr in ("in_channels", "in_features"):
            if hasattr(module, attr):
                return getattr(module, attr)
        return self.raw.shape[1]

    @property
    def groups(self) -> int:
        return getattr(self.module, "groups", 1)


def quantized_tensors(model: nn.Module) -> list[QuantizedTensor]:
    """Every weight of ``model`` that carries a :class:`ChannelQuantizer`, in module order."""
    found = []
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, chain in module.parametrizations.items():
            for quantizer in chain:
                if isinstance(quantizer, ChannelQuantizer):
                    name = f"{module_name}.{attr}" if module_name else attr
                    found.append(QuantizedTensor(name, module, attr, quantizer))
    return found


def quantizer_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The bit depths and exponents of ``model`` (trained with their own optimizer)."""
    for tensor in quantized_tensors(model):
        yield tensor.quantizer.bits
        yield tensor.quantizer.exponent


def prepare(
    model: nn.Module,
    *,
    initial_bits: float = INITIAL_BITS,
    exclude_names: Sequence[str] = (),
    exclude_types: Iterable[type[nn.Module]] = (),
    levels: str = "paper",
) -> list[QuantizedTensor]:
    """Give every compressible weight of ``model`` per-channel bits and exponents, in place.

    Args:
        model: Any module; ``nn.Linear``, ``nn.Conv1d/2d/3d`` (grouped and depthwise
            included) and ``nn.MultiheadAttention`` weights inside it are compressed.
        initial_bits: Starting bit depth of every channel.
        exclude_names: Module names (``fnmatch`` patterns, e.g. ``"head"`` or
            ``"blocks.*.proj"``) to leave in full precision.
        exclude_types: Module classes to leave in full precision.
        levels: The quantization grid, ``"paper"`` or ``"signs"`` (see
            :data:`selfcompress.quantize.LEVELS`).

    Returns:
        The compressed weights. Calling ``prepare`` on a prepared model returns them
        unchanged.

    Raises:
        ValueError: A bad ``initial_bits``, a filter that matches no module, or a model
            with nothing left to compress.
    """
    if not (isinstance(initial_bits, (int, float)) and 1 <= initial_bits <= 16):
        raise ValueError(f"`initial_bits` must be a number in [1, 16], got {initial_bits!r}.")
    check_levels(levels)
    exclude_types = tuple(exclude_types)
    for cls in exclude_types:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"`exclude_types` must hold nn.Module classes, got {cls!r}.")
    existing = quantized_tensors(model)
    if existing:
        return existing

    modules = dict(model.named_modules())
    for pattern in exclude_names:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in modules if name):
            raise ValueError(f"`exclude_names` entry {pattern!r} matches no module of the model.")
    for cls in exclude_types:
        if not any(isinstance(module, cls) for module in modules.values()):
            raise ValueError(f"`exclude_types` entry {cls.__name__} matches no module of the model.")

    holders = shared_parameters(model)
    targets, tied = [], {}
    for name, module in modules.items():
        if isinstance(module, exclude_types) or any(fnmatch.fnmatchcase(name, p) for p in exclude_names):
            continue
        for attr in compressible_weights(module):
            key = id(getattr(module, attr))
            if key in holders:
                tied[key] = holders[key]
            else:
                targets.append((module, attr))
    for names in tied.values():
        warnings.warn(
            f"{' and '.join(names)} are one shared (tied) parameter: left uncompressed, since a "
            "quantizer under one name would give the others different values.",
            stacklevel=2,
        )
    if not targets:
        raise ValueError(
            "`model` has nothing to compress: no nn.Linear, nn.Conv1d/2d/3d or "
            "nn.MultiheadAttention weight is left after `exclude_names`/`exclude_types` "
            "(shared, tied weights are left uncompressed)."
        )
    for module, attr in targets:
        quantizer = ChannelQuantizer(getattr(module, attr), initial_bits, levels)
        parametrize.register_parametrization(module, attr, quantizer, unsafe=True)
    return quantized_tensors(model)


def shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """The parameters of ``model`` reachable under more than one name (tied weights), by ``id``."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names[id(parameter)].append(name)
    return {key: found for key, found in names.items() if len(found) > 1}


def bake(model: nn.Module) -> nn.Module:
    """Replace every quantized weight of ``model`` by its quantized value, in place.

    Removes the quantizers: ``model`` is left with plain modules and ordinary parameters.
    Unlike ``parametrize.remove_parametrizations`` this never edits a class that a copy
    of the module may share.
    """
    for tensor in quantized_tensors(model):
        module, attr = tensor.module, tensor.attr
        with torch.no_grad():
            value = getattr(module, attr).detach().clone()
        requires_grad = tensor.raw.requires_grad
        del module.parametrizations[attr]
        if not module.parametrizations:
            del module._modules["parametrizations"]
            module.__class__ = module.__class__.__bases__[0]
        setattr(module, attr, nn.Parameter(value, requires_grad=requires_grad))
    return model
