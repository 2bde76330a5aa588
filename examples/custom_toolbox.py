"""Build the toolbox yourself, swap in your own mutation, and run DEAP's eaMuPlusLambda directly.

    python examples/custom_toolbox.py
"""

from __future__ import annotations

import random

from deap import algorithms, tools

import deap_quant as dq
from deap_quant.operators import mut_add_gene, mut_remove_gene
from deap_quant.zoo import load_model


def mut_grow_or_prune(individual, space, grow=0.7):
    """A user's mutation in DEAP style: in place, returns a tuple, leaves the fitness alone."""
    if random.random() < grow or not individual:
        return mut_add_gene(individual, space, n=2)
    return mut_remove_gene(individual)


def main(bits: int = 2, mu: int = 16, lambda_: int = 32, ngen: int = 20, seed: int = 0) -> tools.HallOfFame:
    zoo = load_model("digits-cnn")
    qmodel = dq.quantize(zoo.model, bits=bits, scale_method="mse")
    evaluator = dq.Evaluator(qmodel, zoo.data.val)
    toolbox = dq.make_toolbox(qmodel, evaluator, layer_choice="uniform", crossover="layer_swap")
    toolbox.register("mutate", mut_grow_or_prune, space=toolbox.gene_space)

    random.seed(seed)
    population = toolbox.population(n=mu)
    hall_of_fame = tools.HallOfFame(3, similar=toolbox.gene_effects.same)  # distinct by the weights they change
    algorithms.eaMuPlusLambda(population, toolbox, mu=mu, lambda_=lambda_, cxpb=0.3, mutpb=0.7,
                              ngen=ngen, halloffame=hall_of_fame, verbose=False)

    # Only now, after the search, score the hall of fame on the held-out test split.
    tester = evaluator.with_data(zoo.data.test)
    baseline = tester.scores([])["accuracy"]
    for rank, individual in enumerate(hall_of_fame, 1):
        print(f"#{rank}: {toolbox.gene_effects.count(individual)} weights changed, val {individual.fitness.values[0]:.4f}, "
              f"test {tester.scores(individual)['accuracy']:.4f} (nearest {baseline:.4f})")
    return hall_of_fame


if __name__ == "__main__":
    main()
