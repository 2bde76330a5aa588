"""Every task end to end: VGG and ResNet classification, a convolutional autoencoder, and FCOS detection.

Each model is a zoo recipe (trained offline on CPU on first use, then cached), quantized with nearest
rounding, and its rounding evolved on the validation split with the recipe's own metric: accuracy,
reconstruction error (-MSE as fitness, PSNR reported) or detection mAP@0.5 (mAP@[.5:.95] reported).
The test split is scored only after the search.

    python examples/tasks.py                  # all four, default budget (the detector takes longest)
    python examples/tasks.py digits-resnet    # just one
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

import deap_quant as dq
from deap_quant.report import format_table
from deap_quant.zoo import load_model

#: Bit-width per recipe at which nearest rounding visibly hurts (per-channel, MSE-fitted grids).
BITS = {"digits-vgg": 3, "digits-resnet": 3, "digits-autoencoder": 3, "digits-detector": 3}

#: The summary values printed besides each task's headline metric.
EXTRA = {"digits-autoencoder": "psnr", "digits-detector": "map"}


def main(models: Sequence[str] = tuple(BITS), bits: Optional[int] = None, mu: int = 20, lambda_: int = 40,
         ngen: int = 30, seed: int = 0, progress: bool = True) -> dict[str, dq.EvolutionResult]:
    """Run each task in ``models``; ``bits`` overrides the per-recipe bit-width of :data:`BITS`."""
    results = {}
    for name in models:
        zoo = load_model(name)                      # trains and caches on first use
        width = bits or BITS.get(name, 3)
        qmodel = dq.quantize(zoo.model, bits=width, scale_method="mse")
        result = dq.evolve(qmodel, val=zoo.data.val, test=zoo.data.test, metric=zoo.recipe.new_metric(),
                           float_model=zoo.model, mu=mu, lambda_=lambda_, ngen=ngen, seed=seed, progress=progress)
        print(f"\n{name}, {width} bits, {len(qmodel.layers)} quantized layers ({zoo.recipe.description})")
        print(format_table(result.to_dict()))
        extra = EXTRA.get(name)
        if extra:
            print(f"{extra}: nearest test {result.baseline['test_scores'][extra]:.4f}, "
                  f"evolved test {result.best['test_scores'][extra]:.4f}")
        results[name] = result
    return results


if __name__ == "__main__":
    main(sys.argv[1:] or tuple(BITS))
