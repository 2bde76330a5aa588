"""What every evaluation map shares: its configuration, batching, fault handling, shipping functions once.

An evaluation map is a drop-in ``toolbox.map``: ``map(func, individuals) -> list of results``
in input order. The parallel maps (:class:`ParallelMap`) keep a set of workers that each hold
``func`` (the evaluator, with its frozen model and data), sent **once** per worker; each call
afterwards sends only the items (an individual goes as a plain list of its genes, its fitness
stays in the driver) in batches, and receives only the results.

Batches are sized so that the measured per-call overhead (the round trip of an empty batch,
measured at start-up and refined afterwards) stays below ``overhead_target`` (5 %) of the
measured evaluation time of a batch, but never so large that a worker sits idle while another
has two batches (``ceil(n / workers)`` at most).

A population-batched evaluator (one with ``evaluate_many``, e.g.
:class:`~deap_quant.evaluation.BatchedEvaluator`; see :func:`batched_target`) gets each worker's
whole share of a call, ``ceil(n / workers)`` items, as one batch and evaluates it with one
``evaluate_many`` call: one batched evaluator per worker, each with its own cache.

Faults: a worker that dies while it holds a batch (killed process, lost Ray actor) is dropped
and its batch goes back to the queue to be re-run on a live worker; every result is written
once, from the one successful run of its batch. Only when no worker is left does the call fail
with :class:`WorkersLostError`. An exception raised by ``func`` itself is not a fault: it is
re-raised in the driver (with the worker's traceback attached) after the batches in flight end.

Results never depend on the backend, on the number of workers or on how items are batched, as
long as ``func`` is a pure function of the item: all randomness (variation, selection) stays in
the driver. A stateful evaluator is fine when its state only saves work (an incremental
evaluator's activation cache and memo: each worker has its own); the one piece of driver state
that changes results, an early-rejection threshold (``evaluator.threshold``, set through
``evaluator.reject_below``), is read in the driver at every call and applied in the workers
before they evaluate.
"""

from __future__ import annotations

import functools
import itertools
import math
import multiprocessing
import pickle
import statistics
import time
import traceback
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

__all__ = ["BACKENDS", "START_METHODS", "DEFAULT_START_METHOD", "MapConfig", "EvaluationMap", "ParallelMap",
           "WorkersLostError", "WorkerError", "WorkerDied", "run_batch", "plan_batch_size", "share_memory",
           "batched_target"]

BACKENDS = ("serial", "processes", "ray")
START_METHODS = ("spawn", "forkserver")
#: ``forkserver`` where the platform has it: torch and this package are imported once, in the server.
DEFAULT_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class WorkersLostError(RuntimeError):
    """Every worker of a parallel map has died: the remaining evaluations cannot be run."""


class WorkerError(RuntimeError):
    """An exception raised in a worker that could not be sent back as itself (its text is kept)."""


class WorkerDied(Exception):
    """Internal: a worker is gone (the reason says how); its batch must be re-run elsewhere."""


@dataclass(frozen=True)
class MapConfig:
    """How fitness is evaluated in parallel; checked on construction.

    ``backend``: ``"serial"`` (the driver, like the built-in ``map``), ``"processes"`` (a local
    process pool) or ``"ray"`` (Ray actors, locally or on a cluster). ``workers``: number of
    worker processes / actors (``None``: the CPUs available here, or the cluster's CPUs for a
    Ray cluster). ``ray_address``: join that Ray cluster (``"auto"``, ``"ray://host:10001"``,
    ``"host:6379"``); ``None`` starts a local Ray instance (and shuts it down on close) unless
    Ray is already initialised. ``batch_size``: fixed items per call (``None``: chosen from the
    measured overhead). ``threads``: torch threads per worker. ``overhead_target``: the share of
    a batch's time the per-call overhead may take. ``start_method``: ``"forkserver"`` (default
    where available: a clean server process that has imported torch but run nothing forks the
    workers, so they start in a fraction of a second) or ``"spawn"`` for the process pool;
    never ``fork``, whose children inherit the driver's torch thread pools.
    ``startup_timeout``: seconds to wait for the Ray actors to come up.
    """

    backend: str = "serial"
    workers: Optional[int] = None
    ray_address: Optional[str] = None
    batch_size: Optional[int] = None
    threads: int = 1
    overhead_target: float = 0.05
    start_method: str = DEFAULT_START_METHOD
    startup_timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not valid; use one of {', '.join(BACKENDS)}")
        for name in ("workers", "batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} is not valid; use an integer >= 1 or None")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads={self.threads!r} is not valid; use an integer >= 1")
        if (not isinstance(self.overhead_target, (int, float)) or math.isnan(self.overhead_target)
                or not 0.0 < self.overhead_target < 1.0):
            raise ValueError(f"overhead_target={self.overhead_target!r} is not valid; use a share in (0, 1)")
        if self.start_method not in START_METHODS:
            raise ValueError(f"start_method={self.start_method!r} is not valid; use one of "
                             f"{', '.join(START_METHODS)}")
        if (not isinstance(self.startup_timeout, (int, float)) or math.isnan(self.startup_timeout)
                or self.startup_timeout <= 0):
            raise ValueError(f"startup_timeout={self.startup_timeout!r} is not valid; use a number of seconds > 0")
        if self.ray_address is not None and (not isinstance(self.ray_address, str) or not self.ray_address):
            raise ValueError(f"ray_address={self.ray_address!r} is not valid; use an address string or None")
        if self.ray_address is not None and self.backend != "ray":
            raise ValueError(f"ray_address={self.ray_address!r} needs backend='ray' (got {self.backend!r})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_batch_size(n_items: int, workers: int, overhead: float, per_item: float, target: float) -> int:
    """Items per batch: enough that ``overhead <= target * batch time``, at most ``ceil(n / workers)``."""
    if n_items <= 0:
        return 1
    fair = math.ceil(n_items / max(1, workers))
    if per_item <= 0 or not math.isfinite(per_item):
        return fair
    needed = math.ceil(max(0.0, overhead) / (target * per_item))
    return max(1, min(needed, fair))


def _payload(item: Any) -> Any:
    """What a worker receives for ``item``: an individual's genes as a plain list (fitness stays here)."""
    if isinstance(item, list) and hasattr(item, "fitness"):
        return list(item)
    return item


def _behind(func: Any, depth: int = 3) -> list[Any]:
    """``func`` and what it wraps: ``functools.partial.func``, ``.evaluator`` (e.g. a Pareto objective)."""
    found, frontier = [], [func]
    for _ in range(depth):
        nxt = []
        for candidate in frontier:
            if candidate is None or any(candidate is seen for seen in found):
                continue
            found.append(candidate)
            nxt.extend(getattr(candidate, name, None) for name in ("func", "evaluator"))
        frontier = nxt
    return found


def _rejecting_target(func: Any) -> Any:
    """The evaluator behind ``func`` that has an early-rejection threshold, if any."""
    for candidate in _behind(func):
        if callable(getattr(candidate, "reject_below", None)) and hasattr(candidate, "threshold"):
            return candidate
    return None


def batched_target(func: Any) -> Any:
    """The population-batched evaluator ``func`` is (or ``toolbox.evaluate`` registered as), if any: an
    object with ``evaluate_many(items)`` (a :class:`~deap_quant.evaluation.BatchedEvaluator`); else ``None``."""
    if isinstance(func, functools.partial) and not func.args and not func.keywords:
        func = func.func
    return func if callable(getattr(func, "evaluate_many", None)) else None


def share_memory(func: Any, share: int) -> None:
    """Worker side: an activation cache sized by default (``cache_bytes=None``) takes ``1/share`` of its share.

    ``share`` workers of one map run on this machine; each would otherwise take the default
    fraction of the available memory for itself (the host's, or the GPU's for a model on CUDA).
    Fitness values do not depend on the budget.
    """
    if share <= 1:
        return
    from ..evaluation.cache import DEFAULT_CACHE_FRACTION, default_budget
    from ..evaluation.evaluator import model_placement

    for candidate in _behind(func):
        if "cache_bytes" in getattr(candidate, "__dict__", {}) and candidate.cache_bytes is None:
            module = getattr(getattr(candidate, "qmodel", None), "module", None)
            device = model_placement(module)[0] if module is not None else None
            candidate.cache_bytes = default_budget(DEFAULT_CACHE_FRACTION / share, device=device)
        if "memory_share" in getattr(candidate, "__dict__", {}):  # a population batch sized from free memory
            candidate.memory_share = share


def driver_state(func: Any) -> Optional[dict[str, Any]]:
    """The driver-side state of ``func`` that workers must share: its rejection threshold."""
    target = _rejecting_target(func)
    return None if target is None else {"threshold": target.threshold}


def run_batch(func: Callable[[Any], Any], items: Sequence[Any],
              state: Optional[dict[str, Any]]) -> tuple[list[Any], float]:
    """Worker side: apply the driver's state, evaluate ``items`` in order, time it."""
    if state is not None:
        target = _rejecting_target(func)
        if target is not None and target.threshold != state["threshold"]:
            target.reject_below(state["threshold"])
    started = time.perf_counter()
    batched = batched_target(func)
    values = batched.evaluate_many(items) if batched is not None else [func(item) for item in items]
    return values, time.perf_counter() - started


def pack_exception(error: BaseException) -> tuple[Optional[bytes], str]:
    """Worker side: the exception pickled (if it pickles) and its traceback as text."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        blob = pickle.dumps(error, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(blob)
    except Exception:
        blob = None
    return blob, text


def unpack_exception(blob: Optional[bytes], text: str, where: str) -> BaseException:
    """Driver side: the worker's exception, with its traceback attached as a note."""
    if blob is not None:
        try:
            error = pickle.loads(blob)
        except Exception:
            error = None
        if isinstance(error, BaseException):
            if hasattr(error, "add_note"):
                error.add_note(f"raised in {where}:\n{text}")
            return error
    return WorkerError(f"{where} raised:\n{text}")


class EvaluationMap:
    """A ``toolbox.map``-compatible callable with a :meth:`close`; use it as a context manager."""

    backend = "serial"

    def __init__(self, config: MapConfig):
        self.config = config
        self.calls = 0
        self.items = 0

    def __call__(self, func: Callable[[Any], Any], iterable: Iterable[Any]) -> list[Any]:
        raise NotImplementedError

    @property
    def workers(self) -> int:
        """Workers alive now."""
        return 1

    def close(self) -> None:
        """Stop the workers (idempotent)."""

    def describe(self) -> dict[str, Any]:
        """Backend, workers and the measured costs, as plain data (for results and benchmarks)."""
        return {"backend": self.backend, "workers": self.workers, "calls": self.calls, "items": self.items}

    def __enter__(self) -> EvaluationMap:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __reduce__(self):
        raise TypeError(f"a {type(self).__name__} holds live workers and cannot be pickled; "
                        "build one per driver process")


class ParallelMap(EvaluationMap):
    """Batching, scheduling and fault handling over workers; a backend supplies the transport.

    A backend implements :meth:`_export` (prepare a function for shipping, once),
    :meth:`_send_function` (give it to one worker), :meth:`_submit` (hand a batch to an idle
    worker, returning a hashable handle) and :meth:`_wait` (block until at least one handle
    finished; yield ``(handle, outcome)`` with outcome ``(values, seconds)``, a
    :class:`WorkerDied`, or the exception ``func`` raised), plus :meth:`_discard` and
    :meth:`close`. Exactly one batch is in flight per worker.
    """

    def __init__(self, config: MapConfig):
        super().__init__(config)
        self._live: list[Any] = []
        self._functions: dict[int, tuple[Any, int]] = {}  # id(func) -> (func, key); func kept alive
        self._keys = itertools.count()
        self._tasks = itertools.count()
        self.workers_started = 0
        self.workers_lost = 0
        self.lost_reasons: list[str] = []
        self.batches = 0
        self.requeued = 0
        self.overhead_seconds: Optional[float] = None
        self.eval_seconds: Optional[float] = None
        self.startup_seconds = 0.0
        self.last_batch_size: Optional[int] = None
        self._closed = False
        self._created = time.perf_counter()

    # ------------------------------------------------------------------ backend hooks
    def _export(self, func: Callable[[Any], Any]) -> Any:
        raise NotImplementedError

    def _send_function(self, worker: Any, key: int, exported: Any) -> None:
        raise NotImplementedError

    def _submit(self, worker: Any, task: int, key: int, items: list[Any],
                state: Optional[dict[str, Any]]) -> Hashable:
        raise NotImplementedError

    def _wait(self, handles: list[Hashable]) -> list[tuple[Hashable, Any]]:
        raise NotImplementedError

    def _discard(self, worker: Any) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ set-up
    def _start(self, workers: list[Any], evaluator: Optional[Callable[[Any], Any]]) -> None:
        """Adopt started workers; ship ``evaluator`` once to each and measure overhead and evaluation time."""
        self._live = list(workers)
        self.workers_started = len(workers)
        if evaluator is not None:
            key = self._key_of(evaluator)
            self._calibrate(key)
        self.startup_seconds = time.perf_counter() - self._created

    def _calibrate(self, key: int) -> None:
        """Per-call overhead: round trips of empty batches; per-evaluation time: the empty gene list, in a worker."""
        round_trips = []
        for _ in range(3):
            for wall, _seconds in self._timed_batches(key, [[] for _ in self._live]):
                round_trips.append(wall)
        try:
            timings = self._timed_batches(key, [[[]] for _ in self._live])
        except WorkersLostError:
            raise
        except Exception:  # the function may not accept an empty gene list: learn from real calls instead
            timings = []
        self.overhead_seconds = statistics.median(round_trips) if round_trips else None
        if timings:
            self.eval_seconds = statistics.median(seconds for _, seconds in timings)

    def _timed_batches(self, key: int, batches: list[list[Any]]) -> list[tuple[float, float]]:
        timings: list[tuple[float, float]] = []
        self._run(key, batches, None, timings)
        return timings

    # ------------------------------------------------------------------ functions
    def _key_of(self, func: Callable[[Any], Any]) -> int:
        known = self._functions.get(id(func))
        if known is not None and known[0] is func:
            return known[1]
        key = next(self._keys)
        exported = self._export(func)
        self._functions[id(func)] = (func, key)
        for worker in list(self._live):
            try:
                self._send_function(worker, key, exported)
            except WorkerDied as died:
                self._lose(worker, died)
        return key

    # ------------------------------------------------------------------ mapping
    @property
    def workers(self) -> int:
        return len(self._live)

    def __call__(self, func: Callable[[Any], Any], iterable: Iterable[Any]) -> list[Any]:
        if self._closed:
            raise RuntimeError(f"this {self.backend} map is closed; build a new one with make_map")
        items = [_payload(item) for item in iterable]
        self.calls += 1
        if not items:
            return []
        key = self._key_of(func)
        if self.config.batch_size is None and batched_target(func) is not None:  # each worker batches its share
            size = math.ceil(len(items) / max(1, len(self._live)))
        else:
            size = self.config.batch_size or plan_batch_size(
                len(items), max(1, len(self._live)), self.overhead_seconds or 0.0,
                self.eval_seconds if self.eval_seconds is not None else math.inf, self.config.overhead_target)
        self.last_batch_size = size
        batches = [items[i:i + size] for i in range(0, len(items), size)]
        timings: list[tuple[float, float]] = []
        results = self._run(key, batches, driver_state(func), timings)
        self._learn(timings, len(items))
        self.items += len(items)
        return [value for batch in results for value in batch]

    def _learn(self, timings: list[tuple[float, float]], n_items: int) -> None:
        """Refine the overhead and per-evaluation estimates from a real call (exponential average)."""
        if not timings or n_items <= 0:
            return
        per_item = sum(seconds for _, seconds in timings) / n_items
        overhead = statistics.median(max(0.0, wall - seconds) for wall, seconds in timings)
        self.eval_seconds = per_item if self.eval_seconds is None else 0.5 * (self.eval_seconds + per_item)
        self.overhead_seconds = (overhead if self.overhead_seconds is None
                                 else 0.5 * (self.overhead_seconds + overhead))

    def _lose(self, worker: Any, died: WorkerDied) -> None:
        if worker in self._live:
            self._live.remove(worker)
            self.workers_lost += 1
            self.lost_reasons.append(str(died))
        self._discard(worker)

    def _run(self, key: int, batches: list[list[Any]], state: Optional[dict[str, Any]],
             timings: list[tuple[float, float]]) -> list[list[Any]]:
        """Run every batch once, to completion, on the live workers; re-run those of workers that die."""
        results: list[Optional[list[Any]]] = [None] * len(batches)
        pending = deque(range(len(batches)))
        running: dict[Hashable, tuple[Any, int, float]] = {}
        idle = deque(self._live)
        error: Optional[BaseException] = None
        while pending or running:
            while pending and idle and error is None:
                worker = idle.popleft()
                if worker not in self._live:
                    continue
                index = pending.popleft()
                try:
                    handle = self._submit(worker, next(self._tasks), key, batches[index], state)
                except WorkerDied as died:
                    self._lose(worker, died)
                    pending.appendleft(index)
                    continue
                running[handle] = (worker, index, time.perf_counter())
            if not running:
                if error is not None:
                    break
                raise WorkersLostError(self._no_workers_message(len(pending)))
            for handle, outcome in self._wait(list(running)):
                worker, index, sent = running.pop(handle)
                if isinstance(outcome, WorkerDied):
                    self._lose(worker, outcome)
                    if error is None:
                        pending.appendleft(index)
                        self.requeued += 1
                elif isinstance(outcome, BaseException):
                    error = error or outcome
                    idle.append(worker)
                else:
                    values, seconds = outcome
                    if results[index] is not None:  # cannot happen: one run of a batch is ever accepted
                        raise RuntimeError(f"batch {index} came back twice")
                    results[index] = values
                    timings.append((time.perf_counter() - sent, seconds))
                    self.batches += 1
                    idle.append(worker)
            if error is not None:
                pending.clear()
        if error is not None:
            raise error
        return results  # type: ignore[return-value]

    def _no_workers_message(self, pending: int) -> str:
        reasons = "; ".join(self.lost_reasons[-self.workers_started:]) or "none started"
        return (f"all {self.workers_started} workers of the {self.backend} backend are gone with {pending} "
                f"batch(es) still to evaluate ({reasons}); nothing is left to run them on -- start a new map "
                "(check memory, the workers' error output, or the Ray cluster)")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "workers_started": self.workers_started,
                "workers_lost": self.workers_lost, "batches": self.batches, "requeued_batches": self.requeued,
                "batch_size": self.config.batch_size or self.last_batch_size,
                "overhead_seconds": self.overhead_seconds, "eval_seconds": self.eval_seconds,
                "startup_seconds": self.startup_seconds, "threads_per_worker": self.config.threads}
