"""Running a comparison: every configuration for every seed, each seed on its data split."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from ..baselines import AdaRoundConfig, Rounding, adaround, best_stochastic, changed_weights, nearest
from ..data.augment import shifted_copies
from ..evaluation.evaluator import Evaluator
from ..evaluation.incremental import IncrementalEvaluator
from ..evaluation.teacher import TeacherEvaluator, split_calibration, teacher_outputs
from ..evolve import evolve
from ..quantization.model import QuantizedModel
from ..quantization.quantize import quantize
from ..report import check_writable, write_json
from ..zoo.training import accuracy
from .configs import CompareSettings, RunConfig, as_configs
from .statistics import paired_tests, pairwise_tests, summarize

__all__ = ["CompareResult", "compare", "redraw_split", "data_seed_of", "REDRAWABLE", "SUMMARY_KEYS"]

SUMMARY_KEYS = ("config", "seed", "data_seed", "val", "test", "evaluations", "seconds")
#: Data sets whose val and test splits are drawn from one pool of examples (no official test set),
#: so that ``data_seeds`` may re-draw them.
REDRAWABLE = ("digits",)


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


def data_seed_of(seed: int, data_seeds: int) -> int:
    """The data seed of run seed ``seed`` when a comparison uses ``data_seeds`` data splits."""
    return seed % data_seeds


def redraw_split(splits: Any, data_seed: int, base_seed: int = 0) -> Any:
    """``splits`` with val and test re-drawn for ``data_seed`` (0: ``splits`` itself).

    The val and test examples are pooled and split again, stratified by class, into parts of the
    same sizes, with the random state ``(base_seed, data_seed)``. The training split, which the
    float model learned from, is never touched, so no test example can have been trained on.
    """
    if data_seed == 0:
        return splits
    from sklearn.model_selection import train_test_split

    (val_inputs, val_targets), (test_inputs, test_targets) = splits.val, splits.test
    inputs, targets = torch.cat([val_inputs, test_inputs]), torch.cat([val_targets, test_targets])
    state = int(np.random.SeedSequence([base_seed, data_seed]).generate_state(1)[0])
    val_index, test_index = train_test_split(np.arange(len(targets)), train_size=len(val_targets),
                                             stratify=targets.numpy(), random_state=state)
    val_index, test_index = torch.from_numpy(np.sort(val_index)), torch.from_numpy(np.sort(test_index))
    return dataclasses.replace(splits, val=(inputs[val_index], targets[val_index]),
                               test=(inputs[test_index], targets[test_index]))


def _check_redrawable(splits: Any, data_seeds: int) -> None:
    if data_seeds == 1:
        return
    name = getattr(splits, "name", "") or "the given"
    tensors = all(isinstance(part, tuple) and len(part) == 2 and all(isinstance(t, torch.Tensor) for t in part)
                  for part in (splits.val, splits.test))
    if name not in REDRAWABLE or not tensors:
        raise ValueError(f"data_seeds={data_seeds} re-draws val and test from one pool of examples, which only "
                         f"the {', '.join(REDRAWABLE)} data set allows; {name} data has a fixed val/test split "
                         "(e.g. an official test set); use data_seeds=1")


class _Context:
    """What runs share: the float model, its data per data seed, quantized models per grid, cached roundings.

    Run seed ``s`` uses data seed ``s mod data_seeds`` (:func:`data_seed_of`); data seed 0 is
    ``splits`` as given, data seed k re-draws its val and test (:func:`redraw_split`).
    """

    def __init__(self, model: nn.Module, splits: Any, settings: CompareSettings, data_seeds: int = 1,
                 base_seed: int = 0):
        self.model = model.eval()
        self.splits = splits
        self.settings = settings
        self.data_seeds = data_seeds
        self.base_seed = base_seed
        self._data: dict[int, Any] = {}
        self._qmodels: dict[str, QuantizedModel] = {}
        self._roundings: dict[tuple, Rounding] = {}
        self._teacher: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def data_seed(self, seed: int) -> int:
        return data_seed_of(seed, self.data_seeds)

    def data(self, seed: int) -> Any:
        """The splits run seed ``seed`` works on."""
        key = self.data_seed(seed)
        if key not in self._data:
            self._data[key] = redraw_split(self.splits, key, self.base_seed)
        return self._data[key]

    def qmodel(self, scale_method: str) -> QuantizedModel:
        """A fresh copy of the model quantized with nearest rounding on the ``scale_method`` grid."""
        if scale_method not in self._qmodels:
            s = self.settings
            self._qmodels[scale_method] = quantize(self.model, bits=s.bits, per_channel=s.per_channel,
                                                   symmetric=s.symmetric, scale_method=scale_method,
                                                   act_bits=s.act_bits, act_observer=s.act_observer,
                                                   act_calibration=self.splits.train if s.act_bits else None)
        return copy.deepcopy(self._qmodels[scale_method])

    def evaluator(self, qmodel: QuantizedModel, split: str, seed: int = 0) -> Evaluator:
        return Evaluator(qmodel, getattr(self.data(seed), split), batch_size=self.settings.batch_size)

    def rounding(self, method: str, scale_method: str, seed: int) -> Rounding:
        """The baseline rounding (cached: evolution started from it reuses the very same states)."""
        key = (method, scale_method, seed)
        if key not in self._roundings:
            qmodel = self.qmodel(scale_method)
            if method == "nearest":
                rounding = nearest(qmodel)
            elif method == "stochastic":
                rounding = best_stochastic(qmodel, self.evaluator(qmodel, "val", seed),
                                           draws=self.settings.stochastic_draws, seed=seed)
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
    val = context.data(seed).val
    if config.fitness == "val":  # the fast evaluator: the same fitness values, bit for bit, sooner
        return IncrementalEvaluator(qmodel, val, batch_size=context.settings.batch_size)
    search, logits, _, _ = context.teacher(seed)
    objective = "agreement" if config.fitness == "teacher-agreement" else "kl"
    combine = {"val+teacher": "tiebreak", "val+teacher-weighted": "weighted"}.get(config.fitness)
    return TeacherEvaluator(qmodel, search, teacher_logits=logits, objective=objective, val=val,
                            combine=combine, weight=config.teacher_weight, batch_size=context.settings.batch_size)


def _run_baseline(context: _Context, config: RunConfig, seed: int) -> dict[str, Any]:
    rounding = context.rounding(config.method, config.scale_method, seed)  # cached; its own seconds say its cost
    started = time.perf_counter()
    qmodel = context.qmodel(config.scale_method)
    qmodel.rebase_(rounding.states)
    val = context.evaluator(qmodel, "val", seed).scores([])["accuracy"]
    test = context.evaluator(qmodel, "test", seed).scores([])["accuracy"]
    seconds = rounding.seconds + (time.perf_counter() - started)
    return {"config": config.name, "seed": seed, "data_seed": context.data_seed(seed), "val": val, "test": test,
            "evaluations": rounding.evaluations, "seconds": seconds, "kind": "baseline", "method": config.method,
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
    evolution = context.settings.evolution_config(config, seed)
    evaluator = _search_evaluator(context, qmodel, config, seed)
    toolbox = config.toolbox(qmodel, evaluator, evolution) if config.toolbox is not None else None
    test_evaluator = context.evaluator(qmodel, "test", seed)
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
    return {"config": config.name, "seed": seed, "data_seed": context.data_seed(seed), "val": chosen["val"],
            "test": chosen["test"], "evaluations": result.evaluations + rounding.evaluations,
            "seconds": result.seconds + rounding.seconds, "kind": "evolve", "method": config.start,
            "details": details}


def _reference_of(config: RunConfig, configs: Sequence[RunConfig]) -> Optional[str]:
    """The baseline configuration an evolutionary configuration starts from, if it is in the run: the
    baseline of its start method on its grid (``scale_method``; every other quantization setting is
    the comparison's, shared by all). Among several, the one named as the shipped set names it
    (``nearest-<grid>``, or the method), else the first."""
    matching = [c.name for c in configs
                if c.kind == "baseline" and c.method == config.start and c.scale_method == config.scale_method]
    usual = f"nearest-{config.scale_method}" if config.start == "nearest" else config.start
    return usual if usual in matching else matching[0] if matching else None


def _load_model(model: Any, data_seed: int, cache: Optional[str], verbose: bool,
                source: Optional[Mapping[str, Any]] = None) -> tuple[nn.Module, Any, str]:
    """``source`` holds ``weights``, ``data_root`` and ``options`` for a recipe name (see :func:`~deap_quant.zoo.load_model`)."""
    if isinstance(model, str):
        from ..zoo import RECIPES, load_model
        if model in RECIPES and RECIPES[model].metric_name != "accuracy":
            usable = ", ".join(name for name, r in sorted(RECIPES.items()) if r.metric_name == "accuracy")
            raise ValueError(f"model={model!r} is scored by {RECIPES[model].metric_name}; compare supports "
                             f"classification recipes (accuracy): {usable}")
        zoo = load_model(model, seed=data_seed, cache=cache, verbose=verbose, **dict(source or {}))
        return zoo.model, zoo.data, model
    if hasattr(model, "model") and hasattr(model, "data"):
        return model.model, model.data, getattr(model, "name", type(model.model).__name__)
    if isinstance(model, tuple) and len(model) in (2, 3) and isinstance(model[0], nn.Module):
        return model[0], model[1], model[2] if len(model) == 3 else type(model[0]).__name__
    raise ValueError(f"model={model!r} is not valid; use a zoo recipe name, a ZooModel, or (module, Splits[, name])")


def compare(model: Any = "digits-cnn", configs: Any = None, *, bits: int = 2, seeds: Union[int, Sequence[int]] = 5,
            out: Optional[Union[str, Path]] = None, only: Optional[Iterable[str]] = None,
            settings: Optional[Mapping[str, Any]] = None, data_seed: int = 0, data_seeds: int = 1,
            cache: Optional[str] = None, progress: bool = True, command: Optional[str] = None,
            weights: Optional[Union[str, Path]] = None, data_root: Optional[Union[str, Path]] = None,
            options: Optional[Mapping[str, Any]] = None) -> CompareResult:
    """Run every configuration for every seed and (with ``out``) write the report files.

    ``model`` is a zoo recipe name, a :class:`~deap_quant.zoo.ZooModel` or ``(module, Splits[, name])``.
    ``configs`` is a configuration file, a mapping in that format, a list of :class:`RunConfig`
    (or dicts), or ``None`` for the shipped set. ``seeds`` is a count (seeds ``0..n-1``) or a
    list. ``only`` keeps the named configurations. ``settings`` overrides
    :class:`CompareSettings` fields (``adaround`` is merged key by key); its ``evolution`` options
    override every evolutionary configuration's own (``{"evolution": {"ngen": 5}}``: every search
    runs 5 generations, as ``deap-quant compare --ngen 5``), while the configuration file's
    ``evolution`` holds defaults that a configuration's own options replace. Every evolutionary
    configuration is checked, as it will run, before any run starts.
    ``data_seed`` is the seed of the train/val/test split of a zoo recipe (recorded for other
    models). ``data_seeds=K`` > 1 re-draws val and test per seed, so that the spread over seeds
    covers the data as well as the search: seed ``s`` runs on data seed ``s mod K``, where data
    seed 0 is the split as loaded and data seed ``k`` pools val and test and splits them again
    (stratified, same sizes, train untouched; :func:`redraw_split`). Only data sets whose val and
    test come from one pool allow it (:data:`REDRAWABLE`: digits). ``command`` (the command line
    that ran it) is quoted in ``report.md``. ``weights``, ``data_root`` and ``options`` reach
    :func:`~deap_quant.zoo.load_model` for a recipe that needs them (e.g. ``cifar10-resnet20``).
    """
    from .report import write_report

    run_configs, file_settings = as_configs(configs)
    if only is not None:
        wanted = [name.strip() for name in only if name.strip()]
        known = {c.name for c in run_configs}
        missing = [name for name in wanted if name not in known]
        if missing:
            raise ValueError(f"--only names unknown configuration(s) {missing}; available: {', '.join(sorted(known))}")
        run_configs = [c for c in run_configs if c.name in wanted]
        if not run_configs:
            raise ValueError("--only selects no configuration; name at least one")
    caller = dict(settings or {})
    merged = {**file_settings, **caller}
    merged["adaround"] = {**dict(file_settings.get("adaround") or {}), **dict(caller.get("adaround") or {})}
    merged["evolution"] = dict(file_settings.get("evolution") or {})  # defaults, below each configuration's own
    merged["evolution_overrides"] = {**dict(file_settings.get("evolution_overrides") or {}),
                                     **dict(caller.get("evolution") or {}),
                                     **dict(caller.get("evolution_overrides") or {})}  # over each one's own
    merged["bits"] = bits
    compare_settings = CompareSettings(**merged)
    for config in run_configs:  # every search's options, combined, before any costly work
        if config.kind == "evolve":
            compare_settings.evolution_config(config, seed=0)
    seed_list = list(range(seeds)) if isinstance(seeds, int) and not isinstance(seeds, bool) else list(seeds)
    if not seed_list or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seed_list):
        raise ValueError(f"seeds={seeds!r} is not valid; use a positive count or a list of integers >= 0")
    if isinstance(data_seeds, bool) or not isinstance(data_seeds, int) or data_seeds < 1:
        raise ValueError(f"data_seeds={data_seeds!r} is not valid; use an integer >= 1")
    out_dir = check_writable(out) if out is not None else None
    source = {key: value for key, value in (("weights", weights), ("data_root", data_root), ("options", options))
              if value is not None}
    if source and not isinstance(model, str):
        raise ValueError(f"weights/data_root/options go with a zoo recipe name, not with model={model!r}")
    float_model, splits, model_name = _load_model(model, data_seed, cache, progress, source)
    _check_redrawable(splits, data_seeds)
    context = _Context(float_model, splits, compare_settings, data_seeds=data_seeds, base_seed=data_seed)

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
    pairs = [(c.name, ref) for c in run_configs if c.kind == "evolve" and (ref := _reference_of(c, run_configs))]
    used = sorted({context.data_seed(seed) for seed in seed_list})
    float_by_data_seed = [{"data_seed": d, **{split: accuracy(float_model, getattr(context.data(d), split))
                                              for split in ("val", "test")}} for d in used]
    float_scores = {split: float(np.mean([entry[split] for entry in float_by_data_seed])) for split in ("val", "test")}
    result = CompareResult(rows=rows, records=records, summary=summarize(rows), paired=paired_tests(rows, pairs),
                           pairwise=pairwise_tests(rows),
                           settings={"model": model_name, "bits": bits, "seeds": seed_list, "data_seed": data_seed,
                                     "data_seeds": data_seeds, **compare_settings.to_dict(), "float": float_scores,
                                     "float_by_data_seed": float_by_data_seed,
                                     "configs": [c.to_dict() for c in run_configs]})
    if out_dir is not None:
        result.paths = write_report(result, run_configs, out_dir, command)
    return result
