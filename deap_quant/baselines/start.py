"""Starting roundings for the search: ``evolve(..., start="nearest" | "adaround" | "stochastic")``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..evaluation.evaluator import DataSpec
from ..quantization.model import QuantizedModel
from .adaround import AdaRoundConfig, adaround
from .common import Rounding
from .nearest import nearest
from .stochastic import best_stochastic

__all__ = ["STARTS", "StartSpec", "resolve_start"]

STARTS = ("nearest", "stochastic", "adaround")

StartSpec = Union[str, Rounding, Sequence[torch.Tensor], Callable[[QuantizedModel], Any], None]


def resolve_start(start: StartSpec, qmodel: QuantizedModel, *, evaluator: Optional[Callable] = None,
                  calibration: Optional[DataSpec] = None, float_model: Optional[nn.Module] = None,
                  seed: int = 0, options: Optional[dict[str, Any]] = None) -> Rounding:
    """Compute the rounding that ``start`` names for ``qmodel`` (without changing ``qmodel``).

    * ``"nearest"``: nearest rounding on ``qmodel``'s grids;
    * ``"stochastic"``: best of ``options["draws"]`` (default 20) stochastic roundings by
      ``evaluator`` (the validation fitness), drawn with ``seed``;
    * ``"adaround"``: AdaRound on ``calibration`` (training inputs; required), with
      ``options`` as :class:`AdaRoundConfig` fields (its seed defaults to ``seed``);
    * a :class:`Rounding`, a list of state tensors, or a callable ``qmodel -> states | Rounding``.
    """
    options = dict(options or {})
    started = time.perf_counter()
    if isinstance(start, str):
        if start == "nearest":
            if options:
                raise ValueError(f"start='nearest' takes no options, got {sorted(options)}")
            return nearest(qmodel)
        if start == "stochastic":
            if evaluator is None:
                raise ValueError("start='stochastic' needs an evaluator (the validation fitness) to pick the best draw")
            unknown = set(options) - {"draws"}
            if unknown:
                raise ValueError(f"start='stochastic' takes only the option 'draws', got {sorted(unknown)}")
            return best_stochastic(qmodel, evaluator, draws=options.get("draws", 20), seed=seed)
        if start == "adaround":
            if calibration is None:
                raise ValueError("start='adaround' needs calibration data drawn from the training split "
                                 "(calibration=...)")
            options.setdefault("seed", seed)
            return adaround(qmodel, calibration, float_model=float_model, config=AdaRoundConfig(**options))
        raise ValueError(f"start={start!r} is not valid; use one of {', '.join(STARTS)}, a list of state "
                         "tensors or a callable")
    if isinstance(start, Rounding):
        return start
    if callable(start):
        produced = start(qmodel)
        if isinstance(produced, Rounding):
            return produced
        return Rounding(getattr(start, "__name__", "custom"), list(produced), seconds=time.perf_counter() - started)
    if isinstance(start, (list, tuple)):
        return Rounding("custom", list(start))
    raise ValueError(f"start={start!r} is not valid; use one of {', '.join(STARTS)}, a list of state tensors "
                     "or a callable")
