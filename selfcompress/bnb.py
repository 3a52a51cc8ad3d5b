"""Exporting a trained model to bitsandbytes 4-bit and 8-bit storage, exactly.

The learned integer codes go straight into bitsandbytes storage, so no second
quantization error is added:

- ``nn.Linear`` whose channels all fit 3 bits, with ``in_features`` a multiple of 64
  (4-bit blocks never straddle two rows): :class:`FP4Linear`, a ``bnb.nn.Linear4bit``
  (``fp4``, block size 64) whose block absmax is ``6 * 2^e`` of its row.
- ``nn.Linear`` whose channels all fit 8 bits: :class:`Int8Linear`, a
  ``bnb.nn.Linear8bitLt`` (``has_fp16_weights=False``) with ``CB`` the codes and
  ``SCB = 127 * 2^e``, so ``CB * SCB / 127`` is the learned weight.
- Convolutions (bitsandbytes has no convolution kernel): :class:`BnbConv`, holding the
  same 4-bit (rows padded to whole blocks) or 8-bit storage and dequantizing in forward.
- Layers with a channel above 8 bits stay plain layers in ``dtype``.

The compute dtype is float32 by default, which CPU inputs usually are; pass
``dtype=torch.float16`` or ``torch.bfloat16`` for half-precision inputs on a GPU.
In float32 on CPU the exported model reproduces :func:`selfcompress.finalize` to float
rounding (the dequantized weights are bit-identical; only the kernels' summation order
may differ): the tests check ``max |diff| <= 1e-5 * max |output|``.
"""

from __future__ import annotations

import math
from typing import Any

import bitsandbytes.functional as bnbf
import torch
from bitsandbytes.nn import Int8Params, Linear4bit, Linear8bitLt, Params4bit
from torch import Tensor, nn

from selfcompress.finalize import LayerCodes, compressed
from selfcompress.graph import autograd_enabled
from selfcompress.quantize import code_bits

BLOCKSIZE = 64
#: fp4 nibble of each integer code -4..3 when the block absmax is 6 * 2^e (table x 6).
_FP4_NIBBLE = {-4: 10, -3: 13, -2: 12, -1: 14, 0: 0, 1: 6, 2: 4, 3: 5}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _fp4_pack(codes: Tensor) -> Tensor:
    """Codes in -4..3 as bitsandbytes fp4 nibbles, two per byte (first in the high nibble)."""
    lut = torch.zeros(8, dtype=torch.uint8)
    for code, nibble in _FP4_NIBBLE.items():
        lut[code + 4] = nibble
    nibbles = lut[(codes.reshape(-1).to(torch.int64) + 4)]
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    return (nibbles[0::2] << 4) | nibbles[1::2]


def _fp4_state(rows: int, cols: int, scale: Tensor, dtype: torch.dtype) -> bnbf.QuantState:
    absmax = (6.0 * scale.float()).repeat_interleave(cols // BLOCKSIZE).contiguous()
    code = bnbf.get_4bit_type("fp4", device=absmax.device)
    return bnbf.QuantState(
        absmax=absmax, shape=torch.Size([rows, cols]), code=code, blocksize=BLOCKSIZE, quant_type="fp4", dtype=dtype
    )


def _frozen(value: Tensor, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(value.detach().to(dtype).clone(), requires_grad=False)


class Int8Linear(Linear8bitLt):
    """``Linear8bitLt`` holding learned codes; its state dict loads strictly at any time."""

    @classmethod
    def from_codes(cls, linear: nn.Linear, layer: LayerCodes, dtype: torch.dtype) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False)
        cb = layer.codes.to(torch.int8).contiguous()
        module.weight = Int8Params(cb, has_fp16_weights=False, requires_grad=False)
        module.weight.CB = cb
        module.weight.SCB = (127.0 * layer.scale.float()).contiguous()
        if linear.bias is not None:
            module.bias = _frozen(linear.bias, dtype)
        return module

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "SCB"
        nn.Module._load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        current = self.weight.SCB if self.weight.SCB is not None else self.state.SCB
        if key in state_dict:
            if key in unexpected_keys:
                unexpected_keys.remove(key)
            if current is None or current.shape != state_dict[key].shape:
                error_msgs.append(f"size mismatch for {key}.")
            else:
                current.copy_(state_dict[key])
        elif strict:
            missing_keys.append(key)


class FP4Linear(Linear4bit):
    """``Linear4bit`` (fp4) holding learned codes of at most 3 bits; loads strictly."""

    @classmethod
    def from_codes(cls, linear: nn.Linear, layer: LayerCodes, dtype: torch.dtype) -> FP4Linear:
        rows, cols = layer.codes.shape
        module = cls(cols, rows, bias=linear.bias is not None, compute_dtype=dtype, quant_type="fp4")
        # bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel on the first
        # eval forward: that computes in bfloat16 (not exact) and state_dict() undoes the
        # repacking in place. Keep the plain layout; CUDA is unaffected.
        module.support_avx512bf16_for_cpu = False
        state = _fp4_state(rows, cols, layer.scale, dtype)
        module.weight = Params4bit(
            _fp4_pack(layer.codes).reshape(-1, 1),
            requires_grad=False,
            quant_state=state,
            blocksize=BLOCKSIZE,
            quant_type="fp4",
            bnb_quantized=True,
            module=module,
        )
        module.quant_state = state
        if linear.bias is not None:
            module.bias = _frozen(linear.bias, dtype)
        return module

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "weight"
        stats = {k[len(key) + 1 :]: v for k, v in state_dict.items() if k.startswith(key + ".")}
        if key in state_dict and stats:
            try:
                self.weight = Params4bit.from_prequantized(
                    data=state_dict[key].clone(),
                    quantized_stats=stats,
                    requires_grad=False,
                    device=self.weight.device,
                    module=self,
                )
            except Exception as error:  # a malformed quant state
                error_msgs.append(f"cannot load 4-bit weight {key}: {error}")
        nn.Module._load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for name in list(unexpected_keys):
            if name.startswith(key + "."):
                unexpected_keys.remove(name)


class BnbConv(nn.Module):
    """A convolution whose weight lives in bitsandbytes 4-bit or 8-bit storage.

    8-bit: ``CB`` (int8 codes, rows of the flattened kernel) and ``SCB = 127 * 2^e``.
    4-bit: fp4 nibbles with each row padded to whole blocks of 64, and the block absmax.
    The forward dequantizes with bitsandbytes and runs the ordinary convolution.
    """

    def __init__(self, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, layer: LayerCodes, bits: int, dtype: torch.dtype):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"`bits` must be 4 or 8, got {bits}.")
        self._conv_forward_of = type(conv)._conv_forward
        for attr in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "padding_mode",
            "_reversed_padding_repeated_twice",
        ):
            setattr(self, attr, getattr(conv, attr))
        self.weight_shape = tuple(layer.codes.shape)
        self.bits = bits
        self.dtype = dtype
        rows = layer.codes.shape[0]
        fan = math.prod(self.weight_shape[1:])
        codes = layer.codes.reshape(rows, fan)
        if bits == 8:
            self.register_buffer("CB", codes.to(torch.int8).contiguous())
            self.register_buffer("SCB", (127.0 * layer.scale.float()).contiguous())
        else:
            padded = -(-fan // BLOCKSIZE) * BLOCKSIZE
            codes = torch.cat([codes, codes.new_zeros(rows, padded - fan)], dim=1)
            self.padded_fan = padded
            self.register_buffer("packed", _fp4_pack(codes))
            self.register_buffer("absmax", _fp4_state(rows, padded, layer.scale, torch.float32).absmax)
        bias = conv.bias
        self.bias = None if bias is None else _frozen(bias, dtype)

    def dequantized_weight(self) -> Tensor:
        rows = self.weight_shape[0]
        if self.bits == 8:
            weight = torch.ops.bitsandbytes.int8_vectorwise_dequant.default(self.CB, self.SCB)
        else:
            code = bnbf.get_4bit_type("fp4", device=self.absmax.device)
            state = bnbf.QuantState(
                absmax=self.absmax,
                shape=torch.Size([rows, self.padded_fan]),
                code=code,
                blocksize=BLOCKSIZE,
                quant_type="fp4",
                dtype=torch.float32,
            )
            weight = bnbf.dequantize_4bit(self.packed.reshape(-1, 1), state, quant_type="fp4")
            weight = weight[:, : math.prod(self.weight_shape[1:])]
        return weight.reshape(self.weight_shape)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward_of(self, x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"bits={self.bits}, groups={self.groups}"
        )


def to_bitsandbytes(
    model: nn.Module,
    inputs: Any = None,
    *,
    dtype: torch.dtype = torch.float32,
    four_bit: bool = True,
) -> nn.Module:
    """A finalized copy of a trained ``model`` with its weights in bitsandbytes storage.

    Works under any grad mode and leaves it as it was.

    Args:
        model: Any model :func:`selfcompress.finalize` accepts (the LightningModule, its
            network, the finalized module, a plain model from a checkpoint); not modified.
        inputs: One forward call, as for :func:`selfcompress.finalize`.
        dtype: The dtype the model's inputs will have. Everything that stays in floating
            point (biases, batch norms, layers with a channel above 8 bits, any float
            weight) is cast to it, and the bitsandbytes layers compute in it. Float32 (the
            default) suits CPU inputs; use ``torch.float16`` / ``torch.bfloat16`` for
            half-precision inputs on a GPU.
        four_bit: Use 4-bit storage for layers whose channels all fit 3 bits.

    Returns:
        The compact module, its ``nn.Linear`` layers replaced by :class:`FP4Linear` /
        :class:`Int8Linear` and its convolutions by :class:`BnbConv` where the codes fit,
        on the CPU. Put it on a device with ``.to(device)`` as usual (bitsandbytes moves its
        state).

    Raises:
        ValueError: As :func:`selfcompress.finalize`, or ``dtype`` is not a floating-point dtype.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"`dtype` must be a floating-point torch.dtype, got {dtype!r}.")
    with autograd_enabled():
        compact, _, layers = compressed(model, inputs)
        return bitsandbytes_from_codes(compact.cpu(), layers, dtype=dtype, four_bit=four_bit)


def bitsandbytes_from_codes(
    compact: nn.Module, layers: dict[str, LayerCodes], *, dtype: torch.dtype = torch.float32, four_bit: bool = True
) -> nn.Module:
    """:func:`to_bitsandbytes` from the output of :func:`selfcompress.finalize.compressed`.

    ``compact`` is modified in place (cast to ``dtype``, layers replaced) and returned.
    """
    compact = compact.to(dtype)
    modules = dict(compact.named_modules())
    for name, layer in layers.items():
        module_name, _, attr = name.rpartition(".")
        module = modules[module_name]
        if attr != "weight" or not isinstance(module, (nn.Linear, *_CONVS)):
            continue
        widest = int(code_bits(layer.codes).max()) if layer.codes.shape[0] else 0  # the codes as bnb holds them
        if widest > 8:
            continue
        if isinstance(module, nn.Linear):
            if four_bit and widest <= 3 and module.in_features % BLOCKSIZE == 0:
                new = FP4Linear.from_codes(module, layer, dtype)
            else:
                new = Int8Linear.from_codes(module, layer, dtype)
        else:
            new = BnbConv(module, layer, 4 if four_bit and widest <= 3 else 8, dtype)
        new.train(module.training)
        if module_name:
            parent_name, _, child = module_name.rpartition(".")
            setattr(modules[parent_name], child, new)
        else:
            compact = new
    return compact


def storage_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module``, bitsandbytes state included."""
    total = 0
    seen: set[int] = set()
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    for sub in module.modules():
        weight = getattr(sub, "weight", None)
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is not None and id(quant_state.absmax) not in seen:
            seen.add(id(quant_state.absmax))
            total += quant_state.absmax.numel() * quant_state.absmax.element_size()
        for scb in (getattr(weight, "SCB", None), getattr(getattr(sub, "state", None), "SCB", None)):
            if isinstance(scb, Tensor) and id(scb) not in seen:
                seen.add(id(scb))
                total += scb.numel() * scb.element_size()
    return total


__all__ = ["BnbConv", "FP4Linear", "Int8Linear", "bitsandbytes_from_codes", "storage_bytes", "to_bitsandbytes"]
