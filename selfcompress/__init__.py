"""selfcompress: neural networks that compress themselves while they train.

Modules, one idea each:

- ``quantize``: the paper's per-channel quantizer (eq. 1) and integer bit counting.
- ``layers``: attaching bit depths and exponents to weights; baking them in.
- ``graph``: channel dependency groups (what must lose channel k together).
- ``size``: the differentiable size penalty and the exact packed size.
- ``gates``: closed channels and driving their constants to zero.
- ``finalize``: a trained model to a plain compact module.
- ``callback``: the Lightning callback wiring it together.
"""

from selfcompress.callback import SelfCompress
from selfcompress.finalize import RemovalReport, finalize
from selfcompress.graph import build_graph
from selfcompress.layers import ChannelQuantizer, bake, prepare, quantized_tensors
from selfcompress.quantize import code_bits, integer_codes, quantize
from selfcompress.size import ModelSize, exact_size, format_size_table, penalty

__all__ = [
    "ChannelQuantizer",
    "ModelSize",
    "RemovalReport",
    "SelfCompress",
    "bake",
    "build_graph",
    "code_bits",
    "exact_size",
    "finalize",
    "format_size_table",
    "integer_codes",
    "penalty",
    "prepare",
    "quantize",
    "quantized_tensors",
]

__version__ = "0.1.0"
