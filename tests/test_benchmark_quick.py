"""Smoke test of benchmarks/eval_throughput.py --quick: structure and identity only, never speed."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_throughput.py"
KEYS = {"speedup_vs_naive", "speedup_vs_forward", "skipped_fraction", "cache_mb"}


@pytest.fixture(scope="module")
def benchmark():
    return runpy.run_path(str(BENCHMARK), run_name="eval_throughput")


def test_quick_run_writes_the_documented_json_and_finds_identical_results(benchmark, digits_zoo, tmp_path):
    threads = torch.get_num_threads()
    path = tmp_path / "figures" / "throughput.json"
    results = benchmark["main"](["--quick", "--quiet", "--json", str(path)])
    assert torch.get_num_threads() == threads  # the benchmark puts the thread setting back
    written = json.loads(path.read_text())
    assert written["identical"] is True and results["identical"] is True
    for model in ("digits_cnn", "resnet18"):
        figures = written[model]
        assert KEYS <= figures.keys()
        assert all(isinstance(figures[key], (int, float)) and figures[key] >= 0 for key in KEYS)
        assert 0.0 <= figures["skipped_fraction"] <= 1.0
        assert figures["identical"] is True and figures["fitness_check"]["missing"] == 0
        assert figures["evaluations"] == figures["fitness_check"]["compared"] > 0
        assert figures["cache_mb"] <= figures["cache_budget_mb"]
        bound = figures["reuse_bound"]  # replayed on the run's own genome stream
        assert bound["genomes"] == figures["evaluations"] and 0.0 < bound["work_fraction"] <= 1.0
        assert bound["speedup_bound"] == pytest.approx(1.0 / bound["work_fraction"])
    assert written["quick"] is True and written["machine"]["threads"] == 1


def test_bad_arguments_are_refused(benchmark, capsys):
    for argv, message in ((["--models", "vgg"], "--models"), (["--threads", "0"], "--threads"),
                          (["--batch-size", "0"], "--batch-size")):
        with pytest.raises(SystemExit) as error:
            benchmark["main"](argv)
        assert error.value.code == 2
        assert message in capsys.readouterr().err


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "models" / "cifar10-resnet20.th").is_file()
                    or not (SHARED / "cifar10" / "test.npz").is_file(),
                    reason=f"the shared real data ({SHARED}) is absent")
def test_real_table_quick_run_writes_the_documented_json(tmp_path):
    """benchmarks/real_table.py --quick on ResNet-20: the documented JSON, every grid, the search rows."""
    table = runpy.run_path(str(BENCHMARK.with_name("real_table.py")), run_name="real_table")
    path = tmp_path / "real.json"
    table["main"](["--quick", "--models", "cifar10-resnet20", "--bits", "3", "--only", "es-from-nearest",
                   "--fast-ngen", "0", "--json", str(path)])
    written = json.loads(path.read_text())["cifar10_resnet20"]
    assert written["float"]["test"] > 0.9  # the pretrained checkpoint's 91.7% on the official test set
    configs = [row["config"] for row in written["rows"] if "paired" not in row]
    assert configs == ["nearest-minmax", "nearest-mse-full", "nearest-mse-narrow", "nearest-mse-auto",
                       "nearest-kmeans", "es-from-nearest"]
    for row in written["rows"]:
        if "paired" not in row:
            assert {"config", "bits", "test_mean", "test_std", "seconds"} <= row.keys() and row["bits"] == 3
            assert 0.0 <= row["test_mean"] <= 1.0
    search = written["rows"][5]
    assert search["evals_per_second"] > 0 and search["val_mean"] >= written["rows"][3]["val_mean"]
    assert 0 < search["search_seconds"] <= search["seconds"]  # evaluations/s count the search's own time


def test_deploy_table_quick_run_checks_every_row_in_onnxruntime(digits_zoo, tmp_path):
    """benchmarks/deploy_table.py --quick on digits-cnn: W4A8 rows, each with its onnxruntime test score."""
    pytest.importorskip("onnxruntime")
    table = runpy.run_path(str(BENCHMARK.with_name("deploy_table.py")), run_name="deploy_table")
    path = tmp_path / "deploy.json"
    table["main"](["--quick", "--quiet", "--models", "digits-cnn", "--bits", "4", "--json", str(path)])
    written = json.loads(path.read_text())["digits_cnn"]
    rows = written["by_bits"]["W4A8"]["rows"]
    assert [row["config"] for row in rows] == ["nearest", "adaround", "es-from-adaround"]
    for row in rows:
        assert 0.0 <= row["test"] <= 1.0 and 0.0 <= row["onnx_test"] <= 1.0
        assert abs(row["onnx_minus_deap_quant_samples"]) <= 1
    assert {entry["config"] for entry in written["by_bits"]["W4A8"]["summary"]} == set(table["ROWS"])


def test_reuse_bound_quick_run_replays_the_recorded_stream(digits_zoo, tmp_path):
    """benchmarks/reuse_bound.py --quick on digits-cnn: one row per operator set, a bound of at least 1x."""
    script = runpy.run_path(str(BENCHMARK.with_name("reuse_bound.py")), run_name="reuse_bound")
    path = tmp_path / "bound.json"
    figures = script["main"](["--quick", "--models", "digits_cnn", "--json", str(path)])
    rows = json.loads(path.read_text())["rows"]
    assert rows == json.loads(json.dumps(figures["rows"]))
    assert [(row["layer_choice"], row["sampler"]) for row in rows] == [("uniform", "residual"), ("size", "uniform")]
    for row in rows:
        assert row["genomes"] == 12 and len(row["stage_seconds"]) == row["stages"] > 1  # mu=4 + lambda=8
        assert 0.0 < row["work_fraction"] <= 1.0 and row["speedup_bound"] >= 1.0
        assert 0.0 < row["work_fraction_flops"] <= 1.0 and len(row["stage_flops"]) == row["stages"]
    with pytest.raises(SystemExit):
        script["main"](["--operators", "size:gaussian"])


def test_deploy_table_quick_run_scores_both_onnxruntime_levels(digits_zoo, tmp_path):
    """Each row: the reproduction level (optimizations disabled) and onnxruntime's default level, apart."""
    pytest.importorskip("onnxruntime")
    table = runpy.run_path(str(BENCHMARK.with_name("deploy_table.py")), run_name="deploy_table")
    path = tmp_path / "deploy.json"
    table["main"](["--quick", "--quiet", "--models", "digits-cnn", "--bits", "4", "--json", str(path)])
    written = json.loads(path.read_text())["digits_cnn"]["by_bits"]["W4A8"]
    n_test = len(digits_zoo.data.test[1])
    for row in written["rows"]:
        assert 0.0 <= row["onnx_default_test"] <= 1.0
        assert row["onnx_default_minus_deap_quant_samples"] == round((row["onnx_default_test"] - row["test"]) * n_test)
        assert row["onnx_minus_deap_quant_samples"] == round((row["onnx_test"] - row["test"]) * n_test)
    for entry in written["summary"]:
        assert {"onnx_test_mean", "onnx_default_test_mean", "onnx_max_abs_diff_samples",
                "onnx_default_max_abs_diff_samples"} <= entry.keys()


def test_onnx_agreement_on_digits_reproduces_exactly_at_the_check_level(digits_zoo, tmp_path):
    """benchmarks/onnx_agreement.py on digits-cnn at W4A4: every level reported; with optimizations disabled
    (the export's check) onnxruntime gives deap_quant's logits."""
    pytest.importorskip("onnxruntime")
    script = runpy.run_path(str(BENCHMARK.with_name("onnx_agreement.py")), run_name="onnx_agreement")
    path = tmp_path / "agreement.json"
    figures = script["main"](["--model", "digits-cnn", "--act-bits", "4", "--genes", "5", "--images", "120",
                              "--json", str(path)])
    written = json.loads(path.read_text())
    assert written == json.loads(json.dumps(figures))
    assert written["check_level"] == "disabled" and written["default_level"] == "all"
    assert set(written["levels"]) == {"disabled", "basic", "extended", "all"} and written["images"] == 120
    exact = written["levels"]["disabled"]
    assert exact["predictions_differing"] == 0 and exact["correct_difference"] == 0
    assert exact["max_logit_difference"] <= 1e-4
    for entry in written["levels"].values():
        assert 0 <= entry["predictions_differing"] <= 120 and entry["max_logit_difference"] >= 0


def test_gpu_check_compares_devices_per_evaluation(tiny_model, tiny_data):
    """benchmarks/gpu_check.py's runs: the CPU/device ratio is per evaluation (the search's time over all
    its evaluations, the mu initial ones included), so runs of different lengths compare the same work."""
    from types import SimpleNamespace

    script = runpy.run_path(str(BENCHMARK.with_name("gpu_check.py")), run_name="gpu_check")
    zoo = SimpleNamespace(model=tiny_model, data=SimpleNamespace(val=tiny_data, test=tiny_data))
    runs = [script["_run"](zoo, "cpu", ngen, True) for ngen in (1, 3)]
    for run in runs:
        assert "seconds_per_generation" not in run
        assert run["evaluations"] == 4 + 8 * run["ngen"]  # --quick: mu=4 initial ones, then lambda=8 a generation
        assert run["seconds_per_evaluation"] == pytest.approx(run["search_seconds"] / run["evaluations"])
    assert script["per_evaluation_ratio"](runs[1], runs[0]) == pytest.approx(
        runs[1]["seconds_per_evaluation"] / runs[0]["seconds_per_evaluation"])
