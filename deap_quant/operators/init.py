"""Initialisation: individuals with a few random genes."""

from __future__ import annotations

import random
from typing import Callable, TypeVar

from ..genome import GeneSpace, Individual

__all__ = ["init_random", "init_empty"]

I = TypeVar("I", bound=Individual)  # noqa: E741


def init_random(container: Callable[..., I], space: GeneSpace, k: int = 8, k_min: int | None = None) -> I:
    """An individual of ``k`` random genes from ``space`` (``k_min..k`` genes if ``k_min`` is given)."""
    count = k if k_min is None else random.randint(k_min, k)
    return container(space.sample(count))


def init_empty(container: Callable[..., I]) -> I:
    """The individual without genes: plain nearest rounding (or whatever the base state is)."""
    return container()
