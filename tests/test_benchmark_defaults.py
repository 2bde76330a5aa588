"""Smoke test of benchmarks/defaults_check.py --quick: the JSON it writes, and that it never reads the test split."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import deap_quant as dq

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "defaults_check.py"
ROW_KEYS = {"bits", "candidate", "runs", "selection_mean", "selection_std", "search_mean", "search_std",
            "selection_by_data_seed", "genes", "seconds", "vs_default"}
RUN_KEYS = {"candidate", "bits", "data_seed", "seed", "search", "selection", "genes", "evaluations", "seconds"}


@pytest.fixture
def benchmark():
    spec = importlib.util.spec_from_file_location("defaults_check", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RecordingPair(tuple):
    """An ``(inputs, targets)`` pair that counts every way of reading it."""

    reads = 0

    def __iter__(self):
        RecordingPair.reads += 1
        return super().__iter__()

    def __getitem__(self, item):
        RecordingPair.reads += 1
        return super().__getitem__(item)

    def __len__(self):
        RecordingPair.reads += 1
        return super().__len__()


class RecordingSplits:
    """The zoo's splits with every access to ``.test`` counted; its test pair counts reads too."""

    def __init__(self, splits):
        self._splits = dataclasses.replace(splits, test=RecordingPair(splits.test))
        self.test_accesses = 0

    @property
    def test(self):
        self.test_accesses += 1
        return self._splits.test

    def __getattr__(self, name):
        return getattr(self._splits, name)


@pytest.fixture
def guarded_zoo(digits_zoo):
    zoo = dataclasses.replace(digits_zoo, data=RecordingSplits(digits_zoo.data))
    RecordingPair.reads = 0
    return zoo


def test_the_guard_notices_a_read_of_the_test_split(guarded_zoo):
    """The recording objects do catch a search that uses test (so the test below can fail)."""
    qmodel = dq.quantize(guarded_zoo.model, bits=2, scale_method="mse")
    dq.evolve(qmodel, guarded_zoo.data.val, guarded_zoo.data.test, mu=2, lambda_=2, ngen=0, progress=False)
    assert guarded_zoo.data.test_accesses == 1 and RecordingPair.reads > 0


def test_quick_run_writes_the_json_and_never_reads_the_test_split(benchmark, guarded_zoo, monkeypatch, tmp_path):
    loads, calls = [], []
    real_evolve = dq.evolve

    def load_model(name, *, seed=0, **options):
        loads.append((name, seed))
        assert seed == 0  # the quick run uses data seed 0 only: the session's trained digits-cnn
        return guarded_zoo

    def evolve(qmodel, val=None, test=None, **options):
        calls.append((val, test))
        return real_evolve(qmodel, val=val, test=test, **options)

    monkeypatch.setattr(benchmark, "load_model", load_model)
    monkeypatch.setattr(benchmark.dq, "evolve", evolve)
    threads = torch.get_num_threads()
    path = tmp_path / "figures" / "defaults.json"
    results = benchmark.main(["--quick", "--quiet", "--ngen", "1", "--mu", "2", "--lambda", "4",
                              "--json", str(path)])

    assert guarded_zoo.data.test_accesses == 0 and RecordingPair.reads == 0  # the test split was never read
    assert torch.get_num_threads() == threads  # the thread setting is put back
    assert loads == [("digits-cnn", 0)]
    written = json.loads(path.read_text())
    assert written["quick"] is True and written["protocol"]["test_split"] == "not used"
    names = list(written["candidates"])
    assert names[0] == "default" and written["candidates"]["default"] == {}
    assert {"layer_choice=size", "sampler=uniform", "crossover=none", "init_genes=2", "init_genes=16"} <= set(names)
    assert written["candidates"]["crossover=none"] == {"crossover": None, "cxpb": 0.0, "mutpb": 1.0}
    assert written["current_defaults"]["layer_choice"] == dq.EvolutionConfig().layer_choice

    # one run per candidate (1 data seed x 1 evolution seed x 2 bits), each with both halves scored
    assert len(written["runs"]) == len(names) == len(calls)
    for run in written["runs"]:
        assert RUN_KEYS <= run.keys() and run["bits"] == 2
        assert 0.0 <= run["search"] <= 1.0 and 0.0 <= run["selection"] <= 1.0
    rows = written["rows"]
    assert {(row["bits"], row["candidate"]) for row in rows} == {(b, n) for b in (2, "all") for n in names}
    for row in rows:
        assert ROW_KEYS <= row.keys()
        assert (row["vs_default"] is None) == (row["candidate"] == "default")
    assert [choice["factor"] for choice in written["choices"]] == ["layer_choice", "sampler", "crossover", "init_genes"]
    for choice in written["choices"]:
        assert choice["winner"] in choice["selection_mean"] and choice["current"] in choice["selection_mean"]
        assert choice["changes_default"] == (choice["winner"] != choice["current"])
    assert results["rows"] == rows and results["choices"] == written["choices"]

    # the search and selection halves are a stratified cut of the validation split, disjoint
    val_inputs, val_targets = guarded_zoo.data.val
    for search, selection in calls:
        assert abs(len(search[1]) - len(selection[1])) <= 1
        assert len(search[1]) + len(selection[1]) == len(val_targets)
        pooled = torch.cat([search[0], selection[0]]).flatten(1)
        rows_val = val_inputs.flatten(1)
        assert sorted(map(tuple, pooled.tolist())) == sorted(map(tuple, rows_val.tolist()))
        counts = torch.bincount(selection[1], minlength=10) - torch.bincount(search[1], minlength=10)
        assert counts.abs().max() <= 1  # stratified by class
    baseline = written["baselines"][0]
    assert baseline["search_size"] + baseline["selection_size"] == len(val_targets)


def test_bad_arguments_are_refused(benchmark, capsys):
    for argv, message in ((["--seeds", "0"], "--seeds"), (["--threads", "0"], "--threads"),
                          (["--bits", "1"], "--bits"), (["--only", "nope"], "--only")):
        with pytest.raises(SystemExit) as error:
            benchmark.main(argv)
        assert error.value.code == 2
        assert message in capsys.readouterr().err
