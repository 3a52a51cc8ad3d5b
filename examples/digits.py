"""Train a small CNN on scikit-learn's bundled digits, with and without SelfCompress.

Needs no download. Prints the size table and the test accuracy before and after
compression::

    python examples/digits.py --epochs 60 --gamma 0.09
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
import torchmetrics
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import selfcompress


def digits_loaders(batch_size: int = 32, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Train / test loaders over the 1,797 8x8 digits (80 / 20, stratified)."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    train_idx, test_idx = train_test_split(torch.arange(len(labels)), test_size=0.2, random_state=seed, stratify=labels)
    train = TensorDataset((images[train_idx] - 0.3) / 0.4, labels[train_idx])
    test = TensorDataset((images[test_idx] - 0.3) / 0.4, labels[test_idx])
    generator = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator),
        DataLoader(test, batch_size=256),
    )


def digits_cnn(width: int = 32, dropout: float = 0.1) -> nn.Sequential:
    """Three conv blocks and a linear classifier for 1x8x8 images."""

    def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
        layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        return layers + [nn.MaxPool2d(2)] if pool else layers

    return nn.Sequential(
        *block(1, width, pool=False),
        *block(width, 2 * width, pool=True),
        *block(2 * width, 4 * width, pool=True),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(4 * width * 2 * 2, 10),
    )


class Classifier(pl.LightningModule):
    """Cross-entropy classification of any network, accuracy by torchmetrics."""

    def __init__(self, net: nn.Module, lr: float = 3e-3, weight_decay: float = 5e-4) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.weight_decay = weight_decay
        self.test_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_accuracy(self(x), y)
        self.log("test_acc", self.test_accuracy)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        return [optimizer], [schedule]


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Test accuracy of any plain module, in eval mode."""
    metric = torchmetrics.Accuracy(task="multiclass", num_classes=10)
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            metric.update(model(x), y)
    return float(metric.compute())


def train(
    epochs: int, gamma: float | None, seed: int = 0, width: int = 32, **compress_kwargs
) -> tuple[Classifier, float, selfcompress.SelfCompress | None]:
    """Train one classifier; ``gamma=None`` trains without compression (``compress_kwargs`` go to the callback)."""
    pl.seed_everything(seed, verbose=False)
    train_loader, test_loader = digits_loaders(seed=seed)
    model = Classifier(digits_cnn(width))
    callbacks = [selfcompress.SelfCompress(gamma=gamma, **compress_kwargs)] if gamma is not None else []
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(model, train_loader)
    return model, accuracy(model, test_loader), (callbacks[0] if callbacks else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--gamma", type=float, default=0.09)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="write the compression report's PNG here")
    args = parser.parse_args()

    start = time.perf_counter()
    baseline, baseline_acc, _ = train(args.epochs, gamma=None, seed=args.seed)
    compressed, compressed_acc, callback = train(args.epochs, gamma=args.gamma, seed=args.seed)
    compact = selfcompress.finalize(compressed)
    compact_acc = accuracy(compact, digits_loaders(seed=args.seed)[1])

    size = callback.size()
    fp32_bytes = 4 * sum(p.numel() for p in baseline.parameters())
    if args.plot:
        callback.report().plot(args.plot)
    print(f"fp32 baseline:  accuracy {baseline_acc:.2%}, {fp32_bytes:,} bytes")
    print(
        f"selfcompressed: accuracy {compressed_acc:.2%} (finalized {compact_acc:.2%}), "
        f"{size.total_bytes:,} bytes = {size.total_bytes / fp32_bytes:.2%} of fp32"
    )
    before, after = (sum(p.numel() for p in m.parameters()) for m in (baseline, compact))
    print(f"parameters: {before:,} -> {after:,}")
    print(f"total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
