"""Self-compress the small MNIST CNN, reading the standard IDX files from ``--data-dir``::

    python examples/mnist.py --data-dir ../shared/datasets/mnist --epochs 3 --gamma 0.05
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import lightning.pytorch as pl
import torch
from digits import Classifier, accuracy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import selfcompress


def read_idx(path: Path) -> torch.Tensor:
    """One IDX file (optionally gzipped): big-endian header, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"`{path}` is not a uint8 IDX file (header {data[:4].hex()}).")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


def mnist(data_dir: Path, split: str) -> TensorDataset:
    """MNIST ``split`` ("train" or "t10k") as normalised float images and labels."""
    images = read_idx(data_dir / f"{split}-images-idx3-ubyte.gz").float().div(255).sub(0.1307).div(0.3081)
    labels = read_idx(data_dir / f"{split}-labels-idx1-ubyte.gz").long()
    return TensorDataset(images.unsqueeze(1), labels)


def mnist_cnn() -> nn.Sequential:
    """conv 5x5 32, conv 5x5 32, BN, pool, conv 3x3 64, conv 3x3 64, BN, pool, 576 -> 10."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5), nn.ReLU(), nn.Conv2d(32, 32, 5), nn.ReLU(), nn.BatchNorm2d(32), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.BatchNorm2d(64), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(576, 10),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--gamma", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.data_dir / "train-images-idx3-ubyte.gz").exists():
        parser.error(f"--data-dir {args.data_dir} holds no train-images-idx3-ubyte.gz")

    pl.seed_everything(args.seed, verbose=False)
    generator = torch.Generator().manual_seed(args.seed)
    train = DataLoader(mnist(args.data_dir, "train"), batch_size=args.batch_size, shuffle=True, generator=generator)
    test = DataLoader(mnist(args.data_dir, "t10k"), batch_size=1000)
    model = Classifier(mnist_cnn())
    callback = selfcompress.SelfCompress(gamma=args.gamma)
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[callback], logger=False, enable_checkpointing=False)
    trainer.fit(model, train)  # the callback prints its size table at the end
    compact = selfcompress.finalize(model.net)
    print(f"test accuracy {accuracy(model, test):.2%} (finalized {accuracy(compact, test):.2%}), "
          f"exact size {callback.size().total_bytes:,} bytes")


if __name__ == "__main__":
    main()
