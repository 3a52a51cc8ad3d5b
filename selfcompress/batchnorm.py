"""Batch-norm running statistics that match the current (quantized) weights.

While bit depths fall and exponents move, the quantized weights change faster than a
batch norm's running averages follow them, so a model in eval mode can be far from the
model that trains. :func:`reestimate_batch_norm` recomputes the statistics from a few
recorded inputs with the weights as they are now.
"""

from __future__ import annotations

import functools
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


#: The running statistics a batch norm in eval form leaves out of a packed file.
STATISTICS = ("running_mean", "running_var")


@functools.lru_cache(maxsize=64)
def eval_form_variance(eps: float) -> float | None:
    """The float32 ``v`` with ``v + eps == 1`` in float32, so ``1 / sqrt(v + eps)`` is exactly 1.

    ``None`` when no non-negative float32 does (``eps`` of 1 or more).
    """
    epsilon = torch.tensor(eps, dtype=torch.float32)
    one = torch.tensor(1.0, dtype=torch.float32)
    variance = one - epsilon
    for _ in range(4):  # 1 - eps rounds to within an ulp of the answer
        total = variance + epsilon
        if total == one and variance >= 0:
            return float(variance)
        variance = torch.nextafter(variance, torch.tensor(0.0 if total > one else 2.0))
    return None


def has_eval_form(module: nn.Module) -> bool:
    """Whether ``module`` is a batch norm whose eval-mode affine map its own weight and bias can hold.

    That takes affine parameters, running statistics and float32 throughout; see :func:`eval_form`.
    """
    if not (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine and module.track_running_stats):
        return False
    tensors = (module.weight, module.bias, module.running_mean, module.running_var)
    float32 = all(t is not None and t.dtype == torch.float32 for t in tensors)
    return float32 and eval_form_variance(module.eps) is not None


@torch.no_grad()
def eval_form(module: nn.Module) -> dict[str, torch.Tensor]:
    """A batch norm's ``weight``, ``bias``, ``running_mean`` and ``running_var`` in eval form.

    In eval mode a batch norm computes ``x * a + c`` per channel with
    ``a = weight / sqrt(running_var + eps)`` and ``c = bias - running_mean * a``. In eval
    form the weight is ``a``, the bias ``c``, the mean 0 and the variance
    :func:`eval_form_variance` (so that ``sqrt(running_var + eps)`` is exactly 1): the same
    outputs in eval mode, to float rounding (bit for bit with PyTorch's CPU kernel, whose
    arithmetic this follows), with two constant statistics that a file need not store.
    Applied twice it changes nothing. A pure function: ``module`` is not modified.

    Raises:
        ValueError: ``module`` has no eval form (:func:`has_eval_form`).
    """
    if not has_eval_form(module):
        raise ValueError(f"`module` {module!r} has no eval form: it needs affine=True, running statistics, float32.")
    scale = torch.rsqrt(module.running_var + module.eps) * module.weight
    shift = torch.addcmul(module.bias, module.running_mean, scale, value=-1)
    variance = eval_form_variance(module.eps)
    return {
        "weight": scale,
        "bias": shift,
        "running_mean": torch.zeros_like(module.running_mean),
        "running_var": torch.full_like(module.running_var, variance),
    }


def eval_form_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], set[str]]:
    """``model``'s state dict with every batch norm that has one in :func:`eval_form`.

    Returns the state and the names of the statistics that are now constants (which a
    packed file stores as one number each). ``model`` is not modified.
    """
    state = dict(model.state_dict())
    constants: set[str] = set()
    for module_name, module in model.named_modules():
        if has_eval_form(module):
            prefix = f"{module_name}." if module_name else ""
            for attr, value in eval_form(module).items():
                state[prefix + attr] = value
            constants.update(prefix + attr for attr in STATISTICS)
    return state, constants
