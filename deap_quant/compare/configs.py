"""Named configurations of a comparison (:class:`RunConfig`), shared settings, configuration files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ..baselines import AdaRoundConfig
from ..evolve import EvolutionConfig, check_evolution_options
from ..quantization.model import QuantizedModel
from ..quantization.quantize import QuantConfig

__all__ = ["RunConfig", "CompareSettings", "load_configs", "default_config_path", "BASELINES", "FITNESSES",
           "SELECTIONS", "STARTS", "SCALE_METHODS"]

BASELINES = ("nearest", "stochastic", "adaround")
STARTS = BASELINES
FITNESSES = ("val", "teacher-kl", "teacher-agreement", "val+teacher", "val+teacher-weighted")
SELECTIONS = ("fitness", "val", "holdout")
SCALE_METHODS = ("minmax", "mse")
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
        check_evolution_options(self.evolution, where=f"config {self.name!r}: ")
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

    ``evolution``: default :class:`EvolutionConfig` fields of every evolutionary configuration (its
    own ``evolution`` options win). ``evolution_overrides``: fields forced on every evolutionary
    configuration, over its own (e.g. ``deap-quant compare --ngen``).
    ``adaround``: :class:`~deap_quant.baselines.AdaRoundConfig` fields (the seed is the run's).
    ``teacher_samples``: training inputs in the teacher's calibration split (``None``: all),
    of which the share ``holdout`` is held out for ``select="holdout"`` and never searched on.
    ``teacher_augment``: shifted copies of each calibration image added to both parts (label-free,
    see :func:`deap_quant.data.augment.shifted_copies`; 0: none).
    ``act_bits``/``act_observer``: activation quantization of every configuration (ranges fitted on
    the training split, the calibration data; ``None``: float activations).
    """

    bits: int = 2
    per_channel: bool = True
    symmetric: bool = True
    evolution: Mapping[str, Any] = field(default_factory=dict)
    evolution_overrides: Mapping[str, Any] = field(default_factory=dict)
    adaround: Mapping[str, Any] = field(default_factory=dict)
    stochastic_draws: int = 20
    teacher_samples: Optional[int] = None
    holdout: float = 0.3
    teacher_augment: int = 0
    batch_size: int = 512
    act_bits: Optional[int] = None
    act_observer: str = "minmax"

    def __post_init__(self) -> None:
        QuantConfig(bits=self.bits, per_channel=self.per_channel, symmetric=self.symmetric, act_bits=self.act_bits,
                    act_observer=self.act_observer)
        for name in ("evolution", "evolution_overrides"):
            options = getattr(self, name)
            unknown = set(options) - _EVOLUTION_FIELDS
            if unknown:
                raise ValueError(f"unknown {name.replace('_', ' ')} option(s) {sorted(unknown)}; valid: "
                                 f"{', '.join(sorted(_EVOLUTION_FIELDS))}")
            check_evolution_options(options, where=f"{name}: ")
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
        out["evolution_overrides"] = dict(self.evolution_overrides)
        return out

    def evolution_config(self, config: RunConfig, seed: int) -> EvolutionConfig:
        """The :class:`EvolutionConfig` of evolutionary configuration ``config`` for ``seed``: these
        defaults, then ``config.evolution``, then :attr:`evolution_overrides`."""
        try:
            return EvolutionConfig(**{**dict(self.evolution), **dict(config.evolution),
                                      **dict(self.evolution_overrides), "seed": seed})
        except ValueError as error:
            raise ValueError(f"config {config.name!r}: {error}") from None


def default_config_path() -> Path:
    """The shipped configuration set."""
    return Path(__file__).resolve().parent.parent / "configs" / "default_compare.json"


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
    check_evolution_options(settings["evolution"], where=f"{where}: evolution: ")
    return configs, settings


def as_configs(configs: Any) -> tuple[list[RunConfig], dict[str, Any]]:
    """Configurations and file settings from a file, a mapping, or a list of :class:`RunConfig` / dicts."""
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
