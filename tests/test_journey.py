"""The README's journey, end to end, as a user takes it.

Train with the defaults' shrinking and a ModelCheckpoint, pick the best checkpoint, load
it into the user's class, finalize it, save it, load the file into a freshly built
network, convert to bitsandbytes: each step is handed what the step before returned,
under the grad mode a user would be in, and every step's outputs are checked.
"""

from __future__ import annotations

import copy

import pytest
import torch

import selfcompress
from tests.test_checkpoints import NETS, Module, Run, assert_same_outputs, eval_outputs, fresh_channel_count


@pytest.fixture(scope="module", params=["small_cnn", "resnet9"])
def run(request, tmp_path_factory) -> Run:
    return Run(request.param, tmp_path_factory.mktemp(request.param))


def test_best_checkpoint_to_bitsandbytes(run: Run, tmp_path) -> None:
    assert sum(t.raw.shape[0] for t in selfcompress.quantized_tensors(run.model)) < fresh_channel_count(run.arch)
    expected = run.outputs_at(run.best)
    x = run.x[:2]

    best = Module.load_from_checkpoint(run.best)
    # Within float rounding: the trained model holds fewer channels than the plain one it loads into.
    assert_same_outputs(eval_outputs(best, run.x), expected)

    with torch.inference_mode():
        compact = selfcompress.finalize(best, inputs=x)
    assert not torch.is_inference_mode_enabled()
    assert (eval_outputs(compact, run.x) - expected).abs().max() <= 1e-5 * expected.abs().max()

    path = tmp_path / "net.safetensors"
    with torch.no_grad():
        selfcompress.save(compact, path)
    assert torch.is_grad_enabled()

    fresh = selfcompress.load(path, NETS[run.arch][0]())
    assert torch.equal(eval_outputs(fresh, run.x), eval_outputs(compact, run.x))

    fast = selfcompress.to_bitsandbytes(fresh)
    out = eval_outputs(fast, run.x)
    assert out.dtype == torch.float32
    assert (out - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_every_form_writes_the_same_file(run: Run, tmp_path) -> None:
    """The trained model, its checkpoint at the end of fit loaded, and finalize's output: one file."""
    run.trainer.save_checkpoint(tmp_path / "end.ckpt")  # `last.ckpt` is the latest one written, maybe earlier
    last = Module.load_from_checkpoint(tmp_path / "end.ckpt")
    x = run.x[:2]
    files = []
    for i, form in enumerate([run.model, run.model.net, last, selfcompress.finalize(last, inputs=x)]):
        path = tmp_path / f"{i}.safetensors"
        with torch.no_grad():
            selfcompress.save(form, path, inputs=x)
        files.append(path.read_bytes())
    assert all(data == files[0] for data in files[1:])


def test_the_lightning_module_saved_loads_into_a_fresh_one(run: Run, tmp_path) -> None:
    """`save(model)` of the trained LightningModule, then `load(path, Module())`: the same class back."""
    path = tmp_path / "net.safetensors"
    with torch.inference_mode():
        selfcompress.save(run.model, path)
    fresh = Module(run.arch)
    loaded = selfcompress.load(path, fresh)
    assert loaded is fresh
    assert torch.equal(eval_outputs(loaded, run.x), eval_outputs(selfcompress.load(path, NETS[run.arch][0]()), run.x))
    assert_same_outputs(eval_outputs(loaded, run.x), eval_outputs(run.model, run.x))
    # Each next step takes it as it is, without inputs: finalize, save (the same file), report.
    again = tmp_path / "again.safetensors"
    with torch.no_grad():
        compact = selfcompress.finalize(loaded)
        selfcompress.save(loaded, again)
    assert torch.equal(eval_outputs(compact, run.x), eval_outputs(loaded, run.x))
    assert again.read_bytes() == path.read_bytes()
    assert selfcompress.report(loaded).total_bytes == selfcompress.report(run.model).total_bytes


def test_a_copy_of_the_trained_model_needs_no_inputs(run: Run) -> None:
    """A deep copy (an EMA or "best so far" copy) finalizes as the trained model does."""
    copied = copy.deepcopy(run.model)
    with torch.inference_mode():
        compact = selfcompress.finalize(copied)
    assert_same_outputs(eval_outputs(compact, run.x), eval_outputs(run.model, run.x))
