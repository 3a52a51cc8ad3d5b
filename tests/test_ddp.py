"""Under DDP every rank takes the same decisions; channels are masked, not removed."""

import subprocess
import sys
from pathlib import Path

import torch


def test_ddp_ranks_end_with_identical_bits_and_masked_channels(tmp_path) -> None:
    script = Path(__file__).parent / "ddp_run.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{k}.pt", weights_only=True) for k in (0, 1))
    assert torch.equal(rank0["bits"], rank1["bits"])
    assert (rank0["bits"] <= 0).any(), "the run should close some channels"
    # Masking: every layer keeps its original width on every rank.
    assert rank0["shapes"] == rank1["shapes"]
    assert rank0["shapes"]["net.0.parametrizations.weight.original"] == (8, 1, 3, 3)
