"""The --smoke settings of the MNIST, peers, CIFAR-10 and cost benchmarks run and return real figures.

The MNIST-based ones skip when ``../shared/datasets/mnist`` is absent (a fresh clone);
the CIFAR-10 one when the zip or Pillow is absent. bench_cost falls back to random images.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
DATASETS = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
MNIST = DATASETS / "mnist"
CIFAR = DATASETS / "cifar10-jpeg.zip"

needs_mnist = pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").exists(), reason=f"no MNIST in {MNIST}")


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_outputs(tmp_path: Path, capsys, name: str) -> dict:
    out = capsys.readouterr().out
    assert "command: python" in out and "machine:" in out
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
    return json.loads((tmp_path / f"{name}.json").read_text())


def run(name: str, tmp_path: Path, *extra: str) -> dict:
    return load(name).main(["--smoke", "--out", str(tmp_path / f"{name.removeprefix('bench_')}.json"),
                            "--plot", str(tmp_path / f"{name.removeprefix('bench_')}.png"), *extra])


@needs_mnist
def test_mnist_smoke(tmp_path, capsys) -> None:
    results = run("bench_mnist", tmp_path, "--data-dir", str(MNIST))
    assert check_outputs(tmp_path, capsys, "mnist")["runs"] == json.loads(json.dumps(results["runs"]))
    fp32, compressed = results["runs"][0], results["runs"][1]
    assert fp32["method"] == "fp32" and fp32["exact_bytes"] == 4 * fp32["params"]
    assert fp32["state_dict_file_bytes"] > fp32["exact_bytes"]
    assert 0 < compressed["exact_bytes"] < fp32["exact_bytes"]
    assert compressed["packed_file_bytes"] is None or compressed["packed_file_bytes"] >= compressed["exact_bytes"]
    assert compressed["finalized_accuracy"] == pytest.approx(compressed["accuracy"], abs=0.01)
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["steps"] > 0 for r in results["runs"])


@needs_mnist
def test_peers_smoke(tmp_path, capsys) -> None:
    results = run("bench_peers", tmp_path, "--data-dir", str(MNIST))
    check_outputs(tmp_path, capsys, "peers")
    runs = {r["method"].split(" gamma")[0]: r for r in results["runs"]}
    assert set(runs) == {"fp32", "selfcompress", "torch-pruning + fine-tune", "lightning ModelPruning + fine-tune",
                         "diffq"}
    for run_ in runs.values():
        if "not_measured" in run_:  # only DiffQ may be missing, and then it says why
            assert run_["method"] == "diffq" and run_["not_measured"]
            continue
        assert 0.0 <= run_["accuracy"] <= 1.0 and run_["file_bytes"] > 0
    assert runs["torch-pruning + fine-tune"]["params"] <= results["target_params"]
    assert runs["lightning ModelPruning + fine-tune"]["file_bytes"] >= runs["fp32"]["file_bytes"] * 0.9


@needs_mnist
def test_pareto_smoke(tmp_path, capsys) -> None:
    results = run("bench_pareto", tmp_path, "--data-dir", str(MNIST), "--initial-bits", "2", "--gammas", "0.1@4,0.05")
    check_outputs(tmp_path, capsys, "pareto")
    assert results["setting"]["initial_bits"] == 2.0
    assert [r["config"] for r in results["runs"][1:3]] == ["gamma 0.1, from 4 bits", "gamma 0.05, from 2 bits"]
    methods = [r["method"] for r in results["runs"]]
    assert methods[:4] == ["fp32", "selfcompress", "selfcompress", "fixed-bit QAT"]
    assert "torch-pruning + fine-tune" in methods
    qat = results["runs"][3]
    assert qat["bits_per_weight"] == pytest.approx(4.0, abs=0.01)  # frozen depths: 4 bits a weight, none removed
    assert all(r["file_bytes"] > 0 and 0.0 <= r["accuracy"] <= 1.0 for r in results["runs"])

    # Each run reshuffles from the seed: without the 0.1 point before it, every other point is the same.
    alone = run("bench_pareto", tmp_path, "--data-dir", str(MNIST), "--initial-bits", "2", "--gammas", "0.05")
    same = ("accuracy", "file_bytes", "params")
    assert [{k: r[k] for k in same} for r in alone["runs"]] == [
        {k: r[k] for k in same} for r in results["runs"] if r["config"] != "gamma 0.1, from 4 bits"]


@pytest.mark.parametrize("text", ["0.1@", "0.1@four", "x", "0.1,,0.2"])
def test_pareto_refuses_bad_gamma_points(text: str) -> None:
    gamma_points = load("bench_pareto").gamma_points
    assert gamma_points("0.002,0.01@4") == [(0.002, None), (0.01, 4.0)]
    assert gamma_points("") == []
    with pytest.raises(argparse.ArgumentTypeError, match="--gammas item .* is not GAMMA or GAMMA@BITS"):
        gamma_points(text)


def test_pareto_matching() -> None:
    matched = load("bench_pareto").matched
    rows = [
        dict(method="selfcompress", file_bytes=100, accuracy=0.9),
        dict(method="selfcompress", file_bytes=50, accuracy=0.8),
        dict(method="diffq", file_bytes=60, accuracy=0.79),  # ours at 50 bytes is better: matched
        dict(method="diffq", file_bytes=99, accuracy=0.85),  # ours at <= 99 bytes reach 0.8 only
        dict(method="fixed-bit QAT", file_bytes=40, accuracy=0.1),  # smaller than any of ours
        dict(method="fp32", file_bytes=400, accuracy=0.99),  # not a peer point
    ]
    matched(rows)
    assert [r.get("matched") for r in rows] == [None, None, True, False, False, None]
    best = [r.get("selfcompress_best_at_no_more_bytes") for r in rows[2:5]]
    assert best == [0.8, 0.8, None]


def test_pareto_matching_counts_equal_image_counts_as_equal() -> None:
    """Three seeds' float32 accuracies with the same number of right images in all: a tie, matched."""
    bench = load("bench_pareto")
    ours = [torch.tensor(n / 10_000).item() for n in (9921, 9895, 9909)]
    peer = [torch.tensor(n / 10_000).item() for n in (9910, 9904, 9911)]
    assert sum(ours) / 3 < sum(peer) / 3  # float32 rounding alone puts the tie on the wrong side
    rows = [dict(method="selfcompress", file_bytes=100, accuracy=sum(ours) / 3),
            dict(method="fixed-bit QAT", file_bytes=100, accuracy=sum(peer) / 3),
            dict(method="diffq", file_bytes=100, accuracy=sum(peer) / 3 + 1 / 30_000)]  # one image more
    bench.matched(rows)
    assert [r.get("matched") for r in rows] == [None, True, False]


def test_pareto_combines_points_from_several_files(tmp_path) -> None:
    """A sweep split across processes: pieces with different points merge, runs in two pieces must agree."""
    setting = dict(name="short (CPU)", epochs=2, batch_size=128, test_subset=None, bits=[2], diffq_penalties=[],
                   pruning_ratios=[])

    def row(method: str, config: str, seed: int, accuracy: float, file_bytes: int) -> dict:
        return dict(method=method, config=config, seed=seed, steps=9, accuracy=accuracy, file_bytes=file_bytes,
                    params=10, seconds=1.0)

    def piece(name: str, gammas: list, rows: list[dict], bits: list) -> str:
        path = tmp_path / f"{name}.json"
        seeds = sorted({r["seed"] for r in rows})
        path.write_text(json.dumps({"setting": {**setting, "gammas": gammas, "bits": bits, "seeds": seeds},
                                    "seed_runs": rows}))
        return str(path)

    first = piece("first", [[0.01, None]], [r for seed in (0, 1) for r in (
        row("fp32", "", seed, 0.99, 400), row("selfcompress", "gamma 0.01", seed, 0.90, 50),
        row("fixed-bit QAT", "2 bits", seed, 0.95, 60))], [2])
    more = [r for seed in (0, 1) for r in (row("fp32", "", seed, 0.99, 400),
                                           row("selfcompress", "gamma 0.001", seed, 0.96, 55))]
    second = piece("second", [[0.001, None]], more, [])
    results = load("bench_pareto").main(["--combine", first, second])
    assert [(r["method"], r["config"]) for r in results["runs"]] == [
        ("fp32", ""), ("selfcompress", "gamma 0.01"), ("selfcompress", "gamma 0.001"), ("fixed-bit QAT", "2 bits")]
    assert results["setting"]["gammas"] == [[0.01, None], [0.001, None]] and results["setting"]["bits"] == [2]
    assert results["runs"][3]["matched"] and results["runs"][0]["seed_accuracies"] == [0.99, 0.99]
    assert len(results["seed_runs"]) == 8  # fp32 once per seed

    disagreeing = piece("disagreeing", [], [row("fp32", "", 1, 0.98, 400)], [])
    with pytest.raises(ValueError, match="disagree on seed 1 fp32 '': 99.0000% in 400 bytes against 98.0000%"):
        load("bench_pareto").main(["--combine", first, second, disagreeing])
    one_seed = piece("one_seed", [[0.002, None]], [row("selfcompress", "gamma 0.002", 0, 0.9, 40)], [])
    with pytest.raises(ValueError, match="no run of selfcompress 'gamma 0.002' on seed 1"):
        load("bench_pareto").main(["--combine", first, one_seed])


def test_cifar_smoke(tmp_path, capsys) -> None:
    if not CIFAR.exists():
        pytest.skip(f"no {CIFAR}")
    pytest.importorskip("PIL")
    results = run("bench_cifar", tmp_path, "--zip", str(CIFAR), "--runs", "fp32", "gamma:0.2", "bits:2",
                  "--probe-images", "100")
    check_outputs(tmp_path, capsys, "cifar")
    assert results["setting"]["probe_test"] == 100
    fp32, compressed, fixed = results["runs"]
    assert fp32["fraction_of_fp32_bits"] == 1.0
    assert 0.0 < compressed["fraction_of_fp32_bits"] < 1.0 and compressed["bytes"] > 0
    assert compressed["finalized_accuracy"] == pytest.approx(compressed["accuracy"], abs=0.02)
    assert fixed["bits_per_weight"] == pytest.approx(2.0, abs=0.01)  # frozen depths: 2 bits a weight, none removed
    # Per layer: channels open of total, code bits, and bytes that add up to no more than the whole.
    layers = compressed["layers"]
    assert layers and all(0 <= row["channels"][0] <= row["channels"][1] and row["bytes"] >= 0 for row in layers)
    assert sum(row["bytes"] for row in layers) <= compressed["bytes"]
    assert all(0.0 <= r["plain_statistics_accuracy"] <= 1.0 for r in (fp32, compressed, fixed))
    assert all(len(r["epochs"]) == 1 and 0.0 <= r["epochs"][0]["twin"] <= 1.0 for r in results["runs"])
    assert all(0.0 <= r["epochs"][0]["twin2"] <= 1.0 for r in results["runs"])  # the second re-estimate
    assert results["full_setting_run"] is False
    combined = load("bench_cifar").main(["--combine", str(tmp_path / "cifar.json"), str(tmp_path / "cifar.json")])
    assert combined["runs"] == results["runs"] * 2
    assert all(r["seed"] == 0 for r in results["runs"])
    with pytest.raises(ValueError, match="'fp32' twice with the same seed"):  # one run counted as two seeds
        load("bench_cifar").main(["--combine", str(tmp_path / "cifar.json"), str(tmp_path / "cifar.json"), "--mean"])
    for bad in ("0", "5", "105", "260"):  # the smoke setting has 256 test images; the probe takes tens
        with pytest.raises(SystemExit):
            load("bench_cifar").main(["--smoke", "--zip", str(CIFAR), "--probe-images", bad])
    err = capsys.readouterr().err
    assert "--probe-images must be a multiple of 10" in err and "from 10 to the test images (256), got 105" in err
    # A run does not depend on what ran before it in the process: alone, the fixed-bit run trains the same.
    alone = load("bench_cifar").main(["--smoke", "--zip", str(CIFAR), "--runs", "bits:2", "--probe-images", "100"])
    assert alone["runs"][0]["epochs"] == fixed["epochs"] and alone["runs"][0]["accuracy"] == fixed["accuracy"]


def test_bn_sources_smoke(tmp_path, capsys) -> None:
    if not CIFAR.exists():
        pytest.skip(f"no {CIFAR}")
    pytest.importorskip("PIL")
    results = load("bench_bn_sources").main(["--smoke", "--epochs", "1", "--schedule-epochs", "3", "--shuffles", "2",
                                              "--zip", str(CIFAR), "--run", "gamma:0.2",
                                              "--out", str(tmp_path / "bn.json")])
    out = capsys.readouterr().out
    assert "command: python" in out and "machine:" in out
    assert json.loads((tmp_path / "bn.json").read_text())["rows"] == results["rows"]
    callback, *twins = results["rows"]
    assert callback["samples"] == 2048 and len(callback["fp32_eval"]) == 1
    # 2 sample counts x plain / augmented x float32 / bfloat16 statistics, 2 shuffles each.
    assert [(t["samples"], t["source"]) for t in twins[:4]] == [
        (128, "re-estimated, plain, fp32"), (128, "re-estimated, plain, bf16"),
        (128, "re-estimated, augmented, fp32"), (128, "re-estimated, augmented, bf16")]
    assert len(twins) == 8 and {t["samples"] for t in twins[4:]} == {256}
    assert all(len(t["fp32_eval"]) == len(t["bf16_eval"]) == 2 for t in twins)
    assert all(0.0 <= a <= 1.0 for r in results["rows"] for a in r["fp32_eval"] + r["bf16_eval"])
    assert 0.0 < results["fraction_of_fp32_bits"] < 1.0
    # One epoch (25 images a class, batches of 64, the last dropped: 3 steps) of a three-epoch schedule.
    assert (results["steps"], results["epochs"], results["schedule_epochs"]) == (3, 1, 3)
    fixed = load("bench_bn_sources").main(["--smoke", "--epochs", "1", "--shuffles", "1", "--zip", str(CIFAR),
                                            "--run", "bits:2"])
    assert fixed["schedule_epochs"] == 1 and fixed["steps"] == 3
    with pytest.raises(ValueError, match="'fp32'"):
        load("bench_bn_sources").main(["--smoke", "--zip", str(CIFAR), "--run", "fp32"])
    with pytest.raises(ValueError, match="`--schedule-epochs` must be at least --epochs"):
        load("bench_bn_sources").main(["--smoke", "--zip", str(CIFAR), "--epochs", "2", "--schedule-epochs", "1"])


def test_cifar_diffq_smoke(tmp_path, capsys) -> None:
    if not CIFAR.exists():
        pytest.skip(f"no {CIFAR}")
    pytest.importorskip("PIL")
    pytest.importorskip("diffq")
    fp32, diffq = load("bench_cifar").main(["--smoke", "--zip", str(CIFAR), "--runs", "fp32", "diffq:10",
                                            "--probe-images", "100"])["runs"]
    # DiffQ's packed file: smaller than fp32 (at least 2 bits a weight), read as the file's share of fp32 bytes.
    assert 0 < diffq["bytes"] < fp32["bytes"] and diffq["fraction_of_fp32_bits"] == diffq["bytes"] / fp32["bytes"]
    assert 0.0 <= diffq["accuracy"] <= 1.0 and diffq["steps"] == fp32["steps"]
    assert "DiffQ penalty 10" in capsys.readouterr().out


def test_cifar_cache_is_renamed_into_place(tmp_path, monkeypatch) -> None:
    """The decoded split lands under its final name whole: no partial file is left, a second call only reads."""
    bench = load("bench_cifar")
    images, labels = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3), np.array([3, 7])
    decoded = []
    monkeypatch.setattr(bench, "decode", lambda zip_path, split: decoded.append(split) or (images, labels))
    for _ in range(2):
        x, y = bench.cached(tmp_path / "absent.zip", tmp_path / "cache", "test")
        np.testing.assert_array_equal(x, images)
        np.testing.assert_array_equal(y, labels)
    assert decoded == ["test"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"cifar10jpeg_test_{a}.npy" for a in "xy"]
    # Interrupted before the rename (a run beside it would be reading now): nothing under the final names.
    monkeypatch.setattr(bench.os, "replace", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        bench.cached(tmp_path / "absent.zip", tmp_path / "other", "train")
    assert not list((tmp_path / "other").iterdir())  # nor the unfinished copy


def test_cifar_augmentation_is_the_training_one() -> None:
    """The same flip and crop with the same generator; shape kept; pixels come from the padded image."""
    augment = load("bench_cifar").augment
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    first, second = (augment(x, torch.Generator().manual_seed(7)) for _ in range(2))
    assert first.shape == x.shape and torch.equal(first, second)
    assert any(not torch.equal(augment(x, torch.Generator().manual_seed(s)), x) for s in range(10))
    assert set(first.unique().tolist()) <= set(x.unique().tolist())  # reflect padding repeats pixels, adds none


def test_cifar_seed_means_average_each_label_over_its_seeds(tmp_path, capsys) -> None:
    def run(kind, value, seed, accuracy, bytes_, options=None):
        return dict(kind=kind, value=value, options=options or {}, seed=seed, accuracy=accuracy, bytes=bytes_,
                    fraction_of_fp32_bits=bytes_ / 1000, seconds=10.0 * (seed + 1), epochs=[])
    seed0 = [run("fp32", None, 0, 0.86, 1000), run("target", "5%", 0, 0.84, 50, {"initial_bits": 2.0})]
    seed1 = [run("fp32", None, 1, 0.88, 1000), run("target", "5%", 1, 0.80, 52, {"initial_bits": 2.0})]
    seed1.append(run("bits", 2.0, 1, 0.85, 70))
    for seed, rows in enumerate((seed0, seed1)):
        (tmp_path / f"s{seed}.json").write_text(json.dumps({"setting": {"name": "test"}, "runs": rows}))
    main = load("bench_cifar").main
    fp32, target, fixed = main(["--combine", str(tmp_path / "s0.json"), str(tmp_path / "s1.json"), "--mean",
                                "--plot", str(tmp_path / "means.png")])["runs"]
    assert fp32["accuracy"] == pytest.approx(0.87) and fp32["seed_accuracies"] == [0.86, 0.88]
    assert target["accuracy"] == pytest.approx(0.82) and target["bytes"] == 51 and target["seconds"] == 15.0
    assert target["fraction_of_fp32_bits"] == pytest.approx(0.051) and "seed" not in target
    assert fixed["seed_accuracies"] == [0.85]  # a label one seed ran stays a one-seed point
    out = capsys.readouterr().out
    assert "SelfCompress target 5%, from 2 bits" in out and "-5.00" in out and "80.00%-84.00%" in out
    assert (tmp_path / "means.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        main(["--mean"])
    assert "--mean averages the runs of --combine" in capsys.readouterr().err


def test_cifar_run_entries_are_checked() -> None:
    parse_run = load("bench_cifar").parse_run
    assert parse_run("target:5%") == ("target", "5%", {}) and parse_run("bits:4") == ("bits", 4.0, {})
    assert parse_run("target:5%,initial_bits=2,bits_lr=0.05") == ("target", "5%", {"initial_bits": 2.0,
                                                                                  "bits_lr": 0.05})
    assert parse_run("target:2%,bn_samples=4096")[2] == {"bn_samples": 4096}  # an int, as the callback wants
    assert isinstance(parse_run("target:2%,bn_samples=4096")[2]["bn_samples"], int)
    assert parse_run("diffq:10") == ("diffq", 10.0, {})
    assert parse_run("bits:1,levels=signs") == ("bits", 1.0, {"levels": "signs"})
    assert load("bench_cifar").compressor(*parse_run("bits:1,levels=signs")).levels == "signs"
    assert parse_run("target:2%,levels=signs")[2] == {"levels": "signs"}
    assert parse_run("target:5%,exclude=net.0,output_min_bits=8")[2] == {"exclude": "net.0", "output_min_bits": 8.0}
    callback = load("bench_cifar").compressor(*parse_run("target:5%,exclude=net.0"))
    assert callback.exclude_names == ("net.0",)  # one pattern, not its characters
    for bad in ("gama:0.1", "bits:4,initial_bits=2", "target:5%,initial_bit=2", "target:5%,initial_bits=two",
                "diffq:10,initial_bits=2", "target:2%,levels=sign"):
        with pytest.raises(ValueError, match=repr(bad)):
            parse_run(bad)


def test_cost_smoke(tmp_path, capsys) -> None:
    results = run("bench_cost", tmp_path, "--data-dir", str(MNIST))
    check_outputs(tmp_path, capsys, "cost")
    assert all(finite(v) and v > 0 for v in results["step_seconds"].values())
    assert finite(results["step_ratio"]) and results["finalize_seconds"] > 0
    assert results["save_seconds"] is None or results["save_bytes"] > 0
    for name in ("fp32", "finalized"):
        assert all(finite(v) and v > 0 for v in results["latency_seconds"][name].values())


def test_pareto_averages_points_over_seeds() -> None:
    averaged = load("bench_pareto").averaged
    seed0 = [dict(method="fp32", config="", seed=0, accuracy=0.98, file_bytes=400, params=10, seconds=2.0)]
    seed1 = [dict(method="fp32", config="", seed=1, accuracy=0.99, file_bytes=401, params=10, seconds=4.0)]
    seed0.append(dict(method="diffq", config="penalty 3", seed=0, accuracy=0.5, file_bytes=100, params=7, seconds=1.0))
    seed1.append(dict(method="diffq", config="penalty 3", seed=1, accuracy=0.7, file_bytes=104, params=8, seconds=1.0))
    fp32, diffq = averaged([seed0, seed1])
    assert fp32["accuracy"] == pytest.approx(0.985) and fp32["file_bytes"] == 400 and fp32["seconds"] == 3.0
    assert fp32["seed_accuracies"] == [0.98, 0.99] and "seed" not in fp32
    assert diffq["method"] == "diffq" and diffq["config"] == "penalty 3"
    assert diffq["accuracy"] == pytest.approx(0.6) and diffq["file_bytes"] == 102 and diffq["params"] == 8
    with pytest.raises(ValueError):
        averaged([seed0, seed1[:1]])  # a seed with a point missing


def test_pareto_combines_seeds_from_several_files(tmp_path, capsys) -> None:
    setting = dict(name="short (CPU)", epochs=2, batch_size=128, test_subset=None)

    def out(seed: int, ours: float, qat: float) -> Path:
        rows = [
            dict(method="fp32", config="", seed=seed, steps=9, accuracy=0.99, file_bytes=400, params=10, seconds=1.0),
            dict(method="selfcompress", config="gamma 0.01", seed=seed, steps=9, accuracy=ours, file_bytes=50,
                 params=5, seconds=1.0),
            dict(method="fixed-bit QAT", config="2 bits", seed=seed, steps=9, accuracy=qat, file_bytes=60,
                 params=10, seconds=1.0),
        ]
        path = tmp_path / f"seed{seed}.json"
        path.write_text(json.dumps({"setting": {**setting, "seeds": [seed]}, "seed_runs": rows}))
        return path

    # Seed 0 alone would miss the QAT point; over both seeds SelfCompress is ahead (0.95 against 0.94).
    files = [str(out(0, 0.92, 0.93)), str(out(1, 0.98, 0.95))]
    results = load("bench_pareto").main(["--combine", *files, "--out", str(tmp_path / "combined.json")])
    fp32, ours, qat = results["runs"]
    assert results["setting"]["seeds"] == [0, 1] and ours["seed_accuracies"] == [0.92, 0.98]
    assert ours["accuracy"] == pytest.approx(0.95) and qat["accuracy"] == pytest.approx(0.94)
    assert qat["matched"] and results["matched"] == 1
    assert "peer points matched: 1 of 1" in capsys.readouterr().out
    assert json.loads((tmp_path / "combined.json").read_text())["matched"] == 1

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"setting": {**setting, "epochs": 3, "seeds": [2]}, "seed_runs": []}))
    with pytest.raises(ValueError, match="same settings"):
        load("bench_pareto").main(["--combine", files[0], str(other)])
