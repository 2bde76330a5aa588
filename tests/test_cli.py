"""The command line end to end with a tiny budget, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from deap_quant.cli import main

TINY = ["--mu", "4", "--lambda", "6", "--ngen", "2", "--no-progress"]


def test_run_end_to_end_writes_results(tmp_path, digits_zoo, capsys):
    out = tmp_path / "run"
    assert main(["run", "--bits", "2", "--seed", "1", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "float" in printed and "nearest" in printed and "evolved" in printed and "evals/s" in printed
    content = json.loads((out / "results.json").read_text())
    for key in ("config", "baseline", "float", "best", "hall_of_fame", "evaluations", "seconds"):
        assert key in content
    assert {"val", "test"} <= set(content["baseline"]) and {"val", "test", "genes"} <= set(content["best"])
    assert content["config"]["quantization"]["bits"] == 2 and content["config"]["seed"] == 1
    assert (out / "logbook.csv").read_text().splitlines()[0].startswith("gen,nevals,evals,max")
    assert len((out / "logbook.csv").read_text().splitlines()) == 4
    assert json.loads((out / "best_genes.json").read_text())["genes"] == content["best"]["genes"]
    assert (out / "fitness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_with_a_saved_model_file(tmp_path, digits_zoo):
    path = tmp_path / "model.pt"
    torch.save(digits_zoo.model, path)
    out = tmp_path / "run"
    assert main(["run", "--model", str(path), "--dataset", "digits", "--out", str(out), *TINY]) == 0
    content = json.loads((out / "results.json").read_text())
    assert content["float"]["test"] == pytest.approx(digits_zoo.float_scores["test"])


def test_run_with_a_torchscript_file(tmp_path, digits_zoo):
    path = tmp_path / "model.ts"
    torch.jit.script(digits_zoo.model).save(str(path))
    assert main(["run", "--model", str(path), "--out", str(tmp_path / "run"), *TINY]) == 0
    content = json.loads((tmp_path / "run" / "results.json").read_text())
    assert content["float"]["test"] == pytest.approx(digits_zoo.float_scores["test"])  # the scripted model itself
    assert [layer["name"] for layer in content["details"]["layers"]] == ["conv1", "conv2", "conv3", "fc1", "fc2"]


@pytest.mark.parametrize("argv, message", [
    (["run", "--bits", "9"], "bits=9 is not valid; use an integer from 2 to 8"),
    (["run", "--mu", "x"], "argument --mu: 'x' is not an integer"),
    (["run", "--cxpb", "2"], "argument --cxpb: 2.0 is not valid; use a probability in [0, 1]"),
    (["run", "--scale-method", "p99"], "scale_method='p99' is not valid"),
    (["run", "--model", "no-such-model"], "is neither a zoo recipe"),
    (["run", "--algorithm", "mu,lambda", "--mu", "8", "--lambda", "4"], "mu=8 > lambda_=4 is not valid"),
    (["run", "--layers", "decoder*"], "matches no quantizable layer"),
    (["run", "--layer-choice", "largest"], "layer_choice='largest' is not valid"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_get_one_line_and_exit_2(tmp_path, digits_zoo, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "x")] if argv[0] == "run" else argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deap-quant: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_unwritable_output_is_refused_before_the_run(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["run", "--out", str(blocker), *TINY]) == 2
    assert "is a file" in capsys.readouterr().err


def test_console_script_exits_non_zero_without_traceback():
    out = subprocess.run([sys.executable, "-m", "deap_quant.cli", "run", "--bits", "1"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "bits=1 is not valid" in out.stderr


# ---------------------------------------------------------------------------------------- internal errors
@pytest.mark.parametrize("error, shown", [
    (KeyError("conv9"), "KeyError: 'conv9'"),
    (TypeError("unsupported operand type(s) for +: 'int' and 'str'"),
     "TypeError: unsupported operand type(s) for +: 'int' and 'str'"),
    (RuntimeError("shape '[2, 3]' is invalid\nfor input of size 5"), "RuntimeError: shape '[2, 3]' is invalid for input of size 5"),
    (AssertionError(), "AssertionError"),
])
def test_an_internal_error_gets_one_line_naming_its_type_and_exit_1(tmp_path, monkeypatch, capsys, error, shown):
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr("deap_quant.export.export", broken)
    assert main(["export", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.strip() == f"deap-quant: internal error: {shown} (run again with --debug for the traceback)"


@pytest.mark.parametrize("argv", [["--debug", "export", "{dir}"], ["export", "{dir}", "--debug"]])
def test_debug_shows_the_traceback_of_an_internal_error(tmp_path, monkeypatch, argv):
    def broken(*args, **kwargs):
        raise KeyError("conv9")

    monkeypatch.setattr("deap_quant.export.export", broken)
    with pytest.raises(KeyError, match="conv9"):
        main([arg.format(dir=tmp_path) for arg in argv])


def test_bad_input_prints_the_whole_message_not_only_its_first_argument(tmp_path, monkeypatch, capsys):
    def missing(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "weights.pt"))

    monkeypatch.setattr("deap_quant.export.export", missing)
    assert main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"deap-quant: error: [Errno 2] No such file or directory: '{tmp_path / 'weights.pt'}'\n"
    with pytest.raises(FileNotFoundError):  # --debug shows where bad input was refused too
        main(["export", str(tmp_path), "--debug"])


def test_debug_is_not_recorded_with_the_run(tmp_path, digits_zoo):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--debug", *TINY]) == 0
    assert "debug" not in json.loads((out / "results.json").read_text())["config"]["run"]


def test_range_and_mutation_only_settings_reach_the_run(tmp_path, digits_zoo):
    """--range picks the grid's levels; --crossover none mutates every offspring (no plain copies)."""
    out = tmp_path / "narrow"
    assert main(["run", "--range", "narrow", "--crossover", "none", "--out", str(out), *TINY]) == 0
    content = json.loads((out / "results.json").read_text())
    assert content["config"]["quantization"]["range"] == "narrow"
    assert all(layer["n_levels"] == 3 for layer in content["details"]["layers"])  # 2 bits, narrow: -1, 0, +1
    assert content["config"]["cxpb"] == 0.0 and content["config"]["mutpb"] == 1.0
    default = tmp_path / "default"
    assert main(["run", "--out", str(default), *TINY]) == 0
    content = json.loads((default / "results.json").read_text())
    assert content["config"]["quantization"]["range"] == "auto" and content["config"]["mutpb"] == 0.8
    assert all(layer["n_levels"] == 4 for layer in content["details"]["layers"])


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the options were checked")


@pytest.mark.parametrize("argv, message", [
    (["--cxpb", "0.5"], "--cxpb 0.5 + --mutpb 0.8 (mutpb's default with a crossover) = 1.3 is more than 1"),
    (["--cxpb", "0.5", "--algorithm", "nsga2"], "give --mutpb 0.5 or less"),
    (["--crossover", "none", "--cxpb", "0.7"], "--cxpb 0.7 needs a crossover, but --crossover is none"),
])
def test_evolution_flag_conflicts_are_explained_before_any_work(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr("deap_quant.cli._load_float_model", _no_model)
    assert main(["run", *argv, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deap-quant: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_crossover_none_with_cxpb_0_and_simple_with_a_large_cxpb_are_accepted(tmp_path, monkeypatch):
    class Loaded(Exception):
        pass

    def loaded(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr("deap_quant.cli._load_float_model", loaded)
    for argv in (["--crossover", "none", "--cxpb", "0"], ["--algorithm", "simple", "--cxpb", "0.5"]):
        with pytest.raises(Loaded):  # the options passed every check: the run went on to load the model
            main(["run", *argv, "--out", str(tmp_path / "run"), "--no-progress", "--debug"])


def test_resume_takes_typed_options_even_when_they_equal_the_parser_default(tmp_path, digits_zoo, capsys):
    """--ngen 30 (the default) on --resume is honoured, and --bits 2 (the default) against a 3-bit run is refused."""
    out = tmp_path / "run"
    small = ["--mu", "2", "--lambda", "2", "--init-genes", "1", "--no-progress", "--checkpoint-every", "1"]
    assert main(["run", "--ngen", "2", "--out", str(out), *small]) == 0
    assert main(["run", "--resume", str(out), "--ngen", "30", "--no-progress"]) == 0
    content = json.loads((out / "results.json").read_text())
    assert content["config"]["ngen"] == 30 and content["logbook"][-1]["gen"] == 30
    three = tmp_path / "three"
    assert main(["run", "--bits", "3", "--ngen", "1", "--out", str(three), *small]) == 0
    capsys.readouterr()
    assert main(["run", "--resume", str(three), "--bits", "2"]) == 2
    assert "--bits 2 differs from the checkpointed run's 3" in capsys.readouterr().err
