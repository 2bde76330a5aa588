"""``evolve``: run a DEAP algorithm over rounding genes, then re-score the result on held-out test data.

The generational loop is DEAP's own (``varOr`` / ``varAnd`` and ``toolbox.select``, step for step
as in ``eaMuPlusLambda``, ``eaMuCommaLambda`` and ``eaSimple``), written out here so that a
progress bar, a per-generation callback and statistics can hook in. The test split is given to
an evaluator only after the last generation.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from deap import algorithms, tools

from .baselines import Rounding, StartSpec, changed_weights, resolve_start
from .checkpoint import (
    CheckpointError,
    data_fingerprint,
    load_checkpoint,
    model_fingerprint,
    open_checkpoints,
)
from .evaluation.batched import BatchedEvaluator, resolve_device
from .evaluation.evaluator import DataSpec, Evaluator, model_placement
from .evaluation.incremental import IncrementalEvaluator, announce_parents
from .evaluation.metrics import MetricSpec
from .genome import Individual
from .parallel import make_map
from .quantization.model import QuantizedModel
from .toolbox import CROSSOVERS, gene_effects, make_toolbox
from .versions import versions

__all__ = ["EvolutionConfig", "EvolutionResult", "evolve", "check_evolution_options", "ALGORITHMS", "SAMPLERS",
           "LAYER_CHOICES"]

ALGORITHMS = ("mu+lambda", "mu,lambda", "simple", "nsga2")
SAMPLERS = ("uniform", "residual")
#: Named layer choices; a list of per-layer weights is valid too.
LAYER_CHOICES = ("uniform", "size")
_AT_LEAST = {"mu": 1, "lambda_": 1, "hof_size": 1, "max_offset": 1, "ngen": 0, "seed": 0, "init_genes": 0}


def _valid_layer_weights(value: Any) -> bool:
    if not isinstance(value, (list, tuple, np.ndarray)) or len(value) == 0:
        return False
    if any(isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) for w in value):
        return False
    weights = [float(w) for w in value]
    return all(math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0


def _option_error(name: str, value: Any) -> Optional[str]:
    """Why ``value`` is not valid for the :class:`EvolutionConfig` field ``name`` (None: it is)."""
    if name in _AT_LEAST:
        least = _AT_LEAST[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            return f"{name}={value!r} is not valid; use an integer >= {least}"
    elif name in ("cxpb", "mutpb"):
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)
                or not 0.0 <= value <= 1.0):
            return f"{name}={value!r} is not valid; use a probability in [0, 1]"
    elif name == "algorithm":
        if value not in ALGORITHMS:
            return f"algorithm={value!r} is not valid; use one of {', '.join(ALGORITHMS)}"
    elif name == "sampler":
        if value not in SAMPLERS:
            return f"sampler={value!r} is not valid; use {' or '.join(repr(s) for s in SAMPLERS)}"
    elif name == "layer_choice":
        if not (value in LAYER_CHOICES if isinstance(value, str) else _valid_layer_weights(value)):
            return (f"layer_choice={value!r} is not valid; use {', '.join(repr(c) for c in LAYER_CHOICES)} or a "
                    "list of per-layer weights (non-negative numbers with a positive sum, one per quantized layer)")
    elif name == "crossover":
        if value is not None and (not isinstance(value, str) or value not in CROSSOVERS):
            return f"crossover={value!r} is not valid; use one of {', '.join(CROSSOVERS)} or None"
    elif name == "include_base":
        if not isinstance(value, bool):
            return f"include_base={value!r} is not valid; use True or False"
    return None


def check_evolution_options(options: Mapping[str, Any], where: str = "") -> None:
    """Check each :class:`EvolutionConfig` field in ``options`` on its own (not how they combine),
    raising ``ValueError`` (prefixed with ``where``) that names the bad value and the valid ones.

    For partial options (e.g. a comparison's configuration over shared defaults); other keys are ignored.
    """
    for name, value in options.items():
        message = _option_error(name, value)
        if message is not None:
            raise ValueError(f"{where}{message}")


class _Default:
    """``evolve``'s default ``population_batch``: ``"auto"`` where evolve builds the fast evaluator, else none."""

    def __repr__(self) -> str:
        return "DEFAULT"


_DEFAULT_BATCH = _Default()

@dataclass(frozen=True)
class EvolutionConfig:
    """Parameters of the evolutionary search; checked on construction."""

    mu: int = 20
    lambda_: int = 40
    ngen: int = 30
    cxpb: float = 0.2
    mutpb: float = 0.8
    algorithm: str = "mu+lambda"
    hof_size: int = 5
    seed: int = 0
    init_genes: int = 8
    layer_choice: Any = "uniform"
    sampler: str = "residual"
    max_offset: int = 1
    crossover: Optional[str] = "uniform"
    include_base: bool = True

    def __post_init__(self) -> None:
        check_evolution_options({f.name: getattr(self, f.name) for f in fields(self)})
        if self.algorithm != "simple" and self.cxpb + self.mutpb > 1.0 + 1e-12:
            raise ValueError(f"cxpb + mutpb = {self.cxpb + self.mutpb:g} is not valid for {self.algorithm}; "
                             "their sum must be at most 1")
        if self.algorithm == "mu,lambda" and self.lambda_ < self.mu:
            raise ValueError(f"mu={self.mu} > lambda_={self.lambda_} is not valid for (mu,lambda); "
                             "lambda_ must be at least mu")
        if self.crossover is None and self.cxpb > 0:
            raise ValueError(f"cxpb={self.cxpb} needs a crossover; set crossover or cxpb=0")

    @property
    def toolbox_options(self) -> dict[str, Any]:
        return {"init_genes": self.init_genes, "layer_choice": self.layer_choice, "sampler": self.sampler,
                "max_offset": self.max_offset, "crossover": self.crossover,
                "select": {"simple": "tournament", "nsga2": "nsga2"}.get(self.algorithm, "best")}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def primary_fitness(individual: Any) -> float:
    return individual.fitness.values[0]


def _genes(individual: Sequence) -> list[list[int]]:
    return [[int(g[0]), int(g[1]), int(g[2])] for g in individual]


@dataclass
class EvolutionResult:
    """Everything a run produced. ``to_dict()`` is what ``results.json`` holds."""

    config: dict[str, Any]
    metric: str
    population: list
    logbook: tools.Logbook
    hall_of_fame: list
    baseline: dict[str, float]
    best: dict[str, Any]
    hall_of_fame_scores: list[dict[str, Any]]
    evaluations: int
    seconds: float
    float_scores: Optional[dict[str, float]] = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def evals_per_second(self) -> float:
        return self.evaluations / self.seconds if self.seconds > 0 else float("nan")

    @property
    def best_individual(self) -> list:
        return self.hall_of_fame[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "metric": self.metric,
            "float": self.float_scores,
            "baseline": self.baseline,
            "best": self.best,
            "hall_of_fame": self.hall_of_fame_scores,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "evals_per_second": self.evals_per_second,
            "logbook": [dict(record) for record in self.logbook],
            "details": self.details,
            "versions": versions(),
        }


def _start_name(start: StartSpec) -> Optional[str]:
    """What names ``start`` before it is computed: a start's name, a Rounding's, a callable's, or ``"custom"``."""
    if start is None or isinstance(start, str):
        return start
    if isinstance(start, Rounding):
        return start.name
    return getattr(start, "__name__", "custom") if callable(start) else "custom"


def _search_identity(evaluator: Any, start: StartSpec, start_options: Optional[dict[str, Any]]) -> dict[str, Any]:
    """What a checkpoint records, beyond the model, to refuse a resume on which fitness values would mean
    something else: the start (name, options), the metric and a SHA-256 of the validation data (of the
    batches an :class:`Evaluator` holds; None for other evaluators). See ``Checkpoint.check_search``."""
    metric = getattr(evaluator, "metric", None)
    identity: dict[str, Any] = {
        "start": {"name": _start_name(start), "options": dict(start_options or {})},
        "metric": {"name": getattr(evaluator, "headline", None),
                   "kind": type(metric).__name__ if metric is not None else type(evaluator).__name__},
        "val_sha256": None}
    if isinstance(evaluator, Evaluator) and (getattr(evaluator, "data", None) is not None
                                             or getattr(evaluator, "_batches", None) is not None):
        evaluator.batches_for(evaluator.qmodel.module)  # materialized (and placed) as its first evaluation would
        identity["val_sha256"] = data_fingerprint(evaluator._batches)
    return identity


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="evolving", unit="gen", leave=False)


def evolve(qmodel: QuantizedModel, val: DataSpec = None, test: Optional[DataSpec] = None, *,
           config: Optional[EvolutionConfig] = None, evaluator: Optional[Callable] = None,
           test_evaluator: Optional[Callable] = None, metric: MetricSpec = "accuracy", batch_size: int = 512,
           toolbox: Any = None, float_model: Optional[torch.nn.Module] = None,
           callback: Optional[Callable[[dict[str, Any]], Any]] = None, progress: bool = True,
           checkpoint: Optional[Union[str, os.PathLike]] = None, checkpoint_every: Optional[int] = None,
           resume: Optional[Union[str, os.PathLike]] = None, run_info: Optional[dict[str, Any]] = None,
           start: StartSpec = None, calibration: Optional[DataSpec] = None,
           start_options: Optional[dict[str, Any]] = None, fast: bool = True,
           backend: str = "serial", workers: Optional[int] = None, ray_address: Optional[str] = None,
           device: Union[None, str, torch.device] = None,
           population_batch: Union[None, int, str, _Default] = _DEFAULT_BATCH,
           **config_options: Any) -> EvolutionResult:
    """Evolve rounding genes for ``qmodel`` on the validation split; re-score on test afterwards.

    Parameters of the search come as an :class:`EvolutionConfig` or as keyword arguments
    (``mu=20, lambda_=40, ngen=30, cxpb=0.2, mutpb=0.8, algorithm="mu+lambda", hof_size=5,
    seed=0``, ...). ``val``/``test`` are data (DataLoader, Dataset or ``(inputs, targets)``);
    alternatively pass ready ``evaluator``/``test_evaluator`` callables. ``toolbox`` replaces
    the one :func:`make_toolbox` would build. ``callback(state)`` is called after every
    generation with the generation number, population, hall of fame and logbook; returning
    ``True`` stops the search early.

    ``checkpoint="DIR"`` saves the loop's whole state there every ``checkpoint_every``
    generations (default 1) and at the end; ``resume="DIR"`` (or a checkpoint file) carries on
    from it with the saved configuration (only ``ngen`` may be raised), giving the same hall of
    fame and logbook as an uninterrupted run (see :mod:`deap_quant.checkpoint`; the logbook's
    wall-time column ``seconds`` continues from the saved elapsed time). ``run_info`` is a
    JSON-able description of the run, kept in checkpoints and in ``config["run"]``.

    ``start="nearest" | "adaround" | "stochastic"`` (or state tensors, or a callable ``qmodel ->
    states``; see :func:`deap_quant.baselines.resolve_start`) first computes that rounding and
    **rebases ``qmodel`` in place** to it (:meth:`QuantizedModel.rebase_`): the baseline in the
    result is then the start rounding, genes are offsets from it, and the result's genes apply
    to ``qmodel`` as it is after the call. Pass ``copy.deepcopy(qmodel)`` to keep the original.
    ``"adaround"`` needs ``calibration=`` (training inputs; ``float_model`` gives its targets if
    passed), ``"stochastic"`` picks the best of N draws by the validation fitness; options of
    either go in ``start_options`` (e.g. ``{"steps": 1000}`` or ``{"draws": 20}``), seeded by
    ``seed``. The start is recomputed on ``resume``: checkpoints record the start's name and options,
    the metric, and SHA-256s of the validation data and of the model rebased to its start, and a
    resume where any of these differ is refused (:class:`~deap_quant.checkpoint.CheckpointError`
    naming it), so fitness values of two different problems are never mixed.

    ``algorithm="nsga2"`` runs NSGA-II (``(mu+lambda)`` with ``tools.selNSGA2``) over
    (validation metric, number of changed weights); its Pareto front, re-scored on test after the
    search, is in ``details["pareto_front"]``.

    Individuals are judged by the weights they change, not by how their genes are written: the
    hall of fame (and Pareto front) keeps one member per distinct set of changes, and every
    reported entry gives ``changed_weights`` beside its ``genes`` (genes that leave a weight where
    it was, e.g. in a hand-made toolbox, do not count).

    ``fast=True`` (default) evaluates with :class:`~deap_quant.evaluation.IncrementalEvaluator`
    (cached activations, memoisation, exact early rejection in ``(mu+lambda)``): the same
    selection, hall of fame and logbook as ``fast=False`` (the plain :class:`Evaluator`), sooner.

    ``backend="processes" | "ray"`` evaluates each generation on ``workers`` worker processes or
    Ray actors (``ray_address`` joins a Ray cluster), registered as ``toolbox.map``; each worker
    gets the evaluator once. Results are identical to ``backend="serial"`` for every number of
    workers (see :mod:`deap_quant.parallel`).

    ``device="cpu" | "cuda" | "cuda:N" | torch.device`` runs the search there: the quantized model
    (and ``float_model``) are moved to it for the call and moved back afterwards; the evaluators
    follow the model (data moved once, activation caches on the device). ``None`` (default) keeps
    the model's own device. A device this machine does not have is a ``ValueError`` naming those it
    has. Checkpoints and results hold genes and fitness values only: a run written on one device
    resumes on another (fitness values computed on different devices may differ in the last bits).

    ``population_batch=K`` (an integer, or ``"auto"``: from free memory) evaluates each generation
    with a :class:`~deap_quant.evaluation.BatchedEvaluator` registered as ``toolbox.map`` (the
    offspring together, ``K`` at a time, stacked on CUDA): the same fitness values, selection, hall
    of fame and logbook as one at a time. With ``backend="processes" | "ray"`` each worker batches
    its share. A ``BatchedEvaluator`` passed as ``evaluator=`` is used the same way. By default
    (``population_batch`` not given) it is ``"auto"`` whenever evolve builds the fast evaluator
    itself; ``None`` evaluates one at a time with the
    :class:`~deap_quant.evaluation.IncrementalEvaluator`.
    """
    if device is not None:
        target = resolve_device(device, qmodel.module)
        moved = [(module, model_placement(module)[0]) for module in (qmodel.module, float_model)
                 if module is not None and model_placement(module)[0] not in (None, target)]
        for module, _ in moved:
            module.to(target)
        try:
            return evolve(qmodel, val, test, config=config, evaluator=evaluator, test_evaluator=test_evaluator,
                          metric=metric, batch_size=batch_size, toolbox=toolbox, float_model=float_model,
                          callback=callback, progress=progress, checkpoint=checkpoint,
                          checkpoint_every=checkpoint_every, resume=resume, run_info=run_info, start=start,
                          calibration=calibration, start_options=start_options, fast=fast, backend=backend,
                          workers=workers, ray_address=ray_address, population_batch=population_batch,
                          **config_options)
        finally:
            for module, origin in reversed(moved):
                module.to(origin)
    if population_batch is _DEFAULT_BATCH:  # batched wherever evolve builds the fast evaluator itself
        population_batch = "auto" if evaluator is None and fast else None
    elif population_batch is not None:
        if evaluator is not None:
            raise ValueError("population_batch applies to the evaluator evolve builds; with evaluator=..., pass a "
                             "BatchedEvaluator(..., population_batch=K) instead")
        if not fast:
            raise ValueError(f"population_batch={population_batch!r} needs the fast evaluator (fast=True)")
        if population_batch != "auto" and (isinstance(population_batch, bool) or not isinstance(population_batch, int)
                                           or population_batch < 1):
            raise ValueError(f"population_batch={population_batch!r} is not valid; use an integer >= 1, 'auto' "
                             "or None")
    if config is not None and config_options:
        raise TypeError("pass either config= or keyword options, not both")
    resumed = None
    if resume is not None:
        resumed = load_checkpoint(resume)
        resumed.check_compatible(qmodel)
        requested = (config.to_dict() if config is not None else
                     EvolutionConfig(**{**resumed.config, **config_options}).to_dict() if config_options else None)
        config = EvolutionConfig(**resumed.resolve_config(requested))
        run_info = resumed.run_info if run_info is None else run_info
    elif config is None:
        config = EvolutionConfig(**config_options)
    resumed, checkpoints = open_checkpoints(qmodel, checkpoint=checkpoint, every=checkpoint_every,
                                            resume=resumed, run_info=run_info)
    if evaluator is None:
        if val is None:
            raise ValueError("evolve needs validation data (val=...) or an evaluator")
        if population_batch is not None:
            evaluator = BatchedEvaluator(qmodel, val, metric=metric, batch_size=batch_size,
                                         population_batch=population_batch)
        else:
            evaluator = (IncrementalEvaluator if fast else Evaluator)(qmodel, val, metric=metric, batch_size=batch_size)
    search = None
    if checkpoints is not None:  # what fitness values depend on beyond the model, checked before the start runs
        search = _search_identity(evaluator, start, start_options)
        if resumed is not None:
            resumed.check_search(search, ("start", "metric", "val_sha256"))
    start_info = None
    given_states = None
    if start is not None:  # before the toolbox: residual-guided sampling reads the rebased residuals
        if resumed is not None:  # put back if the resume is refused below
            given_states = [qmodel.base_states(layer).clone() for layer in range(len(qmodel.layer_table()))]
        rounding = resolve_start(start, qmodel, evaluator=evaluator, calibration=calibration,
                                 float_model=float_model, seed=config.seed, options=start_options)
        start_info = {"name": rounding.name, "changed_weights": changed_weights(qmodel, rounding.states),
                      "seconds": rounding.seconds, "evaluations": rounding.evaluations,
                      "details": dict(getattr(rounding, "details", None) or {})}
        qmodel.rebase_(rounding.states)
    if search is not None:
        search["base_sha256"] = model_fingerprint(qmodel)["sha256"]  # grids and the (rebased) base states
        if resumed is not None:
            try:
                resumed.check_search(search, ("base_sha256",))
            except CheckpointError:
                if given_states is not None:
                    qmodel.rebase_(given_states)  # the model as it was given
                raise
    if toolbox is None:
        toolbox = make_toolbox(qmodel, evaluator, **config.toolbox_options)
    parallel = make_map(backend, workers, toolbox.evaluate, ray_address=ray_address)  # workers start here, once
    own_map = toolbox.map
    if backend != "serial":  # on "serial" a user's toolbox keeps its own map
        toolbox.register("map", parallel)
    elif isinstance(evaluator, BatchedEvaluator) and getattr(own_map, "func", own_map) is map:
        toolbox.register("map", evaluator.map)  # the offspring of a generation in one call
    _seed_everything(config.seed)
    started = time.perf_counter()
    evaluations = 0

    def evaluate(individuals: list) -> int:
        invalid = [ind for ind in individuals if not ind.fitness.valid]
        for ind, fit in zip(invalid, toolbox.map(toolbox.evaluate, invalid)):
            ind.fitness.values = fit
        return len(invalid)

    def record(gen: int, nevals: int) -> dict[str, Any]:
        values = np.array([primary_fitness(ind) for ind in population], dtype=np.float64)
        entry = {"gen": gen, "nevals": nevals, "evals": evaluations, "max": float(values.max()),
                 "mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
                 "genes": float(np.mean([len(ind) for ind in population])),
                 "best_genes": len(hall_of_fame[0]), "seconds": time.perf_counter() - started}
        logbook.record(**entry)
        return entry

    effects = gene_effects(qmodel)  # after any rebase: genes are offsets from the base in force now
    hall_of_fame = tools.HallOfFame(config.hof_size, similar=effects.same)
    logbook = tools.Logbook()
    logbook.header = ["gen", "nevals", "evals", "max", "mean", "std", "genes", "seconds"]
    last_gen = config.ngen
    pareto_front = tools.ParetoFront(similar=effects.same) if config.algorithm == "nsga2" else None
    archives = {"pareto_front": pareto_front} if pareto_front is not None else {}  # checkpointed with the HoF

    def save_checkpoint(gen: int, finished: bool) -> None:
        if checkpoints is not None and checkpoints.due(gen, finished):
            checkpoints.save(generation=gen, config=config.to_dict(), population=population,
                             hall_of_fame=hall_of_fame, logbook=logbook, evaluations=evaluations,
                             elapsed_seconds=time.perf_counter() - started, finished=finished, archives=archives,
                             search=search)

    def no_threshold() -> None:  # an early-rejection threshold holds only for the generation that set it
        if hasattr(evaluator, "reject_below"):
            evaluator.reject_below(None)

    no_threshold()
    if resumed is None:
        population = toolbox.population(n=config.mu)
        if config.include_base and population:
            population[0] = (toolbox.individual_class() if hasattr(toolbox, "individual_class")
                             else type(population[0])())
        nevals = evaluate(population)
        evaluations += nevals
        hall_of_fame.update(population)
        record(0, nevals)
        first_gen = 1
        save_checkpoint(0, finished=config.ngen == 0)
    else:  # carry on exactly where the checkpoint left off (RNG states included)
        population = resumed.restore(getattr(toolbox, "individual_class", Individual), hall_of_fame, logbook,
                                     archives)
        evaluations = resumed.evaluations
        started -= resumed.elapsed_seconds
        first_gen = resumed.generation + 1
        if resumed.finished and config.ngen == resumed.config.get("ngen"):
            last_gen = resumed.generation  # it ended there (possibly stopped by a callback)
        if resumed.torch_threads != torch.get_num_threads():
            warnings.warn(f"the checkpoint was written with {resumed.torch_threads} torch threads, this process "
                          f"uses {torch.get_num_threads()}; scores may differ in the last bits "
                          "(torch.set_num_threads to match)", RuntimeWarning, stacklevel=2)
    if pareto_front is not None:
        pareto_front.update(population)
    bar = _progress(config.ngen, progress)
    if bar is not None and first_gen > 1:
        bar.update(min(first_gen - 1, config.ngen))
    try:
        for gen in range(first_gen, last_gen + 1):
            if config.algorithm == "simple":
                offspring = toolbox.select(population, len(population))
                offspring = algorithms.varAnd(offspring, toolbox, config.cxpb, config.mutpb)
            else:
                offspring = algorithms.varOr(population, toolbox, config.lambda_, config.cxpb, config.mutpb)
            if config.algorithm == "mu+lambda":  # a fast evaluator may then stop offspring that cannot be selected
                announce_parents(evaluator, toolbox, population, config.mu, hall_of_fame)
            else:
                no_threshold()
            nevals = evaluate(offspring)
            evaluations += nevals
            hall_of_fame.update(offspring)
            if pareto_front is not None:
                pareto_front.update(population + offspring)
            if config.algorithm in ("mu+lambda", "nsga2"):
                population[:] = toolbox.select(population + offspring, config.mu)
            elif config.algorithm == "mu,lambda":
                population[:] = toolbox.select(offspring, config.mu)
            else:
                population[:] = offspring
            entry = record(gen, nevals)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(best=f"{entry['max']:.4f}", genes=len(hall_of_fame[0]))
            stop = callback is not None and callback({"gen": gen, "population": population,
                                                      "hall_of_fame": hall_of_fame, "logbook": logbook}) is True
            save_checkpoint(gen, finished=stop or gen == last_gen)
            if stop:
                break
    finally:
        if bar is not None:
            bar.close()
        no_threshold()
        parallel_info = parallel.describe()
        parallel.close()
        toolbox.map = own_map  # a caller's toolbox gets its map back, not a closed one
    search_seconds = time.perf_counter() - started

    # The search is over: only now is the test split touched.
    headline = getattr(evaluator, "headline", "score")
    if test_evaluator is None and test is not None:
        if isinstance(evaluator, IncrementalEvaluator):  # a handful of models, each scored once: no cache to build
            test_evaluator = Evaluator(qmodel, test, metric=copy.copy(evaluator.metric), batch_size=evaluator.batch_size)
        else:
            test_evaluator = evaluator.with_data(test) if hasattr(evaluator, "with_data") else None

    def scored(genes: Sequence) -> dict[str, Any]:
        val_scores = evaluator.scores(genes) if hasattr(evaluator, "scores") else {headline: evaluator(genes)[0]}
        entry: dict[str, Any] = {"val": val_scores[headline], "genes": _genes(genes),
                                 "changed_weights": effects.count(genes), "val_scores": val_scores}
        if test_evaluator is not None:
            test_scores = (test_evaluator.scores(genes) if hasattr(test_evaluator, "scores")
                           else {headline: test_evaluator(genes)[0]})
            entry.update(test=test_scores[headline], test_scores=test_scores)
        return entry

    baseline = scored([])
    baseline.pop("genes")
    baseline.pop("changed_weights")
    hof_scores = [scored(ind) for ind in hall_of_fame]
    float_scores = None
    if float_model is not None and hasattr(evaluator, "score_module"):
        float_scores = {"val": evaluator.score_module(float_model)[headline]}
        if test_evaluator is not None:
            float_scores["test"] = test_evaluator.score_module(float_model)[headline]
    best = dict(hof_scores[0])
    best["n_genes"] = len(best["genes"])
    extra: dict[str, Any] = {}
    if start_info is not None:
        extra["start"] = start_info
    if pareto_front is not None:
        extra["pareto_front"] = [{**scored(ind), "n_genes": len(ind)} for ind in pareto_front]
    return EvolutionResult(
        config={**config.to_dict(), "quantization": dict(getattr(qmodel, "config", {})),
                **({"run": run_info} if run_info else {})},
        metric=headline, population=population, logbook=logbook, hall_of_fame=list(hall_of_fame),
        baseline=baseline, best=best, hall_of_fame_scores=hof_scores, evaluations=evaluations,
        seconds=time.perf_counter() - started, float_scores=float_scores,
        details={"search_seconds": search_seconds, "search_evals_per_second": evaluations / max(search_seconds, 1e-9),
                 "n_weights": sum(layer.numel for layer in qmodel.layer_table()),
                 "layers": [layer.to_dict() for layer in qmodel.layer_table()],
                 "torch_threads": torch.get_num_threads(), "parallel": parallel_info,
                 "device": str(model_placement(qmodel.module)[0] or "cpu"),
                 "population_batch": (evaluator.batching_stats() if isinstance(evaluator, BatchedEvaluator)
                                      else None),
                 "resumed_from_generation": None if resumed is None else resumed.generation, **extra},
    )
