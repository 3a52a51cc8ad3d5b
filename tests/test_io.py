"""Packed save/load: bit-exact outputs, size against exact_size, and every bad file."""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from selfcompress import entropy, io
from selfcompress.batchnorm import eval_form_state
from selfcompress.finalize import compressed, finalize
from selfcompress.graph import build_graph
from selfcompress.io import FORMAT_VERSION, SelfCompressFormatError, load, read_manifest, save
from selfcompress.layers import prepare
from selfcompress.packing import pack_codes
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
    tensors = prepare(model, initial_bits=8)  # exponents for 8-bit codes: the depths set below decide the widths
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
    """Same outputs bit for bit in eval mode; the same tensors, batch norms in eval form."""
    model, inputs, path, _, compact, report = saved
    assert report.removed  # channels really were removed
    loaded = load(path, make_net()).eval()
    assert repr(loaded) == repr(compact)
    x = inputs[0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), compact(x))
        other = torch.randn(7, 3, 4, 4)
        assert torch.equal(loaded(other), compact(other))
    expected, constants = eval_form_state(compact)
    assert constants == {f"{bn}.{stat}" for bn in ("1", "4") for stat in ("running_mean", "running_var")}
    for key, value in expected.items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_manifest_records_the_compact_module(saved):
    _, _, path, manifest, compact, report = saved
    stored, tensors = read_manifest(path)
    assert stored == manifest
    assert stored["version"] == 5 and stored["coding"] == "none"  # 5: batch norms in eval form
    assert "removed" not in stored and "original_shapes" not in stored  # a function of the compact module only
    assert set(tensors) == {"codes", "data"}  # one entry each in the safetensors header
    state = compact.state_dict()
    specs = {f"{name}.{attr}": spec for name, _, tensors_, *_ in stored["modules"] for attr, spec in tensors_.items()}
    statistics = {f"{bn}.{stat}" for bn in "14" for stat in ("running_mean", "running_var")}
    assert sorted(specs) == sorted(set(state) - statistics)
    for key, spec in specs.items():
        assert spec[0] == list(state[key].shape)
    packed = {key for key, spec in specs.items() if len(spec) == 3 and isinstance(spec[2], str)}
    assert packed == {"0.weight", "3.weight", "6.weight", "9.weight"}
    marked = {group[0] for group in stored["modules"] if group[3:] == ["eval"]}
    assert marked == {"1", "4"}  # the batch norms, in eval form: statistics left out, rebuilt on load
    assert not any(stat in specs for stat in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var"))
    assert specs["0.weight"][0] == [6, 3, 3, 3] and specs["0.weight"][1] == "float32"
    _, _, layers = compressed(compact)
    assert specs["0.weight"][2] == "".join("0123456789abcdefg"[w] for w in layers["0.weight"].widths.tolist())
    types = {name: type_name for name, type_name, *_ in stored["modules"]}
    assert types["3"] == "Conv2d" and types["1"] == "BatchNorm2d"


def test_codes_are_exact_and_widths_minimal(saved):
    model, inputs, *_ = saved
    compact, _, layers = compressed(model, inputs)
    state = compact.state_dict()
    assert int(layers["0.weight"].widths.max()) == 12
    assert int(layers["9.weight"].widths.max()) <= 3
    for name, layer in layers.items():
        assert torch.equal(layer.weight(), state[name])


def test_file_size_matches_exact_size(saved):
    model, inputs, path, *_ = saved
    exact = exact_size(model, build_graph(model, inputs)).total_bytes
    size = os.path.getsize(path)
    assert exact <= size <= exact * 1.01 + 512  # the data section alone is the exact figure
    fp32 = sum(p.numel() for p in make_net().parameters()) * 4
    assert size - 512 < fp32


def test_save_leaves_model_unchanged(tmp_path):
    model, inputs = trained_net(seed=1)
    before = _snapshot(model)
    save(model, tmp_path / "a.sc", inputs)
    _assert_untouched(model, before)
    # deterministic: the same model saves the same bytes
    save(model, tmp_path / "b.sc", inputs)
    assert (tmp_path / "a.sc").read_bytes() == (tmp_path / "b.sc").read_bytes()


def test_save_into_a_missing_directory_names_the_path(tmp_path):
    model, inputs = trained_net(seed=1)
    path = tmp_path / "missing" / "a.sc"
    with pytest.raises(FileNotFoundError, match="missing/a.sc.*does not exist"):
        save(model, path, inputs)
    assert not (tmp_path / "missing").exists()


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


def rewrite_v3(path, out, edit_body=None, codes=None, data_tail=None):
    """Rewrite a version 3 file with an edited manifest body or code stream, checksum recomputed."""
    tensors = safetensors.torch.load_file(str(path))
    with safe_open(str(path), "pt") as f:
        head = json.loads(f.metadata()["selfcompress"])
    size = head["manifest_bytes"]
    body = json.loads(zlib.decompress(tensors["data"][:size].numpy().tobytes()))
    if edit_body is not None:
        edit_body(body)
    packed_body = zlib.compress(json.dumps(body).encode())
    tail = tensors["data"][size:] if data_tail is None else data_tail
    tensors["data"] = torch.cat([torch.frombuffer(bytearray(packed_body), dtype=torch.uint8), tail])
    if codes is not None:
        tensors["codes"] = (
            torch.frombuffer(bytearray(codes), dtype=torch.uint8) if codes else torch.zeros(0, dtype=torch.uint8)
        )
    head.update(manifest_bytes=len(packed_body), sha256=io._digest(tensors))
    safetensors.torch.save_file(tensors, out, metadata={"selfcompress": json.dumps(head)})


def write_legacy(model, inputs, path, version):
    """A version 1 or 2 file as those versions wrote it: one codes/scale/width triple per weight."""
    compact, _, layers = compressed(model, inputs)
    tensors, packed, modules = {}, {}, {}
    for name, value in compact.state_dict().items():
        layer = layers.get(name)
        if layer is None:
            tensors[name] = value.contiguous()
            continue
        packed[name] = {"shape": list(value.shape), "dtype": "float32"}
        tensors[name + "::codes"] = pack_codes(layer.codes.reshape(layer.codes.shape[0], -1), layer.widths)
        tensors[name + "::scale"] = layer.scale.contiguous()
        tensors[name + "::width"] = layer.widths.to(torch.uint8)
    for module_name, module in compact.named_modules():
        attrs = {a: getattr(module, a) for a in ("in_channels", "out_channels", "groups", "num_features")
                 if isinstance(getattr(module, a, None), int)}  # fmt: skip
        if attrs:
            modules[module_name] = [type(module).__name__, attrs]
    manifest = {"format": "selfcompress", "version": version, "sha256": io._digest(tensors), "packed": packed,
                "modules": modules}  # fmt: skip
    if version == 1:
        manifest.update(removed={"0": [1, 4]}, original_shapes={"0.weight": [8, 3, 3, 3]})
    safetensors.torch.save_file(tensors, path, metadata={"selfcompress": json.dumps(manifest)})


def test_newer_version(saved, tmp_path):
    newer = tmp_path / "newer.sc"
    _rewrite_manifest(saved[2], newer, lambda m: m.update(version=FORMAT_VERSION + 1))
    _expect_format_error(newer, match=f"version {FORMAT_VERSION + 1}")


@pytest.mark.parametrize("version", [1, 2])
def test_version_1_and_2_files_still_load(saved, tmp_path, version):
    model, inputs, _, _, compact, _ = saved
    old = tmp_path / f"v{version}.sc"
    write_legacy(model, inputs, old, version)
    assert read_manifest(old)[0]["version"] == version
    loaded = load(old, make_net()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(inputs[0][0]), compact(inputs[0][0]))
    for key, value in compact.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    flipped = bytearray(old.read_bytes())
    flipped[-3] ^= 0xFF
    (tmp_path / "flipped.sc").write_bytes(bytes(flipped))
    _expect_format_error(tmp_path / "flipped.sc", match="checksum")


@pytest.mark.parametrize("coding", ["lzma", "zlib"])
def test_entropy_coded_file_loads_bit_exactly(saved, tmp_path, coding):
    model, inputs, path, _, compact, _ = saved
    coded = tmp_path / f"{coding}.sc"
    manifest = save(model, coded, inputs, entropy_coding=coding)
    assert manifest["coding"] == coding and read_manifest(coded)[0] == manifest
    loaded = load(coded, make_net()).eval()
    for key, value in eval_form_state(compact)[0].items():
        assert torch.equal(loaded.state_dict()[key], value), key
    other = torch.randn(5, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded(other), compact(other))
    assert os.path.getsize(coded) < os.path.getsize(path)


def test_codes_that_do_not_shrink_stay_packed(tmp_path):
    model, inputs = trained_net(seed=2)
    with torch.no_grad():  # uniform 8-bit codes: nothing for a coder to gain
        weight = model[9].parametrizations.weight
        weight.original.copy_(torch.rand_like(weight.original) * 2 - 1)
        weight[0].bits.fill_(8)
    fixed, coded = tmp_path / "fixed.sc", tmp_path / "coded.sc"
    save(model, fixed, inputs)
    manifest = save(model, coded, inputs, entropy_coding="zlib")
    if manifest["coding"] == "none":
        assert coded.read_bytes() == fixed.read_bytes()
    assert os.path.getsize(coded) <= os.path.getsize(fixed)


def test_unknown_entropy_coding(saved, tmp_path):
    model, inputs, *_ = saved
    with pytest.raises(ValueError, match="entropy_coding.*'brotli'"):
        save(model, tmp_path / "x.sc", inputs, entropy_coding="brotli")


def _packed_spec(body, name):
    module, _, attr = name.rpartition(".")
    return next(group[2] for group in body["modules"] if group[0] == module)[attr]


def _group(body, module):
    return next(group for group in body["modules"] if group[0] == module)


@pytest.mark.parametrize(
    "edit",
    [
        lambda b: _packed_spec(b, "9.weight").__setitem__(0, [10, 999]),  # more codes than stored
        lambda b: _packed_spec(b, "9.weight").__setitem__(2, "z" * 10),  # bad width digits
        lambda b: _packed_spec(b, "9.weight").__setitem__(2, "3"),  # too few widths
        lambda b: _packed_spec(b, "9.weight").__setitem__(1, "int8"),  # packed weights are float
        lambda b: b.update(coding="brotli"),
        lambda b: b.update(modules={"0": 1}),
        lambda b: b["modules"].append(["extra", "Linear", {"weight": [[2, 2], "float32"]}]),
        lambda b: b["modules"][0].__setitem__(1, "Linear"),  # wrong type
        lambda b: b.update(extra=1),
        lambda b: _group(b, "1").__setitem__(3, "evil"),  # an unknown module mark
        lambda b: _group(b, "1").append("eval"),  # two marks
        lambda b: _group(b, "0").append("eval"),  # a convolution marked as a batch norm in eval form
        lambda b: _group(b, "1")[2].__setitem__("running_var", [[6], "float32"]),  # marked, statistics kept
        lambda b: _group(b, "1")[2].pop("weight"),  # marked without its weight
        lambda b: _group(b, "1").pop(),  # the mark gone: the statistics are missing
    ],
)
def test_inconsistent_manifest(saved, tmp_path, edit):
    bad = tmp_path / "bad.sc"
    rewrite_v3(saved[2], bad, edit)
    _expect_format_error(bad)


def test_inconsistent_data(saved, tmp_path):
    bad = tmp_path / "bad.sc"
    data = safetensors.torch.load_file(str(saved[2]))["data"]
    size = read_manifest(saved[2])[0]["manifest_bytes"]
    rewrite_v3(saved[2], bad, data_tail=data[size:-1])  # one byte short
    _expect_format_error(bad, match="corrupted")
    rewrite_v3(saved[2], bad, codes=b"\0" * 3)  # packed codes of the wrong length
    _expect_format_error(bad, match="corrupted")


@pytest.mark.parametrize("coding", ["lzma", "zlib"])
def test_bad_entropy_streams(tmp_path, coding):
    model, inputs = trained_net()
    with torch.no_grad():
        for index in (0, 6, 9):
            model[index].bias.zero_()  # a tail both coders shrink, so that bad tails are read too
    good = tmp_path / "good.sc"
    save(model, good, inputs, entropy_coding=coding)
    stream = safetensors.torch.load_file(str(good))["codes"].numpy().tobytes()
    bad = tmp_path / "bad.sc"
    corrupt = bytearray(stream)
    corrupt[len(corrupt) // 2] ^= 0x5A
    corrupt[len(corrupt) // 3] ^= 0xA5
    compress = entropy.encode_codes  # a stream the coder itself wrote, but for more codes than the manifest allows
    bomb = compress([torch.zeros(1000, 1000, dtype=torch.int32)], [torch.full((1000,), 2)], coding)
    assert len(bomb) < 20_000
    for codes in (bytes(corrupt), stream[: len(stream) // 2], stream[:-1], stream + b"\0", b"", bomb):
        rewrite_v3(good, bad, codes=codes)
        _expect_format_error(bad, match="corrupted")
    head = read_manifest(good)[0]
    assert head["tail"] == coding  # the scales and other tensors are coded too
    tail = safetensors.torch.load_file(str(good))["data"][head["manifest_bytes"] :]
    tail_bomb = entropy.compress(b"\0" * 10_000_000, coding)
    for bad_tail in (tail[:-1], tail[: tail.numel() // 2], torch.cat([tail, tail[:1]]), torch.tensor(list(tail_bomb))):
        rewrite_v3(good, bad, data_tail=bad_tail.to(torch.uint8))
        _expect_format_error(bad, match="corrupted")
    data = good.read_bytes()
    for cut in (7, 100, len(data) // 2, len(data) - 1):  # a truncated file
        bad.write_bytes(data[:cut])
        _expect_format_error(bad)


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
