import torch
from torch import nn

from selfcompress import build_graph, exact_size, penalty, prepare, quantized_tensors


def chain() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def prepared_chain(bits: dict[str, list[float]]):
    torch.manual_seed(0)
    model = chain()
    tensors = prepare(model, initial_bits=8)
    with torch.no_grad():
        for tensor in tensors:
            if tensor.name in bits:
                tensor.quantizer.bits.copy_(torch.tensor(bits[tensor.name]).reshape(-1, 1))
    graph = build_graph(model, ((torch.randn(2, 6),), {}))
    return model, tensors, graph


def test_exact_size_counts_kept_channels_live_fan_in_and_overhead() -> None:
    model, tensors, graph = prepared_chain({"0.weight": [-1, 0, 3, 3, 3], "2.weight": [2, 2, -1, -1]})
    size = exact_size(model, graph)
    widths = {}
    for t in tensors:
        codes = torch.round(
            torch.clamp(
                t.raw / torch.exp2(t.quantizer.exponent),
                -torch.exp2(t.quantizer.bits.clamp_min(0) - 1),
                torch.exp2(t.quantizer.bits.clamp_min(0) - 1) - 1,
            )
        )
        widths[t.name] = [
            max((int(c).bit_length() if c >= 0 else int(-c - 1).bit_length()) + 1 if c != 0 else 0 for c in row)
            for row in codes.tolist()
        ]
    per_channel = 32 + 8 + 32  # scale, width, bias
    # Layer 0 keeps rows 2..4 (fan-in 6); layer 2 keeps rows 0, 1 with 3 live inputs; head keeps 3 rows of 2 inputs.
    expected = (
        sum(widths["0.weight"][r] * 6 for r in (2, 3, 4))
        + 3 * per_channel
        + sum(widths["2.weight"][r] * 3 for r in (0, 1))
        + 2 * per_channel
        + sum(widths["4.weight"][r] * 2 for r in range(3))
        + 3 * per_channel
    )
    assert size.total_bits == expected
    assert [layer.channels_kept for layer in size.layers] == [3, 2, 3]
    assert size.weights_kept == 3 * 6 + 2 * 3 + 3 * 2
    assert size.fp32_bits == 32 * sum(p.numel() for p in chain().parameters())


def test_penalty_is_eq5_and_ignores_closed_inputs() -> None:
    model, tensors, graph = prepared_chain({"0.weight": [-1, 1, 2, 3, 4], "2.weight": [1, 1, 1, 1]})
    q = penalty(tensors, graph, num_weights=30 + 20 + 12)
    b0, b2, b4 = (t.quantizer.bits.detach().clamp_min(0).flatten() for t in tensors)
    # live inputs: layer 0 reads 6 inputs; layer 2 reads 4 open channels; layer 4 reads 4.
    expected = 6 * b0.sum() + (4 * b2.sum() + 4 * b0.sum()) + (4 * b4.sum() + 3 * b2.sum())
    assert torch.isclose(q, expected / 62)


def test_penalty_gradient_reaches_only_open_bits() -> None:
    model, tensors, graph = prepared_chain({"0.weight": [-1, 1, 2, 3, 4]})
    penalty(tensors, graph, 62).backward()
    grad = tensors[0].quantizer.bits.grad.flatten()
    assert grad[0] == 0 and torch.all(grad[1:] > 0)


def test_residual_channel_counts_as_closed_only_when_every_writer_is() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            h = self.a(x)
            return self.head(h + self.b(h))

    model = Residual()
    tensors = {t.name: t for t in prepare(model)}
    graph = build_graph(model, ((torch.randn(2, 4),), {}))
    with torch.no_grad():
        tensors["a.weight"].quantizer.bits[0] = -1
    assert [layer.channels_kept for layer in exact_size(model, graph).layers] == [3, 3, 2]
    with torch.no_grad():
        tensors["b.weight"].quantizer.bits[0] = -1
    assert [layer.channels_kept for layer in exact_size(model, graph).layers] == [2, 2, 2]
    assert quantized_tensors(model)[0].name == "a.weight"
