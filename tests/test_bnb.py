"""bitsandbytes export: learned codes in 4/8-bit storage, outputs, state-dict round trip."""

import bitsandbytes.functional as bnbf
import pytest
import torch
from torch import nn

from selfcompress.bnb import BnbConv, FP4Linear, Int8Linear, storage_bytes, to_bitsandbytes
from selfcompress.finalize import finalize
from selfcompress.layers import prepare

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def make_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = make_net()
    x = torch.randn(6, 3, 4, 4)
    model.train()
    model(x)
    model.eval()
    t = prepare(model, initial_bits=8)  # exponents for 8-bit codes: the depths set below decide the widths
    with torch.no_grad():
        t[0].quantizer.bits[:] = 3
        t[0].quantizer.bits[[2, 5]] = -1  # closed, removed with the depthwise channels
        t[1].quantizer.bits[[2, 5]] = -1
        for module in (model[0], model[3], model[1], model[4]):
            module.bias[[2, 5]] = 0
        for bn in (model[1], model[4]):
            bn.running_mean[[2, 5]] = 0
        t[1].quantizer.bits[:] = torch.where(t[1].quantizer.bits > 0, 6.0, -1.0)
        t[2].quantizer.bits[:] = 2
        t[3].quantizer.bits[:] = 3  # 128 inputs: whole 64-blocks per row -> 4-bit
        t[4].quantizer.bits[:] = 7  # 8-bit
        t[5].quantizer.bits[:] = 12
        t[5].quantizer.exponent -= 4  # 12-bit codes: stays a plain layer
    inputs = ((x,), {})
    return model, inputs, finalize(model, inputs).eval()


def _dequantized(module):
    if isinstance(module, BnbConv):
        return module.dequantized_weight()
    if isinstance(module, Int8Linear):
        scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return torch.ops.bitsandbytes.int8_vectorwise_dequant.default(module.weight.data, scb)
    return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)


def test_layer_choice_and_weights(trained):
    model, inputs, compact = trained
    exported = to_bitsandbytes(model, inputs, dtype=torch.float32)
    kinds = {name: type(module) for name, module in exported.named_children()}
    assert kinds["0"] is BnbConv and exported[0].bits == 4
    assert kinds["3"] is BnbConv and exported[3].bits == 8
    assert kinds["6"] is BnbConv and exported[6].bits == 4
    assert kinds["9"] is FP4Linear and kinds["11"] is Int8Linear
    assert kinds["13"] is nn.Linear  # a channel above 8 bits
    assert exported[0].out_channels == compact[0].out_channels == 6
    state = compact.state_dict()
    for name in (0, 3, 6, 9, 11):
        weight = _dequantized(exported[name]).reshape(state[f"{name}.weight"].shape)
        # 2^e is not a power of two for a real exponent, so the bitsandbytes scales
        # (6 * 2^e, 127 * 2^e) are rounded: at most a couple of float32 ulps.
        torch.testing.assert_close(weight, state[f"{name}.weight"], rtol=3e-7, atol=0)
    assert torch.equal(exported[13].weight, state["13.weight"])


def test_outputs_match_finalized(trained):
    model, inputs, compact = trained
    x = torch.randn(9, 3, 4, 4)
    reference = compact(x)
    scale = float(reference.abs().max())
    exported = to_bitsandbytes(model, inputs, dtype=torch.float32).eval()
    with torch.no_grad():
        # eval: LLM.int8() quantizes the activations of Int8Linear to int8 per row
        assert float((exported(x) - reference).abs().max()) <= 1e-2 * scale
        exported.train()  # on CPU training mode dequantizes the int8 weight instead
        for bn in (exported[1], exported[4]):
            bn.eval()
        assert float((exported(x) - reference).abs().max()) <= 1e-5 * scale
    half = to_bitsandbytes(model, inputs, dtype=torch.float16).eval()
    with torch.no_grad():
        assert float((half(x.half()).float() - reference).abs().max()) <= 2e-2 * scale


def test_state_dict_round_trip(trained):
    model, inputs, _ = trained
    x = torch.randn(3, 3, 4, 4)
    source = to_bitsandbytes(model, inputs, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = source(x)
    state = source.state_dict()
    assert state["11.SCB"].dtype == torch.float32 and state["9.weight"].dtype == torch.uint8
    target = to_bitsandbytes(model, inputs, dtype=torch.float32).eval()
    with torch.no_grad():
        for value in target.state_dict().values():
            if value.is_floating_point():
                value.zero_()  # so the load has something to restore
        target(x)  # after a forward the int8 state has moved; loading must still work
        assert not torch.equal(target(x), expected)
    result = target.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(target(x), expected)


def test_storage_smaller_than_fp16(trained):
    model, inputs, compact = trained
    exported = to_bitsandbytes(model, inputs, dtype=torch.float16)
    fp16 = sum(p.numel() * 2 for p in compact.parameters())
    assert storage_bytes(exported) < fp16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_export_matches(trained):
    model, inputs, compact = trained
    x = torch.randn(5, 3, 4, 4)
    reference = compact(x)
    exported = to_bitsandbytes(model, inputs, dtype=torch.float16).cuda().eval()
    with torch.no_grad():
        out = exported(x.cuda().half()).float().cpu()
    assert float((out - reference).abs().max()) <= 2e-2 * float(reference.abs().max())
