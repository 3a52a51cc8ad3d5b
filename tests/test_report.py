import io
import struct

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from selfcompress import SelfCompress, build_graph, code_bits, exact_size, integer_codes, prepare
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
    {"epoch": 0, "bits_per_weight": 8.0, "size_fraction": 0.3, "size_bytes": 300.0, "weights_kept": 1.0,
     "channels_open": 12.0, "val_acc": 0.5},
    {"epoch": 1, "bits_per_weight": 4.0, "size_fraction": 0.2, "size_bytes": 200.0, "weights_kept": 0.8,
     "channels_open": 9.0, "val_acc": 0.7},
]


def test_figures_are_those_of_exact_size() -> None:
    model = prepared(CLOSING)
    size = exact_size(model, build_graph(model, INPUTS))
    found = report(model, INPUTS)
    assert found.total_bytes == size.total_bytes
    assert found.fp32_bytes * 8 == size.fp32_bits
    assert found.fraction_of_fp32 == pytest.approx(size.fraction_of_fp32)
    assert found.bits_per_weight == pytest.approx(size.bits_per_weight)
    assert found.other_bytes == (size.other_bits + 7) // 8 > 0  # the batch norm
    assert [row.name for row in found.layers] == ["0.weight", "2.weight", "5.weight"]
    for row, layer in zip(found.layers, size.layers, strict=True):
        assert (row.channels_open, row.channels_total) == (layer.channels_open, layer.channels_total)
        assert (row.weights_kept, row.weights_total) == (layer.weights_kept, layer.weights_total)
        assert row.bytes == (layer.bits + 7) // 8
        assert row.share == pytest.approx(layer.bits / size.total_bits)
    assert found.layers[0].channels_open == 3 and found.layers[1].channels_open == 3
    other_share = found.other_bytes * 8 / size.total_bits
    assert sum(row.share for row in found.layers) + other_share == pytest.approx(1, abs=0.02)


def test_channel_bits_are_code_widths_with_closed_channels_at_zero() -> None:
    model = prepared(CLOSING)
    found = report(model, INPUTS)
    first = model[0]
    q = first.parametrizations.weight[0]
    widths = code_bits(integer_codes(first.parametrizations.weight.original, q.bits, q.exponent)).tolist()
    assert found.layers[0].channel_bits[:2] == [0, 0]
    assert found.layers[0].channel_bits[2:] == widths[2:]
    assert max(found.layers[0].channel_bits) == found.layers[0].max_bits
    assert [len(row.channel_bits) for row in found.layers] == [5, 4, 3]
    assert found.layers[1].channel_bits[2] == 0


def test_inputs_default_to_recorded_ones_and_are_required_otherwise() -> None:
    model = prepared(CLOSING)
    with pytest.raises(ValueError, match="inputs"):
        report(model)
    set_example_inputs(model, INPUTS)
    assert report(model).total_bytes == report(model, INPUTS).total_bytes


def test_an_unprepared_model_is_refused() -> None:
    with pytest.raises(ValueError, match="prepare"):
        report(chain(), INPUTS)


def test_to_dict_is_flat_plain_numbers() -> None:
    found = report(prepared(CLOSING), INPUTS, history=HISTORY)
    figures = found.to_dict()
    assert figures["total_bytes"] == found.total_bytes
    assert figures["layer/2.weight/channels_open"] == 3
    assert type(figures["total_bytes"]) is int and type(figures["fraction_of_fp32"]) is float
    assert all(type(value) in (int, float) for value in figures.values())
    assert all(isinstance(key, str) for key in figures)


def test_table_names_every_layer_and_the_total() -> None:
    found = report(prepared(CLOSING), INPUTS)
    text = str(found)
    for name in ("0.weight", "2.weight", "5.weight", "other tensors", "total"):
        assert name in text
    assert f"{found.total_bytes:,}" in text and "3/5" in text


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
