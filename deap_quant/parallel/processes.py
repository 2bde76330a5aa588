"""The ``processes`` backend: a local pool of worker processes, each holding the evaluator once.

Workers are started with the ``forkserver`` (default where available) or ``spawn`` method,
never ``fork``, so torch's thread pools start clean in every worker; the fork server imports
torch and this package once (it runs no torch code), so workers start in well under a second. Each worker talks to the driver over its own
pipe: the evaluator is pickled once in the driver and the same bytes are sent to every worker at
start-up; afterwards a call sends ``(task, function key, gene lists, threshold)`` and gets back
``(task, fitness values, seconds)``. The driver watches each busy worker's pipe and process
sentinel together, so a worker that dies (``SIGKILL``, out of memory) is noticed at once and its
batch is re-run on another worker.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import weakref
from collections.abc import Hashable
from typing import Any, Callable, Optional

from . import base
from .base import MapConfig, ParallelMap, WorkerDied, pack_exception, run_batch, unpack_exception

__all__ = ["ProcessMap", "default_workers"]

_PROTOCOL = pickle.HIGHEST_PROTOCOL


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _worker_main(conn: multiprocessing.connection.Connection, threads: int) -> None:
    """A worker's loop: keep registered functions, evaluate the batches sent to it, until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    import torch

    torch.set_num_threads(threads)
    functions: dict[int, Any] = {}
    broken: dict[int, tuple[Optional[bytes], str]] = {}
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        kind = message[0]
        if kind == "stop":
            return
        if kind == "register":
            _, key, blob, share = message
            try:
                functions[key] = pickle.loads(blob)
                base.share_memory(functions[key], share)
            except Exception as error:  # reported when the function is first used
                broken[key] = pack_exception(error)
            continue
        _, task, key, items, state = message
        try:
            if key in broken:
                reply = ("error", task, *broken[key])
            else:
                values, seconds = run_batch(functions[key], items, state)
                reply = ("ok", task, values, seconds)
            data = pickle.dumps(reply, protocol=_PROTOCOL)
        except Exception as error:
            data = pickle.dumps(("error", task, *pack_exception(error)), protocol=_PROTOCOL)
        try:
            conn.send_bytes(data)
        except (BrokenPipeError, OSError):
            return


class _Worker:
    """The driver's end of one worker process."""

    def __init__(self, context: Any, threads: int, number: int):
        self.number = number
        self.conn, child = context.Pipe(duplex=True)
        self.process = context.Process(target=_worker_main, args=(child, threads), daemon=True,
                                       name=f"deap-quant-worker-{number}")
        self.process.start()
        child.close()  # the driver must not hold the child's end, or a dead worker would never read as EOF
        self.task: Optional[int] = None

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid

    def send(self, message: tuple) -> None:
        try:
            self.conn.send_bytes(pickle.dumps(message, protocol=_PROTOCOL))
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as error:
            raise WorkerDied(self._death(f"its pipe is closed ({type(error).__name__})")) from None

    def receive(self) -> Any:
        """The outcome of the task in flight, ``None`` if nothing (or only a stale reply) was ready."""
        if self.conn.poll():
            try:
                reply = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                return WorkerDied(self._death("its pipe closed"))
            if reply[1] != self.task:
                return None  # a reply to a task given up on after an error elsewhere
            self.task = None
            if reply[0] == "ok":
                return reply[2], reply[3]
            return unpack_exception(reply[2], reply[3], f"worker process {self.pid}")
        if not self.process.is_alive():
            return WorkerDied(self._death("it exited"))
        return None

    def _death(self, how: str) -> str:
        self.process.join(timeout=1.0)
        code = self.process.exitcode
        if code is not None and code < 0:
            try:
                how = f"{how}; killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"{how}; killed by signal {-code}"
        elif code is not None:
            how = f"{how}; exit code {code}"
        return f"worker process {self.pid} died ({how})"

    def stop(self, timeout: float = 5.0) -> None:
        if self.process.is_alive():
            try:
                self.conn.send_bytes(pickle.dumps(("stop",), protocol=_PROTOCOL))
            except OSError:
                pass
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self.conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    while workers:
        workers.pop().stop()


class ProcessMap(ParallelMap):
    """``toolbox.map`` over a local pool of worker processes (see the module docstring).

    ``evaluator`` (optional) is sent to every worker at start-up and used to measure the
    per-call overhead and the evaluation time; any other function given to the map is sent
    once, on its first use. ``worker_pids()`` lists the live workers.
    """

    backend = "processes"

    def __init__(self, config: MapConfig, evaluator: Optional[Callable[[Any], Any]] = None):
        super().__init__(config)
        context = multiprocessing.get_context(config.start_method)
        if config.start_method == "forkserver":  # import torch and this package once, in the server
            context.set_forkserver_preload([__name__])
        count = config.workers or default_workers()
        self._all: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._all)
        try:
            for number in range(count):
                self._all.append(_Worker(context, config.threads, number))
            self._start(list(self._all), evaluator)
        except BaseException:
            self.close()
            raise

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers."""
        return [worker.pid for worker in self._live]

    def _export(self, func: Callable[[Any], Any]) -> bytes:
        try:
            return pickle.dumps(func, protocol=_PROTOCOL)
        except Exception as error:
            raise TypeError(f"the processes backend sends {func!r} to its workers, but it cannot be pickled "
                            f"({type(error).__name__}: {error}); define it at module level") from error

    def _send_function(self, worker: _Worker, key: int, exported: bytes) -> None:
        worker.send(("register", key, exported, len(self._all)))  # all on this machine: share its memory

    def _submit(self, worker: _Worker, task: int, key: int, items: list[Any],
                state: Optional[dict[str, Any]]) -> Hashable:
        worker.task = task
        worker.send(("run", task, key, items, state))
        return worker

    def _wait(self, handles: list[Hashable]) -> list[tuple[Hashable, Any]]:
        while True:
            watched: dict[Any, _Worker] = {}
            for worker in handles:
                watched[worker.conn] = worker
                watched[worker.process.sentinel] = worker
            ready = multiprocessing.connection.wait(list(watched))
            done: dict[_Worker, Any] = {}
            for obj in ready:
                worker = watched[obj]
                if worker in done:
                    continue
                outcome = worker.receive()
                if outcome is not None:
                    done[worker] = outcome
            if done:
                return list(done.items())

    def _discard(self, worker: _Worker) -> None:
        worker.stop(timeout=1.0)

    def close(self) -> None:
        self._closed = True
        self._live = []
        self._finalizer()
