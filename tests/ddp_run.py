"""Train with SelfCompress under Lightning's ``ddp`` strategy on 2 CPU processes (gloo).

Run by tests/test_ddp.py as a script, since the ``ddp`` launcher re-executes it per rank.
Each rank writes its final bit depths and parameter shapes to ``<out>/rank<k>.pt``.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from selfcompress import SelfCompress, quantized_tensors  # noqa: E402
from tests.helpers import Classifier, random_loader, small_cnn, tiny_trainer  # noqa: E402


class RecordBits(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        bits = torch.cat([t.quantizer.bits.detach().flatten() for t in quantized_tensors(pl_module)])
        shapes = {name: tuple(p.shape) for name, p in pl_module.named_parameters()}
        torch.save({"bits": bits, "shapes": shapes}, self.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    pl.seed_everything(0, verbose=False)
    model = Classifier(small_cnn(dropout=0.0))
    callbacks = [SelfCompress(gamma=3.0, bits_lr=1.0, ramp_steps=2), RecordBits(out)]
    trainer = tiny_trainer(8, callbacks=callbacks, strategy="ddp", devices=2)
    trainer.fit(model, random_loader())
