"""The Lightning callback: wires Trainer hooks to the plain functions of the package."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from selfcompress.batchnorm import RecentInputs, batch_norms, detach_inputs, reestimate_batch_norm
from selfcompress.checkpoint import accept_state_dict, plain_state_dict, size_as_built
from selfcompress.finalize import compressed, silent_channels
from selfcompress.gates import channel_closed_steps, count_closed_steps, drive_closed_to_zero, protect_outputs
from selfcompress.graph import ChannelGraph, build_graph, record_example_inputs, stop_recording, traced_module
from selfcompress.layers import INITIAL_BITS, QuantizedTensor, prepare, quantized_tensors
from selfcompress.quantize import check_levels
from selfcompress.report import CompressionReport, channel_bits, entropy_size, from_size
from selfcompress.size import ModelSize, exact_size, open_rows, penalty
from selfcompress.surgery import RemovalRecord, keep_one_per_group, remove_channels, supported_channels
from selfcompress.targets import parse_target_size, scheduled_target, update_gamma

METRIC_PREFIX = "selfcompress/"
# Adam's own default: an exponent's task gradient shrinks as its layer widens, and a larger
# epsilon (1e-3 before) held the exponents of wide layers almost still.
EXPONENT_EPS = 1e-8


class SelfCompress(Callback):
    """Make a network learn per-channel bit depths, close the channels it does not need.

    Every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.MultiheadAttention`` weight gets one
    bit depth and one exponent per output channel (paper eq. 1). The loss gains
    ``gamma x`` the network's size in bits per original weight (eq. 5), applied once per
    optimizer step. Bit depths and exponents are trained by the callback's own Adam,
    whatever optimizer the LightningModule configures for the weights.

    Example::

        trainer = Trainer(callbacks=[SelfCompress(gamma=0.01)])
        trainer.fit(model, datamodule)
        compact = selfcompress.finalize(model)

    Args:
        gamma: Weight of the size term; larger gives a smaller network (0.01 when neither
            ``gamma`` nor ``target_size`` is given).
        target_size: The size you want, instead of choosing ``gamma``: bytes (``65536``,
            ``"64KiB"``, ``"1.5MB"``), bits per original weight (``"2bpw"``) or a fraction
            of the float32 size (``"3%"``, ``"0.03x"``); see
            :func:`selfcompress.targets.parse_target_size`. At every optimizer step the
            exact size is measured and ``gamma`` (starting at 0.01) becomes
            ``gamma * (size / goal) ** gamma_rate``, kept in ``[1e-6, 100]``; at or
            below the goal the size term pauses. The goal falls from the starting size to
            ``target_size`` over the first ``target_ramp`` of training (see
            :func:`selfcompress.targets.scheduled_target`). Giving both ``gamma`` and
            ``target_size`` is an error.
        gamma_rate: How fast ``gamma`` follows ``target_size`` (per optimizer step).
        target_ramp: Fraction of the training steps (``trainer.estimated_stepping_batches``)
            after which the size is steered to ``target_size`` itself; before, to a goal
            falling towards it, so that the network has time to adapt. ``0`` (or training
            of unknown length) steers to ``target_size`` from the first step.
        initial_bits: Starting bit depth of every channel (3: measured smaller than 8 on
            every benchmark, at equal or better accuracy; on a depthwise CNN, as accurate
            within its seeds' spread). Raise it (say to 8) to start a pretrained network
            from almost exactly its own output.
        levels: The quantization grid. ``"paper"``: eq. 1, integers ``-2^(b-1) .. 2^(b-1) - 1``
            times the channel's scale. ``"signs"``: the same, except that a channel below
            ``log2(3)`` bits, to which eq. 1 leaves only ``{-scale, 0}``, holds each weight's
            sign, ``±scale/2``, in one bit. Measured better at a few percent of the float32
            size with ``target_size``; with a gamma on wide networks with batch norms it
            closes far more channels than eq. 1 (see the README), so it is not the default.
        bits_lr: Learning rate of the bit depths (Adam).
        exponent_lr: Learning rate of the exponents (Adam).
        follow_schedule: Scale both learning rates by the user's learning-rate schedule:
            by the first optimizer's current ``lr`` over the highest it has had, so that
            bit depths settle as the weights do (warm-up is not followed).
        eps: Adam epsilon of the bit depths, large on purpose so that they move steadily. Their
            gradients are measured in units of the average channel's size gradient
            (``d penalty / d bits`` averaged over the channels at the first step), so the same
            ``eps`` and ``gamma`` act alike on a network of any size. Exponents use Adam's
            own 1e-8 (``EXPONENT_EPS``), small beside their gradients at any width.
        exclude_names: Module names (``fnmatch`` patterns) to leave uncompressed.
        exclude_types: Module classes to leave uncompressed.
        output_min_bits: Floor on the bit depth of layers writing the model's outputs,
            which never lose channels.
        ramp_steps: Optimizer steps over which a closed channel's bias and batch-norm shift
            are brought to exactly zero.
        shrink_every: When closed channels leave the training model for real: ``"epoch"``
            (at each epoch's end), a number of optimizer steps, or ``None`` to keep them
            masked until :func:`~selfcompress.finalize`. Under multi-process strategies
            (DDP) channels are masked only.
        print_report: Print the compression report once at the end of ``fit`` (rank 0).
        bn_samples: Batch-norm running statistics are re-estimated with the current
            quantized weights, on the network's inputs of the epoch's last training batches
            holding at least ``bn_samples`` samples (whole batches, counted along the first
            dimension of the first input tensor), before every validation during ``fit``, at
            each epoch's end (before checkpoints are written) and at the end of training, so
            that the model in eval mode is the model that trained. The inputs are kept as
            references (no copies); dropout runs as in training, on a forked random state.
            ``0`` turns this off. Counted in samples, not batches: the estimate's noise
            depends on the samples, the memory it holds too.

    Raises:
        ValueError: An argument out of range (at construction), or a model with nothing to
            compress or a filter that matches nothing (at setup).
    """

    def __init__(
        self,
        gamma: float | None = None,
        *,
        target_size: int | str | None = None,
        gamma_rate: float = 0.02,
        target_ramp: float = 0.5,
        initial_bits: float = INITIAL_BITS,
        levels: str = "paper",
        bits_lr: float = 0.1,
        exponent_lr: float = 0.05,
        follow_schedule: bool = True,
        eps: float = 0.1,
        exclude_names: Sequence[str] = (),
        exclude_types: Iterable[type[nn.Module]] = (),
        output_min_bits: float = 2.0,
        ramp_steps: int = 100,
        shrink_every: int | Literal["epoch"] | None = "epoch",
        print_report: bool = True,
        bn_samples: int = 2048,
    ) -> None:
        if gamma is not None and target_size is not None:
            raise ValueError(
                f"Give either `gamma` ({gamma!r}) or `target_size` ({target_size!r}), not both: "
                "with a target, gamma is steered automatically."
            )
        gamma = 0.01 if gamma is None else gamma
        _check_number("gamma", gamma, low=0.0)
        _check_number("gamma_rate", gamma_rate, low=0.0)
        _check_number("target_ramp", target_ramp, low=0.0, high=1.0)
        if not isinstance(follow_schedule, bool):
            raise ValueError(f"`follow_schedule` must be True or False, got {follow_schedule!r}.")
        if target_size is not None:
            parse_target_size(target_size, fp32_bits=2**62, weights=2**40)  # the syntax, before any training
        _check_number("initial_bits", initial_bits, low=1.0, high=16.0)
        check_levels(levels)
        _check_number("bits_lr", bits_lr, low=0.0, inclusive_low=False)
        _check_number("exponent_lr", exponent_lr, low=0.0)
        _check_number("eps", eps, low=0.0, inclusive_low=False)
        _check_number("output_min_bits", output_min_bits, low=1.0, high=16.0)
        if not (isinstance(ramp_steps, int) and ramp_steps >= 1):
            raise ValueError(f"`ramp_steps` must be an int >= 1, got {ramp_steps!r}.")
        if not (
            shrink_every is None or shrink_every == "epoch" or (isinstance(shrink_every, int) and shrink_every >= 1)
        ):
            raise ValueError(f"`shrink_every` must be 'epoch', an int >= 1 or None, got {shrink_every!r}.")
        if not (isinstance(bn_samples, int) and not isinstance(bn_samples, bool) and bn_samples >= 0):
            raise ValueError(f"`bn_samples` must be an int >= 0 (0 turns re-estimation off), got {bn_samples!r}.")
        if isinstance(exclude_names, str):
            raise ValueError(f"`exclude_names` must be a sequence of names, got the string {exclude_names!r}.")
        self.gamma = float(gamma)
        self.target_size = target_size
        self.gamma_rate = float(gamma_rate)
        self.target_ramp = float(target_ramp)
        self.initial_bits = float(initial_bits)
        self.levels = levels
        self.bits_lr = bits_lr
        self.exponent_lr = exponent_lr
        self.follow_schedule = follow_schedule
        self.eps = eps
        self.exclude_names = tuple(exclude_names)
        self.exclude_types = tuple(exclude_types)
        self.output_min_bits = float(output_min_bits)
        self.ramp_steps = ramp_steps
        self.shrink_every = shrink_every
        self.print_report = print_report
        self.history: list[dict[str, float]] = []
        #: Bytes of the finalized model with entropy-coded codes, measured at the end of fit.
        self.entropy_bytes: int | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict[str, Any] | None = None
        self._graph: ChannelGraph | None = None
        self._traced: nn.Module | None = None
        self._tensors: list[QuantizedTensor] = []
        self._num_weights: int | None = None
        self._fp32_bits: int | None = None
        self._inputs = None
        self._stepped = False
        self._above_target = True
        self._start_bits: int | None = None  # the size at the first step, where the target's ramp starts
        self._peak_lr = 0.0  # the highest learning rate the user's first optimizer has had
        self._shrinking = False
        self._resize_hook = None
        self._module: pl.LightningModule | None = None
        self._bits_grad_scale: float | None = None
        self._removed: RemovalRecord = {}  # what shrinking removed, by state-dict name in the LightningModule
        self.bn_samples = bn_samples
        # Recent training inputs of the module replayed for batch norms (of every module in the first batch).
        self._recent_inputs: dict[nn.Module, RecentInputs] = {}
        self._input_hooks: list[Any] = []
        self._watched: nn.Module | None = None  # the module whose inputs are replayed; None: not chosen yet
        self._nothing_to_watch = False
        self._recording_inputs = False
        self._bn_step: int | None = None

    @property
    def graph(self) -> ChannelGraph | None:
        """The channel groups of the traced model (known after the first training step)."""
        return self._graph

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._shrinking = self.shrink_every is not None and trainer.world_size == 1
        if self.shrink_every is not None and trainer.world_size > 1:
            rank_zero_warn(
                "SelfCompress masks closed channels under multi-process training: parameter shapes "
                "cannot change under DDP. They are removed by `selfcompress.finalize` after training."
            )
        if self._shrinking and getattr(pl_module, "_compiler_ctx", None) is not None:
            raise ValueError(
                "SelfCompress cannot change the shapes of a `torch.compile`d model while it trains: "
                "pass `shrink_every=None` (closed channels stay masked until `selfcompress.finalize`)."
            )
        if self._shrinking and any(isinstance(c, StochasticWeightAveraging) for c in trainer.callbacks):
            raise ValueError(
                "SelfCompress cannot change the shapes of a model that `StochasticWeightAveraging` keeps an "
                "average copy of: pass `shrink_every=None` (closed channels stay masked until "
                "`selfcompress.finalize`)."
            )
        self._tensors = prepare(
            pl_module,
            initial_bits=self.initial_bits,
            levels=self.levels,
            exclude_names=self.exclude_names,
            exclude_types=self.exclude_types,
        )
        if self._graph is None:
            record_example_inputs(pl_module)
        self._module = pl_module
        if self._resize_hook is None:
            # Plain state dicts (checkpoints hold one) and shrunken ones: fit the model to them before loading.
            self._resize_hook = pl_module.register_load_state_dict_pre_hook(
                lambda module, state_dict, prefix, *args: accept_state_dict(
                    module, state_dict, prefix, self.initial_bits
                )
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._resize_hook is not None:
            self._resize_hook.remove()
            self._resize_hook = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        quantizer_ids = set()
        for tensor in self._tensors:
            quantizer_ids |= {id(tensor.quantizer.bits), id(tensor.quantizer.exponent)}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in quantizer_ids]
        self._optimizer = torch.optim.Adam(
            [
                {"params": [t.quantizer.bits for t in self._tensors], "lr": self.bits_lr},
                {"params": [t.quantizer.exponent for t in self._tensors], "lr": self.exponent_lr, "eps": EXPONENT_EPS},
            ],
            eps=self.eps,
            weight_decay=0.0,
        )
        if self._pending_state is not None:
            self._optimizer.load_state_dict(self._pending_state["optimizer"])
            self._pending_state = None

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._recording_inputs = False  # the forward passes of this batch are over
        if self._optimizer is None or optimizer is not trainer.optimizers[0]:
            return
        self._ensure_graph(pl_module)
        params = [p for group in self._optimizer.param_groups for p in group["params"]]
        if not _unscale(params, trainer):
            self._optimizer.zero_grad(set_to_none=True)
            return
        self._follow_schedule(optimizer)
        bits = [t.quantizer.bits for t in self._tensors]
        if self.target_size is None or self._steer_towards_target(bits, trainer):
            size_gradient = torch.autograd.grad(self.gamma * self.penalty(), bits)
            for param, grad in zip(bits, size_gradient, strict=True):
                param.grad = grad if param.grad is None else param.grad + grad
        for param in bits:
            if param.grad is not None:
                param.grad.mul_(self._bits_grad_scale)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        protect_outputs(self._tensors, self._graph, self.output_min_bits)
        self._stepped = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._stepped:
            self._stepped = False
            count_closed_steps(self._tensors)
            drive_closed_to_zero(self._traced, self._tensors, self._graph, self.ramp_steps)
            if isinstance(self.shrink_every, int) and trainer.global_step % self.shrink_every == 0:
                self.shrink(trainer.optimizers)
            if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
                size = self.size()
                pl_module.log(METRIC_PREFIX + "bytes", float(size.total_bytes), prog_bar=True, logger=False)
                pl_module.log(METRIC_PREFIX + "bpw", size.bits_per_weight, prog_bar=True, logger=False)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_watching_inputs()
        if self._graph is None or not trainer.is_global_zero:
            return
        self.entropy_bytes = self._entropy_bytes()
        if self.entropy_bytes is not None:
            for logger in trainer.loggers:
                logger.log_metrics({METRIC_PREFIX + "entropy_bytes": float(self.entropy_bytes)}, trainer.global_step)
        if self.print_report:
            print(self.report())

    def _entropy_bytes(self) -> int | None:
        """Bytes of the finalized model with its codes entropy-coded (what `save(entropy_coding="lzma")` holds)."""
        try:
            compact, _, layers = compressed(self._traced, self._inputs)
        except (ValueError, RuntimeError) as error:  # a figure is not worth failing the fit for
            rank_zero_warn(f"SelfCompress could not measure the entropy-coded size: {error}")
            return None
        return entropy_size(compact, layers)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reestimate_batch_norm(trainer)  # before ModelCheckpoint / EarlyStopping, which run last
        if self._graph is None:
            return
        if self.shrink_every == "epoch":
            self.shrink(trainer.optimizers)
        size = self.size()
        figures = size_figures(size)
        if self.target_size is not None:
            figures["target_fraction"] = self._target_bits(size) / size.fp32_bits
            figures["gamma"] = self.gamma
        for name, value in figures.items():
            pl_module.log(METRIC_PREFIX + name, value, prog_bar=name in ("bits_per_weight", "size_fraction"))
        self.history.append({"epoch": trainer.current_epoch, **figures})

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for recent in self._recent_inputs.values():
            recent.clear()  # statistics come from this epoch's batches only (and resume exactly)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.bn_samples:
            self._watch_inputs(pl_module)
            self._recording_inputs = True

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._reestimate_batch_norm(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reestimate_batch_norm(trainer)  # for `trainer.test` and whatever runs after fit

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_watching_inputs()

    def _watch_inputs(self, pl_module: pl.LightningModule) -> None:
        """Record forward inputs in training: of every module in the first batch, then of the one replayed."""
        self._choose_watched(pl_module)
        if self._input_hooks or self._nothing_to_watch:
            return
        modules = [self._watched] if self._watched is not None else list(pl_module.modules())
        self._recent_inputs = {m: self._recent_inputs.get(m, RecentInputs(self.bn_samples)) for m in modules}
        self._input_hooks = [m.register_forward_pre_hook(self._remember_inputs, with_kwargs=True) for m in modules]

    def _choose_watched(self, pl_module: pl.LightningModule) -> None:
        """After the first batch: keep the outermost module called in training that runs every batch norm."""
        if self._watched is not None or not any(self._recent_inputs.values()):
            return
        wanted = set(batch_norms(self._traced if self._traced is not None else pl_module))
        found = next(
            (m for m in pl_module.modules() if self._recent_inputs.get(m) and wanted <= set(batch_norms(m))), None
        )
        recent = self._recent_inputs.get(found)
        self._stop_watching_inputs()
        if wanted and found is None:
            rank_zero_warn(
                "SelfCompress found no module whose forward runs every batch norm in training, so their running "
                "statistics are not re-estimated for the quantized weights. `bn_samples=0` silences this."
            )
        self._watched, self._nothing_to_watch = found, found is None or not wanted
        self._recent_inputs = {found: recent} if found is not None else {}

    def _remember_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Lightning's DDP wrapper points a module's forward at training_step: not replayable inputs.
        if self._recording_inputs and module.training and torch.is_grad_enabled() and "forward" not in vars(module):
            self._recent_inputs[module].add(detach_inputs((args, kwargs)))

    def _stop_watching_inputs(self) -> None:
        for handle in self._input_hooks:
            handle.remove()
        self._input_hooks, self._recent_inputs, self._recording_inputs = [], {}, False
        self._watched, self._nothing_to_watch = None, False

    def _reestimate_batch_norm(self, trainer: pl.Trainer) -> None:
        """Batch-norm statistics for the current weights, unless no step was taken since the last time."""
        self._choose_watched(trainer.lightning_module)
        recent = self._recent_inputs.get(self._watched) if self._watched is not None else None
        if not recent or self._bn_step == trainer.global_step:
            return
        with trainer.precision_plugin.forward_context():
            reestimate_batch_norm(self._watched, recent.inputs)
        self._bn_step = trainer.global_step

    def _target_bits(self, size: ModelSize) -> int:
        return parse_target_size(self.target_size, size.fp32_bits, size.weights_total)

    def _follow_schedule(self, optimizer: torch.optim.Optimizer) -> None:
        """Scale the quantizer's learning rates as the user's schedule has annealed its own."""
        if not self.follow_schedule:
            return
        lr = float(optimizer.param_groups[0]["lr"])
        self._peak_lr = max(self._peak_lr, lr)
        factor = schedule_factor(lr, self._peak_lr)
        bits_group, exponent_group = self._optimizer.param_groups
        bits_group["lr"], exponent_group["lr"] = self.bits_lr * factor, self.exponent_lr * factor

    def _steer_towards_target(self, bits: list[torch.nn.Parameter], trainer: pl.Trainer) -> bool:
        """Update ``gamma`` from the exact size; whether the size term applies this step.

        Above the scheduled goal the size term applies and ``gamma`` grows; at or below it
        the term pauses and, on crossing, the bit depths' momentum is cleared so they stop
        where they are.
        """
        size = self.size()
        if self._start_bits is None:
            self._start_bits = size.total_bits
        total = trainer.estimated_stepping_batches
        ramp = self.target_ramp * total if math.isfinite(total) else 0.0
        progress = trainer.global_step / ramp if ramp > 0 else 1.0
        target = scheduled_target(self._start_bits, self._target_bits(size), progress)
        self.gamma = update_gamma(self.gamma, size.total_bits, target, self.gamma_rate)
        above = size.total_bits > target
        if self._above_target and not above:
            for param in bits:
                if "exp_avg" in self._optimizer.state.get(param, {}):
                    self._optimizer.state[param]["exp_avg"].zero_()
        self._above_target = above
        return above

    def penalty(self) -> torch.Tensor:
        """The differentiable size term (bits per original weight), without ``gamma``."""
        return penalty(self._tensors, self._graph, self._num_weights)

    def size(self) -> ModelSize:
        """The exact size of the model being trained, against the network it started as.

        Totals (fp32 size, weights, and each layer's channels and weights) are those of the
        network as built, before any channel left it.
        """
        size = size_as_built(exact_size(self._traced, self._graph), self._tensors, self._removed, self._prefix())
        return dataclasses.replace(size, fp32_bits=self._fp32_bits)

    def _prefix(self) -> str:
        """The traced network's prefix in the LightningModule's state-dict names."""
        return next((f"{name}." for name, m in self._module.named_modules() if m is self._traced and name), "")

    def report(self) -> CompressionReport:
        """Per-layer figures, tables and a plot of the model being trained, with the history."""
        if self._graph is None:
            raise RuntimeError("SelfCompress.report() needs at least one training step.")
        coding = "lzma" if self.entropy_bytes is not None else None
        return from_size(
            self.size(),
            channel_bits(self._traced, self._graph),
            self.history,
            entropy_bytes=self.entropy_bytes,
            entropy_coding=coding,
        )

    def shrink(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> int:
        """Remove, for real, every channel that is closed and whose constant reached zero.

        Returns the number of channels removed. The network's function does not change.
        """
        if not self._shrinking or self._graph is None:
            return 0
        graph = self._graph
        kept = graph.kept_channels(open_rows(self._tensors))
        ready = graph.removable & ~kept & (channel_closed_steps(self._tensors, graph) >= self.ramp_steps)
        if not ready.any():
            return 0
        ready &= supported_channels(self._traced, graph) & silent_channels(self._traced, graph, self._inputs)
        ready = keep_one_per_group(ready, graph)
        if not ready.any():
            return 0
        prefix = self._prefix()
        optimizers = [*optimizers, self._optimizer]
        removed = remove_channels(self._traced, graph, ready, optimizers, record=self._removed, prefix=prefix)
        self._graph = build_graph(self._traced, self._inputs)
        return removed

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The exact training form goes aside; "state_dict" becomes what a freshly built module loads.
        checkpoint["selfcompress"] = {"state_dict": checkpoint["state_dict"], "removed": copy.deepcopy(self._removed)}
        checkpoint["state_dict"] = plain_state_dict(pl_module, self._removed, checkpoint["state_dict"])

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get("selfcompress")
        if saved is not None:  # else a plain checkpoint: loaded already, quantizers fitted to its weights
            pl_module.load_state_dict(saved["state_dict"], strict=pl_module.strict_loading)
        self._removed = copy.deepcopy(saved["removed"]) if saved is not None else {}
        if self._traced is not None:  # the model may have changed shape: the groups follow
            self._graph = build_graph(self._traced, self._inputs)

    def _ensure_graph(self, pl_module: pl.LightningModule) -> None:
        if self._graph is not None:
            return
        found = traced_module(pl_module)
        if found is None:
            raise RuntimeError(
                "SelfCompress could not trace the model: no forward call of a module holding all "
                "compressed layers was seen. Set `example_input_array` on the LightningModule."
            )
        self._traced, self._inputs = found
        stop_recording(pl_module)
        self._tensors = quantized_tensors(self._traced)
        self._graph = build_graph(self._traced, self._inputs)
        if self._num_weights is None:
            size = exact_size(self._traced, self._graph)
            self._num_weights, self._fp32_bits = size.weights_total, size.fp32_bits
        if self._bits_grad_scale is None:
            self._bits_grad_scale = bits_gradient_scale(self._tensors, self.penalty())

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self._optimizer.state_dict() if self._optimizer is not None else None,
            "num_weights": self._num_weights,
            "fp32_bits": self._fp32_bits,
            "history": list(self.history),
            "gamma": self.gamma,
            "above_target": self._above_target,
            "start_bits": self._start_bits,
            "peak_lr": self._peak_lr,
            "bits_grad_scale": self._bits_grad_scale,
            "removed": copy.deepcopy(self._removed),
            "levels": self.levels,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_levels = state_dict.get("levels", "paper")
        if saved_levels != self.levels:
            raise ValueError(
                f"The checkpoint was trained with `levels={saved_levels!r}`, this SelfCompress has "
                f"`levels={self.levels!r}`: resume with `SelfCompress(levels={saved_levels!r}, ...)`."
            )
        self._num_weights = state_dict["num_weights"]
        self._fp32_bits = state_dict["fp32_bits"]
        self.history = list(state_dict["history"])
        if self.target_size is not None and "gamma" in state_dict:
            self.gamma = float(state_dict["gamma"])  # resume the steering where it was
            self._above_target = bool(state_dict.get("above_target", True))
            self._start_bits = state_dict.get("start_bits")
        self._peak_lr = float(state_dict.get("peak_lr", 0.0))
        if state_dict["optimizer"] is not None:
            self._pending_state = {"optimizer": state_dict["optimizer"]}
        self._removed = copy.deepcopy(state_dict.get("removed", {}))
        self._bits_grad_scale = state_dict.get("bits_grad_scale")


def bits_gradient_scale(tensors: list[QuantizedTensor], size_penalty: torch.Tensor) -> float:
    """One over the mean gradient of the size penalty with respect to each channel's bit depth.

    The penalty is in bits per original weight, so a channel's share of it (and its
    gradient) shrinks as the network grows; against Adam's epsilon that would make large
    networks compress ever more slowly. Multiplied by this scale, the average channel's
    size gradient is ``gamma`` whatever the network's size.
    """
    bits = [t.quantizer.bits for t in tensors]
    grads = torch.autograd.grad(size_penalty, bits)
    mean = float(torch.cat([g.flatten() for g in grads]).mean())
    return 1.0 / mean if mean > 0 else 1.0


def schedule_factor(lr: float, peak_lr: float) -> float:
    """How far a learning-rate schedule has annealed: ``lr / peak_lr`` in ``[0, 1]`` (1 without a peak)."""
    if not peak_lr > 0:
        return 1.0
    return min(max(lr / peak_lr, 0.0), 1.0)


def size_figures(size: ModelSize) -> dict[str, float]:
    """The figures logged each epoch, from one exact size."""
    return {
        "bits_per_weight": size.bits_per_weight,
        "size_fraction": size.fraction_of_fp32,
        "size_bytes": float(size.total_bytes),
        "weights_kept": size.weights_kept / max(size.weights_total, 1),
        "channels_open": float(size.channels_open),
    }


def _unscale(params: list[nn.Parameter], trainer: pl.Trainer) -> bool:
    """Undo a mixed-precision loss scale on ``params``' gradients; False if any is not finite."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    grads = [p.grad for p in params if p.grad is not None]
    if scaler is not None and scaler.is_enabled():
        inverse = 1.0 / scaler.get_scale()
        for grad in grads:
            grad.mul_(inverse)
    return all(bool(torch.isfinite(grad).all()) for grad in grads)


def _check_number(name: str, value: Any, *, low: float, high: float = math.inf, inclusive_low: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if inclusive_low else value > low) and value <= high
    if not ok:
        bound = "[" if inclusive_low else "("
        raise ValueError(f"`{name}` must be a finite number in {bound}{low}, {high}], got {value!r}.")
