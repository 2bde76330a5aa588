"""Checkpoints: atomic saving, exact resumption (also after a real SIGKILL), refusal of the wrong ones,
and same-seed reproducibility."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import deap_quant as dq
from deap_quant import evolve, quantize
from deap_quant.checkpoint import (
    CHECKPOINT_FILE,
    PREVIOUS_FILE,
    CheckpointError,
    capture_rng,
    load_checkpoint,
    model_fingerprint,
    restore_rng,
    save_checkpoint,
)
from deap_quant.cli import main

from .conftest import make_tiny_model

OPTIONS = dict(mu=5, lambda_=8, ngen=5, init_genes=3, seed=3, progress=False)


class Interrupt(Exception):
    """Raised by a callback to stop a run the hard way, like a crash."""


def interrupt_at(generation: int):
    def callback(state):
        if state["gen"] == generation:
            raise Interrupt
    return callback


def without_seconds(logbook) -> list[dict]:
    """The logbook without its wall-time column (the only column that differs between two runs)."""
    return [{key: value for key, value in record.items() if key != "seconds"} for record in logbook]


def individuals(collection) -> list[tuple]:
    return [(list(ind), ind.fitness.wvalues) for ind in collection]


def assert_same_run(a: dq.EvolutionResult, b: dq.EvolutionResult) -> None:
    assert individuals(a.hall_of_fame) == individuals(b.hall_of_fame)
    assert individuals(a.population) == individuals(b.population)
    assert without_seconds(a.logbook) == without_seconds(b.logbook)
    assert a.evaluations == b.evaluations
    assert a.best == b.best and a.baseline == b.baseline and a.hall_of_fame_scores == b.hall_of_fame_scores


@pytest.fixture
def qmodel():
    return quantize(make_tiny_model(), bits=2)


@pytest.mark.parametrize("algorithm", ["mu+lambda", "mu,lambda", "simple", "nsga2"])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(qmodel, tiny_data, tmp_path, algorithm):
    options = {**OPTIONS, "algorithm": algorithm}
    full = evolve(qmodel, tiny_data, tiny_data, **options)
    with pytest.raises(Interrupt):
        evolve(qmodel, tiny_data, tiny_data, checkpoint=tmp_path, checkpoint_every=2, callback=interrupt_at(3),
               **options)
    assert load_checkpoint(tmp_path).generation == 2  # every 2nd generation; generation 3 never completed
    # Scramble every global generator: resuming must not depend on them.
    random.seed(999)
    np.random.seed(999)
    torch.manual_seed(999)
    resumed = evolve(qmodel, tiny_data, tiny_data, resume=tmp_path, progress=False)
    assert_same_run(resumed, full)
    assert resumed.details["resumed_from_generation"] == 2
    assert resumed.details.get("pareto_front") == full.details.get("pareto_front")
    final = load_checkpoint(tmp_path)
    assert final.generation == OPTIONS["ngen"] and final.finished


def test_resuming_a_finished_run_reproduces_it_and_raising_ngen_extends_it(qmodel, tiny_data, tmp_path):
    short = evolve(qmodel, tiny_data, tiny_data, checkpoint=tmp_path, **OPTIONS)
    again = evolve(qmodel, tiny_data, tiny_data, resume=tmp_path, progress=False)
    assert_same_run(again, short)
    longer = evolve(qmodel, tiny_data, tiny_data, **{**OPTIONS, "ngen": OPTIONS["ngen"] + 3})
    extended = evolve(qmodel, tiny_data, tiny_data, resume=tmp_path, ngen=OPTIONS["ngen"] + 3, progress=False)
    assert_same_run(extended, longer)


def test_a_run_stopped_by_its_callback_stays_stopped_when_resumed(qmodel, tiny_data, tmp_path):
    stopped = evolve(qmodel, tiny_data, tiny_data, checkpoint=tmp_path, callback=lambda s: s["gen"] == 3, **OPTIONS)
    assert len(stopped.logbook) == 4
    resumed = evolve(qmodel, tiny_data, tiny_data, resume=tmp_path, progress=False)
    assert_same_run(resumed, stopped)


def test_checkpoints_are_written_every_k_generations_and_the_previous_one_is_kept(qmodel, tiny_data, tmp_path):
    seen = []

    def watch(state):
        if (tmp_path / CHECKPOINT_FILE).exists():
            seen.append(load_checkpoint(tmp_path / CHECKPOINT_FILE).generation)

    evolve(qmodel, tiny_data, tiny_data, checkpoint=tmp_path, checkpoint_every=3, callback=watch, **OPTIONS)
    # the callback runs before the checkpoint of its own generation is written
    assert seen == [0, 0, 0, 3, 3]
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE).generation == 5
    assert load_checkpoint(tmp_path / PREVIOUS_FILE).generation == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE, PREVIOUS_FILE]  # no temporary left


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(qmodel, tiny_data, tmp_path, monkeypatch):
    evolve(qmodel, tiny_data, tiny_data, checkpoint=tmp_path, **{**OPTIONS, "ngen": 2})
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()
    checkpoint = load_checkpoint(tmp_path)

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, checkpoint)
    monkeypatch.undo()
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE, PREVIOUS_FILE]


def test_after_a_crash_between_the_two_renames_the_previous_checkpoint_is_used(qmodel, tiny_data, tmp_path):
    evolve(qmodel, tiny_data, tiny_data, checkpoint=tmp_path, **{**OPTIONS, "ngen": 3})
    (tmp_path / CHECKPOINT_FILE).rename(tmp_path / PREVIOUS_FILE)  # the state right between the renames
    assert load_checkpoint(tmp_path).generation == 3
    resumed = evolve(qmodel, tiny_data, tiny_data, resume=tmp_path, progress=False)
    assert_same_run(resumed, evolve(qmodel, tiny_data, tiny_data, **{**OPTIONS, "ngen": 3}))


def test_rng_states_round_trip_through_json():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random()
    np.random.normal()  # leaves a cached Gaussian in NumPy's state
    state = json.loads(json.dumps(capture_rng()))
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    restore_rng(state)
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_a_checkpoint_is_a_verified_json_document_with_everything_needed(qmodel, tiny_data, tmp_path):
    seen = {}
    evolve(qmodel, tiny_data, tiny_data, checkpoint=tmp_path, callback=lambda s: seen.update(
        population=individuals(s["population"]), hall_of_fame=individuals(s["hall_of_fame"])), **OPTIONS)
    header, payload = (tmp_path / CHECKPOINT_FILE).read_bytes().split(b"\n", 1)
    assert header.startswith(b"DEAP-QUANT-CHECKPOINT 1 ")
    content = json.loads(payload)
    assert {"generation", "config", "population", "hall_of_fame", "logbook", "rng", "library", "model",
            "evaluations"} <= set(content)
    assert set(content["rng"]) == {"python", "numpy", "torch"}
    assert content["config"]["seed"] == 3 and content["model"]["quantization"]["bits"] == 2
    checkpoint = load_checkpoint(tmp_path)
    # fitness values survive bit for bit (JSON writes the shortest repr that reads back exactly)
    assert [(e["genes"], tuple(e["wvalues"])) for e in checkpoint.population] == \
        [([list(g) for g in genes], wvalues) for genes, wvalues in seen["population"]]
    assert [(e["genes"], tuple(e["wvalues"])) for e in checkpoint.hall_of_fame] == \
        [([list(g) for g in genes], wvalues) for genes, wvalues in seen["hall_of_fame"]]


def test_resume_refuses_a_different_model_bit_width_or_version(qmodel, tiny_data, tmp_path, monkeypatch):
    evolve(qmodel, tiny_data, tiny_data, checkpoint=tmp_path, **{**OPTIONS, "ngen": 1})
    with pytest.raises(CheckpointError, match="was made with bits=2; this model is quantized with bits=3"):
        evolve(quantize(make_tiny_model(), bits=3), tiny_data, resume=tmp_path)
    with pytest.raises(CheckpointError, match="belongs to a different model .same layer shapes"):
        evolve(quantize(make_tiny_model(seed=5), bits=2), tiny_data, resume=tmp_path)
    with pytest.raises(CheckpointError, match=r"belongs to a different model \(layer 1 fc \(4, 64\), this model"):
        evolve(quantize(make_tiny_model(classes=3), bits=2), tiny_data, resume=tmp_path)
    monkeypatch.setattr(dq, "__version__", "9.9.9")
    with pytest.raises(CheckpointError, match="was written by deap_quant .*; this is deap_quant 9.9.9"):
        evolve(qmodel, tiny_data, resume=tmp_path)


def test_resume_refuses_a_changed_configuration_but_accepts_the_same(qmodel, tiny_data, tmp_path):
    evolve(qmodel, tiny_data, tiny_data, checkpoint=tmp_path, **{**OPTIONS, "ngen": 2})
    with pytest.raises(CheckpointError, match="was made with mu=5, not 8; only ngen may change"):
        evolve(qmodel, tiny_data, resume=tmp_path, mu=8)
    with pytest.raises(CheckpointError, match="ngen=1 is not valid .* already at generation 2"):
        evolve(qmodel, tiny_data, resume=tmp_path, ngen=1)
    config = dq.EvolutionConfig(**{k: v for k, v in OPTIONS.items() if k != "progress"})
    evolve(qmodel, tiny_data, resume=tmp_path, config=config, progress=False)  # same settings, more generations


def test_a_new_run_refuses_to_overwrite_an_existing_checkpoint(qmodel, tiny_data, tmp_path):
    evolve(qmodel, tiny_data, tiny_data, checkpoint=tmp_path, **{**OPTIONS, "ngen": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        evolve(qmodel, tiny_data, tiny_data, checkpoint=tmp_path, **OPTIONS)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_same_seed_gives_the_same_results_and_the_json_records_versions_and_seed(qmodel, tiny_data):
    first = evolve(qmodel, tiny_data, tiny_data, **OPTIONS)
    second = evolve(qmodel, tiny_data, tiny_data, **OPTIONS)
    assert_same_run(first, second)
    other = evolve(qmodel, tiny_data, tiny_data, **{**OPTIONS, "seed": 4})
    assert individuals(other.population) != individuals(first.population)
    content = json.loads(json.dumps(first.to_dict(), default=str))
    assert content["config"]["seed"] == 3
    assert {"torch", "deap", "deap_quant"} <= set(content["versions"])
    assert content["versions"]["torch"] == torch.__version__ and content["versions"]["deap_quant"] == dq.__version__
    assert content["details"]["torch_threads"] == torch.get_num_threads()


# ---------------------------------------------------------------------------------------- the real thing
RUN = ["--mu", "5", "--lambda", "5", "--ngen", "8", "--seed", "5", "--init-genes", "4", "--threads", "1",
       "--no-progress"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "deap_quant.cli", *args]


def comparable(results: dict) -> dict:
    keys = ("config", "baseline", "best", "hall_of_fame", "evaluations", "float", "metric")
    content = {key: results[key] for key in keys}
    content["config"] = {k: v for k, v in content["config"].items() if k != "run"}
    content["logbook"] = without_seconds(results["logbook"])
    return content


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_result(tmp_path, digits_zoo):
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(cli("run", *RUN, "--out", str(full)), check=True, capture_output=True, timeout=300)

    process = subprocess.Popen(cli("run", *RUN, "--out", str(killed), "--checkpoint-every", "1"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if (killed / CHECKPOINT_FILE).exists() and load_checkpoint(killed).generation >= 2:
                break
            time.sleep(0.01)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    interrupted_at = load_checkpoint(killed).generation
    assert 2 <= interrupted_at < 8 and not (killed / "results.json").exists()

    resumed = subprocess.run(cli("run", "--resume", str(killed), "--no-progress"), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((full / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert comparable(b) == comparable(a)
    assert b["details"]["resumed_from_generation"] >= interrupted_at  # it may have saved once more before dying
    assert b["config"]["run"]["seed"] == 5 and b["details"]["torch_threads"] == 1


def test_cli_resume_refuses_changed_settings_and_leaves_the_folder_alone(tmp_path, digits_zoo, capsys):
    out = tmp_path / "run"
    assert main(["run", "--mu", "3", "--lambda", "3", "--ngen", "1", "--out", str(out), "--checkpoint-every", "1",
                 "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--bits", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["deap-quant: error: --bits 3 differs from the checkpointed run's 2; drop it when resuming "
                   "(only --ngen may be raised)"]
    assert main(["run", "--out", str(out), "--checkpoint-every", "1", "--no-progress"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _flipped_start(weight: int):
    """A start rounding: nearest with one weight of the first layer moved up a level (or down at the top)."""
    def start(qmodel):
        states = [qmodel.base_states(layer).clone() for layer in range(len(qmodel.layers))]
        flat = states[0].view(-1)
        flat[weight] = flat[weight] + 1 if int(flat[weight]) < qmodel.layer_table()[0].n_levels - 1 else flat[weight] - 1
        return states
    return start


def test_resume_refuses_another_start_metric_or_validation_data(qmodel, tiny_data, tmp_path):
    options = {**OPTIONS, "ngen": 3, "start": "stochastic", "start_options": {"draws": 3}}
    full = evolve(quantize(make_tiny_model(), bits=2), tiny_data, tiny_data, **options)
    evolve(quantize(make_tiny_model(), bits=2), tiny_data, tiny_data, checkpoint=tmp_path,
           **{**options, "ngen": 1})
    search = load_checkpoint(tmp_path).search
    assert search["start"] == {"name": "stochastic", "options": {"draws": 3}}
    assert search["metric"] == {"name": "accuracy", "kind": "Accuracy"}
    assert len(search["val_sha256"]) == 64 and len(search["base_sha256"]) == 64
    fresh = lambda: quantize(make_tiny_model(), bits=2)  # noqa: E731
    with pytest.raises(CheckpointError, match=r"start='stochastic' \(options \{'draws': 3\}\); this run has "
                                              r"start=None \(options \{\}\)"):
        evolve(fresh(), tiny_data, resume=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"options \{'draws': 3\}\); this run has start='stochastic' "
                                              r"\(options \{'draws': 4\}\)"):
        evolve(fresh(), tiny_data, resume=tmp_path, start="stochastic", start_options={"draws": 4}, progress=False)
    with pytest.raises(CheckpointError, match="metric 'accuracy' .Accuracy.; this run scores with 'loss'"):
        evolve(fresh(), tiny_data, resume=tmp_path, start="stochastic", start_options={"draws": 3}, metric="loss",
               progress=False)
    inputs, targets = tiny_data
    with pytest.raises(CheckpointError, match="on other validation data"):
        evolve(fresh(), (inputs, (targets + 1) % 4), resume=tmp_path, start="stochastic",
               start_options={"draws": 3}, progress=False)
    assert load_checkpoint(tmp_path).generation == 1  # nothing was written by the refused resumes
    resumed = evolve(fresh(), tiny_data, tiny_data, resume=tmp_path, ngen=3, start="stochastic",
                     start_options={"draws": 3}, progress=False)
    assert_same_run(resumed, full)


def test_resume_refuses_a_start_that_rounds_differently_under_the_same_name(tiny_data, tmp_path):
    evolve(quantize(make_tiny_model(), bits=2), tiny_data, checkpoint=tmp_path, start=_flipped_start(0),
           **{**OPTIONS, "ngen": 1})
    given = quantize(make_tiny_model(), bits=2)
    before = model_fingerprint(given)
    with pytest.raises(CheckpointError, match="start rounding differs"):
        evolve(given, tiny_data, resume=tmp_path, start=_flipped_start(1), progress=False)
    assert model_fingerprint(given) == before  # a refused resume leaves the model as it was given
    resumed = evolve(given, tiny_data, resume=tmp_path, start=_flipped_start(0), progress=False)
    assert resumed.details["resumed_from_generation"] == 1
