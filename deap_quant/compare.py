"""Compare rounding baselines and evolutionary configurations across seeds, with statistics and plots.

A *comparison* runs named configurations (:class:`RunConfig`) on one model and bit-width for
several seeds and writes into an output folder:

* ``summary.json`` -- one row per configuration and seed (rewritten after every run, so an
  interrupted comparison keeps what it finished; runs go seed by seed):
  ``{"config", "seed", "val", "test", "evaluations", "seconds"}`` (held-out test of the
  selected individual; baselines appear as configurations ``nearest-minmax``, ``nearest-mse``,
  ``stochastic`` and ``adaround``);
* ``runs.json`` / ``runs.csv`` -- the same rows with details (hall of fame re-scored on test,
  start rounding, Pareto fronts, convergence curves);
* ``summary.csv`` and ``report.md`` -- mean, std and 95% confidence interval (Student t) per
  configuration, each evolutionary configuration against its starting baseline (paired
  one-sided Wilcoxon signed-rank test over seeds and two-sided Mann-Whitney U), and the matrix
  of pairwise Mann-Whitney U p-values (scipy);
* ``convergence.png`` -- best search fitness against evaluations, median and min-max band
  across seeds; ``pareto.png`` -- NSGA-II fronts (changed weights vs accuracy) on val and test.

The seed varies every random choice of a run (evolution, AdaRound's minibatches and calibration
sample, stochastic draws, the teacher's calibration split); the float model and the
train/val/test split stay fixed. The test split is scored only after a run's search and never
selects anything. The shipped configuration set is ``deap_quant/configs/default_compare.json``.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from .baselines import AdaRoundConfig, Rounding, adaround, best_stochastic, changed_weights, nearest
from .data.augment import shifted_copies
from .evaluation.evaluator import Evaluator
from .evaluation.incremental import IncrementalEvaluator
from .evaluation.teacher import TeacherEvaluator, split_calibration, teacher_outputs
from .evolve import EvolutionConfig, evolve
from .quantization.model import QuantizedModel
from .quantization.quantize import QuantConfig, quantize
from .report import check_writable, write_json
from .zoo.cache import atomic_write_bytes
from .zoo.training import accuracy

__all__ = ["RunConfig", "CompareSettings", "CompareResult", "compare", "load_configs", "default_config_path",
           "summarize", "paired_tests", "pairwise_tests", "BASELINES", "FITNESSES", "SELECTIONS", "STARTS",
           "SUMMARY_KEYS"]

BASELINES = ("nearest", "stochastic", "adaround")
STARTS = BASELINES
FITNESSES = ("val", "teacher-kl", "teacher-agreement", "val+teacher", "val+teacher-weighted")
SELECTIONS = ("fitness", "val", "holdout")
SCALE_METHODS = ("minmax", "mse")
SUMMARY_KEYS = ("config", "seed", "val", "test", "evaluations", "seconds")
_EVOLUTION_FIELDS = {f.name for f in fields(EvolutionConfig)} - {"seed"}

ToolboxBuilder = Callable[[QuantizedModel, Callable, EvolutionConfig], Any]


@dataclass(frozen=True)
class RunConfig:
    """One named configuration of a comparison.

    * ``kind="baseline"``: ``method`` is ``nearest``, ``stochastic`` (best of N draws on
      validation) or ``adaround``, on the grid of ``scale_method``.
    * ``kind="evolve"``: evolution started from ``start`` (a baseline method), with the search
      ``fitness``: ``val`` (validation metric), ``teacher-kl`` / ``teacher-agreement`` (label-free,
      on a calibration split of the training data), ``val+teacher`` (validation metric, teacher
      KL as tie-breaker) or ``val+teacher-weighted`` (validation metric - ``teacher_weight`` *
      KL). ``evolution`` holds :class:`EvolutionConfig` fields over the comparison's defaults.
      ``select`` picks the reported individual among the hall of fame and the start: ``fitness``
      (the search's best), ``val`` (best validation metric; meaningful when the fitness is the
      teacher) or ``holdout`` (lowest teacher KL on a held-out part of the training data).
      ``toolbox`` (Python only) builds the DEAP toolbox: ``toolbox(qmodel, evaluator, config)``.
    """

    name: str
    kind: str = "evolve"
    method: Optional[str] = None
    scale_method: str = "mse"
    start: str = "nearest"
    fitness: str = "val"
    select: str = "fitness"
    teacher_weight: float = 1.0
    evolution: Mapping[str, Any] = field(default_factory=dict)
    toolbox: Optional[ToolboxBuilder] = None
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "," in self.name:
            raise ValueError(f"name={self.name!r} is not valid; use a non-empty name without commas")
        if self.kind not in ("baseline", "evolve"):
            raise ValueError(f"config {self.name!r}: kind={self.kind!r} is not valid; use 'baseline' or 'evolve'")
        if self.kind == "baseline" and self.method not in BASELINES:
            raise ValueError(f"config {self.name!r}: method={self.method!r} is not valid; use one of "
                             f"{', '.join(BASELINES)}")
        if self.scale_method not in SCALE_METHODS:
            raise ValueError(f"config {self.name!r}: scale_method={self.scale_method!r} is not valid; use "
                             f"{' or '.join(SCALE_METHODS)}")
        if self.start not in STARTS:
            raise ValueError(f"config {self.name!r}: start={self.start!r} is not valid; use one of {', '.join(STARTS)}")
        if self.fitness not in FITNESSES:
            raise ValueError(f"config {self.name!r}: fitness={self.fitness!r} is not valid; use one of "
                             f"{', '.join(FITNESSES)}")
        if self.select not in SELECTIONS:
            raise ValueError(f"config {self.name!r}: select={self.select!r} is not valid; use one of "
                             f"{', '.join(SELECTIONS)}")
        if not isinstance(self.teacher_weight, (int, float)) or not self.teacher_weight >= 0:
            raise ValueError(f"config {self.name!r}: teacher_weight={self.teacher_weight!r} is not valid; "
                             "use a number >= 0")
        unknown = set(self.evolution) - _EVOLUTION_FIELDS
        if unknown:
            raise ValueError(f"config {self.name!r}: unknown evolution option(s) {sorted(unknown)}; valid: "
                             f"{', '.join(sorted(_EVOLUTION_FIELDS))} (the seed comes from the comparison)")
        if self.toolbox is not None and not callable(self.toolbox):
            raise ValueError(f"config {self.name!r}: toolbox must be a callable (qmodel, evaluator, config) -> Toolbox")

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"config {entry.get('name')!r}: unknown key(s) {sorted(unknown)}; valid: "
                             f"{', '.join(sorted(known))}")
        return cls(**entry)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["evolution"] = dict(self.evolution)
        out["toolbox"] = getattr(self.toolbox, "__name__", None) if self.toolbox is not None else None
        return out

    @property
    def uses_teacher(self) -> bool:
        return self.kind == "evolve" and "teacher" in self.fitness


@dataclass(frozen=True)
class CompareSettings:
    """Settings shared by every configuration of a comparison; checked on construction.

    ``evolution``: default :class:`EvolutionConfig` fields of every evolutionary configuration.
    ``adaround``: :class:`~deap_quant.baselines.AdaRoundConfig` fields (the seed is the run's).
    ``teacher_samples``: training inputs in the teacher's calibration split (``None``: all),
    of which the share ``holdout`` is held out for ``select="holdout"`` and never searched on.
    ``teacher_augment``: shifted copies of each calibration image added to both parts (label-free,
    see :func:`deap_quant.data.augment.shifted_copies`; 0: none).
    """

    bits: int = 2
    per_channel: bool = True
    symmetric: bool = True
    evolution: Mapping[str, Any] = field(default_factory=dict)
    adaround: Mapping[str, Any] = field(default_factory=dict)
    stochastic_draws: int = 20
    teacher_samples: Optional[int] = None
    holdout: float = 0.3
    teacher_augment: int = 0
    batch_size: int = 512

    def __post_init__(self) -> None:
        QuantConfig(bits=self.bits, per_channel=self.per_channel, symmetric=self.symmetric)
        unknown = set(self.evolution) - _EVOLUTION_FIELDS
        if unknown:
            raise ValueError(f"unknown evolution option(s) {sorted(unknown)}; valid: {', '.join(sorted(_EVOLUTION_FIELDS))}")
        if "seed" in self.adaround:
            raise ValueError("adaround.seed is not valid here; every run uses its own seed")
        AdaRoundConfig(**self.adaround)
        for name, least in (("stochastic_draws", 1), ("batch_size", 1), ("teacher_augment", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name}={value!r} is not valid; use an integer >= {least}")
        if self.teacher_samples is not None and (isinstance(self.teacher_samples, bool)
                                                 or not isinstance(self.teacher_samples, int)
                                                 or self.teacher_samples < 2):
            raise ValueError(f"teacher_samples={self.teacher_samples!r} is not valid; use an integer >= 2 or None")
        if not isinstance(self.holdout, (int, float)) or not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout={self.holdout!r} is not valid; use a fraction strictly between 0 and 1")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["evolution"], out["adaround"] = dict(self.evolution), dict(self.adaround)
        return out


# ---------------------------------------------------------------------------- configuration files
def default_config_path() -> Path:
    """The shipped configuration set."""
    return Path(__file__).with_name("configs") / "default_compare.json"


def load_configs(source: Union[str, Path, Mapping[str, Any], None] = None) -> tuple[list[RunConfig], dict[str, Any]]:
    """Read a configuration file (JSON; YAML if PyYAML is installed) or mapping.

    The file holds ``{"configs": [...], "evolution": {...}, "settings": {...}}``: the named
    configurations, default evolution options, and :class:`CompareSettings` fields. Returns the
    configurations and the settings (with ``evolution`` folded in).
    """
    if source is None:
        source = default_config_path()
    if isinstance(source, Mapping):
        content, where = dict(source), "the configuration"
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ValueError(f"configuration file {where!r} does not exist")
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(f"{where} is YAML but PyYAML is not installed; pip install pyyaml or use JSON") from None
            content = yaml.safe_load(text)
        else:
            try:
                content = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON: {error}") from None
    if not isinstance(content, dict) or not isinstance(content.get("configs"), list) or not content["configs"]:
        raise ValueError(f"{where} must hold an object with a non-empty list 'configs'")
    unknown = set(content) - {"configs", "evolution", "settings", "description"}
    if unknown:
        raise ValueError(f"{where}: unknown top-level key(s) {sorted(unknown)}; valid: configs, evolution, "
                         "settings, description")
    configs = [RunConfig.from_dict(entry) for entry in content["configs"]]
    names = [c.name for c in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{where}: configuration name(s) {duplicates} appear more than once")
    settings = dict(content.get("settings") or {})
    settings["evolution"] = {**dict(content.get("evolution") or {}), **dict(settings.get("evolution") or {})}
    return configs, settings


def _as_configs(configs: Any) -> tuple[list[RunConfig], dict[str, Any]]:
    if configs is None or isinstance(configs, (str, Path, Mapping)):
        return load_configs(configs)
    out = []
    for entry in configs:
        if isinstance(entry, RunConfig):
            out.append(entry)
        elif isinstance(entry, Mapping):
            out.append(RunConfig.from_dict(entry))
        else:
            raise ValueError(f"configs entries must be RunConfig or dicts, got {type(entry).__name__}")
    if not out:
        raise ValueError("configs is empty; give at least one configuration")
    return out, {}


# ---------------------------------------------------------------------------- statistics
def _t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    from scipy import stats

    if len(values) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration (in first-seen order): n, mean/std of val and test, 95% CI of test, cost."""
    order = list(dict.fromkeys(row["config"] for row in rows))
    out = []
    for name in order:
        mine = [row for row in rows if row["config"] == name]
        test = np.array([row["test"] for row in mine], dtype=np.float64)
        val = np.array([row["val"] for row in mine], dtype=np.float64)
        low, high = _t_interval(test)
        out.append({"config": name, "n": len(mine),
                    "val_mean": float(val.mean()), "val_std": float(val.std(ddof=1)) if len(val) > 1 else 0.0,
                    "test_mean": float(test.mean()), "test_std": float(test.std(ddof=1)) if len(test) > 1 else 0.0,
                    "test_ci_low": low, "test_ci_high": high,
                    "evaluations_mean": float(np.mean([row["evaluations"] for row in mine])),
                    "seconds_mean": float(np.mean([row["seconds"] for row in mine]))})
    return out


def _mann_whitney(a: Sequence[float], b: Sequence[float], alternative: str = "two-sided") -> float:
    from scipy import stats

    if len(a) < 1 or len(b) < 1:
        return float("nan")
    if np.ptp(np.concatenate([a, b])) == 0:
        return 1.0  # all equal: no evidence of any difference
    return float(stats.mannwhitneyu(a, b, alternative=alternative).pvalue)


def _wilcoxon(differences: Sequence[float], alternative: str = "greater") -> float:
    from scipy import stats

    differences = np.asarray(differences, dtype=np.float64)
    if len(differences) < 1 or np.all(differences == 0):
        return 1.0 if len(differences) else float("nan")
    return float(stats.wilcoxon(differences, alternative=alternative).pvalue)


def pairwise_tests(rows: Sequence[Mapping[str, Any]], key: str = "test") -> list[dict[str, Any]]:
    """Two-sided Mann-Whitney U p-value of ``key`` for every pair of configurations."""
    by_config: dict[str, list[float]] = {}
    for row in rows:
        by_config.setdefault(row["config"], []).append(float(row[key]))
    names = list(by_config)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out.append({"a": a, "b": b, "mean_a": float(np.mean(by_config[a])), "mean_b": float(np.mean(by_config[b])),
                        "p_mannwhitney": _mann_whitney(by_config[a], by_config[b])})
    return out


def paired_tests(rows: Sequence[Mapping[str, Any]], pairs: Iterable[tuple[str, str]],
                 key: str = "test") -> list[dict[str, Any]]:
    """For each ``(config, reference)``: mean difference over common seeds, the one-sided paired
    Wilcoxon signed-rank p-value (config > reference) and the two-sided Mann-Whitney U p-value."""
    table: dict[tuple[str, Any], float] = {(row["config"], row["seed"]): float(row[key]) for row in rows}
    out = []
    for name, reference in pairs:
        seeds = sorted({s for (c, s) in table if c == name} & {s for (c, s) in table if c == reference})
        if not seeds:
            continue
        a = np.array([table[(name, s)] for s in seeds])
        b = np.array([table[(reference, s)] for s in seeds])
        out.append({"config": name, "reference": reference, "n": len(seeds), "mean": float(a.mean()),
                    "reference_mean": float(b.mean()), "difference": float((a - b).mean()),
                    "wins": int((a > b).sum()), "losses": int((a < b).sum()),
                    "p_wilcoxon_greater": _wilcoxon(a - b, "greater"), "p_mannwhitney": _mann_whitney(a, b)})
    return out


# ---------------------------------------------------------------------------- running
@dataclass
class CompareResult:
    """Rows (``summary.json``), detailed records, statistics and the written files."""

    rows: list[dict[str, Any]]
    records: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    paired: list[dict[str, Any]]
    pairwise: list[dict[str, Any]]
    settings: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)


class _Context:
    """What runs share: the float model, its data, quantized models per grid, and cached roundings."""

    def __init__(self, model: nn.Module, splits: Any, settings: CompareSettings):
        self.model = model.eval()
        self.splits = splits
        self.settings = settings
        self._qmodels: dict[str, QuantizedModel] = {}
        self._roundings: dict[tuple, Rounding] = {}
        self._teacher: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def qmodel(self, scale_method: str) -> QuantizedModel:
        """A fresh copy of the model quantized with nearest rounding on the ``scale_method`` grid."""
        if scale_method not in self._qmodels:
            s = self.settings
            self._qmodels[scale_method] = quantize(self.model, bits=s.bits, per_channel=s.per_channel,
                                                   symmetric=s.symmetric, scale_method=scale_method)
        return copy.deepcopy(self._qmodels[scale_method])

    def evaluator(self, qmodel: QuantizedModel, split: str) -> Evaluator:
        return Evaluator(qmodel, getattr(self.splits, split), batch_size=self.settings.batch_size)

    def rounding(self, method: str, scale_method: str, seed: int) -> Rounding:
        """The baseline rounding (cached: evolution started from it reuses the very same states)."""
        key = (method, scale_method, seed)
        if key not in self._roundings:
            qmodel = self.qmodel(scale_method)
            if method == "nearest":
                rounding = nearest(qmodel)
            elif method == "stochastic":
                rounding = best_stochastic(qmodel, self.evaluator(qmodel, "val"), draws=self.settings.stochastic_draws,
                                           seed=seed)
            else:
                config = AdaRoundConfig(**{**dict(self.settings.adaround), "seed": seed})
                rounding = adaround(qmodel, self.splits.train, float_model=self.model, config=config)
            self._roundings[key] = rounding
        return self._roundings[key]

    def teacher(self, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(search inputs, their float outputs, held-out inputs, their float outputs), computed once per seed."""
        if seed not in self._teacher:
            search, holdout = split_calibration(self.splits.train, self.settings.holdout, seed=seed,
                                                n=self.settings.teacher_samples)
            copies = self.settings.teacher_augment
            if copies:
                search = torch.cat([search, shifted_copies(search, copies, seed=seed)])
                holdout = torch.cat([holdout, shifted_copies(holdout, copies, seed=seed + 1)])
            self._teacher[seed] = (search, teacher_outputs(self.model, search), holdout,
                                   teacher_outputs(self.model, holdout))
        return self._teacher[seed]


def _search_evaluator(context: _Context, qmodel: QuantizedModel, config: RunConfig, seed: int) -> Callable:
    if config.fitness == "val":  # the fast evaluator: the same fitness values, bit for bit, sooner
        return IncrementalEvaluator(qmodel, context.splits.val, batch_size=context.settings.batch_size)
    search, logits, _, _ = context.teacher(seed)
    objective = "agreement" if config.fitness == "teacher-agreement" else "kl"
    combine = {"val+teacher": "tiebreak", "val+teacher-weighted": "weighted"}.get(config.fitness)
    return TeacherEvaluator(qmodel, search, teacher_logits=logits, objective=objective, val=context.splits.val,
                            combine=combine, weight=config.teacher_weight, batch_size=context.settings.batch_size)


def _run_baseline(context: _Context, config: RunConfig, seed: int) -> dict[str, Any]:
    started = time.perf_counter()
    rounding = context.rounding(config.method, config.scale_method, seed)
    qmodel = context.qmodel(config.scale_method)
    qmodel.rebase_(rounding.states)
    val = context.evaluator(qmodel, "val").scores([])["accuracy"]
    test = context.evaluator(qmodel, "test").scores([])["accuracy"]
    seconds = rounding.seconds + (time.perf_counter() - started)
    return {"config": config.name, "seed": seed, "val": val, "test": test, "evaluations": rounding.evaluations,
            "seconds": seconds, "kind": "baseline", "method": config.method,
            "details": {k: v for k, v in rounding.details.items() if k != "draw_fitness"}}


def _select(context: _Context, qmodel: QuantizedModel, config: RunConfig, seed: int, result: Any) -> dict[str, Any]:
    """The reported individual: the search's best, or the best of start + hall of fame by val or holdout."""
    if config.select == "fitness":
        return {**result.best, "selected": "best"}
    candidates = [{**result.baseline, "genes": []}] + list(result.hall_of_fame_scores)
    if config.select == "val":
        scores = [candidate["val"] for candidate in candidates]
    else:
        _, _, holdout, logits = context.teacher(seed)
        judge = TeacherEvaluator(qmodel, holdout, teacher_logits=logits, objective="kl",
                                 batch_size=context.settings.batch_size)
        scores = [judge(candidate["genes"]) for candidate in candidates]
    position = max(range(len(candidates)), key=lambda i: scores[i])
    chosen = dict(candidates[position])
    chosen["selected"] = "start" if position == 0 else f"hall_of_fame[{position - 1}]"
    return chosen


def _run_evolve(context: _Context, config: RunConfig, seed: int) -> dict[str, Any]:
    rounding = context.rounding(config.start, config.scale_method, seed)
    qmodel = context.qmodel(config.scale_method)
    moved = changed_weights(qmodel, rounding.states)
    qmodel.rebase_(rounding.states)
    evolution = EvolutionConfig(**{**dict(context.settings.evolution), **dict(config.evolution), "seed": seed})
    evaluator = _search_evaluator(context, qmodel, config, seed)
    toolbox = config.toolbox(qmodel, evaluator, evolution) if config.toolbox is not None else None
    test_evaluator = context.evaluator(qmodel, "test")
    result = evolve(qmodel, evaluator=evaluator, test_evaluator=test_evaluator, config=evolution, toolbox=toolbox,
                    batch_size=context.settings.batch_size, progress=False)
    chosen = _select(context, qmodel, config, seed, result)
    curve = [{"evals": int(entry["evals"]), "max": float(entry["max"])} for entry in result.logbook]
    details: dict[str, Any] = {
        "start": {"method": config.start, "val": result.baseline["val"], "test": result.baseline.get("test"),
                  "changed_weights": moved, "seconds": rounding.seconds},
        "selected": chosen["selected"], "n_genes": len(chosen["genes"]),
        "best": {"val": result.best["val"], "test": result.best.get("test"), "n_genes": result.best["n_genes"]},
        "hall_of_fame": [{"val": h["val"], "test": h.get("test"), "n_genes": len(h["genes"])}
                         for h in result.hall_of_fame_scores],
        "search_seconds": result.seconds, "curve": curve,
    }
    if "pareto_front" in result.details:
        details["pareto_front"] = [{"val": p["val"], "test": p.get("test"), "n_genes": p["n_genes"]}
                                   for p in result.details["pareto_front"]]
    return {"config": config.name, "seed": seed, "val": chosen["val"], "test": chosen["test"],
            "evaluations": result.evaluations + rounding.evaluations, "seconds": result.seconds + rounding.seconds,
            "kind": "evolve", "method": config.start, "details": details}


def _reference_of(config: RunConfig, names: set[str]) -> Optional[str]:
    """The baseline configuration an evolutionary configuration starts from, if it is in the run."""
    wanted = f"nearest-{config.scale_method}" if config.start == "nearest" else config.start
    return wanted if wanted in names else None


def _load_model(model: Any, data_seed: int, cache: Optional[str], verbose: bool) -> tuple[nn.Module, Any, str]:
    if isinstance(model, str):
        from .zoo import RECIPES, load_model
        if model in RECIPES and RECIPES[model].metric_name != "accuracy":
            usable = ", ".join(name for name, r in sorted(RECIPES.items()) if r.metric_name == "accuracy")
            raise ValueError(f"model={model!r} is scored by {RECIPES[model].metric_name}; compare supports "
                             f"classification recipes (accuracy): {usable}")
        zoo = load_model(model, seed=data_seed, cache=cache, verbose=verbose)
        return zoo.model, zoo.data, model
    if hasattr(model, "model") and hasattr(model, "data"):
        return model.model, model.data, getattr(model, "name", type(model.model).__name__)
    if isinstance(model, tuple) and len(model) in (2, 3) and isinstance(model[0], nn.Module):
        return model[0], model[1], model[2] if len(model) == 3 else type(model[0]).__name__
    raise ValueError(f"model={model!r} is not valid; use a zoo recipe name, a ZooModel, or (module, Splits[, name])")


def compare(model: Any = "digits-cnn", configs: Any = None, *, bits: int = 2, seeds: Union[int, Sequence[int]] = 5,
            out: Optional[Union[str, Path]] = None, only: Optional[Iterable[str]] = None,
            settings: Optional[Mapping[str, Any]] = None, data_seed: int = 0, cache: Optional[str] = None,
            progress: bool = True, command: Optional[str] = None) -> CompareResult:
    """Run every configuration for every seed and (with ``out``) write the report files.

    ``model`` is a zoo recipe name, a :class:`~deap_quant.zoo.ZooModel` or ``(module, Splits[, name])``.
    ``configs`` is a configuration file, a mapping in that format, a list of :class:`RunConfig`
    (or dicts), or ``None`` for the shipped set. ``seeds`` is a count (seeds ``0..n-1``) or a
    list. ``only`` keeps the named configurations. ``settings`` overrides
    :class:`CompareSettings` fields (``evolution`` and ``adaround`` are merged key by key).
    ``command`` (the command line that ran it) is quoted in ``report.md``.
    """
    run_configs, file_settings = _as_configs(configs)
    if only is not None:
        wanted = [name.strip() for name in only if name.strip()]
        known = {c.name for c in run_configs}
        missing = [name for name in wanted if name not in known]
        if missing:
            raise ValueError(f"--only names unknown configuration(s) {missing}; available: {', '.join(sorted(known))}")
        run_configs = [c for c in run_configs if c.name in wanted]
        if not run_configs:
            raise ValueError("--only selects no configuration; name at least one")
    merged = {**file_settings, **dict(settings or {})}
    for key in ("evolution", "adaround"):
        merged[key] = {**dict(file_settings.get(key) or {}), **dict((settings or {}).get(key) or {})}
    merged["bits"] = bits
    compare_settings = CompareSettings(**merged)
    seed_list = list(range(seeds)) if isinstance(seeds, int) and not isinstance(seeds, bool) else list(seeds)
    if not seed_list or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seed_list):
        raise ValueError(f"seeds={seeds!r} is not valid; use a positive count or a list of integers >= 0")
    out_dir = check_writable(out) if out is not None else None
    float_model, splits, model_name = _load_model(model, data_seed, cache, progress)
    context = _Context(float_model, splits, compare_settings)

    records: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(run_configs) * len(seed_list), desc="compare", unit="run")
    try:
        for seed in seed_list:  # seed-major: an interrupted comparison has every configuration for its seeds
            for config in run_configs:
                if bar is not None:
                    bar.set_postfix_str(f"{config.name} seed {seed}")
                run = _run_baseline if config.kind == "baseline" else _run_evolve
                records.append(run(context, config, seed))
                if out_dir is not None:  # partial results survive an interruption
                    write_json(out_dir / "summary.json", [{key: r[key] for key in SUMMARY_KEYS} for r in records])
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    rows = [{key: record[key] for key in SUMMARY_KEYS} for record in records]
    names = {c.name for c in run_configs}
    pairs = [(c.name, ref) for c in run_configs if c.kind == "evolve" and (ref := _reference_of(c, names))]
    float_scores = {split: accuracy(float_model, getattr(splits, split)) for split in ("val", "test")}
    result = CompareResult(rows=rows, records=records, summary=summarize(rows), paired=paired_tests(rows, pairs),
                           pairwise=pairwise_tests(rows),
                           settings={"model": model_name, "bits": bits, "seeds": seed_list, "data_seed": data_seed,
                                     **compare_settings.to_dict(), "float": float_scores,
                                     "configs": [c.to_dict() for c in run_configs]})
    if out_dir is not None:
        result.paths = write_report(result, run_configs, out_dir, command)
    return result


# ---------------------------------------------------------------------------- writing
def _percent(value: Optional[float]) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _p(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3g}"


def format_report(result: CompareResult, command: Optional[str] = None) -> str:
    """The markdown report: settings, summary table, comparisons with their start, pairwise p-values."""
    s = result.settings
    lines = [f"# deap-quant compare: {s['model']}, {s['bits']} bits, "
             f"{'per-channel' if s['per_channel'] else 'per-tensor'}, {len(s['seeds'])} seeds", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [f"Float model: val {_percent(s['float']['val'])}%, test {_percent(s['float']['test'])}%. "
              "Accuracy in %. `test` is the held-out test split, scored after each search; the 95% CI is "
              "Student's t over seeds.", "",
              "| config | n | val mean | test mean | test std | test 95% CI | evaluations | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    for row in result.summary:
        lines.append(f"| {row['config']} | {row['n']} | {_percent(row['val_mean'])} | {_percent(row['test_mean'])} | "
                     f"{_percent(row['test_std'])} | [{_percent(row['test_ci_low'])}, {_percent(row['test_ci_high'])}] | "
                     f"{row['evaluations_mean']:.0f} | {row['seconds_mean']:.1f} |")
    if result.summary:
        winner = max(result.summary, key=lambda r: r["test_mean"])
        lines += ["", f"Highest mean test accuracy: **{winner['config']}** ({_percent(winner['test_mean'])}%)."]
    if result.paired:
        lines += ["", "## Evolution against its starting rounding (test, paired by seed)", "",
                  "| config | start | mean | start mean | difference | wins/losses | p (Wilcoxon, greater) | "
                  "p (Mann-Whitney, two-sided) |", "|---|---|---|---|---|---|---|---|"]
        for row in result.paired:
            lines.append(f"| {row['config']} | {row['reference']} | {_percent(row['mean'])} | "
                         f"{_percent(row['reference_mean'])} | {100 * row['difference']:+.2f} | "
                         f"{row['wins']}/{row['losses']} | {_p(row['p_wilcoxon_greater'])} | "
                         f"{_p(row['p_mannwhitney'])} |")
    names = [row["config"] for row in result.summary]
    if len(names) > 1:
        lookup = {(r["a"], r["b"]): r["p_mannwhitney"] for r in result.pairwise}
        lines += ["", "## Pairwise Mann-Whitney U p-values (test, two-sided)", "",
                  "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for a in names:
            cells = ["" if a == b else _p(lookup.get((a, b), lookup.get((b, a), float("nan")))) for b in names]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", "Figures: `convergence.png` (best search fitness vs evaluations, median and min-max over "
              "seeds)" + (", `pareto.png` (NSGA-II fronts)" if any("pareto_front" in r.get("details", {})
                                                                    for r in result.records) else "") + "."]
    return "\n".join(lines) + "\n"


def _csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _png(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def plot_convergence(records: Sequence[Mapping[str, Any]], configs: Sequence[RunConfig], path: Path) -> bool:
    """Best search fitness vs evaluations per evolutionary configuration: median line, min-max band.

    One panel per fitness kind (their scales differ). Returns False if there is nothing to plot.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {c.name: c for c in configs}
    curves: dict[str, list[list[dict]]] = {}
    for record in records:
        if record.get("kind") == "evolve" and record["details"].get("curve"):
            curves.setdefault(record["config"], []).append(record["details"]["curve"])
    if not curves:
        return False
    kinds = list(dict.fromkeys(by_name[name].fitness for name in curves))
    figure, axes = plt.subplots(1, len(kinds), figsize=(6.4 * len(kinds), 4.4), dpi=110, squeeze=False)
    colors = plt.get_cmap("tab20")
    for panel, kind in zip(axes[0], kinds):
        for number, (name, runs) in enumerate((n, r) for n, r in curves.items() if by_name[n].fitness == kind):
            length = min(len(run) for run in runs)
            evals = np.median([[p["evals"] for p in run[:length]] for run in runs], axis=0)
            values = np.array([[p["max"] for p in run[:length]] for run in runs], dtype=np.float64)
            color = colors((2 * number) % 20 + (number // 10) % 2)  # distinct hues first
            panel.plot(evals, np.median(values, axis=0), color=color, label=name, linewidth=1.2)
            panel.fill_between(evals, values.min(axis=0), values.max(axis=0), color=color, alpha=0.15, linewidth=0)
        panel.set_xlabel("fitness evaluations")
        label = {"val": "validation accuracy"}.get(kind, kind)
        panel.set_ylabel(f"best search fitness ({label})")
        panel.grid(alpha=0.3)
        panel.legend(fontsize=6, loc="lower right")
    figure.tight_layout()
    _png(figure, path)
    return True


def plot_pareto(records: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """NSGA-II fronts: changed weights vs accuracy, validation (o) and test (x), one colour per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fronts: dict[str, list[tuple[int, list[dict]]]] = {}
    for record in records:
        if "pareto_front" in record.get("details", {}):
            fronts.setdefault(record["config"], []).append((record["seed"], record["details"]["pareto_front"]))
    if not fronts:
        return False
    figure, axes = plt.subplots(1, len(fronts), figsize=(6.0 * len(fronts), 4.2), dpi=110, squeeze=False)
    colors = plt.get_cmap("tab10")
    for panel, (name, runs) in zip(axes[0], fronts.items()):
        for number, (seed, front) in enumerate(runs):
            front = sorted(front, key=lambda p: p["n_genes"])
            genes = [p["n_genes"] for p in front]
            color = colors(number % 10)
            panel.step(genes, [p["val"] for p in front], where="post", color=color, marker="o", markersize=3,
                       linewidth=1, label=f"seed {seed} val")
            if all(p.get("test") is not None for p in front):
                panel.plot(genes, [p["test"] for p in front], color=color, marker="x", linestyle=":", linewidth=1,
                           label=f"seed {seed} test")
        panel.set_title(name, fontsize=9)
        panel.set_xlabel("changed weights (genes)")
        panel.set_ylabel("accuracy")
        panel.grid(alpha=0.3)
        panel.legend(fontsize=6, loc="lower right")
    figure.tight_layout()
    _png(figure, path)
    return True


def write_report(result: CompareResult, configs: Sequence[RunConfig], out_dir: Union[str, Path],
                 command: Optional[str] = None) -> dict[str, Path]:
    """Write summary.json, runs.json, runs.csv, summary.csv, report.md and the plots into ``out_dir``."""
    out = check_writable(out_dir)
    paths = {name: out / name for name in ("summary.json", "runs.json", "runs.csv", "summary.csv", "report.md")}
    write_json(paths["summary.json"], result.rows)
    write_json(paths["runs.json"], {"settings": result.settings, "runs": result.records, "summary": result.summary,
                                    "paired": result.paired, "pairwise": result.pairwise})
    atomic_write_bytes(paths["runs.csv"], _csv(result.rows, SUMMARY_KEYS))
    atomic_write_bytes(paths["summary.csv"], _csv(result.summary, list(result.summary[0]) if result.summary else []))
    if plot_convergence(result.records, configs, out / "convergence.png"):
        paths["convergence.png"] = out / "convergence.png"
    if plot_pareto(result.records, out / "pareto.png"):
        paths["pareto.png"] = out / "pareto.png"
    atomic_write_bytes(paths["report.md"], format_report(result, command).encode())
    return paths
