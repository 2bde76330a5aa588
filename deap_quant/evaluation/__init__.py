"""Fitness evaluation: apply genes, measure a metric on a data split, revert. No DEAP here."""

from .batched import BatchedEvaluator, StreamedBatches, available_devices, resolve_device
from .cache import ActivationCache, CacheEntry, default_budget
from .evaluator import DataSpec, Evaluator, FunctionEvaluator, materialize
from .incremental import IncrementalEvaluator, announce_parents
from .metrics import METRICS, Accuracy, BatchMetric, CrossEntropy, Metric, TopK, make_metric
from .stages import Stage, StageSplit, register_splitter, split_model
from .tasks import DetectionMAP, ReconstructionError, evaluate_module
from .teacher import TeacherAgreement, TeacherEvaluator, TeacherKL

__all__ = ["DataSpec", "Evaluator", "FunctionEvaluator", "materialize",
           "METRICS", "Accuracy", "BatchMetric", "CrossEntropy", "Metric", "TopK", "make_metric",
           "IncrementalEvaluator", "announce_parents", "ActivationCache", "CacheEntry", "default_budget",
           "BatchedEvaluator", "StreamedBatches", "resolve_device", "available_devices",
           "Stage", "StageSplit", "split_model", "register_splitter",
           "DetectionMAP", "ReconstructionError", "evaluate_module",
           "TeacherAgreement", "TeacherEvaluator", "TeacherKL"]
