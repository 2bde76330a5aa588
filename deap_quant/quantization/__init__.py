"""PyTorch side: grids, nearest-rounding quantization, and the frozen quantized model. No DEAP here."""

from .activations import ACT_OBSERVERS, ActivationQuantizer, calibrate_activations
from .fold import fold_bn
from .grids import CodebookGrid, Grid, UniformGrid, fit_codebook_grid, fit_uniform_grid
from .model import AppliedGenes, GeneError, LayerInfo, QuantizedModel, as_gene_array
from .quantize import QUANTIZABLE_TYPES, QuantConfig, quantizable_layers, quantize

__all__ = [
    "CodebookGrid", "Grid", "UniformGrid", "fit_codebook_grid", "fit_uniform_grid",
    "AppliedGenes", "GeneError", "LayerInfo", "QuantizedModel", "as_gene_array",
    "QUANTIZABLE_TYPES", "QuantConfig", "quantizable_layers", "quantize", "fold_bn",
    "ActivationQuantizer", "ACT_OBSERVERS", "calibrate_activations",
]
