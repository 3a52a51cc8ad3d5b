"""The callback and its arguments from a LightningCLI config file and from the command line."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("jsonargparse")
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from selfcompress import SelfCompress  # noqa: E402
from tests.helpers import Classifier  # noqa: E402

QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
]


class RandomData(pl.LightningDataModule):
    """Random 1x8x8 images in four classes."""

    def __init__(self, n: int = 32, batch_size: int = 8) -> None:
        super().__init__()
        self.n = n
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(self.n, 1, 8, 8, generator=generator)
        y = torch.randint(0, 4, (self.n,), generator=generator)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)


def cli(args: list[str], run: bool = False) -> LightningCLI:
    return LightningCLI(
        Classifier, RandomData, args=args, run=run, save_config_callback=None, parser_kwargs={"exit_on_error": False}
    )


def compress_callbacks(trainer: pl.Trainer) -> list[SelfCompress]:
    return [c for c in trainer.callbacks if isinstance(c, SelfCompress)]


def test_callback_and_gamma_from_the_command_line() -> None:
    found = cli([*QUIET, "--trainer.callbacks+=selfcompress.SelfCompress", "--trainer.callbacks.gamma=0.03"])
    (callback,) = compress_callbacks(found.trainer)
    assert callback.gamma == pytest.approx(0.03)
    assert callback.initial_bits == SelfCompress().initial_bits  # untouched arguments keep their defaults


def test_callback_and_arguments_from_a_yaml_config(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: selfcompress.SelfCompress\n"
        "      init_args:\n"
        "        gamma: 0.2\n"
        "        initial_bits: 6.0\n"
        "        exclude_names: ['net.0']\n"
        "        ramp_steps: 7\n"
    )
    found = cli([*QUIET, f"--config={config}"])
    (callback,) = compress_callbacks(found.trainer)
    assert (callback.gamma, callback.initial_bits, callback.ramp_steps) == (0.2, 6.0, 7)
    assert callback.exclude_names == ("net.0",)


def test_exclude_types_from_a_yaml_config(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: selfcompress.SelfCompress\n"
        "      init_args:\n"
        "        exclude_types: [torch.nn.Linear]\n"
    )
    found = cli([*QUIET, f"--config={config}"])
    (callback,) = compress_callbacks(found.trainer)
    assert callback.exclude_types == (torch.nn.Linear,)


def test_out_of_range_gamma_is_refused_with_its_name() -> None:
    with pytest.raises(ValueError, match="gamma"):
        cli([*QUIET, "--trainer.callbacks+=selfcompress.SelfCompress", "--trainer.callbacks.gamma=-1"])


def test_fit_subcommand_trains_and_compresses() -> None:
    torch.set_num_threads(1)
    found = cli(
        [
            "fit",
            *QUIET,
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--seed_everything=0",
            "--trainer.callbacks+=selfcompress.SelfCompress",
            "--trainer.callbacks.gamma=0.5",
        ],
        run=True,
    )
    (callback,) = compress_callbacks(found.trainer)
    assert found.trainer.global_step == 2
    assert [entry["epoch"] for entry in callback.history] == [0]
    assert callback.size().total_bits < callback.size().fp32_bits
