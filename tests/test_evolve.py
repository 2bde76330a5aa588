"""The toolbox under DEAP's own algorithms, evolve()'s loop, and the held-out test protocol."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from deap import algorithms, tools
from torch.utils.data import DataLoader, Dataset

import deap_quant as dq
from deap_quant import Evaluator, EvolutionConfig, evolve, make_toolbox, quantize


@pytest.fixture
def setup(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=2)
    return qmodel, Evaluator(qmodel, tiny_data, batch_size=16)


@pytest.mark.parametrize("run", ["eaMuPlusLambda", "eaMuCommaLambda", "eaSimple"])
def test_deap_algorithms_run_unmodified_on_the_toolbox(setup, run):
    qmodel, evaluator = setup
    toolbox = make_toolbox(qmodel, evaluator, init_genes=3,
                           select="tournament" if run == "eaSimple" else "best")
    random.seed(0)
    population = toolbox.population(n=6)
    hall_of_fame = tools.HallOfFame(2)
    if run == "eaSimple":
        final, logbook = algorithms.eaSimple(population, toolbox, cxpb=0.5, mutpb=0.5, ngen=3,
                                             halloffame=hall_of_fame, verbose=False)
    else:
        final, logbook = getattr(algorithms, run)(population, toolbox, mu=6, lambda_=8, cxpb=0.3, mutpb=0.6,
                                                  ngen=3, halloffame=hall_of_fame, verbose=False)
    assert len(final) == 6 and len(logbook) == 4
    assert all(ind.fitness.valid for ind in final)
    assert isinstance(final[0], dq.Individual)
    # fitness is the evaluator's verdict on the genes, and the weights came back afterwards
    assert hall_of_fame[0].fitness.values == evaluator(hall_of_fame[0])
    assert torch.equal(qmodel.dequantized_weights(1), qmodel.grids[1].dequantize(qmodel.base_states(1)))


def test_evolve_loop_matches_deap_eaMuPlusLambda_step_for_step(setup, tiny_data):
    qmodel, evaluator = setup
    config = EvolutionConfig(mu=6, lambda_=10, ngen=4, cxpb=0.3, mutpb=0.6, init_genes=3, include_base=False,
                             seed=11, hof_size=3)
    result = evolve(qmodel, evaluator=evaluator, config=config, progress=False)

    toolbox = make_toolbox(qmodel, evaluator, **config.toolbox_options)
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    population = toolbox.population(n=6)
    hall_of_fame = tools.HallOfFame(3, similar=toolbox.gene_effects.same)  # members differ in what they change
    final, logbook = algorithms.eaMuPlusLambda(population, toolbox, mu=6, lambda_=10, cxpb=0.3, mutpb=0.6,
                                               ngen=4, halloffame=hall_of_fame, verbose=False)
    assert [list(ind) for ind in result.population] == [list(ind) for ind in final]
    assert [list(ind) for ind in result.hall_of_fame] == [list(ind) for ind in hall_of_fame]
    assert result.logbook.select("nevals") == logbook.select("nevals")


@pytest.mark.parametrize("algorithm", ["mu+lambda", "mu,lambda", "simple"])
def test_evolve_result_structure(setup, tiny_data, algorithm):
    qmodel, evaluator = setup
    result = evolve(qmodel, tiny_data, tiny_data, mu=4, lambda_=6, ngen=2, algorithm=algorithm,
                    hof_size=2, seed=1, progress=False, batch_size=16)
    content = result.to_dict()
    assert {"config", "baseline", "float", "best", "hall_of_fame", "evaluations", "seconds", "logbook",
            "versions"} <= set(content)
    assert set(content["best"]) >= {"val", "test", "genes", "n_genes"}
    assert len(content["hall_of_fame"]) == 2 and all({"val", "test", "genes"} <= set(h) for h in content["hall_of_fame"])
    assert content["evaluations"] == sum(result.logbook.select("nevals"))
    assert [r["gen"] for r in content["logbook"]] == [0, 1, 2]
    assert content["config"]["seed"] == 1 and content["versions"]["deap_quant"] == dq.__version__
    if algorithm == "mu+lambda":  # the nearest-rounding individual is in the first population; elitism keeps it
        assert content["best"]["val"] >= content["baseline"]["val"]


def test_same_seed_same_run_different_seed_different_run(setup, tiny_data):
    qmodel, evaluator = setup
    runs = [evolve(qmodel, evaluator=evaluator, mu=4, lambda_=6, ngen=3, seed=s, progress=False) for s in (5, 5, 6)]
    genes = [[list(ind) for ind in r.hall_of_fame] for r in runs]
    assert genes[0] == genes[1]
    assert genes[0] != genes[2]


class RecordingDataset(Dataset):
    """Records every access, so a test can prove when the test split was first read."""

    def __init__(self, inputs, targets):
        self.inputs, self.targets = inputs, targets
        self.reads = 0

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        self.reads += 1
        return self.inputs[index], self.targets[index]


def test_test_split_is_untouched_until_the_search_ends(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=2)
    test = RecordingDataset(*tiny_data)
    reads_during_search = []
    result = evolve(qmodel, tiny_data, DataLoader(test, batch_size=16), mu=4, lambda_=6, ngen=3, progress=False,
                    callback=lambda state: reads_during_search.append(test.reads))
    assert reads_during_search == [0, 0, 0]
    assert test.reads > 0
    # what was reported is what the test split gives, read afresh
    tester = Evaluator(qmodel, tiny_data)
    assert result.best["test"] == tester.scores(result.hall_of_fame[0])["accuracy"]
    assert result.baseline["test"] == tester.scores([])["accuracy"]


def test_callback_can_stop_early(setup):
    qmodel, evaluator = setup
    result = evolve(qmodel, evaluator=evaluator, mu=4, lambda_=6, ngen=10, progress=False,
                    callback=lambda state: state["gen"] == 2)
    assert len(result.logbook) == 3


@pytest.mark.parametrize("options, message", [
    ({"mu": 10, "lambda_": 5, "algorithm": "mu,lambda"}, "mu=10 > lambda_=5 is not valid for \\(mu,lambda\\)"),
    ({"cxpb": 1.5}, "cxpb=1.5 is not valid; use a probability in \\[0, 1\\]"),
    ({"mutpb": -0.1}, "mutpb=-0.1 is not valid"),
    ({"cxpb": 0.6, "mutpb": 0.6}, "cxpb \\+ mutpb = 1.2 is not valid"),
    ({"algorithm": "cma"}, "algorithm='cma' is not valid"),
    ({"mu": 0}, "mu=0 is not valid"),
])
def test_bad_evolution_config(options, message):
    with pytest.raises(ValueError, match=message):
        EvolutionConfig(**options)


def test_evolve_on_digits_improves_validation_and_reports_test(digits_zoo):
    qmodel = quantize(digits_zoo.model, bits=2, scale_method="mse")
    result = evolve(qmodel, digits_zoo.data.val, digits_zoo.data.test, float_model=digits_zoo.model,
                    mu=6, lambda_=12, ngen=4, seed=0, progress=False)
    # Elitism alone gives best >= baseline; at 2 bits four generations must find a strictly better rounding,
    # and a fitness that ignored the genes would not.
    assert result.best["val"] > result.baseline["val"]
    assert result.best["val"] == Evaluator(qmodel, digits_zoo.data.val).scores(result.hall_of_fame[0])["accuracy"]
    assert result.float_scores["test"] > 0.9
    best = result.hall_of_fame[0]
    tester = Evaluator(qmodel, digits_zoo.data.test)
    assert result.best["test"] == tester.scores(best)["accuracy"]


def changed(qmodel, genes) -> tuple:
    """The (layer, index, state) changes ``genes`` make, as the model itself applies them."""
    out = []
    for layer, states in enumerate(qmodel.states_with(genes)):
        base = qmodel.base_states(layer).view(-1)
        moved = torch.nonzero(states.view(-1) != base).view(-1).tolist()
        out += [(layer, index, int(states.view(-1)[index])) for index in moved]
    return tuple(out)


def top_state_indices(qmodel, layer):
    states = qmodel.base_states(layer).view(-1)
    return torch.nonzero(states == qmodel.layers[layer].n_levels - 1).view(-1).tolist()


def test_hall_of_fame_members_differ_in_the_weights_they_change(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=2, scale_method="mse")
    evaluator = Evaluator(qmodel, tiny_data, batch_size=16)
    toolbox = make_toolbox(qmodel, evaluator)
    top = top_state_indices(qmodel, 1)
    real = [(0, 3, 1 if int(qmodel.base_states(0).view(-1)[3]) < 3 else -1),
            (1, 7, 1 if int(qmodel.base_states(1).view(-1)[7]) < 3 else -1)]

    def individual():  # one of two real genes, plus a gene that moves a top-state weight up: a no-op
        return dq.Individual([random.choice(real), (1, random.choice(top), 1)])

    toolbox.register("individual", individual)
    toolbox.register("population", tools.initRepeat, list, toolbox.individual)
    result = evolve(qmodel, evaluator=evaluator, toolbox=toolbox, mu=10, ngen=0, hof_size=5, seed=0, progress=False)
    effects = [changed(qmodel, ind) for ind in result.hall_of_fame]
    assert len(set(effects)) == len(effects) == 3  # nearest rounding and the two real genes
    assert sorted(entry["changed_weights"] for entry in result.hall_of_fame_scores) == [0, 1, 1]


def test_nsga2_minimises_changed_weights_not_genes(setup):
    qmodel, evaluator = setup
    toolbox = make_toolbox(qmodel, evaluator, select="nsga2")
    noop = (1, top_state_indices(qmodel, 1)[0], 1)
    real = (0, 3, 1 if int(qmodel.base_states(0).view(-1)[3]) < 3 else -1)
    ind = toolbox.individual_class([real, noop])
    assert toolbox.evaluate(ind) == (evaluator(ind)[0], 1.0)


def test_every_gene_changes_its_weight_and_results_say_how_many(tiny_model, tiny_data):
    from deap_quant.report import format_table

    qmodel = quantize(tiny_model, bits=2, scale_method="mse")

    def edges(q):  # a start with many weights on the grid's edges, where half the moves are impossible
        return [torch.where(q.base_states(layer) >= 2, q.layers[layer].n_levels - 1, 0) for layer in range(2)]

    result = evolve(qmodel, tiny_data, tiny_data, algorithm="nsga2", mu=8, lambda_=12, ngen=3, seed=0,
                    start=edges, progress=False, batch_size=16)
    for ind in list(result.population) + list(result.hall_of_fame):
        assert len(changed(qmodel, ind)) == len(ind) and ind.fitness.values[1] == len(ind)
    content = result.to_dict()
    entries = [content["best"], *content["hall_of_fame"], *content["details"]["pareto_front"]]
    for entry in entries:
        assert entry["changed_weights"] == len(changed(qmodel, entry["genes"]))
    assert content["best"]["n_genes"] == len(content["best"]["genes"])
    table = format_table(content)
    assert "changed" in table.splitlines()[0]
    assert table.splitlines()[3].split()[-2:] == [str(len(content["best"]["genes"])),
                                                   str(content["best"]["changed_weights"])]


# ------------------------------------------------------------------------------ FunctionEvaluator
def test_function_evaluator_uses_a_returned_pair_as_the_fitness(tiny_model):
    from deap_quant import FunctionEvaluator, Individual

    qmodel = quantize(tiny_model, bits=2)
    assert FunctionEvaluator(qmodel, lambda module: (0.9, 0.125))([]) == (0.9, 0.125)
    assert FunctionEvaluator(qmodel, lambda module: [0.9, 0.125], higher_is_better=False)([]) == (-0.9, -0.125)
    assert FunctionEvaluator(qmodel, lambda module: 0.5)([]) == (0.5, 0.0)
    assert FunctionEvaluator(qmodel, lambda module: {"score": 0.5}, higher_is_better=False)([]) == (-0.5, 0.0)
    evaluator = FunctionEvaluator(qmodel, lambda module: (torch.tensor(0.75), np.float32(-1.5)))
    fitness = evaluator([])
    assert fitness == (0.75, -1.5) and all(type(value) is float for value in fitness)
    individual = Individual()
    individual.fitness.values = fitness  # fits the two-objective fitness the toolbox uses
    assert individual.fitness.values == (0.75, -1.5)
    for bad in ((0.9,), (0.9, 0.1, 0.2)):
        with pytest.raises(ValueError, match=f"length {len(bad)}.*a number or a pair"):
            FunctionEvaluator(qmodel, lambda module, bad=bad: bad)([])


@pytest.mark.parametrize("training", [True, False])
def test_function_evaluator_score_module_restores_the_train_mode(training):
    from deap_quant import FunctionEvaluator

    modes = []
    evaluator = FunctionEvaluator(quantize(torch.nn.Sequential(torch.nn.Linear(4, 3)), bits=2),
                                  lambda module: modes.append(module.training) or 1.0)
    module = torch.nn.Linear(4, 3).train(training)
    assert evaluator.score_module(module) == {"score": 1.0}
    assert modes == [False] and module.training is training  # scored in eval mode, then put back


def test_fitness_plot_of_a_lower_is_better_metric_is_drawn_in_the_metric_units(tiny_model, tiny_data, tmp_path,
                                                                                monkeypatch):
    """fitness.png for metric="loss": the logbook holds fitness = -loss, the plot shows the loss itself."""
    import json

    import matplotlib.pyplot as plt

    from deap_quant.report import plot_fitness

    close = plt.close
    result = evolve(quantize(tiny_model, bits=2), tiny_data, tiny_data, metric="loss", mu=3, lambda_=4, ngen=2,
                    progress=False)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figures plot_fitness draws
    dq.write_results(result, tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    plot_fitness({k: v for k, v in written.items() if k != "higher_is_better"}, tmp_path / "old.png")  # older file
    assert len(figures) == 2
    for figure in figures:
        axis = figure.axes[0]
        lines = {line.get_label(): [float(y) for y in line.get_ydata()] for line in axis.lines}
        best = next(values for label, values in lines.items() if label.startswith("best (val)"))
        assert best == [-entry["max"] for entry in written["logbook"]]  # the lowest loss of each generation
        assert "min" in next(label for label in lines if label.startswith("best (val)"))
        assert lines["mean (val)"] == [-entry["mean"] for entry in written["logbook"]]
        assert lines["nearest (val)"][0] == written["baseline"]["val"] > 0
        assert best[-1] <= lines["nearest (val)"][0]  # the start is in the population: never worse than it
        assert all(value > 0 for values in lines.values() for value in values)  # all on the loss's side of zero
        assert float(axis.collections[0].get_offsets()[0][1]) == written["best"]["test"]
        close(figure)
    assert written["higher_is_better"] is False
