"""Label-free teacher fitness: agreement with, or KL divergence to, the float model's outputs.

A validation split is small, so a search that maximises validation accuracy overfits it. The
float model's own outputs are a target that needs no labels: on a *calibration split drawn
from the training data* (which can be far larger than the validation split) the quantized
model is scored by how often its top-1 class agrees with the float model's, or by the mean
``KL(teacher || student)`` of their softmax outputs. The float outputs are computed once,
when the evaluator is built, and cached with the inputs as the "targets" of the data pair, so
the ordinary :class:`~deap_quant.evaluation.Evaluator` machinery scores them.

:class:`TeacherEvaluator` plugs into :func:`deap_quant.evolve` like any evaluator: its fitness
is the teacher objective (optionally combined with the validation metric, as a tie-breaker or
weighted), while :meth:`~TeacherEvaluator.scores` and :meth:`~TeacherEvaluator.with_data`
report the labelled metric, so ``val`` and ``test`` in the results stay comparable across
fitness functions. The held-out test split is never part of any teacher fitness.

No DEAP here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..quantization.model import QuantizedModel
from .evaluator import DataSpec, Evaluator, eval_mode, model_placement, place
from .incremental import IncrementalEvaluator
from .metrics import Metric, MetricSpec

__all__ = ["TeacherAgreement", "TeacherKL", "TEACHER_OBJECTIVES", "COMBINE_MODES", "TeacherEvaluator",
           "teacher_outputs", "calibration_inputs", "split_calibration"]

TEACHER_OBJECTIVES = ("kl", "agreement")
COMBINE_MODES = (None, "tiebreak", "weighted")


class TeacherAgreement(Metric):
    """Top-1 agreement with the teacher's outputs (given as the batch "targets"); ties broken by KL.

    ``kl`` is the mean over samples of ``KL(softmax(teacher / T) || softmax(outputs / T))``.
    """

    name = "agreement"

    def __init__(self, temperature: float = 1.0):
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature={temperature!r} is not valid; use a positive number")
        self.temperature = float(temperature)
        self.reset()

    def reset(self) -> None:
        self.agree = 0
        self.count = 0
        self.kl_sum = 0.0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        if outputs.ndim != 2 or targets.shape != outputs.shape:
            raise ValueError(f"{self.name} needs outputs and teacher outputs of the same shape [batch, classes]; "
                             f"got {tuple(outputs.shape)} and {tuple(targets.shape)} (pass the float model's "
                             "outputs as targets, e.g. with teacher_outputs())")
        teacher = targets.to(outputs.dtype)
        self.agree += int((outputs.argmax(dim=1) == teacher.argmax(dim=1)).sum())
        self.count += len(outputs)
        log_student = F.log_softmax(outputs / self.temperature, dim=1)
        log_teacher = F.log_softmax(teacher / self.temperature, dim=1)
        self.kl_sum += float(F.kl_div(log_student, log_teacher, log_target=True, reduction="sum"))

    def summary(self) -> dict[str, float]:
        count = max(self.count, 1)
        return {"agreement": self.agree / count, "kl": self.kl_sum / count}

    def fitness(self) -> tuple[float, float]:
        values = self.summary()
        return values["agreement"], -values["kl"]


class TeacherKL(TeacherAgreement):
    """Mean KL divergence to the teacher as the objective (lower is better); agreement breaks ties."""

    name = "kl"

    def summary(self) -> dict[str, float]:
        count = max(self.count, 1)
        return {"kl": self.kl_sum / count, "agreement": self.agree / count}

    def fitness(self) -> tuple[float, float]:
        values = self.summary()
        return -values["kl"], values["agreement"]


def _teacher_metric(objective: str, temperature: float) -> TeacherAgreement:
    if objective == "kl":
        return TeacherKL(temperature)
    if objective == "agreement":
        return TeacherAgreement(temperature)
    raise ValueError(f"objective={objective!r} is not valid; use one of {', '.join(TEACHER_OBJECTIVES)}")


def calibration_inputs(data: Union[DataSpec, torch.Tensor], n: Optional[int] = None, seed: int = 0) -> torch.Tensor:
    """Inputs only (labels dropped) of ``data``; ``n`` of them drawn without replacement with ``seed``.

    ``data`` is an input tensor, an ``(inputs, targets)`` pair, a Dataset or a DataLoader.
    ``n=None`` (or ``n`` at least the number available) keeps all, in their order.
    """
    if isinstance(data, torch.Tensor):
        inputs = data
    elif isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        inputs = data[0]
    elif isinstance(data, (DataLoader, Dataset)):
        loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=256, shuffle=False)
        inputs = torch.cat([batch[0] if isinstance(batch, (tuple, list)) else batch for batch in loader])
    else:
        raise TypeError(f"calibration data must be a tensor, an (inputs, targets) pair, a Dataset or a "
                        f"DataLoader, got {type(data).__name__}")
    if len(inputs) == 0:
        raise ValueError("the calibration data is empty; it needs at least one sample")
    if n is None or n >= len(inputs):
        return inputs
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} is not valid; use a positive number of samples or None for all")
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    return inputs[order[:n]]


def split_calibration(data: Union[DataSpec, torch.Tensor], holdout: float, seed: int = 0,
                      n: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle the inputs of ``data`` (``n`` of them, or all) and split off a held-out share.

    Returns ``(search_inputs, holdout_inputs)``; the held-out part can select among the hall of
    fame without touching validation or test data.
    """
    if not isinstance(holdout, (int, float)) or not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout={holdout!r} is not valid; use a fraction strictly between 0 and 1")
    inputs = calibration_inputs(data, None)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    if n is not None:
        order = order[:n]
    cut = int(round(len(order) * (1.0 - holdout)))
    if cut < 1 or cut >= len(order):
        raise ValueError(f"holdout={holdout} of {len(order)} samples leaves an empty part; use more samples")
    return inputs[order[:cut]], inputs[order[cut:]]


def teacher_outputs(model: nn.Module, inputs: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The float model's outputs on ``inputs`` (eval mode, no gradients), computed once.

    Inputs are moved to the model's device and floating dtype; the outputs stay where the model
    made them (an evaluator moves its targets to the quantized model's device).
    """
    device, dtype = model_placement(model)
    with torch.inference_mode(), eval_mode(model):
        chunks = [model(place(inputs[i:i + batch_size], device, dtype)) for i in range(0, len(inputs), batch_size)]
    outputs = torch.cat(chunks).detach().clone()
    if outputs.ndim != 2:
        raise ValueError(f"teacher fitness needs class scores of shape [batch, classes]; the model gives "
                         f"{tuple(outputs.shape)}")
    return outputs


class TeacherEvaluator:
    """Fitness from agreement with (or KL to) the float model on a label-free calibration split.

    * ``calibration``: inputs drawn from the *training* data (tensor, pair, Dataset or loader);
      labels, if any, are ignored.
    * ``teacher``: the float model, run once on ``calibration`` here; or pass its outputs as
      ``teacher_logits`` (e.g. to share one cached computation between runs).
    * ``objective``: ``"kl"`` (minimise the mean KL divergence; agreement breaks ties) or
      ``"agreement"`` (maximise top-1 agreement; KL breaks ties).
    * ``val`` with ``metric``: the labelled validation split. It is what :meth:`scores` reports
      (so results show the usual validation accuracy), and it enters the fitness only through
      ``combine``: ``None`` (teacher only), ``"tiebreak"`` (fitness = (validation metric,
      teacher objective)) or ``"weighted"`` (fitness = (validation metric + ``weight`` * teacher
      objective, validation metric), the teacher objective being ``-kl`` or ``agreement``).

    :meth:`with_data` returns a plain :class:`Evaluator` with the labelled metric, which is what
    :func:`deap_quant.evolve` uses to re-score on test after the search.

    ``fast=True`` (default) scores genomes with :class:`IncrementalEvaluator` (cached
    activations, memoisation): the same fitness values bit for bit, sooner.
    """

    def __init__(self, qmodel: QuantizedModel, calibration: Union[DataSpec, torch.Tensor], *,
                 teacher: Optional[nn.Module] = None, teacher_logits: Optional[torch.Tensor] = None,
                 objective: str = "kl", val: Optional[DataSpec] = None, metric: MetricSpec = "accuracy",
                 combine: Optional[str] = None, weight: float = 1.0, temperature: float = 1.0,
                 batch_size: int = 512, fast: bool = True):
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine={combine!r} is not valid; use None, 'tiebreak' or 'weighted'")
        if combine is not None and val is None:
            raise ValueError(f"combine={combine!r} needs the validation split (val=...)")
        if not isinstance(fast, bool):
            raise ValueError(f"fast={fast!r} is not valid; use True or False")
        if not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"weight={weight!r} is not valid; use a non-negative number")
        if (teacher is None) == (teacher_logits is None):
            raise ValueError("pass exactly one of teacher= (the float model) or teacher_logits= (its outputs)")
        inputs = calibration_inputs(calibration)
        if teacher_logits is None:
            teacher_logits = teacher_outputs(teacher, inputs, batch_size)
        if len(teacher_logits) != len(inputs):
            raise ValueError(f"teacher_logits has {len(teacher_logits)} rows for {len(inputs)} calibration inputs")
        self.qmodel = qmodel
        self.objective = objective
        self.combine = combine
        self.weight = float(weight)
        self.batch_size = batch_size
        self.teacher_logits = teacher_logits
        kind = IncrementalEvaluator if fast else Evaluator
        self.calibration = kind(qmodel, (inputs, teacher_logits), metric=_teacher_metric(objective, temperature),
                                batch_size=batch_size)
        self.val = kind(qmodel, val, metric=metric, batch_size=batch_size) if val is not None else None
        self.evaluations = 0

    @property
    def headline(self) -> str:
        """The labelled metric's name when a validation split is given, else the teacher objective's."""
        return self.val.headline if self.val is not None else self.calibration.headline

    @property
    def n_samples(self) -> int:
        return self.calibration.n_samples

    def _teacher_term(self, fitness: Sequence[float]) -> float:
        return fitness[0]  # -kl or agreement: higher is better either way

    def __call__(self, genes: Iterable[Sequence[int]] = ()) -> tuple[float, ...]:
        """Fitness of ``genes`` (higher is better in both components)."""
        self.evaluations += 1
        genes = list(genes)
        teacher = tuple(self.calibration(genes))
        if self.combine is None:
            return teacher
        labelled = tuple(self.val(genes))
        if self.combine == "tiebreak":
            return labelled[0], self._teacher_term(teacher)
        return labelled[0] + self.weight * self._teacher_term(teacher), labelled[0]

    def _summaries(self, module: nn.Module) -> dict[str, float]:
        teacher = {f"teacher_{k}": v for k, v in self.calibration.run(module).summary().items()}
        if self.val is None:
            return {**self.calibration.metric.summary(), **teacher}
        return {**self.val.run(module).summary(), **teacher}

    def scores(self, genes: Iterable[Sequence[int]] = ()) -> dict[str, float]:
        """Validation metric values (headline) plus ``teacher_kl`` and ``teacher_agreement``."""
        with self.qmodel.applied(genes):
            with torch.inference_mode():
                return self._summaries(self.qmodel.module)

    def score_module(self, module: nn.Module) -> dict[str, float]:
        return self._summaries(module)

    def with_data(self, data: DataSpec) -> Evaluator:
        """A plain evaluator of the labelled metric on other data (used to re-score on test)."""
        if self.val is None:
            raise ValueError("this TeacherEvaluator has no labelled metric (val=None); pass test_evaluator= "
                             "to evolve, or give val=")
        return self.val.with_data(data)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()
