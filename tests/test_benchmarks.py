"""Each benchmark's smoke setting runs, so the scripts cannot silently rot."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_benchmark_smoke(tmp_path, capsys) -> None:
    results = load("bench_digits").main(["--smoke", "--out", str(tmp_path / "digits.json")])
    run = results["runs"][0]
    assert 0.0 < run["fraction"] < 1.0
    assert 0.0 <= run["accuracy"] <= 1.0
    assert run["finalized_accuracy"] == pytest.approx(run["accuracy"], abs=0.01)
    assert run["exact_bytes"] <= run["file_bytes"] <= run["exact_bytes"] * 1.01 + 512
    assert run["statistics_bytes"] > 0 and run["statistics_bytes"] % 8 == 0  # two float32 a batch-norm channel
    machine = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("machine: "))
    assert f"({torch.backends.cpu.get_cpu_capability()} kernels)" in machine  # results differ between CPUs
    assert (tmp_path / "digits.json").exists()


def test_shrink_benchmark_smoke(tmp_path) -> None:
    summary = load("bench_shrink").main(["--smoke", "--plot", str(tmp_path / "shrink.png")])
    results = summary["results"]
    assert [len(results[mode]["epoch_seconds"]) for mode in ("plain", "mask", "shrink")] == [2, 2, 2]
    assert summary["shrink_over_mask"] > 0
    assert (tmp_path / "shrink.png").stat().st_size > 1000


def test_target_benchmark_smoke() -> None:
    results = load("bench_target").main(["--smoke"])
    run = results["runs"][0]
    assert run["target"] == "12KB" and run["target_bytes"] == 12000
    assert run["reached_bytes"] > 0 and 0 <= run["accuracy"] <= 1


def test_scale_benchmark_smoke(capsys) -> None:
    results = load("bench_scale").main(["--smoke"])
    runs = {(r["kind"], r["scale"]): r for r in results["runs"]}
    assert sorted(runs) == [("cnn", 1), ("cnn", 4), ("mlp", 1), ("mlp", 4)]
    assert runs["cnn", 4]["weights"] > 10 * runs["cnn", 1]["weights"]  # the inner convolutions grow 16x
    for r in runs.values():
        assert 0.0 < r["weights_kept"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["fp32_accuracy"] <= 1.0
        # bits per weight split into the weights kept and the bits each kept weight holds
        assert r["bits_per_kept_weight"] * r["weights_kept"] == pytest.approx(r["bits_per_weight"], rel=1e-9)
    assert "fp32 acc." in capsys.readouterr().out


def test_scale_benchmark_mlp_with_batch_norms() -> None:
    plain = load("bench_scale").main(["--smoke", "--kinds", "mlp", "--scales", "1"])["runs"][0]
    with_bn = load("bench_scale").main(["--smoke", "--kinds", "mlp-bn", "--scales", "1"])["runs"][0]
    assert with_bn["kind"] == "mlp-bn"
    assert with_bn["weights"] == plain["weights"]  # the batch norms add no compressed weights


def test_printed_command_can_be_pasted(monkeypatch) -> None:
    monkeypatch.setattr("sys.argv", ["bench_pareto.py", "--bits", "", "--gammas", "0.001@4,0.002"])
    assert load("common").command() == "python bench_pareto.py --bits '' --gammas 0.001@4,0.002"


def test_checkpoints_benchmark_smoke(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    results = load("bench_checkpoints").main(["--smoke"])
    assert list(tmp_path.iterdir()) == []  # its checkpoints lived in a scratch directory, gone with it
    assert [(r["mode"], r["seed"]) for r in results["runs"]] == [("gamma", 0), ("target_size", 0)]
    for r in results["runs"]:
        assert sorted(r["picks"]) == ["val_acc", "val_loss"]
        for pick in [*r["picks"].values(), r["final"]]:
            assert 0 <= pick["epoch"] < results["epochs"] and 0.0 <= pick["accuracy"] <= 1.0
            # a checkpoint's file is the size the callback logged at its epoch, plus the container
            assert pick["logged_bytes"] <= pick["file_bytes"] <= pick["logged_bytes"] * 1.01 + 512
    assert sorted(results["fp32_accuracy"]) == [0] and 0.0 <= results["fp32_accuracy"][0] <= 1.0
    assert "x final file" in capsys.readouterr().out
