"""The ``ray`` backend: Ray actors that each hold the evaluator once and evaluate batches of gene lists.

The evaluator is put into Ray's object store once (:func:`ray.put`); every actor fetches it
from there at start-up (one copy per node in the store, one deserialised copy per actor) and
keeps it. A call then sends ``(function key, gene lists, threshold)`` to an actor and gets back
``(fitness values, seconds)``. Actor calls cost about a millisecond each, so batches are sized
from the measured overhead (see :mod:`.base`). An actor that dies (process killed, node lost,
:func:`ray.kill`) surfaces as :class:`ray.exceptions.RayActorError`; its batch is re-run on a
live actor. Ray is optional: without it, asking for this backend says how to install it.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Hashable
from typing import Any, Callable, Optional

from . import base
from .base import MapConfig, ParallelMap, WorkerDied, pack_exception, run_batch, unpack_exception
from .processes import default_workers

__all__ = ["RayMap", "import_ray", "ray_available", "RAY_INSTALL_HINT"]

RAY_INSTALL_HINT = 'pip install -e ".[ray]" (or pip install "ray>=2.9")'


def import_ray() -> Any:
    """The ``ray`` module, or an :class:`ImportError` that says how to install it."""
    try:
        import ray
    except ImportError as error:
        raise ImportError(f"backend='ray' needs Ray, which is not installed here ({error}); install it with "
                          f"{RAY_INSTALL_HINT}, or use backend='processes'") from None
    return ray


def ray_available() -> bool:
    """Whether Ray can be imported."""
    try:
        import_ray()
    except ImportError:
        return False
    return True


class _EvaluationActor:
    """Runs in a Ray worker process: holds the registered functions, evaluates batches."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.functions: dict[int, Any] = {}
        self.broken: dict[int, tuple[Optional[bytes], str]] = {}

    def register(self, key: int, boxed: list, share: int) -> None:
        """``boxed`` is ``[ObjectRef]``, fetched here so that a failure to load it is reported on use.

        ``share``: actors of this map on this node (they split the memory an activation cache may take).
        """
        import ray

        try:
            self.functions[key] = ray.get(boxed[0])
            base.share_memory(self.functions[key], share)
        except Exception as error:
            self.broken[key] = pack_exception(error)

    def run(self, key: int, items: list, state: Optional[dict[str, Any]]) -> tuple:
        if key in self.broken:
            return ("error", *self.broken[key])
        try:
            values, seconds = run_batch(self.functions[key], items, state)
        except Exception as error:
            return ("error", *pack_exception(error))
        return ("ok", values, seconds)

    def ping(self) -> tuple[int, str]:
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()


_ACTOR_CLASS: Any = None


def _actor_class(ray: Any) -> Any:
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        _ACTOR_CLASS = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(_EvaluationActor)
    return _ACTOR_CLASS


def _shutdown(ray: Any, actors: list, owns_ray: list) -> None:
    while actors:
        try:
            ray.kill(actors.pop(), no_restart=True)
        except Exception:
            pass
    if owns_ray and owns_ray[0] and ray.is_initialized():
        ray.shutdown()
        owns_ray[0] = False


class RayMap(ParallelMap):
    """``toolbox.map`` over Ray actors (see the module docstring).

    With ``config.ray_address`` it joins that cluster; otherwise it uses the Ray instance this
    process already initialised, or starts a local one and shuts it down on :meth:`close`.
    ``workers=None`` means one actor per CPU of the cluster. ``ray_init`` holds further
    keyword arguments for :func:`ray.init` (e.g. ``runtime_env``).
    """

    backend = "ray"

    def __init__(self, config: MapConfig, evaluator: Optional[Callable[[Any], Any]] = None,
                 ray_init: Optional[dict[str, Any]] = None):
        super().__init__(config)
        ray = import_ray()
        self._ray = ray
        self._owns_ray = [False]
        self._all: list[Any] = []
        self._actor_of: dict[Hashable, Any] = {}
        self._pids: dict[Any, int] = {}
        self._nodes: dict[Any, str] = {}
        self._objects: list[Any] = []  # refs of the shipped functions, alive as long as the map
        self._finalizer = weakref.finalize(self, _shutdown, ray, self._all, self._owns_ray)
        try:
            if not ray.is_initialized():
                options: dict[str, Any] = {"logging_level": logging.WARNING}
                if config.ray_address is None:
                    options.update(num_cpus=max(config.workers or 1, default_workers()), include_dashboard=False)
                ray.init(address=config.ray_address, **{**options, **(ray_init or {})})
                self._owns_ray[0] = True
            count = config.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
            actor_class = _actor_class(ray)
            self._all.extend(actor_class.remote(config.threads) for _ in range(count))
            self._start(self._started_actors(count), evaluator)
        except BaseException:
            self.close()
            raise

    def _started_actors(self, count: int) -> list:
        ray = self._ray
        pings = {actor.ping.remote(): actor for actor in self._all}
        ready, waiting = ray.wait(list(pings), num_returns=len(pings), timeout=self.config.startup_timeout)
        if waiting:
            cpus = ray.cluster_resources().get("CPU", 0)
            raise RuntimeError(f"only {len(ready)} of {count} Ray actors started within "
                               f"{self.config.startup_timeout:g} s; the cluster has {cpus:g} CPUs and each actor "
                               "needs 1: ask for fewer workers or add nodes")
        live = []
        for ref in ready:
            actor = pings[ref]
            try:
                self._pids[actor], self._nodes[actor] = ray.get(ref)
                live.append(actor)
            except Exception as error:
                self.workers_lost += 1
                self.lost_reasons.append(f"Ray actor failed to start ({type(error).__name__}: {error})")
        if not live:
            raise RuntimeError(f"none of the {count} Ray actors started: {'; '.join(self.lost_reasons)}")
        return live

    @property
    def actors(self) -> list:
        """Handles of the live actors (``ray.kill`` one to see a batch re-run elsewhere)."""
        return list(self._live)

    def worker_pids(self) -> list[int]:
        """Process ids of the live actors (on their nodes)."""
        return [self._pids[actor] for actor in self._live]

    def _export(self, func: Callable[[Any], Any]) -> Any:
        try:
            ref = self._ray.put(func)
        except Exception as error:
            raise TypeError(f"the ray backend puts {func!r} into the object store, but it cannot be serialised "
                            f"({type(error).__name__}: {error}); define it at module level") from error
        self._objects.append(ref)
        return ref

    def _send_function(self, worker: Any, key: int, exported: Any) -> None:
        share = sum(node == self._nodes.get(worker) for node in self._nodes.values())
        worker.register.remote(key, [exported], share)  # actor calls from one caller run in order: before any run

    def _submit(self, worker: Any, task: int, key: int, items: list[Any],
                state: Optional[dict[str, Any]]) -> Hashable:
        ref = worker.run.remote(key, items, state)
        self._actor_of[ref] = worker
        return ref

    def _wait(self, handles: list[Hashable]) -> list[tuple[Hashable, Any]]:
        ray = self._ray
        ready, _ = ray.wait(handles, num_returns=1)
        out = []
        for ref in ready:
            actor = self._actor_of.pop(ref)
            try:
                reply = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.ObjectLostError) as error:
                detail = " ".join(str(error).split())[:200]
                out.append((ref, WorkerDied(f"Ray actor (pid {self._pids.get(actor)}) died "
                                            f"({type(error).__name__}: {detail})")))
                continue
            if reply[0] == "ok":
                out.append((ref, (reply[1], reply[2])))
            else:
                out.append((ref, unpack_exception(reply[1], reply[2], f"Ray actor (pid {self._pids.get(actor)})")))
        return out

    def _discard(self, worker: Any) -> None:
        try:
            self._ray.kill(worker, no_restart=True)
        except Exception:
            pass

    def close(self) -> None:
        self._closed = True
        self._live = []
        self._finalizer()
