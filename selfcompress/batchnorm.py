"""Batch-norm running statistics that match the current (quantized) weights.

While bit depths fall and exponents move, the quantized weights change faster than a
batch norm's running averages follow them, so a model in eval mode can be far from the
model that trains. :func:`reestimate_batch_norm` recomputes the statistics from a few
recorded inputs with the weights as they are now.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from selfcompress.graph import map_tensors

#: The positional and keyword arguments of one forward call.
ForwardInputs = tuple[tuple[Any, ...], dict[str, Any]]


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch norms of ``model`` that keep running statistics."""
    return [
        module
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
    ]


@torch.no_grad()
def reestimate_batch_norm(model: nn.Module, inputs: Sequence[ForwardInputs]) -> bool:
    """Replace every batch norm's running statistics by their average over ``inputs``.

    Each batch norm's running mean and variance become the plain average of its batch
    statistics over the forward calls ``model(*args, **kwargs)`` for ``(args, kwargs)`` in
    ``inputs`` (cumulative average, as ``momentum=None``), computed in train mode without
    gradients. Afterwards every module's mode, each norm's ``momentum`` and
    ``num_batches_tracked`` are as before, and so is the random state: dropout draws its
    masks during the pass, as in training, from a forked generator.

    Unlike :func:`torch.optim.swa_utils.update_bn`, which feeds one positional tensor per
    batch, this replays any forward signature, leaves the random state and submodule
    modes untouched, and keeps ``num_batches_tracked``.

    Args:
        model: The network whose batch norms to update (in place).
        inputs: Recorded ``(args, kwargs)`` of forward calls of ``model``.

    Returns:
        Whether anything was re-estimated (False without batch norms or without inputs).
    """
    norms = batch_norms(model)
    if not norms or not inputs:
        return False
    saved = [(norm, norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
    modes = [(module, module.training) for module in model.modules()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    accelerators = [device.index or 0] if device.type not in ("cpu", "meta") else []
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
        model.train()
        rng = torch.random.fork_rng(devices=accelerators, device_type=device.type if accelerators else None)
        with rng, parametrize.cached():
            for args, kwargs in inputs:
                model(*args, **kwargs)
    finally:
        for norm, momentum, count in saved:
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(count)
        for module, training in modes:
            module.training = training
    return True


def detach_inputs(value: Any) -> Any:
    """``value`` with every tensor in it detached (references, not copies), through lists, tuples and dicts."""
    return map_tensors(torch.Tensor.detach, value)


def sample_count(inputs: ForwardInputs) -> int:
    """Samples in one forward call: the first dimension of its first tensor of at least one dimension (1 if none)."""
    found: list[int] = []
    map_tensors(lambda t: found.append(t.shape[0]) if t.dim() > 0 else None, inputs)
    return found[0] if found else 1


class RecentInputs:
    """The inputs of the most recent forward calls that together hold at least ``samples`` samples.

    Whole calls are kept (as given, no copies); the oldest is dropped once the others hold
    ``samples`` without it.
    """

    def __init__(self, samples: int) -> None:
        self.samples = samples
        self._calls: deque[tuple[ForwardInputs, int]] = deque()
        self._held = 0

    def add(self, inputs: ForwardInputs) -> None:
        count = sample_count(inputs)
        self._calls.append((inputs, count))
        self._held += count
        while self._held - self._calls[0][1] >= self.samples:
            self._held -= self._calls.popleft()[1]

    def clear(self) -> None:
        self._calls.clear()
        self._held = 0

    @property
    def inputs(self) -> list[ForwardInputs]:
        """The kept calls, oldest first."""
        return [inputs for inputs, _ in self._calls]

    def __len__(self) -> int:
        return len(self._calls)
