"""Each benchmark's smoke setting runs, so the scripts cannot silently rot."""

import importlib.util
from pathlib import Path

import pytest

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
    assert "machine:" in capsys.readouterr().out
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
