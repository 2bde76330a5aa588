"""Quickstart: quantize the digits CNN to 2 bits, evolve its rounding, read the held-out test score.

    python examples/digits_es.py
"""

from __future__ import annotations

import deap_quant as dq
from deap_quant.zoo import load_model


def main(bits: int = 2, mu: int = 20, lambda_: int = 40, ngen: int = 30, seed: int = 0,
         progress: bool = True) -> dq.EvolutionResult:
    zoo = load_model("digits-cnn")                       # trains in seconds on CPU, then cached
    qmodel = dq.quantize(zoo.model, bits=bits, scale_method="mse")
    result = dq.evolve(qmodel, val=zoo.data.val, test=zoo.data.test, float_model=zoo.model,
                       mu=mu, lambda_=lambda_, ngen=ngen, seed=seed, progress=progress)
    print(f"nearest rounding: test {result.baseline['test']:.4f}")
    print(f"evolved ({result.best['n_genes']} genes): val {result.best['val']:.4f}, "
          f"test {result.best['test']:.4f}")
    return result


if __name__ == "__main__":
    main()
