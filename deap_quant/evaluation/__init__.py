"""Fitness evaluation: apply genes, measure a metric on a data split, revert. No DEAP here."""

from .evaluator import DataSpec, Evaluator, FunctionEvaluator, materialize
from .metrics import METRICS, Accuracy, BatchMetric, CrossEntropy, Metric, TopK, make_metric

__all__ = ["DataSpec", "Evaluator", "FunctionEvaluator", "materialize",
           "METRICS", "Accuracy", "BatchMetric", "CrossEntropy", "Metric", "TopK", "make_metric"]
