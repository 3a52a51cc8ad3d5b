import io
import os
import struct

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from selfcompress import SelfCompress, code_bits, finalize, integer_codes, prepare, save
from selfcompress.graph import set_example_inputs
from selfcompress.report import CompressionReport, report
from tests.helpers import Classifier, random_loader, small_cnn, tiny_trainer

INPUTS = ((torch.randn(2, 6),), {})


def chain() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))


def prepared(bits: dict[str, list[float]] | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    model = chain()
    tensors = prepare(model, initial_bits=8)
    with torch.no_grad():
        for tensor in tensors:
            if bits and tensor.name in bits:
                tensor.quantizer.bits.copy_(torch.tensor(bits[tensor.name]).reshape(-1, 1))
    return model


CLOSING = {"0.weight": [-1, 0, 3, 5, 8], "2.weight": [2, 2, -1, 4]}
HISTORY = [
    {
        "epoch": 0,
        "bits_per_weight": 8.0,
        "size_fraction": 0.3,
        "size_bytes": 300.0,
        "weights_kept": 1.0,
        "channels_open": 12.0,
        "val_acc": 0.5,
    },
    {
        "epoch": 1,
        "bits_per_weight": 4.0,
        "size_fraction": 0.2,
        "size_bytes": 200.0,
        "weights_kept": 0.8,
        "channels_open": 9.0,
        "val_acc": 0.7,
    },
]


def test_figures_are_those_of_the_packed_file(tmp_path) -> None:
    model = prepared(CLOSING)
    compact, removal = finalize(model, INPUTS, return_report=True)
    # closed and silent (after relu of a negative bias, or a zeroed batch norm); channel 1 of "0" is not
    assert removal.removed == {"0": [0], "2": [2]}
    found = report(model, INPUTS)
    assert [row.name for row in found.layers] == ["0.weight", "2.weight", "5.weight"]
    state = compact.state_dict()
    for row in found.layers:
        weight = state[row.name]
        assert (row.channels_total, row.weights_total, row.weights_kept) == (weight.shape[0],) + (weight.numel(),) * 2
    assert [row.channels_open for row in found.layers] == [3, 3, 3]
    assert found.fp32_bytes == 4 * sum(p.numel() for p in compact.parameters())
    assert found.other_bytes == 2 * 3 * 4 + 8  # the batch norm in eval form: weight and bias of 3 floats, a counter
    save(model, tmp_path / "net.sc", INPUTS)
    size = os.path.getsize(tmp_path / "net.sc")
    assert found.total_bytes <= size <= found.total_bytes * 1.01 + 512
    save(model, tmp_path / "net.lzma.sc", INPUTS, entropy_coding="lzma")
    coded = os.path.getsize(tmp_path / "net.lzma.sc")
    assert found.entropy_coding == "lzma" and found.entropy_bytes < found.total_bytes
    assert 0 <= coded - found.entropy_bytes <= size - found.total_bytes + 16  # the same container
    other_share = found.other_bytes / found.total_bytes
    assert sum(row.share for row in found.layers) + other_share == pytest.approx(1, abs=0.02)


def test_channel_bits_are_the_code_widths_of_the_compact_weights() -> None:
    model = prepared(CLOSING)
    compact = finalize(model, INPUTS)
    found = report(model, INPUTS)
    first = model[0]
    q = first.parametrizations.weight[0]
    widths = code_bits(integer_codes(first.parametrizations.weight.original, q.bits, q.exponent)).tolist()
    assert found.layers[0].channel_bits == widths[1:]  # channel 0 was removed
    assert found.layers[0].channel_bits[0] == 0  # closed, kept: its bias is not zero
    assert max(found.layers[0].channel_bits) == found.layers[0].max_bits
    assert [len(row.channel_bits) for row in found.layers] == [4, 3, 3]
    assert report(compact).to_dict() == found.to_dict()


def test_inputs_default_to_recorded_ones_and_are_required_otherwise() -> None:
    model = prepared(CLOSING)
    with pytest.raises(ValueError, match="inputs"):
        report(model)
    set_example_inputs(model, INPUTS)
    assert report(model).total_bytes == report(model, INPUTS).total_bytes


def test_an_untrained_plain_model_is_refused() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32))
    with pytest.raises(ValueError, match="prepare"):
        report(model, INPUTS)


def test_to_dict_is_flat_plain_numbers() -> None:
    found = report(prepared(CLOSING), INPUTS, history=HISTORY)
    figures = found.to_dict()
    assert figures["total_bytes"] == found.total_bytes
    assert figures["layer/2.weight/channels_open"] == 3
    assert type(figures["total_bytes"]) is int and type(figures["fraction_of_fp32"]) is float
    assert all(type(value) in (int, float) for value in figures.values())
    assert all(isinstance(key, str) for key in figures)
    assert figures["entropy_bytes"] == found.entropy_bytes


def test_entropy_figure_is_shown_and_optional() -> None:
    found = report(prepared(CLOSING), INPUTS)
    assert f"{found.entropy_bytes:,} bytes entropy-coded (lzma" in str(found)
    assert f"{found.total_bytes:,} bytes =" in found.summary()
    skipped = report(prepared(CLOSING), INPUTS, entropy_coding=None)
    assert skipped.entropy_bytes is None and "entropy" not in skipped.summary()
    assert "entropy_bytes" not in skipped.to_dict()
    assert report(prepared(CLOSING), INPUTS, entropy_coding="zlib").entropy_coding == "zlib"
    with pytest.raises(ValueError, match="entropy_coding.*'brotli'"):
        report(prepared(CLOSING), INPUTS, entropy_coding="brotli")


def test_table_names_every_layer_and_the_total() -> None:
    found = report(prepared(CLOSING), INPUTS)
    text = str(found)
    for name in ("0.weight", "2.weight", "5.weight", "other tensors", "total"):
        assert name in text
    assert f"{found.total_bytes:,}" in text and "9/10" in text


def test_rich_rendering() -> None:
    pytest.importorskip("rich")
    from rich.console import Console
    from rich.table import Table

    found = report(prepared(CLOSING), INPUTS)
    table = found.rich_table()
    assert isinstance(table, Table) and table.row_count == len(found.layers) + 2
    console = Console(record=True, width=140, file=io.StringIO())
    console.print(found)
    text = console.export_text()
    assert "2.weight" in text and f"{found.total_bytes:,}" in text


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_and_adds_a_panel_for_the_history(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    model = prepared(CLOSING)
    bare = report(model, INPUTS).plot(tmp_path / "bare.png")
    full = report(model, INPUTS, history=HISTORY).plot(tmp_path / "full.png", dpi=60)
    assert bare.stat().st_size > 1000 and full.stat().st_size > 1000
    bare_width, bare_height = _png_size(bare)
    full_width, full_height = _png_size(full)
    assert full_height / full_width > bare_height / bare_width  # the history panel is below


def test_report_of_a_trained_model_matches_the_callback() -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    callback = SelfCompress(gamma=0.5)
    model = Classifier(small_cnn())
    tiny_trainer(1, callbacks=[callback], limit_train_batches=2).fit(model, random_loader())
    found = report(model.net, history=callback.history)
    assert isinstance(found, CompressionReport)
    assert found.total_bytes == callback.size().total_bytes
    assert found.history == callback.history and found.history is not callback.history
