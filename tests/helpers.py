"""Small models, data and trainers shared by the tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def small_cnn(width: int = 8, classes: int = 4, dropout: float = 0.1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(dropout) if dropout else nn.Identity(),
        nn.Linear(2 * width * 4 * 4, classes),
    )


def random_loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=generator)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class Classifier(pl.LightningModule):
    """Calls its network through ``self.net`` in training, ``self(x)`` elsewhere."""

    def __init__(self, net: nn.Module | None = None, optimizer: str = "adamw") -> None:
        super().__init__()
        self.net = net if net is not None else small_cnn()
        self.optimizer = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        if self.optimizer == "sgd-onecycle":
            optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
            total = self.trainer.estimated_stepping_batches
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=total)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return [optimizer], [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)]


def tiny_trainer(max_epochs: int = 2, **kwargs) -> pl.Trainer:
    defaults = dict(
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def fit(callback: pl.Callback, epochs: int = 3, seed: int = 0, optimizer: str = "adamw", dropout: float = 0.1,
        **trainer_kwargs) -> tuple[Classifier, pl.Trainer]:
    """``small_cnn`` trained on ``random_loader`` with ``callback``, from seed ``seed``."""
    pl.seed_everything(seed, verbose=False)
    model = Classifier(small_cnn(dropout=dropout), optimizer=optimizer)
    trainer = tiny_trainer(epochs, **({"callbacks": [callback]} | trainer_kwargs))
    trainer.fit(model, random_loader())
    return model, trainer
