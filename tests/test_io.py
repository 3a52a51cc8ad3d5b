"""Packed save/load: bit-exact outputs, size against exact_size, and every bad file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from selfcompress.finalize import finalize
from selfcompress.graph import build_graph
from selfcompress.io import SelfCompressFormatError, compressed_codes, load, read_manifest, save
from selfcompress.layers import prepare
from selfcompress.size import exact_size

ROOT = Path(__file__).resolve().parents[1]


def make_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12 * 4 * 4, 10),
    )


def trained_net(seed: int = 0):
    """A prepared net that looks trained: closed, low-bit and 12-bit channels."""
    torch.manual_seed(seed)
    model = make_net()
    x = torch.randn(4, 3, 4, 4)
    model.train()
    model(x)  # non-trivial batch-norm statistics
    model.eval()
    tensors = prepare(model)
    conv0, dw, conv6, head = tensors
    with torch.no_grad():
        for t in (conv0, dw):  # close channels 1 and 4 of the first group
            t.quantizer.bits[[1, 4]] = -1
            t.module.bias[[1, 4]] = 0
        for bn in (model[1], model[4]):
            bn.bias[[1, 4]] = 0
            bn.running_mean[[1, 4]] = 0
        conv0.quantizer.bits[0] = 2
        conv0.quantizer.bits[2] = 12
        conv0.quantizer.exponent[2] -= 4  # channel 2 now needs 12-bit codes
        conv6.quantizer.bits[[0, 5]] = -1
        conv6.module.bias[[0, 5]] = 0
        conv6.quantizer.bits[1] = 5
        head.quantizer.bits[:] = 3
    return model, ((x,), {})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, inputs = trained_net()
    path = tmp_path_factory.mktemp("io") / "net.safetensors"
    manifest = save(model, path, inputs)
    compact, report = finalize(model, inputs, return_report=True)
    return model, inputs, path, manifest, compact.eval(), report


def _snapshot(model):
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, snapshot):
    text, state = snapshot
    assert repr(model) == text
    current = model.state_dict()
    assert current.keys() == state.keys()
    assert all(torch.equal(current[k], state[k]) for k in state)


def test_load_reproduces_finalize_bit_for_bit(saved):
    model, inputs, path, _, compact, report = saved
    assert report.removed  # channels really were removed
    loaded = load(path, make_net()).eval()
    assert repr(loaded) == repr(compact)
    x = inputs[0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), compact(x))
        other = torch.randn(7, 3, 4, 4)
        assert torch.equal(loaded(other), compact(other))
    for key, value in compact.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_manifest_records_the_compact_module(saved):
    _, _, path, manifest, compact, report = saved
    stored, _ = read_manifest(path)
    assert stored == manifest
    assert stored["version"] == 2
    assert "removed" not in stored and "original_shapes" not in stored  # a function of the compact module only
    state = compact.state_dict()
    for key, entry in stored["packed"].items():
        assert entry["shape"] == list(state[key].shape)
    assert set(stored["packed"]) == {"0.weight", "3.weight", "6.weight", "9.weight"}
    assert stored["packed"]["0.weight"]["shape"] == [6, 3, 3, 3]
    assert stored["modules"]["3"] == ["Conv2d", {"in_channels": 6, "out_channels": 6, "groups": 6}]
    assert stored["modules"]["1"] == ["BatchNorm2d", {"num_features": 6}]
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "0.weight" not in keys and "0.weight::codes" in keys
    assert "1.running_mean" in keys


def test_codes_are_exact_and_widths_minimal(saved):
    model, inputs, *_ = saved
    compact, _, layers = compressed_codes(model, inputs)
    state = compact.state_dict()
    assert int(layers["0.weight"].widths.max()) == 12
    assert int(layers["9.weight"].widths.max()) <= 3
    for name, layer in layers.items():
        assert torch.equal(layer.weight(), state[name])


def test_file_size_matches_exact_size(saved):
    model, inputs, path, *_ = saved
    exact = exact_size(model, build_graph(model, inputs)).total_bytes
    size = os.path.getsize(path)
    assert size <= exact * 1.02 + 4096
    assert size >= exact  # the data section alone is the exact figure
    fp32 = sum(p.numel() for p in make_net().parameters()) * 4
    assert size - 4096 < fp32


def test_save_leaves_model_unchanged(tmp_path):
    model, inputs = trained_net(seed=1)
    before = _snapshot(model)
    save(model, tmp_path / "a.sc", inputs)
    _assert_untouched(model, before)
    # deterministic: the same model saves the same bytes
    save(model, tmp_path / "b.sc", inputs)
    assert (tmp_path / "a.sc").read_bytes() == (tmp_path / "b.sc").read_bytes()


def _expect_format_error(path, model=None, match=None):
    model = model if model is not None else make_net()
    before = _snapshot(model)
    with pytest.raises(SelfCompressFormatError, match=match):
        load(path, model)
    _assert_untouched(model, before)


def test_truncated_file(saved, tmp_path):
    data = saved[2].read_bytes()
    for cut in (0, 5, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.sc"
        bad.write_bytes(data[:cut])
        _expect_format_error(bad)


def test_random_bytes(tmp_path):
    generator = torch.Generator().manual_seed(0)
    bad = tmp_path / "random.sc"
    bad.write_bytes(bytes(torch.randint(0, 256, (5000,), generator=generator, dtype=torch.uint8).tolist()))
    _expect_format_error(bad)
    bad.write_bytes((10).to_bytes(8, "little") + b"not json!!" + b"\0" * 20)
    _expect_format_error(bad, match="corrupted")


def test_flipped_data_byte(saved, tmp_path):
    data = bytearray(saved[2].read_bytes())
    data[-3] ^= 0xFF
    bad = tmp_path / "flipped.sc"
    bad.write_bytes(bytes(data))
    _expect_format_error(bad, match="checksum")


def test_foreign_safetensors_file(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file(make_net().state_dict(), foreign)
    _expect_format_error(foreign, match="not one written by selfcompress")
    safetensors.torch.save_file(make_net().state_dict(), foreign, metadata={"selfcompress": json.dumps({"x": 1})})
    _expect_format_error(foreign, match="not a selfcompress file")


def _rewrite_manifest(path, out, edit):
    tensors = safetensors.torch.load_file(str(path))
    with safe_open(str(path), "pt") as f:
        manifest = json.loads(f.metadata()["selfcompress"])
    edit(manifest)
    safetensors.torch.save_file(tensors, out, metadata={"selfcompress": json.dumps(manifest)})


def test_newer_version(saved, tmp_path):
    newer = tmp_path / "newer.sc"
    _rewrite_manifest(saved[2], newer, lambda m: m.update(version=m["version"] + 1))
    _expect_format_error(newer, match="version 3")


def test_version_1_files_still_load(saved, tmp_path):
    _, inputs, path, _, compact, _ = saved
    old = tmp_path / "v1.sc"

    def as_version_1(manifest):
        manifest.update(version=1, removed={"0": [1, 4]}, original_shapes={"0.weight": [8, 3, 3, 3]})

    _rewrite_manifest(path, old, as_version_1)
    loaded = load(old, make_net()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(inputs[0][0]), compact(inputs[0][0]))


def test_inconsistent_manifest(saved, tmp_path):
    bad = tmp_path / "bad.sc"
    _rewrite_manifest(saved[2], bad, lambda m: m["packed"]["9.weight"].update(shape=[10, 999]))
    _expect_format_error(bad, match="corrupted")


def test_mismatched_model(saved):
    path = saved[2]
    narrower = make_net()
    narrower[0] = nn.Conv2d(3, 4, 3, padding=1)  # the file has 6 channels: more than the model
    _expect_format_error(path, narrower, match="does not match")
    other_kernel = make_net()
    other_kernel[0] = nn.Conv2d(3, 8, 5, padding=2)
    _expect_format_error(path, other_kernel, match="does not match")
    wider = make_net()
    wider[0] = nn.Conv2d(3, 16, 3, padding=1)  # channels are only ever fewer in the file: resized
    assert load(path, wider)[0].out_channels == saved[4][0].out_channels
    shorter = nn.Sequential(*list(make_net())[:-1])
    _expect_format_error(path, shorter, match="does not match")
    renamed = nn.Sequential(*list(make_net()))
    renamed[7] = nn.Identity()  # fine: no state
    loaded = load(path, renamed)
    assert loaded[0].out_channels == saved[4][0].out_channels
    swapped = make_net()
    swapped[1] = nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
    _expect_format_error(path, swapped, match="does not match")
    prepared = make_net()
    prepare(prepared)
    _expect_format_error(path, prepared, match="does not match")


def test_bench_smoke_prints_figures(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_export.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "command:" in result.stdout and "machine:" in result.stdout
    assert "file bytes" in result.stdout
    report = json.loads(out.read_text())
    assert report["models"]
    for entry in report["models"]:
        assert 0 < entry["file_bytes"] < entry["fp32_state_dict_bytes"]
        assert entry["pack_seconds"] >= 0 and entry["latency_ms"]["finalized"]["batch_1"] > 0
