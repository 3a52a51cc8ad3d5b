"""selfcompress: neural networks that compress themselves while they train.

Modules, one idea each:

- ``quantize``: the paper's per-channel quantizer (eq. 1), integer bit counting, and
  recovering a baked weight's integer form.
- ``layers``: attaching bit depths and exponents to weights; baking them in.
- ``graph``: channel dependency groups (what must lose channel k together).
- ``size``: the differentiable size penalty and the exact packed size.
- ``batchnorm``: re-estimating batch-norm statistics for the quantized weights.
- ``checkpoint``: the plain state dict a Lightning checkpoint holds.
- ``gates``: closed channels and driving their constants to zero.
- ``surgery``: removing channels from a training model and its optimizers.
- ``finalize``: any form of a trained model to one plain compact module and its codes.
- ``packing`` / ``io``: bit packing; the safetensors file, saved and loaded safely.
- ``bnb``: bitsandbytes modules built from the learned integer codes.
- ``targets`` / ``report``: size targets; per-layer report, table and plot.
- ``callback``: the Lightning callback wiring it together.
"""

from typing import Any

from selfcompress.batchnorm import reestimate_batch_norm
from selfcompress.callback import SelfCompress
from selfcompress.finalize import RemovalReport, finalize
from selfcompress.graph import build_graph
from selfcompress.io import SelfCompressFormatError, load, save
from selfcompress.layers import ChannelQuantizer, bake, prepare, quantized_tensors
from selfcompress.packing import pack_codes, unpack_codes
from selfcompress.quantize import code_bits, dequantize, integer_codes, integer_form, quantize
from selfcompress.report import CompressionReport, report
from selfcompress.size import ModelSize, exact_size, penalty
from selfcompress.targets import parse_target_size, update_gamma

__all__ = [
    "ChannelQuantizer",
    "CompressionReport",
    "ModelSize",
    "RemovalReport",
    "SelfCompress",
    "SelfCompressFormatError",
    "bake",
    "build_graph",
    "code_bits",
    "dequantize",
    "exact_size",
    "finalize",
    "integer_codes",
    "integer_form",
    "load",
    "pack_codes",
    "parse_target_size",
    "penalty",
    "prepare",
    "quantize",
    "quantized_tensors",
    "reestimate_batch_norm",
    "report",
    "save",
    "to_bitsandbytes",
    "unpack_codes",
    "update_gamma",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # bitsandbytes takes seconds to import: load it only when asked for.
    if name == "to_bitsandbytes":
        from selfcompress.bnb import to_bitsandbytes

        return to_bitsandbytes
    raise AttributeError(f"module 'selfcompress' has no attribute {name!r}")
