"""Tied weights (one parameter under two names, as an embedding tied to the output layer):
left uncompressed, never sliced, stored once, tied again on load."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from helpers import tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

import selfcompress
from selfcompress.layers import prepare, quantized_tensors

VOCAB, WIDTH = 20, 16


class TiedLM(pl.LightningModule):
    """Embedding -> hidden layer -> output layer sharing the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.hidden = nn.Linear(WIDTH, WIDTH)
        self.out = nn.Linear(WIDTH, VOCAB, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(self.embed(tokens))))

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        return nn.functional.cross_entropy(self(tokens), targets)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def token_loader() -> DataLoader:
    tokens = torch.randint(0, VOCAB, (64,), generator=torch.Generator().manual_seed(0))
    return DataLoader(list(zip(tokens, (tokens + 1) % VOCAB, strict=True)), batch_size=16)


def test_a_tied_weight_is_left_uncompressed_with_a_warning() -> None:
    model = TiedLM()
    with pytest.warns(UserWarning, match=r"embed\.weight and out\.weight are one shared \(tied\) parameter"):
        tensors = prepare(model)
    assert [t.name for t in tensors] == ["hidden.weight"]
    assert model.out.weight is model.embed.weight


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A TiedLM fitted with the callback's defaults (shrinking on) and a gamma that closes channels."""
    pl.seed_everything(0, verbose=False)
    model = TiedLM()
    callback = selfcompress.SelfCompress(gamma=3.0, print_report=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path_factory.mktemp("ckpt"), save_last=True)
    with pytest.warns(UserWarning, match="tied"):
        tiny_trainer(8, callbacks=[callback, checkpoint], enable_checkpointing=True).fit(model, token_loader())
    return model.eval(), callback, checkpoint


def test_channels_feeding_a_tied_weight_are_not_removed(trained) -> None:
    model, _, _ = trained
    hidden = next(t for t in quantized_tensors(model) if t.name == "hidden.weight")
    assert not hidden.quantizer.open.all()  # some channels closed: slicing them would cut the tied weight
    compact = selfcompress.finalize(model)
    assert compact.out.weight is compact.embed.weight
    assert tuple(compact.embed.weight.shape) == (VOCAB, WIDTH)
    tokens = torch.arange(VOCAB)
    assert torch.equal(compact(tokens), model(tokens))


def test_a_tied_weight_is_stored_once_and_tied_again_on_load(trained, tmp_path) -> None:
    model, callback, _ = trained
    path = tmp_path / "tied.safetensors"
    with torch.no_grad():
        manifest = selfcompress.save(model, path)
    stored = [name for module, _, attrs in manifest["modules"] for name in (f"{module}.{a}" for a in attrs)]
    assert "embed.weight" in stored and "out.weight" not in stored
    reported = callback.size().total_bytes
    assert reported <= os.path.getsize(path) <= reported * 1.01 + 512
    loaded = selfcompress.load(path, TiedLM())
    assert loaded.out.weight is loaded.embed.weight
    tokens = torch.arange(VOCAB)
    assert torch.equal(loaded.eval()(tokens), model(tokens))


def test_a_checkpoint_of_a_tied_model_loads_tied(trained) -> None:
    model, _, checkpoint = trained
    loaded = TiedLM.load_from_checkpoint(checkpoint.last_model_path).eval()
    assert loaded.out.weight is loaded.embed.weight
    tokens = torch.arange(VOCAB)
    assert torch.equal(loaded(tokens), model(tokens))
