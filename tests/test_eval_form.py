"""Batch norms in eval form: the same eval outputs from two per-channel numbers, in the file too."""

import pytest
import torch
from torch import nn

import selfcompress
from selfcompress.batchnorm import eval_form, eval_form_state, eval_form_variance, has_eval_form
from selfcompress.graph import build_graph
from selfcompress.layers import prepare
from selfcompress.size import exact_size


def random_norm(norm: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in (norm.weight, norm.bias, norm.running_mean):
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
        norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=generator) * 10 + 1e-3)
    return norm.eval()


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1, 0.5, 0.9, 1e-12])
def test_eval_form_variance_plus_eps_is_exactly_one(eps) -> None:
    variance = eval_form_variance(eps)
    assert variance is not None and variance >= 0
    total = torch.tensor(variance, dtype=torch.float32) + torch.tensor(eps, dtype=torch.float32)
    assert float(total) == 1.0 and float(torch.rsqrt(total)) == 1.0


def test_no_eval_form_variance_for_eps_above_one() -> None:
    assert eval_form_variance(2.0) is None
    assert not has_eval_form(nn.BatchNorm1d(3, eps=2.0))


@pytest.mark.parametrize(
    ("norm", "shape"),
    [
        (nn.BatchNorm1d(19), (8, 19)),
        (nn.BatchNorm1d(19), (8, 19, 5)),
        (nn.BatchNorm2d(19, eps=1e-3), (4, 19, 5, 5)),
        (nn.BatchNorm3d(7, eps=0.1), (2, 7, 3, 3, 3)),
    ],
)
def test_eval_form_gives_the_same_outputs_bit_for_bit_and_is_idempotent(norm, shape) -> None:
    norm = random_norm(norm)
    x = torch.randn(shape) * 3
    with torch.no_grad():
        expected = norm(x)
        form = eval_form(norm)
        for attr, value in form.items():
            getattr(norm, attr).copy_(value)
        assert torch.equal(norm(x), expected)  # PyTorch's CPU kernel computes x * a + c from the same a and c
        assert torch.equal(norm(x.contiguous(memory_format=torch.channels_last)), expected) if x.dim() == 4 else True
    again = eval_form(norm)
    assert all(torch.equal(again[attr], getattr(norm, attr)) for attr in again)
    assert torch.equal(form["running_mean"], torch.zeros(shape[1]))


@pytest.mark.parametrize(
    "norm",
    [nn.BatchNorm2d(3, affine=False), nn.BatchNorm2d(3, track_running_stats=False), nn.BatchNorm2d(3).double()],
)
def test_norms_without_eval_form_are_refused_and_left_as_they_are(norm) -> None:
    assert not has_eval_form(norm)
    with pytest.raises(ValueError, match="no eval form"):
        eval_form(norm)
    model = nn.Sequential(norm)
    state, constants = eval_form_state(model)
    assert not constants and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.BatchNorm2d(5, eps=1e-3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 4),
    )


def trained_cnn() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = cnn()
    x = torch.randn(8, 3, 4, 4)
    model.train()
    model(x)
    model(x * 2 + 1)  # statistics far from 0 and 1
    model.eval()
    prepare(model)
    return model, x


def test_exact_size_counts_two_floats_per_batch_norm_channel() -> None:
    model, x = trained_cnn()
    size = exact_size(model, build_graph(model, ((x,), {})))
    assert size.other_tensors == {
        "1.weight": 6 * 32,
        "1.bias": 6 * 32,
        "1.num_batches_tracked": 64,
        "4.weight": 5 * 32,
        "4.bias": 5 * 32,
        "4.num_batches_tracked": 64,
    }


def test_file_holds_the_eval_form_and_loads_for_the_models_own_eps(tmp_path) -> None:
    model, x = trained_cnn()
    path = tmp_path / "net.safetensors"
    with torch.inference_mode():
        compact = selfcompress.finalize(model, inputs=x)
        selfcompress.save(compact, path)
    expected = compact.eval()(x)
    loaded = selfcompress.load(path, cnn()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert torch.equal(loaded[1].running_mean, torch.zeros(6))
    assert torch.equal(loaded[1].running_var, torch.full((6,), eval_form_variance(1e-5)))
    assert torch.equal(loaded[4].running_var, torch.full((5,), eval_form_variance(1e-3)))
    other_eps = cnn()
    other_eps[4].eps = 0.01  # statistics are rebuilt for the model's own eps: same outputs
    with torch.no_grad():
        assert torch.equal(selfcompress.load(path, other_eps).eval()(x), expected)
    first = path.read_bytes()
    selfcompress.save(loaded, path)  # what load returned saves to the same file
    assert path.read_bytes() == first
    assert selfcompress.report(loaded).total_bytes == exact_size_of(model, x)


def exact_size_of(model: nn.Module, x: torch.Tensor) -> int:
    return exact_size(model, build_graph(model, ((x,), {}))).total_bytes


def test_loading_into_a_model_whose_norm_cannot_hold_the_eval_form_is_refused(tmp_path) -> None:
    model, x = trained_cnn()
    path = tmp_path / "net.safetensors"
    selfcompress.save(model, path, inputs=x)
    fresh = cnn()
    fresh[4].eps = 2.0
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(selfcompress.SelfCompressFormatError, match="'4' is marked 'eval'"):
        selfcompress.load(path, fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
