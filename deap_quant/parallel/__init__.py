"""Parallel and distributed fitness evaluation, plugged in as DEAP's ``toolbox.map``.

``make_map(backend, workers, evaluator)`` returns a callable with DEAP's ``map(func, items)``
contract and a ``close()``:

* ``"serial"`` -- evaluate in the driver (the built-in ``map``);
* ``"processes"`` -- a local pool of worker processes, each holding the evaluator once;
* ``"ray"`` -- Ray actors, locally or on a cluster (``ray_address``), each holding it once.

Register it on any toolbox (``toolbox.register("map", pmap)``) and DEAP's own algorithms use it;
:func:`deap_quant.evolve` does so for ``backend=`` / ``workers=``. Workers receive only gene
lists and return only fitness values; all randomness stays in the driver, so a run gives the
same hall of fame, logbook and population on every backend and number of workers. See
:mod:`deap_quant.parallel.base` for batching and fault handling.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from .base import (
    BACKENDS,
    DEFAULT_START_METHOD,
    START_METHODS,
    EvaluationMap,
    MapConfig,
    ParallelMap,
    WorkerError,
    WorkersLostError,
    batched_target,
    plan_batch_size,
)
from .processes import ProcessMap, default_workers
from .ray_backend import RAY_INSTALL_HINT, RayMap, import_ray, ray_available
from .serial import SerialMap

__all__ = ["make_map", "BACKENDS", "START_METHODS", "DEFAULT_START_METHOD", "MapConfig", "EvaluationMap",
           "ParallelMap", "SerialMap", "ProcessMap", "RayMap", "WorkersLostError", "WorkerError", "plan_batch_size",
           "default_workers", "ray_available", "import_ray", "RAY_INSTALL_HINT", "batched_target"]


def make_map(backend: str = "serial", workers: Optional[int] = None, evaluator: Optional[Callable[[Any], Any]] = None,
             *, ray_address: Optional[str] = None, batch_size: Optional[int] = None, threads: int = 1,
             overhead_target: float = 0.05, start_method: str = DEFAULT_START_METHOD, startup_timeout: float = 300.0,
             ray_init: Optional[dict[str, Any]] = None) -> EvaluationMap:
    """A ``toolbox.map`` for ``backend``, with its workers started and ``evaluator`` loaded into each.

    ``evaluator`` is the function the map will mostly be called with (for a toolbox from
    :func:`~deap_quant.make_toolbox`, pass ``toolbox.evaluate``); it is sent to each worker once,
    now, and used to measure the per-call overhead and the evaluation time that size the batches.
    Other functions are sent once on first use. ``workers=None``: one per CPU available (the
    cluster's CPUs for Ray). ``threads``: torch threads per worker. The remaining options are
    those of :class:`MapConfig`; ``ray_init`` holds extra :func:`ray.init` keyword arguments.
    Close the map when done (or use it as a context manager).
    """
    config = MapConfig(backend=backend, workers=workers, ray_address=ray_address, batch_size=batch_size,
                       threads=threads, overhead_target=overhead_target, start_method=start_method,
                       startup_timeout=startup_timeout)
    if ray_init is not None and backend != "ray":
        raise ValueError(f"ray_init needs backend='ray' (got {backend!r})")
    if backend == "serial":
        return SerialMap(config)
    if backend == "processes":
        return ProcessMap(config, evaluator)
    return RayMap(config, evaluator, ray_init=ray_init)
