"""deap_quant: evolve the rounding of quantized PyTorch networks with DEAP.

Quantize a trained model (:func:`quantize`), evolve sparse rounding genes on a validation split
(:func:`evolve`, or DEAP's own algorithms on :func:`make_toolbox`), and read the held-out test
scores from the :class:`EvolutionResult`.
"""

__version__ = "0.1.0"

from .baselines import AdaRoundConfig, Rounding, adaround, best_stochastic, nearest
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .compare import CompareResult, RunConfig
from .compare import compare as compare_configs
from .evaluation import Evaluator, FunctionEvaluator, IncrementalEvaluator
from .evaluation.teacher import TeacherEvaluator
from .evolve import EvolutionConfig, EvolutionResult, evolve
from .export import ExportError, load, read_export
from .export import export as export_model
from .genome import Fitness, Gene, GeneSpace, Individual, MultiFitness, MultiIndividual, normalize
from .parallel import MapConfig, WorkersLostError, make_map
from .quantization import GeneError, LayerInfo, QuantConfig, QuantizedModel, quantize
from .report import write_results
from .toolbox import make_toolbox

__all__ = [
    "__version__",
    "quantize", "QuantConfig", "QuantizedModel", "LayerInfo", "GeneError",
    "Evaluator", "FunctionEvaluator", "IncrementalEvaluator",
    "Gene", "Individual", "Fitness", "MultiIndividual", "MultiFitness", "GeneSpace", "normalize",
    "make_toolbox", "evolve", "EvolutionConfig", "EvolutionResult", "write_results",
    "Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint",
    "export_model", "load", "read_export", "ExportError",
    "nearest", "best_stochastic", "adaround", "AdaRoundConfig", "Rounding", "TeacherEvaluator",
    "compare_configs", "RunConfig", "CompareResult",
    "make_map", "MapConfig", "WorkersLostError",
]
