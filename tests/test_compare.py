"""Multi-configuration, multi-seed comparison: configurations, statistics, reports, CLI, example."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from deap_quant.cli import main as cli_main
from deap_quant.compare import (
    SUMMARY_KEYS,
    RunConfig,
    compare,
    default_config_path,
    holm,
    load_configs,
    paired_tests,
    pairwise_tests,
    redraw_split,
    summarize,
)
from deap_quant.data import Splits

ROOT = Path(__file__).resolve().parent.parent
TINY = {"evolution": {"mu": 4, "lambda_": 6, "ngen": 2}, "adaround": {"steps": 10, "samples": 32},
        "stochastic_draws": 2}



@pytest.fixture
def tiny_splits(tiny_model):
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(96, 1, 8, 8, generator=generator)
    targets = tiny_model(inputs).argmax(dim=1).detach()  # learnable labels: the float model is right
    flip = torch.rand(96, generator=generator) < 0.2
    targets = torch.where(flip, (targets + 1) % 4, targets)
    return Splits((inputs[:48], targets[:48]), (inputs[48:72], targets[48:72]), (inputs[72:], targets[72:]),
                  num_classes=4, name="tiny")


def test_shipped_configurations_cover_the_issue():
    configs, settings = load_configs()
    assert default_config_path().is_file()
    names = {c.name for c in configs}
    assert {"nearest-minmax", "nearest-mse", "stochastic", "adaround", "es-from-nearest", "es-from-adaround"} <= names
    evolving = [c for c in configs if c.kind == "evolve"]
    for config in evolving:  # every operator set is started from nearest-MSE and from AdaRound
        stem = config.name.rsplit("-from-", 1)[0]
        assert {f"{stem}-from-nearest", f"{stem}-from-adaround"} <= names
    assert {c.fitness for c in evolving} >= {"val", "teacher-kl", "val+teacher"}
    assert {c.evolution.get("algorithm", settings["evolution"]["algorithm"]) for c in evolving} >= {
        "mu+lambda", "mu,lambda", "simple", "nsga2"}
    assert {c.evolution.get("sampler", "uniform") for c in evolving} == {"uniform", "residual"}
    assert {c.evolution.get("layer_choice", settings["evolution"]["layer_choice"]) for c in evolving} == {"uniform", "size"}
    assert any(c.evolution.get("cxpb", 0) > 0 for c in evolving) and any("holdout" == c.select for c in evolving)
    setup = (ROOT / "setup.cfg").read_text()
    assert "configs/*.json" in setup


def test_run_config_validation():
    with pytest.raises(ValueError, match="fitness='labels'"):
        RunConfig("x", fitness="labels")
    with pytest.raises(ValueError, match="method=None"):
        RunConfig("x", kind="baseline")
    with pytest.raises(ValueError, match="unknown evolution option"):
        RunConfig("x", evolution={"seed": 3})
    with pytest.raises(ValueError, match="unknown key"):
        RunConfig.from_dict({"name": "x", "colour": "red"})
    with pytest.raises(ValueError, match="name"):
        RunConfig("a,b")
    with pytest.raises(ValueError, match="more than once"):
        load_configs({"configs": [{"name": "a", "kind": "baseline", "method": "nearest"}] * 2})
    with pytest.raises(ValueError, match="does not exist"):
        load_configs("/nonexistent/configs.json")


def test_statistics_match_scipy():
    rows = ([{"config": "a", "seed": s, "val": 0.9, "test": t, "evaluations": 10, "seconds": 1.0}
             for s, t in enumerate([0.90, 0.92, 0.91, 0.93, 0.94])]
            + [{"config": "b", "seed": s, "val": 0.8, "test": t, "evaluations": 0, "seconds": 2.0}
               for s, t in enumerate([0.80, 0.81, 0.83, 0.82, 0.80])]
            + [{"config": "c", "seed": s, "val": 0.8, "test": 0.85, "evaluations": 0, "seconds": 2.0} for s in range(5)])
    summary = {row["config"]: row for row in summarize(rows)}
    a = np.array([0.90, 0.92, 0.91, 0.93, 0.94])
    low, high = stats.t.interval(0.95, 4, loc=a.mean(), scale=stats.sem(a))
    assert summary["a"]["test_mean"] == pytest.approx(a.mean())
    assert summary["a"]["test_std"] == pytest.approx(a.std(ddof=1))
    assert (summary["a"]["test_ci_low"], summary["a"]["test_ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert summary["c"]["test_std"] == 0.0
    paired = paired_tests(rows, [("a", "b"), ("c", "c")])
    assert paired[0]["wins"] == 5 and paired[0]["p_wilcoxon_greater"] == pytest.approx(1 / 32)
    assert paired[0]["p_mannwhitney"] == pytest.approx(stats.mannwhitneyu(a, [0.80, 0.81, 0.83, 0.82, 0.80]).pvalue)
    assert paired[1]["p_wilcoxon_greater"] == 1.0 and paired[1]["difference"] == 0.0
    pairwise = {(r["a"], r["b"]): r["p_mannwhitney"] for r in pairwise_tests(rows)}
    assert set(pairwise) == {("a", "b"), ("a", "c"), ("b", "c")}
    assert pairwise[("a", "b")] < 0.05


def test_holm_matches_a_hand_computed_example():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1, and never below a smaller p-value's
    adjusted = holm([0.02, float("nan"), 0.04])  # NaN (no test) stays NaN and is not counted
    assert adjusted[0] == pytest.approx(0.04) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert holm([0.3]) == [0.3] and holm([]) == []


def test_paired_p_values_are_holm_corrected_per_reference():
    tests = {"a": [0.90, 0.92, 0.91, 0.93, 0.94], "b": [0.80, 0.81, 0.83, 0.82, 0.80],
             "c": [0.81, 0.80, 0.84, 0.82, 0.79], "d": [0.85, 0.83, 0.86, 0.84, 0.80], "e": [0.7] * 5}
    rows = [{"config": name, "seed": s, "val": 0.0, "test": t} for name, values in tests.items()
            for s, t in enumerate(values)]
    paired = {(row["config"], row["reference"]): row
              for row in paired_tests(rows, [("a", "b"), ("c", "b"), ("d", "b"), ("a", "e")])}
    family = [("a", "b"), ("c", "b"), ("d", "b")]  # the three compared with b; a against e is a family of its own
    raw = [paired[pair]["p_wilcoxon_greater"] for pair in family]
    assert [paired[pair]["p_wilcoxon_greater_holm"] for pair in family] == pytest.approx(holm(raw))
    assert [paired[pair]["p_mannwhitney_holm"] for pair in family] == pytest.approx(
        holm([paired[pair]["p_mannwhitney"] for pair in family]))
    assert paired[("a", "b")]["p_wilcoxon_greater_holm"] == pytest.approx(3 / 32)  # the smallest p (1/32), times 3
    assert paired[("a", "e")]["p_wilcoxon_greater_holm"] == paired[("a", "e")]["p_wilcoxon_greater"]


def test_compare_end_to_end_on_a_tiny_model(tiny_model, tiny_splits, tmp_path):
    configs = [
        RunConfig("nearest-minmax", kind="baseline", method="nearest", scale_method="minmax"),
        RunConfig("nearest-mse", kind="baseline", method="nearest"),
        RunConfig("stochastic", kind="baseline", method="stochastic"),
        RunConfig("adaround", kind="baseline", method="adaround"),
        RunConfig("es-from-adaround", start="adaround"),
        RunConfig("teacher-from-nearest", fitness="teacher-kl", select="holdout"),
        RunConfig("nsga2-from-nearest", evolution={"algorithm": "nsga2"}),
    ]
    result = compare((tiny_model, tiny_splits, "tiny"), configs, bits=2, seeds=[0, 1], out=tmp_path, settings=TINY,
                     progress=False)
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert len(rows) == 14 and all(tuple(row) == SUMMARY_KEYS for row in rows)
    assert [row["config"] for row in rows[:7]] == [c.name for c in configs] and rows[7]["seed"] == 1
    by = {(row["config"], row["seed"]): row for row in rows}
    # evolution from AdaRound starts from the very rounding the AdaRound baseline reports
    for seed in (0, 1):
        record = next(r for r in result.records if r["config"] == "es-from-adaround" and r["seed"] == seed)
        assert record["details"]["start"]["test"] == by[("adaround", seed)]["test"]
        assert by[("es-from-adaround", seed)]["val"] >= by[("adaround", seed)]["val"]
        assert by[("es-from-adaround", seed)]["evaluations"] == 4 + 2 * 6
    assert by[("nearest-mse", 0)]["test"] == by[("nearest-mse", 1)]["test"]  # deterministic baseline
    assert by[("stochastic", 0)]["evaluations"] == 2
    for name in ("summary.json", "runs.json", "runs.csv", "summary.csv", "report.md", "convergence.png", "pareto.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "convergence.png").read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "report.md").read_text()
    assert "es-from-adaround | adaround" in report and "Mann-Whitney" in report and "p Holm (Wilcoxon)" in report
    assert "by data seed" not in report and all(row["data_seed"] == 0 for row in rows)
    assert [p["reference"] for p in result.paired] == ["adaround", "nearest-mse", "nearest-mse"]
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert any("pareto_front" in r["details"] for r in runs["runs"])
    with pytest.raises(ValueError, match="unknown configuration"):
        compare((tiny_model, tiny_splits), configs, seeds=1, only=["nope"], progress=False)


def test_selection_never_looks_at_the_test_split(tiny_model, tiny_splits):
    configs = [RunConfig("teacher-holdout", fitness="teacher-kl", select="holdout"),
               RunConfig("teacher-val", fitness="teacher-kl", select="val")]
    first = compare((tiny_model, tiny_splits), configs, seeds=[3], settings=TINY, progress=False)
    test_inputs, test_targets = tiny_splits.test
    other = Splits(tiny_splits.train, tiny_splits.val, (test_inputs, (test_targets + 1) % 4), num_classes=4)
    second = compare((tiny_model, other), configs, seeds=[3], settings=TINY, progress=False)
    for a, b in zip(first.records, second.records):
        assert a["details"]["selected"] == b["details"]["selected"] and a["val"] == b["val"]
        assert a["test"] != b["test"] or math.isclose(a["test"], 0.0)


def test_cli_compare_runs_the_named_configurations(digits_zoo, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = cli_main(["compare", "--model", "digits-cnn", "--bits", "2", "--seeds", "2", "--out", str(out),
                     "--only", "nearest-mse,es-from-nearest", "--ngen", "1", "--no-progress", "--data-seeds", "2"])
    assert code == 0
    rows = json.loads((out / "summary.json").read_text())
    assert sorted({row["config"] for row in rows}) == ["es-from-nearest", "nearest-mse"] and len(rows) == 4
    assert [row["data_seed"] for row in rows] == [0, 0, 1, 1]
    assert (out / "runs.csv").read_text().splitlines()[0] == "config,seed,data_seed,val,test,evaluations,seconds"
    printed = capsys.readouterr().out
    assert "deap-quant compare --model digits-cnn --bits 2 --seeds 2" in printed and "--data-seeds 2" in printed
    assert "es-from-nearest" in printed and "| float |" in printed and "p Holm (Wilcoxon)" in printed
    assert cli_main(["compare", "--list"]) == 0 and "es-from-adaround" in capsys.readouterr().out
    assert cli_main(["compare", "--only", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli_main(["compare", "--config", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1


def test_redrawn_splits_keep_train_and_the_pool_and_change_val_and_test(digits_zoo):
    splits = digits_zoo.data
    assert redraw_split(splits, 0) is splits
    first, again, other = redraw_split(splits, 1), redraw_split(splits, 1), redraw_split(splits, 2)
    assert torch.equal(again.val[0], first.val[0]) and torch.equal(again.test[1], first.test[1])  # deterministic
    assert not torch.equal(first.val[1], splits.val[1]) and not torch.equal(first.test[0], other.test[0])
    for drawn in (first, other):
        assert drawn.train is splits.train and drawn.sizes() == splits.sizes()
        for part in ("val", "test"):  # stratified: every class keeps its count in val and in test
            assert torch.equal(torch.bincount(getattr(drawn, part)[1], minlength=10),
                               torch.bincount(getattr(splits, part)[1], minlength=10))
        pool = sorted(map(bytes, torch.cat([splits.val[0], splits.test[0]]).flatten(1).numpy()))
        assert sorted(map(bytes, torch.cat([drawn.val[0], drawn.test[0]]).flatten(1).numpy())) == pool
    assert redraw_split(splits, 1, base_seed=5).val[0].shape == first.val[0].shape
    assert not torch.equal(redraw_split(splits, 1, base_seed=5).val[1], first.val[1])


def test_data_seeds_run_each_seed_on_its_own_data_split(digits_zoo, tiny_model, tiny_splits):
    configs = [RunConfig("nearest-mse", kind="baseline", method="nearest"), RunConfig("es-from-nearest")]
    result = compare(digits_zoo, configs, seeds=[0, 1, 2], data_seeds=2, settings=TINY, progress=False)
    assert [(r["config"], r["seed"], r["data_seed"]) for r in result.rows] == [
        ("nearest-mse", 0, 0), ("es-from-nearest", 0, 0), ("nearest-mse", 1, 1), ("es-from-nearest", 1, 1),
        ("nearest-mse", 2, 0), ("es-from-nearest", 2, 0)]
    from deap_quant import Evaluator, quantize
    qmodel = quantize(digits_zoo.model, bits=2, scale_method="mse")
    for row in result.rows[::2]:  # nearest rounding is the same for every seed: only its data differs
        data = redraw_split(digits_zoo.data, row["data_seed"])
        assert row["val"] == Evaluator(qmodel, data.val).scores([])["accuracy"]
        assert row["test"] == Evaluator(qmodel, data.test).scores([])["accuracy"]
    for record in result.records[1::2]:  # evolution starts on, and is scored on, its seed's split
        start = record["details"]["start"]
        assert (start["val"], start["test"]) == (result.rows[2 * (record["seed"])]["val"],
                                                 result.rows[2 * (record["seed"])]["test"])
    assert result.settings["data_seeds"] == 2 and [e["data_seed"] for e in result.settings["float_by_data_seed"]] == [0, 1]
    with pytest.raises(ValueError, match="data_seeds=2 re-draws val and test from one pool .* only the digits"):
        compare((tiny_model, tiny_splits), configs, seeds=2, data_seeds=2, settings=TINY, progress=False)
    with pytest.raises(ValueError, match="data_seeds=0 is not valid; use an integer >= 1"):
        compare((tiny_model, tiny_splits), configs, seeds=2, data_seeds=0, settings=TINY, progress=False)


def test_example_main_runs_with_a_tiny_budget(digits_zoo, tmp_path):
    spec = importlib.util.spec_from_file_location("compare_operators", ROOT / "examples" / "compare_operators.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(seeds=2, out=str(tmp_path), only=["nearest-mse", "adaround", "es-from-adaround"], ngen=1,
                         adaround_steps=20, progress=False)
    assert {row["config"] for row in result.rows} == {"nearest-mse", "adaround", "es-from-adaround"}
    assert result.paired[0]["reference"] == "adaround" and (tmp_path / "report.md").is_file()


def test_compare_passes_weights_and_data_root_to_a_recipe(tiny_model, tiny_splits, monkeypatch):
    """A pretrained recipe (cifar10-resnet20) gets its weights and data through compare() as through run."""
    from deap_quant.zoo import recipes

    seen = {}

    def fake_load_model(name, **kwargs):
        seen.update(kwargs, name=name)
        return recipes.ZooModel(name, tiny_model, tiny_splits, {}, 0.0, True, None, recipes.RECIPES["digits-cnn"])

    monkeypatch.setattr(recipes, "load_model", fake_load_model)
    monkeypatch.setattr("deap_quant.zoo.load_model", fake_load_model)
    configs = [RunConfig("nearest-mse", kind="baseline", method="nearest")]
    result = compare("digits-cnn", configs, seeds=[0], settings=TINY, progress=False, weights="w.th",
                     data_root="data", options={"val_size": 10})
    assert seen["weights"] == "w.th" and seen["data_root"] == "data" and seen["options"] == {"val_size": 10}
    assert len(result.rows) == 1
    with pytest.raises(ValueError, match="go with a zoo recipe name"):
        compare((tiny_model, tiny_splits), configs, seeds=[0], weights="w.th", progress=False)


def test_paired_wilcoxon_treats_equal_accuracy_differences_as_ties():
    """Differences of 2 images out of 360 are ties, whatever last bits the float subtraction leaves."""
    reference, config = [338, 331, 342, 343, 331], [338, 329, 340, 345, 333]  # 0, -2, -2, +2, +2 images
    rows = ([{"config": "es", "seed": s, "test": c / 360} for s, c in enumerate(config)]
            + [{"config": "ada", "seed": s, "test": r / 360} for s, r in enumerate(reference)])
    assert len({abs(c / 360 - r / 360) for c, r in zip(config, reference)} - {0.0}) == 2  # the round-off is there
    row = paired_tests(rows, [("es", "ada")])[0]
    exact = stats.wilcoxon([c - r for c, r in zip(config, reference)], alternative="greater").pvalue
    assert exact == pytest.approx(0.6875)
    assert row["p_wilcoxon_greater"] == pytest.approx(exact)
    assert (row["wins"], row["losses"]) == (2, 2)


def test_reference_baseline_is_matched_by_method_and_grid(tiny_model, tiny_splits):
    """An evolutionary configuration is paired with the baseline of its start method on its own grid."""
    configs = [RunConfig("adaround", kind="baseline", method="adaround", scale_method="mse"),
               RunConfig("rtn-minmax", kind="baseline", method="nearest", scale_method="minmax"),
               RunConfig("es-minmax-from-adaround", start="adaround", scale_method="minmax"),
               RunConfig("es-minmax-from-nearest", start="nearest", scale_method="minmax"),
               RunConfig("es-mse-from-adaround", start="adaround", scale_method="mse")]
    settings = {**TINY, "evolution": {"mu": 2, "lambda_": 2, "ngen": 1}}
    result = compare((tiny_model, tiny_splits), configs, seeds=[0], settings=settings, progress=False)
    pairs = {(p["config"], p["reference"]) for p in result.paired}
    # the mse AdaRound baseline is not the start of the minmax search; the minmax nearest baseline is,
    # whatever its name
    assert pairs == {("es-minmax-from-nearest", "rtn-minmax"), ("es-mse-from-adaround", "adaround")}


def test_cli_compare_ngen_overrides_a_configurations_own_ngen(digits_zoo, tmp_path):
    path = tmp_path / "configs.json"
    path.write_text(json.dumps({
        "evolution": {"mu": 2, "lambda_": 2, "ngen": 3, "cxpb": 0.0, "mutpb": 1.0, "crossover": None},
        "configs": [{"name": "nearest-mse", "kind": "baseline", "method": "nearest"},
                    {"name": "es", "start": "nearest"},
                    {"name": "es-long", "start": "nearest", "evolution": {"ngen": 4, "mu": 3}}]}))
    out = tmp_path / "cmp"
    assert cli_main(["compare", "--config", str(path), "--seeds", "1", "--ngen", "1", "--out", str(out),
                     "--no-progress"]) == 0
    runs = {r["config"]: r for r in json.loads((out / "runs.json").read_text())["runs"]}
    assert {name: len(runs[name]["details"]["curve"]) - 1 for name in ("es", "es-long")} == {"es": 1, "es-long": 1}
    assert runs["es-long"]["evaluations"] == 3 + 2  # its own mu=3 is kept: only what --ngen names is overridden


def test_a_baseline_row_counts_its_rounding_seconds_once(tiny_model, tiny_splits, monkeypatch):
    """The row's seconds are the rounding's own seconds plus its scoring, not the rounding twice."""
    from types import SimpleNamespace

    from deap_quant.baselines import Rounding
    from deap_quant.compare import running

    clock = [0.0]
    monkeypatch.setattr(running, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def slow_adaround(qmodel, *args, **kwargs):  # takes 100 s of the patched clock, and says so
        clock[0] += 100.0
        return Rounding("adaround", [qmodel.base_states(layer).clone() for layer in range(len(qmodel.layers))],
                        seconds=100.0)

    monkeypatch.setattr(running, "adaround", slow_adaround)
    configs = [RunConfig("adaround", kind="baseline", method="adaround"),
               RunConfig("es-from-adaround", start="adaround")]
    settings = {**TINY, "evolution": {"mu": 2, "lambda_": 2, "ngen": 1}}
    result = compare((tiny_model, tiny_splits), configs, seeds=[0], settings=settings, progress=False)
    seconds = {row["config"]: row["seconds"] for row in result.rows}
    assert seconds["adaround"] == 100.0  # the clock moves only inside the rounding
