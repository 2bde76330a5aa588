"""The ``serial`` backend: evaluate in the driver, in order, exactly like the built-in ``map``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

from .base import EvaluationMap

__all__ = ["SerialMap"]


class SerialMap(EvaluationMap):
    """``toolbox.map`` that calls ``func`` on each item in the driver (the reference for the others)."""

    backend = "serial"

    def __call__(self, func: Callable[[Any], Any], iterable: Iterable[Any]) -> list[Any]:
        self.calls += 1
        results = [func(item) for item in iterable]
        self.items += len(results)
        return results
