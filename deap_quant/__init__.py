"""deap_quant: evolve the rounding of quantized PyTorch networks with DEAP.

Quantize a trained model (:func:`quantize`), evolve sparse rounding genes on a validation split
(:func:`evolve`, or DEAP's own algorithms on :func:`make_toolbox`), and read the held-out test
scores from the :class:`EvolutionResult`.
"""

__version__ = "0.1.0"

from .evaluation import Evaluator, FunctionEvaluator
from .evolve import EvolutionConfig, EvolutionResult, evolve
from .genome import Fitness, Gene, GeneSpace, Individual, MultiFitness, MultiIndividual, normalize
from .quantization import GeneError, LayerInfo, QuantConfig, QuantizedModel, quantize
from .report import write_results
from .toolbox import make_toolbox

__all__ = [
    "__version__",
    "quantize", "QuantConfig", "QuantizedModel", "LayerInfo", "GeneError",
    "Evaluator", "FunctionEvaluator",
    "Gene", "Individual", "Fitness", "MultiIndividual", "MultiFitness", "GeneSpace", "normalize",
    "make_toolbox", "evolve", "EvolutionConfig", "EvolutionResult", "write_results",
]
