"""Saving a trained model as one packed safetensors file, and loading it back.

The file is the compact module :func:`~selfcompress.finalize` returns: every weight in
integer form (:func:`selfcompress.quantize.integer_form`) as its codes bit-packed at the
width each row needs (:mod:`selfcompress.packing`), a float32 scale and a uint8 width per
row; every other tensor (biases, batch-norm parameters and statistics, float weights) as
it is. A JSON manifest in the safetensors metadata records the format version, each
packed tensor's shape and dtype, the type and shape attributes of every module, and a
SHA-256 of the tensors; it depends only on the compact module, so every input
``finalize`` accepts gives the same bytes. (Version 1 also recorded the shapes before
removal and the removed indices; :func:`load` reads both versions.)

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
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from selfcompress.finalize import LayerCodes, RemovalReport, compressed
from selfcompress.packing import pack_codes, unpack_codes
from selfcompress.quantize import dequantize
from selfcompress.surgery import resize_to_state_dict

FORMAT_NAME = "selfcompress"
FORMAT_VERSION = 2
METADATA_KEY = "selfcompress"
_CODES, _SCALE, _WIDTH = "::codes", "::scale", "::width"

#: Module attributes that channel removal may change, restored by :func:`load`.
_SHAPE_ATTRS = (
    "in_channels",
    "out_channels",
    "groups",
    "in_features",
    "out_features",
    "num_features",
    "num_parameters",
)

_DTYPES = {
    str(dtype).removeprefix("torch."): dtype for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
}


class SelfCompressFormatError(ValueError):
    """A packed file cannot be written or loaded faithfully.

    Raised by :func:`load` for a truncated, corrupted or foreign file, a file written by
    a newer format version, or a model whose structure does not match the file; the
    model is then left unchanged. Raised by :func:`save` when a weight cannot be stored
    exactly as integer codes.
    """


def compressed_codes(model: nn.Module, inputs: Any = None) -> tuple[nn.Module, RemovalReport, dict[str, LayerCodes]]:
    """``(compact, report, codes)`` of any model :func:`~selfcompress.finalize` accepts.

    ``codes`` maps each weight stored packed (its ``state_dict`` name in ``compact``) to its
    :class:`~selfcompress.finalize.LayerCodes`; works under any grad mode.
    """
    return compressed(model, inputs)


def save(model: nn.Module, path: str | os.PathLike, inputs: Any = None) -> dict:
    """Write a trained model as one packed safetensors file.

    The file is that of the compact module :func:`~selfcompress.finalize` returns, so every
    input it accepts (the LightningModule, its network, the finalized module, a plain model
    from a checkpoint) gives the same file. Works under any grad mode.

    Args:
        model: Any model :func:`~selfcompress.finalize` accepts; not modified.
        path: Where to write; the file is replaced atomically.
        inputs: One forward call, as for :func:`~selfcompress.finalize`.

    Returns:
        The manifest stored in the file's metadata.

    Raises:
        ValueError: As :func:`~selfcompress.finalize` (no compressed weights, no inputs).
    """
    compact, _, layers = compressed(model, inputs)
    tensors: dict[str, Tensor] = {}
    packed: dict[str, dict] = {}
    for name, value in compact.state_dict().items():
        layer = layers.get(name)
        if layer is None or layer.dtype not in _DTYPES.values():
            tensors[name] = value.detach().cpu().contiguous()
            continue
        packed[name] = {"shape": list(value.shape), "dtype": str(layer.dtype).removeprefix("torch.")}
        tensors[name + _CODES] = pack_codes(layer.codes.reshape(layer.codes.shape[0], -1), layer.widths)
        tensors[name + _SCALE] = layer.scale.contiguous()
        tensors[name + _WIDTH] = layer.widths.to(torch.uint8)
    modules = {}
    for module_name, module in compact.named_modules():
        attrs = {attr: getattr(module, attr) for attr in _SHAPE_ATTRS if isinstance(getattr(module, attr, None), int)}
        if attrs:
            modules[module_name] = [type(module).__name__, attrs]
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "sha256": _digest(tensors),
        "packed": packed,
        "modules": modules,
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
    if not isinstance(packed, dict):
        raise TypeError("`packed` must be a mapping")
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
    """Whether ``model`` can take the file's tensors: same names and types, channels only fewer."""
    current = model.state_dict()
    missing, unexpected = sorted(set(state) - set(current)), sorted(set(current) - set(state))
    if missing or unexpected:
        raise SelfCompressFormatError(
            "the model does not match the file: "
            f"tensors in the file but not the model {missing[:5]}, in the model but not the file {unexpected[:5]}."
        )
    modules = dict(model.named_modules())
    for name, value in state.items():
        have = tuple(current[name].shape)
        module = modules.get(name.rpartition(".")[0])
        channel_dims = 0
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            channel_dims = min(value.dim(), 2)
        elif isinstance(module, _BatchNorm):
            channel_dims = min(value.dim(), 1)
        shape = tuple(value.shape)
        fits = len(shape) == len(have) and all(
            (1 <= saved <= own) if dim < channel_dims else saved == own
            for dim, (saved, own) in enumerate(zip(shape, have, strict=False))
        )
        if not fits:
            raise SelfCompressFormatError(
                f"the model does not match the file: '{name}' has shape {have}, the file holds {shape} "
                "(only channel dimensions of Linear, Conv and BatchNorm layers may be smaller in the file)."
            )
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

    ``model`` is a plain (not prepared) instance, as constructed, with the original
    shapes or any larger than the file's: every tensor must have the file's name and
    number of dimensions, Linear/Conv/BatchNorm channel dimensions may be larger than in
    the file and are shrunk to it, every other dimension must be equal. Its weights are
    set to ``codes * scale`` exactly as :func:`~selfcompress.finalize` sets them, so on the
    same device its outputs equal the finalized model's bit for bit. Version 1 files load too.

    Returns:
        ``model``, loaded in place.

    Raises:
        SelfCompressFormatError: A truncated, corrupted or foreign file, a newer format
            version, or a model that does not match. ``model`` is then unchanged.
    """
    # Tensors made under inference mode cannot be updated outside it, and the reverse: load in
    # the mode the model's tensors were made in, whatever the caller's.
    made_in_inference = any(t.is_inference() for t in model.state_dict().values())
    with torch.inference_mode(made_in_inference):
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
