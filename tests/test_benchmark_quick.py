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
    assert written["quick"] is True and written["machine"]["threads"] == 1


def test_bad_arguments_are_refused(benchmark, capsys):
    for argv, message in ((["--models", "vgg"], "--models"), (["--threads", "0"], "--threads"),
                          (["--batch-size", "0"], "--batch-size")):
        with pytest.raises(SystemExit) as error:
            benchmark["main"](argv)
        assert error.value.code == 2
        assert message in capsys.readouterr().err
