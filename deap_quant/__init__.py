"""deap_quant: evolve the rounding of quantized PyTorch networks with DEAP.

Quantize a trained model (:func:`quantize`), evolve sparse rounding genes on a validation split
(:func:`evolve`, or DEAP's own algorithms on :func:`make_toolbox`), and read the held-out test
scores from the :class:`EvolutionResult`.

``import deap_quant`` loads the quantization, evaluation and evolution code but not the
comparison (:mod:`deap_quant.compare`: scipy, scikit-learn, matplotlib) nor the result writers
(:func:`write_results`, which reach the model zoo and its data); those names are resolved on
first use by the module-level ``__getattr__`` below, so they stay in ``__all__`` and work as
before (``from deap_quant import compare_configs``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .baselines import AdaRoundConfig, Rounding, adaround, best_stochastic, nearest
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .evaluation import BatchedEvaluator, Evaluator, FunctionEvaluator, IncrementalEvaluator
from .evaluation.teacher import TeacherEvaluator
from .evolve import EvolutionConfig, EvolutionResult, evolve
from .export import ExportError, load, read_export
from .export import export as export_model
from .genome import Fitness, Gene, GeneSpace, Individual, MultiFitness, MultiIndividual, normalize
from .parallel import MapConfig, WorkersLostError, make_map
from .quantization import GeneError, LayerInfo, QuantConfig, QuantizedModel, quantize
from .toolbox import make_toolbox

__all__ = [
    "__version__",
    "quantize", "QuantConfig", "QuantizedModel", "LayerInfo", "GeneError",
    "Evaluator", "FunctionEvaluator", "IncrementalEvaluator", "BatchedEvaluator",
    "Gene", "Individual", "Fitness", "MultiIndividual", "MultiFitness", "GeneSpace", "normalize",
    "make_toolbox", "evolve", "EvolutionConfig", "EvolutionResult", "write_results",
    "Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint",
    "export_model", "load", "read_export", "ExportError", "to_onnx", "onnx_scores",
    "nearest", "best_stochastic", "adaround", "AdaRoundConfig", "Rounding", "TeacherEvaluator",
    "compare_configs", "RunConfig", "CompareResult",
    "make_map", "MapConfig", "WorkersLostError",
]

#: Public names loaded on first use: name -> (module, attribute in it).
_LAZY = {
    "compare_configs": (".compare", "compare"),
    "RunConfig": (".compare", "RunConfig"),
    "CompareResult": (".compare", "CompareResult"),
    "write_results": (".report", "write_results"),
    "to_onnx": (".onnx_export", "to_onnx"),
    "onnx_scores": (".onnx_export", "onnx_scores"),
}
#: Submodules reachable as attributes before anything imported them (``deap_quant.compare.compare(...)``).
_LAZY_SUBMODULES = ("compare", "report", "data", "zoo", "cli")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module, __name__), attribute)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
