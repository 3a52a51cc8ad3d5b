"""Saving a trained model as one packed safetensors file, and loading it back.

The file is the compact module :func:`~selfcompress.finalize` returns. Format versions 3
to 5 hold two uint8 tensors, so the header stays small whatever the number of layers:

- ``codes``: every weight in integer form (:func:`selfcompress.quantize.integer_form`),
  layer after layer, bit-packed at the width each row needs (:mod:`selfcompress.packing`),
  or the whole stream entropy-coded (:mod:`selfcompress.entropy`, ``save(...,
  entropy_coding="lzma")``);
- ``data``: the zlib-compressed JSON manifest, then every row's float32 scale, then every
  other tensor (biases, batch-norm parameters and statistics, float weights) as it is
  (compressed as a whole too in an entropy-coded file, where that makes it smaller).

A batch norm with affine parameters and running statistics is stored in eval form
(:func:`selfcompress.batchnorm.eval_form`): its weight and bias hold the affine map it
applies in eval mode and its statistics are left out, its manifest entry marked
``"eval"``; loading sets them to the constants of eval form for the model's own ``eps``.
Such files are version 5; a loaded model computes the same in eval mode, to float
rounding (bit for bit on PyTorch's CPU kernel).

The safetensors metadata holds the format name and version, a SHA-256 of both tensors and
the manifest's length. The manifest lists each module holding tensors with its type and,
per tensor, its shape and dtype, plus one width digit per row for packed weights; the
tensors follow in that order. A row whose codes are all odd (a channel holding signs) is
stored halved, one bit narrower, and marked by its digit: such files are version 4 (5
with batch norms in eval form); all others version 3. It depends only on the compact
module, so every input ``finalize`` accepts gives the same bytes. Versions 1 and 2 (one safetensors entry per
tensor, three per packed weight) still load.

Loading never unpickles anything: safetensors, JSON and stdlib decompressors with an
output bound only. The manifest is checked against the model before any code is decoded,
and nothing decodes to more than the shapes allow. Every problem with a file (truncated,
corrupted, foreign, written by a newer version, a decompression bomb, or not matching the
model) raises :class:`SelfCompressFormatError`, and the model is left untouched.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from selfcompress.batchnorm import STATISTICS, eval_form_state, eval_form_variance
from selfcompress.entropy import CODERS, compress, decode_codes, decompress, encode_codes
from selfcompress.finalize import compressed, is_lightning_module, mark_compact, state_network
from selfcompress.layers import shared_parameters
from selfcompress.packing import pack_codes, packed_nbytes, unpack_codes
from selfcompress.quantize import dequantize, restored_codes
from selfcompress.surgery import resize_to_state_dict

FORMAT_NAME = "selfcompress"
FORMAT_VERSION = 5
METADATA_KEY = "selfcompress"
_CODES, _SCALE, _WIDTH = "::codes", "::scale", "::width"

_DTYPES = {
    str(dtype).removeprefix("torch."): dtype for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
}

#: Dtypes of the tensors stored as they are (version 3).
_STORED_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (*_DTYPES.values(), torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
}
#: One character per row width in the manifest (0 to 16); rows of odd codes, stored halved
#: (:func:`selfcompress.quantize.stored_codes`), take the second alphabet (version 4).
_WIDTH_DIGITS = "0123456789abcdefg"
_ODD_WIDTH_DIGITS = "hijklmnopqrstuvwx"
_MAX_MANIFEST = 1 << 26  # bytes a manifest may inflate to
_EVAL_FORM = "eval"  # a module entry's mark: a batch norm in eval form, its statistics left out (version 5)


class SelfCompressFormatError(ValueError):
    """A packed file cannot be written or loaded faithfully.

    Raised by :func:`load` for a truncated, corrupted or foreign file, a file written by
    a newer format version, or a model whose structure does not match the file; the
    model is then left unchanged. Raised by :func:`save` when a weight cannot be stored
    exactly as integer codes.
    """


def save(model: nn.Module, path: str | os.PathLike, inputs: Any = None, *, entropy_coding: str | None = None) -> dict:
    """Write a trained model as one packed safetensors file.

    The file is that of the compact module :func:`~selfcompress.finalize` returns, so every
    input it accepts (the LightningModule, its network, the finalized module, a plain model
    from a checkpoint) gives the same file. Works under any grad mode.

    Args:
        model: Any model :func:`~selfcompress.finalize` accepts; not modified.
        path: Where to write; the file is replaced atomically.
        inputs: One forward call, as for :func:`~selfcompress.finalize`.
        entropy_coding: ``None`` (default) stores the codes bit-packed at each channel's
            width, so the file matches the exact size and the codes can be read in place;
            ``"lzma"`` (smallest) or ``"zlib"`` codes them losslessly for the wire
            (:mod:`selfcompress.entropy`), unless that would not make them smaller (the
            manifest's ``coding`` says which). :func:`load` reads every form bit-exactly.

    Returns:
        The manifest stored in the file.

    Raises:
        ValueError: As :func:`~selfcompress.finalize` (no compressed weights, no inputs), or
            an unknown ``entropy_coding``.
    """
    if entropy_coding is not None and entropy_coding not in CODERS:
        raise ValueError(f"`entropy_coding` must be None or one of {CODERS}, got {entropy_coding!r}.")
    compact, _, layers = compressed(model, inputs)
    groups: dict[str, list] = {}
    codes, widths, scales, rest = [], [], [], []
    odd_rows_seen = False
    # One order whatever form ``model`` came in: modules as they nest, each one's tensors by name.
    order = {module_name: i for i, (module_name, _) in enumerate(compact.named_modules(remove_duplicate=False))}
    state, constants = eval_form_state(compact)
    tied_seen: set[int] = set()
    tied = {name: key for key, names in shared_parameters(compact).items() for name in names}
    for name in sorted(state, key=lambda n: (order.get(n.rpartition(".")[0], len(order)), n.rpartition(".")[2])):
        if name in tied:  # a tied parameter is stored once, under its first name; `load` ties it again
            if tied[name] in tied_seen:
                continue
            tied_seen.add(tied[name])
        value = state[name]
        module_name, _, attr = name.rpartition(".")
        if module_name not in groups:
            groups[module_name] = [module_name, type(compact.get_submodule(module_name)).__name__, {}]
        entries = groups[module_name][2]
        layer = layers.get(name)
        if name in constants:
            if len(groups[module_name]) == 3:
                groups[module_name].append(_EVAL_FORM)
            continue
        if layer is None or layer.dtype not in _DTYPES.values():
            value = value.detach().cpu().contiguous()
            if _dtype_name(value.dtype) not in _STORED_DTYPES:
                raise SelfCompressFormatError(f"cannot store '{name}': dtype {value.dtype} is not supported.")
            entries[attr] = [list(value.shape), _dtype_name(value.dtype)]
            rest.append(value.reshape(-1).view(torch.uint8))
            continue
        widths.append(layer.widths.to(torch.int64).cpu())
        stored, odd = layer.stored
        odd_rows_seen |= bool(odd.any())
        digits = "".join(
            (_ODD_WIDTH_DIGITS if o else _WIDTH_DIGITS)[w]
            for o, w in zip(odd.tolist(), widths[-1].tolist(), strict=True)
        )
        entries[attr] = [list(value.shape), _dtype_name(layer.dtype), digits]
        codes.append(stored)
        scales.append(layer.scale.detach().cpu().to(torch.float32).reshape(-1).view(torch.uint8))
    stream, coding = _cat_bytes([pack_codes(c, w) for c, w in zip(codes, widths, strict=True)]), "none"
    if entropy_coding is not None:
        coded = encode_codes(codes, widths, entropy_coding)
        if len(coded) < stream.numel():  # codes close to uniform do not shrink: they stay packed
            stream, coding = _as_tensor(coded), entropy_coding
    tail, tail_coding = _cat_bytes([*scales, *rest]), "none"
    if entropy_coding is not None:  # scales are powers of two, closed channels' constants zero: worth coding too
        coded_tail = compress(tail.numpy().tobytes(), entropy_coding)
        if len(coded_tail) < tail.numel():
            tail, tail_coding = _as_tensor(coded_tail), entropy_coding
    body = {"coding": coding, "tail": tail_coding, "modules": list(groups.values())}
    compressed_body = zlib.compress(_json(body), 9)
    tensors = {"codes": stream, "data": _cat_bytes([_as_tensor(compressed_body), tail])}
    version = 5 if constants else 4 if odd_rows_seen else 3  # what older readers can read stays as it was
    head = {
        "format": FORMAT_NAME,
        "version": version,
        "sha256": _digest(tensors),
        "manifest_bytes": len(compressed_body),
    }
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"`path` {str(path)!r}: the directory {str(path.parent)!r} does not exist.")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata={METADATA_KEY: _json(head).decode()})
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {**head, **body}


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def _cat_bytes(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


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
    if version >= 3:
        try:
            size = manifest["manifest_bytes"]
            data = stored["data"]
            if not isinstance(size, int) or not 0 < size <= data.numel() or data.dtype != torch.uint8:
                raise ValueError(f"manifest_bytes {size!r} does not fit the {data.numel()} bytes of data")
            body = json.loads(_inflate(data[:size]))
            if not isinstance(body, dict) or set(body) != {"coding", "tail", "modules"}:
                raise ValueError("the manifest must hold exactly coding, tail and modules")
        except (KeyError, ValueError, zlib.error, RuntimeError) as error:
            raise SelfCompressFormatError(f"'{path}' has a corrupted selfcompress manifest: {error!r}") from error
        manifest = {**manifest, **body}
    return manifest, stored


def _inflate(data: Tensor) -> bytes:
    """The zlib-compressed manifest, at most ``_MAX_MANIFEST`` bytes."""
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"the manifest must be a 1-D uint8 tensor, got {data.dtype} of shape {tuple(data.shape)}")
    decoder = zlib.decompressobj()
    text = decoder.decompress(data.numpy().tobytes(), _MAX_MANIFEST + 1)
    if len(text) > _MAX_MANIFEST or not decoder.eof or decoder.unused_data:
        raise ValueError(f"the manifest is not one zlib stream of at most {_MAX_MANIFEST} bytes")
    return text


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise ValueError(f"a shape must be a list of integers >= 0, got {value!r}")
    return tuple(value)


def _file_shapes(manifest: dict, stored: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape as the file declares it, before anything is decoded."""
    if manifest["version"] < 3:
        packed = manifest["packed"]
        if not isinstance(packed, dict):
            raise TypeError("`packed` must be a mapping")
        shapes = {name: _shape(entry["shape"]) for name, entry in packed.items()}
        shapes.update({name: tuple(value.shape) for name, value in stored.items() if "::" not in name})
        return shapes
    return {entry[0]: entry[2] for entry in _entries(manifest)}


def _entries(manifest: dict) -> list[tuple[str, str, tuple[int, ...], str, str | None, str | None]]:
    """``(name, module type, shape, dtype, width digits, statistic)`` of every tensor of a version 3+ file, in order.

    A packed weight has width digits; a statistic a batch norm in eval form left out (version 5)
    is named by its attribute; every other tensor has neither.
    """
    modules = manifest["modules"]
    if not isinstance(modules, list):
        raise TypeError("`modules` must be a list")
    found = []
    lengths = (3, 4) if manifest["version"] >= 5 else (3,)
    for group in modules:
        if not (
            isinstance(group, list)
            and len(group) in lengths
            and isinstance(group[0], str)
            and isinstance(group[1], str)
            and group[3:] in ([], [_EVAL_FORM])
        ):
            raise TypeError(f"a module entry must be [name, type, tensors] (or with 'eval'), got {str(group)[:80]}")
        module_name, type_name, tensors = group[:3]
        if not isinstance(tensors, dict):
            raise TypeError(f"the tensors of module '{module_name}' must be a mapping")
        for attr, spec in tensors.items():
            name = f"{module_name}.{attr}" if module_name else attr
            if not (isinstance(spec, list) and len(spec) in (2, 3) and isinstance(spec[1], str)):
                raise TypeError(f"'{name}' must be [shape, dtype] or [shape, dtype, widths], got {str(spec)[:80]}")
            if spec[1] not in (_DTYPES if len(spec) == 3 else _STORED_DTYPES):
                raise ValueError(f"'{name}' has dtype {spec[1]!r}, not one a file may hold")
            found.append((name, type_name, _shape(spec[0]), spec[1], spec[2] if len(spec) == 3 else None, None))
        if group[3:]:
            prefix = f"{module_name}." if module_name else ""
            weight = tensors.get("weight")
            if set(tensors) & set(STATISTICS) or not (isinstance(weight, list) and len(weight) == 2):
                raise ValueError(f"'{module_name}' is marked 'eval' but has no float weight, or keeps its statistics")
            shape = _shape(weight[0])
            found += [(prefix + stat, type_name, shape, "float32", None, stat) for stat in STATISTICS]
    names = [entry[0] for entry in found]
    if len(set(names)) != len(names):
        raise ValueError("tensor names must be distinct")
    return found


def _file_state(manifest: dict, stored: dict[str, Tensor], eps: dict[str, float]) -> dict[str, Tensor]:
    """The finalized model's state dict rebuilt from a validated file (``eps``: of the model's batch norms)."""
    if manifest["version"] >= 3:
        return _file_state_v3(manifest, stored, eps)
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


def _stored(stored: dict[str, Tensor], name: str) -> Tensor:
    value = stored[name]
    if value.dtype != torch.uint8 or value.dim() != 1:
        raise ValueError(f"'{name}' is {value.dtype} of shape {tuple(value.shape)}, expected a 1-D uint8 tensor")
    return value


def _widths(digits: Any, rows: int, version: int) -> tuple[Tensor, Tensor]:
    """A layer's row widths and odd rows from their digits in the manifest.

    ``0``-``9``, ``a``-``g`` for widths 0-16; from version 4, ``h``-``x`` for odd rows of widths 0-16.
    """
    alphabet = _WIDTH_DIGITS + (_ODD_WIDTH_DIGITS if version >= 4 else "")
    if not isinstance(digits, str) or len(digits) != rows or not set(digits) <= set(alphabet):
        raise ValueError(f"widths must be {rows} characters of {alphabet!r}, got {str(digits)[:40]!r}")
    index = torch.tensor([alphabet.index(d) for d in digits], dtype=torch.int64)
    odd = index >= len(_WIDTH_DIGITS)
    return torch.where(odd, index - len(_WIDTH_DIGITS), index), odd


def _file_state_v3(manifest: dict, stored: dict[str, Tensor], eps: dict[str, float]) -> dict[str, Tensor]:
    if set(stored) != {"codes", "data"}:
        raise ValueError(f"the file holds tensors {sorted(stored)}, expected codes and data")
    coding, tail_coding = manifest["coding"], manifest["tail"]
    if any(c != "none" and c not in CODERS for c in (coding, tail_coding)):
        raise ValueError(f"unknown coding {coding!r} or {tail_coding!r}")
    entries = _entries(manifest)
    packed = [(name, shape, dtype, digits) for name, _, shape, dtype, digits, _ in entries if digits is not None]
    if any(len(shape) < 2 for _, shape, _, _ in packed):
        raise ValueError("packed weights must have at least 2 dimensions")
    rows = [shape[0] for _, shape, _, _ in packed]
    cols = [math.prod(shape[1:]) for _, shape, _, _ in packed]
    forms = [_widths(digits, count, manifest["version"]) for (_, _, _, digits), count in zip(packed, rows, strict=True)]
    widths, odd = [w for w, _ in forms], [o for _, o in forms]
    stream, data = _stored(stored, "codes"), _stored(stored, "data")
    other = [(name, shape, dtype) for name, _, shape, dtype, digits, stat in entries if digits is None and stat is None]
    sizes = [math.prod(shape) * _STORED_DTYPES[dtype].itemsize for _, shape, dtype in other]
    need = 4 * sum(rows) + sum(sizes)  # bytes of the scales and the other tensors
    data = data[manifest["manifest_bytes"] :]
    if tail_coding != "none":
        data = _as_tensor(decompress(data.numpy().tobytes(), tail_coding, need))
    if need != data.numel():
        raise ValueError(
            f"the data holds {data.numel()} bytes after the manifest; the scales and other tensors need {need}"
        )
    scales = data[: 4 * sum(rows)].clone().view(torch.float32)
    at = 4 * sum(rows)
    if coding == "none":
        nbytes = [packed_nbytes(w, c) for w, c in zip(widths, cols, strict=True)]
        if sum(nbytes) != stream.numel():
            raise ValueError(f"the codes hold {stream.numel()} bytes; the shapes and widths need {sum(nbytes)}")
        ends = list(itertools.accumulate(nbytes))
        codes = [unpack_codes(stream[e - n : e], w, c) for e, n, w, c in zip(ends, nbytes, widths, cols, strict=True)]
    else:
        codes = decode_codes(stream.numpy().tobytes(), widths, cols, coding)
    state = {}
    for name, _, shape, _, _, stat in entries:
        if stat is not None:
            module_name = name.rpartition(".")[0]
            variance = eval_form_variance(eps[module_name]) if module_name in eps else None
            if variance is None:
                raise ValueError(
                    f"'{module_name}' is marked 'eval' but the model's module there is no batch norm "
                    "whose eps allows the eval form"
                )
            state[name] = torch.full(shape, 0.0 if stat == "running_mean" else variance)
    ends = list(itertools.accumulate(rows))
    for (name, shape, dtype, _), stored_form, odd_form, end, count in zip(packed, codes, odd, ends, rows, strict=True):
        layer_codes = restored_codes(stored_form, odd_form)
        state[name] = dequantize(layer_codes.reshape(shape), scales[end - count : end], _DTYPES[dtype])
    for (name, shape, dtype), size in zip(other, sizes, strict=True):
        raw = data[at : at + size]
        if dtype == "bool" and raw.numel() and int(raw.max()) > 1:
            raise ValueError(f"'{name}' holds bytes other than 0 and 1")
        state[name] = raw.clone().view(_STORED_DTYPES[dtype]).reshape(shape)
        at += size
    return {name: state[name] for name, *_ in entries}


def _check_model(model: nn.Module, manifest: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Whether ``model`` can take the file's tensors: same names and types, channels only fewer."""
    current = model.state_dict()
    missing, unexpected = sorted(set(shapes) - set(current)), sorted(set(current) - set(shapes))
    if missing or unexpected:
        raise SelfCompressFormatError(
            "the model does not match the file: "
            f"tensors in the file but not the model {missing[:5]}, in the model but not the file {unexpected[:5]}."
        )
    modules = dict(model.named_modules())
    for name, shape in shapes.items():
        have = tuple(current[name].shape)
        module = modules.get(name.rpartition(".")[0])
        channel_dims = 0
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            channel_dims = min(len(shape), 2)
        elif isinstance(module, _BatchNorm):
            channel_dims = min(len(shape), 1)
        fits = len(shape) == len(have) and all(
            (1 <= saved <= own) if dim < channel_dims else saved == own
            for dim, (saved, own) in enumerate(zip(shape, have, strict=False))
        )
        if not fits:
            raise SelfCompressFormatError(
                f"the model does not match the file: '{name}' has shape {have}, the file holds {shape} "
                "(only channel dimensions of Linear, Conv and BatchNorm layers may be smaller in the file)."
            )
    if manifest["version"] >= 3:
        types = {name.rpartition(".")[0]: type_name for name, type_name, *_ in _entries(manifest)}
    else:
        types = {module_name: entry[0] for module_name, entry in manifest["modules"].items()}
    for module_name, type_name in types.items():
        module = modules.get(module_name)
        if module is None or type(module).__name__ != type_name:
            found = type(module).__name__ if module is not None else "nothing"
            raise SelfCompressFormatError(
                f"the model does not match the file: '{module_name}' is {found}, the file has {type_name}."
            )


def _load_target(model: nn.Module, file_shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """The module a file goes into: ``model``, or the network of a LightningModule whose own
    tensor names are not the file's (``save`` wrote that network)."""
    if is_lightning_module(model) and not set(file_shapes) <= set(model.state_dict()):
        return state_network(model)
    return model


def _with_tied(model: nn.Module, found: dict[str, Any]) -> dict[str, Any]:
    """``found`` (by state-dict name) with each tied name of ``model`` it lacks, taken from the one it holds."""
    found = dict(found)
    for names in shared_parameters(model).values():
        held = next((name for name in names if name in found), None)
        if held is not None:
            found.update({name: found[held] for name in names if name not in found})
    return found


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
    same device its outputs equal the finalized model's bit for bit. Entropy-coded files and
    files of versions 1 and 2 load too. ``model`` may also be a fresh LightningModule
    holding the network: the file written from a trained one holds its network (see
    :func:`save`), which is then loaded into the fresh one's network.

    Returns:
        ``model``, loaded in place.

    Raises:
        SelfCompressFormatError: A truncated, corrupted or foreign file, a newer format
            version, a code stream that expands past the manifest's shapes, or a model that
            does not match. ``model`` is then unchanged.
    """
    # Tensors made under inference mode cannot be updated outside it, and the reverse: load in
    # the mode the model's tensors were made in, whatever the caller's.
    made_in_inference = any(t.is_inference() for t in model.state_dict().values())
    with torch.inference_mode(made_in_inference):
        manifest, stored = read_manifest(path)
        try:
            modules = manifest["modules"]
            if manifest["version"] < 3 and (
                not isinstance(modules, dict)
                or not all(isinstance(v, list) and len(v) == 2 and isinstance(v[1], dict) for v in modules.values())
            ):
                raise TypeError("`modules` must map names to [type, attributes]")
            file_shapes = _file_shapes(manifest, stored)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
            raise SelfCompressFormatError(f"'{path}' is corrupted: {error!r}") from error
        target = _load_target(model, file_shapes)
        shapes = _with_tied(target, file_shapes)
        _check_model(target, manifest, shapes)  # before decoding: the model bounds what the file may expand to
        try:
            eps = {name: m.eps for name, m in target.named_modules() if isinstance(m, _BatchNorm)}
            state = _with_tied(target, _file_state(manifest, stored, eps))
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
            if isinstance(error, SelfCompressFormatError):
                raise
            raise SelfCompressFormatError(f"'{path}' is corrupted: {error!r}") from error
        try:
            _apply(copy.deepcopy(target), state)  # dry run: the real model stays untouched on failure
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
            raise SelfCompressFormatError(f"the model does not match '{path}': {error}") from error
        _apply(target, state)
        mark_compact(target)
        return model
