"""Saving a trained model as one packed safetensors file, and loading it back.

The file holds, for every compressed weight, only the channels :func:`~selfcompress.finalize`
keeps: their integer codes bit-packed at the width each channel needs
(:mod:`selfcompress.packing`), a float32 scale ``2^e`` and a uint8 width per channel.
Every other tensor of the finalized model (biases, batch-norm parameters and statistics,
uncompressed layers) is stored as it is. A JSON manifest in the safetensors metadata
records the format version, the shape of every tensor after channel removal, the shape
it had before, the removed channel indices and the module attributes that removal
changed. The layout matches :func:`selfcompress.exact_size` (codes, 32-bit scale, 8-bit
width and 32-bit bias per kept channel; everything else at its own precision).

Loading never unpickles anything: safetensors and JSON only. Every problem with a file
(truncated, corrupted, foreign, written by a newer version, or not matching the model)
raises :class:`SelfCompressFormatError`, and the model is left untouched.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from selfcompress.finalize import RemovalReport, finalize
from selfcompress.graph import ExampleInputs, build_graph, example_inputs
from selfcompress.layers import quantized_tensors
from selfcompress.packing import pack_codes, unpack_codes
from selfcompress.quantize import MAX_CODE_BITS, code_bits
from selfcompress.surgery import resize_to_state_dict

FORMAT_NAME = "selfcompress"
FORMAT_VERSION = 1
METADATA_KEY = "selfcompress"
_CODES, _SCALE, _WIDTH = "::codes", "::scale", "::width"

#: Module attributes that channel removal may change, restored by :func:`load`.
_SHAPE_ATTRS = (
    "in_channels", "out_channels", "groups", "in_features", "out_features", "num_features", "num_parameters"
)

_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
}


class SelfCompressFormatError(ValueError):
    """A packed file cannot be written or loaded faithfully.

    Raised by :func:`load` for a truncated, corrupted or foreign file, a file written by
    a newer format version, or a model whose structure does not match the file; the
    model is then left unchanged. Raised by :func:`save` when a weight cannot be stored
    exactly as integer codes.
    """


@dataclass(frozen=True)
class LayerCodes:
    """The integer form of one compressed weight of a finalized model.

    ``weight == (codes.float() * scale.view(-1, 1, ...)).to(dtype)`` bit for bit.
    """

    name: str
    codes: Tensor  # int32, the weight's shape after channel removal
    scale: Tensor  # float32 (rows,): 2 ** exponent of each kept row
    widths: Tensor  # int64 (rows,): bits each kept row needs
    dtype: torch.dtype

    def weight(self) -> Tensor:
        return dequantize(self.codes, self.scale, self.dtype)


def dequantize(codes: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``codes * scale`` per row, in float32 and then ``dtype`` (the op finalize bakes)."""
    shape = (-1,) + (1,) * (codes.dim() - 1)
    return (codes.float() * scale.float().reshape(shape)).to(dtype)


def compressed_codes(
    model: nn.Module, inputs: ExampleInputs | None = None
) -> tuple[nn.Module, RemovalReport, dict[str, LayerCodes]]:
    """Finalize a prepared ``model`` and recover the integer codes of its compressed weights.

    Returns:
        ``(compact, report, codes)``: the module and report of :func:`finalize`, and per
        compressed weight name (as in ``compact.state_dict()``) its :class:`LayerCodes`.

    Raises:
        ValueError: As :func:`finalize`.
        SelfCompressFormatError: A kept weight is not exactly ``2^e * code`` with codes
            of at most 16 bits.
    """
    tensors = quantized_tensors(model)
    if not tensors:
        raise ValueError("`model` has no quantized weights: call `selfcompress.prepare` or train with `SelfCompress`.")
    inputs = inputs if inputs is not None else example_inputs(model)
    compact, report = finalize(model, inputs, return_report=True)
    compact_state = compact.state_dict()
    removed = _removed_rows(model, inputs, report) if report.removed else {}
    layers = {}
    for tensor in tensors:
        weight = compact_state.get(tensor.name)
        if weight is None:
            raise SelfCompressFormatError(f"the finalized model has no tensor '{tensor.name}'.")
        rows = torch.ones(tensor.raw.shape[0], dtype=torch.bool)
        if tensor.name in removed:
            rows[removed[tensor.name]] = False
        if int(rows.sum()) != weight.shape[0]:
            raise SelfCompressFormatError(
                f"'{tensor.name}': {int(rows.sum())} rows expected after removal, "
                f"the finalized model has {weight.shape[0]}."
            )
        # exp2 of the whole exponent tensor, as the quantizer computes it: a vectorised
        # exp2 may differ by an ulp between SIMD lanes and the tail of a shorter tensor.
        scale = torch.exp2(tensor.quantizer.exponent.detach()).float().reshape(-1).cpu()[rows]
        weight = weight.detach().cpu()
        shape = (-1,) + (1,) * (weight.dim() - 1)
        codes = torch.round(weight.float() / scale.reshape(shape)).to(torch.int32)
        if not torch.equal(dequantize(codes, scale, weight.dtype), weight):
            raise SelfCompressFormatError(
                f"'{tensor.name}' is not exactly 2^exponent x integer codes after finalize; cannot pack it."
            )
        widths = code_bits(codes)
        if len(widths) and int(widths.max()) > MAX_CODE_BITS:
            raise SelfCompressFormatError(f"'{tensor.name}' has codes wider than {MAX_CODE_BITS} bits; cannot pack it.")
        layers[tensor.name] = LayerCodes(tensor.name, codes, scale, widths, weight.dtype)
    return compact, report, layers


def _removed_rows(model: nn.Module, inputs: ExampleInputs, report: RemovalReport) -> dict[str, Tensor]:
    """Per compressed weight, the row indices finalize removed (original numbering)."""
    graph = build_graph(model, inputs)
    gone = torch.zeros(graph.num_channels, dtype=torch.bool)
    for root, offset, size in graph.roots:
        idxs = report.removed.get(root)
        if idxs:
            if max(idxs) >= size:
                raise SelfCompressFormatError(f"removed channels of '{root}' do not match its channel group.")
            gone[torch.as_tensor(idxs, dtype=torch.int64) + offset] = True
    return {
        name: producer.rows[gone[producer.channels]]
        for name, producer in graph.producers.items()
        if gone[producer.channels].any()
    }


def save(model: nn.Module, path: str | os.PathLike, inputs: ExampleInputs | None = None) -> dict:
    """Write a trained, prepared ``model`` as one packed safetensors file.

    Args:
        model: A model prepared by :func:`selfcompress.prepare` (trained); not modified.
        path: Where to write; the file is replaced atomically.
        inputs: ``(args, kwargs)`` of one forward call, as for :func:`finalize`.

    Returns:
        The manifest stored in the file's metadata.

    Raises:
        ValueError: As :func:`finalize` (no quantized weights, no example inputs).
        SelfCompressFormatError: A weight cannot be stored exactly.
    """
    compact, report, layers = compressed_codes(model, inputs)
    original = _original_shapes(model)
    tensors: dict[str, Tensor] = {}
    packed: dict[str, dict] = {}
    original_shapes: dict[str, list[int]] = {}
    for name, value in compact.state_dict().items():
        if tuple(original.get(name, value.shape)) != tuple(value.shape):
            original_shapes[name] = list(original[name])
        layer = layers.get(name)
        if layer is None:
            tensors[name] = value.detach().cpu().contiguous()
            continue
        if layer.dtype not in _DTYPES.values():
            raise SelfCompressFormatError(f"'{name}' has unsupported dtype {layer.dtype}.")
        packed[name] = {"shape": list(value.shape), "dtype": str(layer.dtype).removeprefix("torch.")}
        tensors[name + _CODES] = pack_codes(layer.codes.reshape(layer.codes.shape[0], -1), layer.widths)
        tensors[name + _SCALE] = layer.scale.contiguous()
        tensors[name + _WIDTH] = layer.widths.to(torch.uint8)
    before = dict(model.named_modules())
    modules = {}
    for module_name, module in compact.named_modules():
        old = before.get(module_name)
        attrs = {
            attr: getattr(module, attr)
            for attr in _SHAPE_ATTRS
            if isinstance(getattr(module, attr, None), int) and getattr(old, attr, None) != getattr(module, attr)
        }
        if attrs:
            modules[module_name] = [type(module).__name__, attrs]
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "sha256": _digest(tensors),
        "packed": packed,
        "original_shapes": original_shapes,
        "modules": modules,
        "removed": {root: list(map(int, idxs)) for root, idxs in report.removed.items()},
    }
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(manifest, separators=(",", ":"))})
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return manifest


def _digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over every stored tensor's name and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _original_shapes(model: nn.Module) -> dict[str, torch.Size]:
    shapes = {name: value.shape for name, value in model.state_dict().items()}
    for tensor in quantized_tensors(model):
        shapes[tensor.name] = tensor.raw.shape
    return shapes


def read_manifest(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """The manifest and raw stored tensors of a packed file, fully validated.

    Raises:
        SelfCompressFormatError: The file is unreadable, not ours, or of a newer version.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise SelfCompressFormatError(f"cannot read '{path}': {error}") from error
    if len(data) < 8:
        raise SelfCompressFormatError(f"'{path}' is truncated: {len(data)} bytes, not a safetensors file.")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise SelfCompressFormatError(f"'{path}' is truncated or not a safetensors file (header past end of file).")
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
        metadata = header.get("__metadata__") or {}
        text = metadata.get(METADATA_KEY)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise SelfCompressFormatError(f"'{path}' is corrupted or not a safetensors file: {error}") from error
    if not isinstance(text, str):
        raise SelfCompressFormatError(f"'{path}' is a safetensors file but not one written by selfcompress.save.")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise SelfCompressFormatError(f"'{path}' has a corrupted selfcompress manifest: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise SelfCompressFormatError(f"'{path}' is not a selfcompress file (no format marker).")
    version = manifest.get("version")
    if not isinstance(version, int) or version < 1:
        raise SelfCompressFormatError(f"'{path}' has an invalid format version {version!r}.")
    if version > FORMAT_VERSION:
        raise SelfCompressFormatError(
            f"'{path}' uses format version {version}; this selfcompress reads up to {FORMAT_VERSION}. "
            "Upgrade selfcompress."
        )
    try:
        stored = safetensors.torch.load(data)
    except Exception as error:  # safetensors raises its own error types for bad files
        raise SelfCompressFormatError(f"'{path}' is corrupted: {error}") from error
    if manifest.get("sha256") != _digest(stored):
        raise SelfCompressFormatError(f"'{path}' is corrupted: its tensors do not match the stored checksum.")
    return manifest, stored


def _file_state(manifest: dict, stored: dict[str, Tensor]) -> dict[str, Tensor]:
    """The finalized model's state dict rebuilt from a validated file."""
    packed = manifest["packed"]
    if not isinstance(packed, dict) or not isinstance(manifest["original_shapes"], dict):
        raise TypeError("`packed` and `original_shapes` must be mappings")
    state, used = {}, set()
    for name, entry in packed.items():
        shape = tuple(int(d) for d in entry["shape"])
        keys = (name + _CODES, name + _SCALE, name + _WIDTH)
        codes_bytes, scale, widths = (stored[key] for key in keys)
        used.update(keys)
        rows = shape[0]
        if scale.dtype != torch.float32 or tuple(scale.shape) != (rows,):
            raise ValueError(f"scale of '{name}' has shape {tuple(scale.shape)}, expected ({rows},)")
        if widths.dtype != torch.uint8 or tuple(widths.shape) != (rows,):
            raise ValueError(f"widths of '{name}' have shape {tuple(widths.shape)}, expected ({rows},)")
        codes = unpack_codes(codes_bytes, widths.to(torch.int64), math.prod(shape[1:])).reshape(shape)
        state[name] = dequantize(codes, scale, _DTYPES[entry["dtype"]])
    for name, value in stored.items():
        if name not in used:
            if "::" in name:
                raise ValueError(f"unexpected packed tensor '{name}'")
            state[name] = value
    return state


def _check_model(model: nn.Module, manifest: dict, state: dict[str, Tensor]) -> None:
    current = model.state_dict()
    missing, unexpected = sorted(set(state) - set(current)), sorted(set(current) - set(state))
    if missing or unexpected:
        raise SelfCompressFormatError(
            "the model does not match the file: "
            f"tensors in the file but not the model {missing[:5]}, in the model but not the file {unexpected[:5]}."
        )
    originals = manifest["original_shapes"]
    for name, value in state.items():
        expected = tuple(int(d) for d in originals.get(name, value.shape))
        if tuple(current[name].shape) != expected:
            raise SelfCompressFormatError(
                f"the model does not match the file: '{name}' has shape {tuple(current[name].shape)}, "
                f"the file was saved from shape {expected}."
            )
    modules = dict(model.named_modules())
    for module_name, (type_name, _) in manifest["modules"].items():
        module = modules.get(module_name)
        if module is None or type(module).__name__ != type_name:
            found = type(module).__name__ if module is not None else "nothing"
            raise SelfCompressFormatError(
                f"the model does not match the file: '{module_name}' is {found}, the file has {type_name}."
            )


def _apply(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Resize ``model`` to the saved shapes (attributes follow the shapes), then load strictly."""
    resize_to_state_dict(model, state)
    model.load_state_dict(state, strict=True)


def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a file written by :func:`save` into a fresh instance of the model's class.

    ``model`` is a plain (not prepared) instance, as constructed; its layers are shrunk to
    the saved shapes, and its weights set to ``codes * 2^e`` exactly as :func:`finalize`
    bakes them, so on the same device its outputs equal the finalized model's bit for bit.

    Returns:
        ``model``, loaded in place.

    Raises:
        SelfCompressFormatError: A truncated, corrupted or foreign file, a newer format
            version, or a model that does not match. ``model`` is then unchanged.
    """
    manifest, stored = read_manifest(path)
    try:
        state = _file_state(manifest, stored)
        modules = manifest["modules"]
        if not isinstance(modules, dict) or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[1], dict) for v in modules.values()
        ):
            raise TypeError("`modules` must map names to [type, attributes]")
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        if isinstance(error, SelfCompressFormatError):
            raise
        raise SelfCompressFormatError(f"'{path}' is corrupted: {error!r}") from error
    _check_model(model, manifest, state)
    try:
        _apply(copy.deepcopy(model), state)  # dry run: the real model stays untouched on failure
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        raise SelfCompressFormatError(f"the model does not match '{path}': {error}") from error
    _apply(model, state)
    return model
