"""Population-batched fitness: evaluate many individuals in one call, on the device the model lives on.

:class:`BatchedEvaluator` is an :class:`~deap_quant.evaluation.incremental.IncrementalEvaluator`
(same memoisation, stage cache, channel patches, changed-sample reuse and exact early rejection,
same fitness values bit for bit) that takes a whole population at once:
:meth:`BatchedEvaluator.evaluate_many` (or :meth:`BatchedEvaluator.map`, DEAP's ``toolbox.map``
contract: ``toolbox.register("map", evaluator.map)``) evaluates a list of gene lists:

* **Once per genome.** Genomes already scored (memo) or repeated in the list are computed once.
* **Scheduled by ancestor.** Each genome starts from the cached genome that shares the longest
  prefix of stages with it (its parent, usually). Genomes are ordered by that ancestor and run in
  groups of ``K`` (the *population batch*); while a call is running, the cached ancestors its
  remaining genomes need are not evicted to make room for new activations. When a selection bar
  is set (:meth:`~.incremental.IncrementalEvaluator.prepare_generation`), the activations of a
  genome whose fitness is below it (it cannot be selected as a parent) are not stored: they
  would only evict the parents' activations, which the next offspring start from.
* **Stacked stages** (``stack``). The ``K`` genomes of a group run batch by batch, stage by stage,
  together: at each stage, those with the same weights there (siblings past the layer they
  changed) run as one batch concatenated along the samples; genomes with different weights run
  with their weights stacked, through :func:`torch.func.vmap` over
  :func:`torch.func.functional_call` (grouped convolutions, for convolutions). Each stacked form
  is used only where it was found to give every genome the bits of running it alone: checked
  once per (stage, number of genomes, input shape), on the run's own data, and for ``vmap`` also
  that the stacked weights really reach the stage (a poisoned weight must show in its output).
  Otherwise the genomes run one after another. ``stack="auto"`` stacks on CUDA, where a larger
  batch fills the device, and not on the CPU, where it was measured no faster (a convolution
  over 8 x 128 images costs 8 times one over 128 on one core, a grouped or vmapped one more;
  see the README). Unstacked, a group is only a sequence, so genomes then run one at a time in
  the ancestor order above (each can start from a sibling computed just before it): ``K``
  matters only where groups are stacked.

So every fitness equals ``IncrementalEvaluator(...)(genes)`` -- and the plain
:class:`~deap_quant.evaluation.evaluator.Evaluator`'s -- bit for bit: accuracy counts and the
loss tie-breaker alike, with no tolerance. Early rejection gives the same verdicts (an
individual is rejected only when certain to end strictly below the bar; a rejected individual's
stored value is an upper bound below the bar, which may differ from the one-at-a-time
evaluator's when a different ancestor was cached), so selection, hall of fame and logbook are
those of the one-at-a-time run.

``K`` is ``population_batch`` (an integer), or with ``"auto"`` as many genomes as the working
activations of one validation batch each fit in :data:`WORK_FRACTION` of the free memory of the
model's device (at most :data:`AUTO_MAX`); it falls back to 1 when memory is short.

**Devices.** Everything runs where the quantized model is (:func:`resolve_device` checks a
requested device; :func:`deap_quant.evolve` moves the model there with ``device=``): the
validation data are moved there once and kept when they fit in ``data_bytes`` (default
:data:`DATA_FRACTION` of the device's free memory); on a CUDA device, data that do not fit stay
in pinned host memory and are streamed in one batch at a time (:class:`StreamedBatches`, at
most :data:`STREAM_KEEP` batches on the device). The activation cache lives on the device too
(its default budget is a quarter of the device's free memory). This module imports torch only.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..quantization.model import SUPPORTED_DEVICES, QuantizedModel
from .cache import CacheEntry, available_memory, state_bytes
from .evaluator import DataSpec, inputs_do_not_fit, materialize, model_placement, place
from .incremental import IncrementalEvaluator, Outcome, _batch_length, _upper_bound
from .metrics import MetricSpec
from .rows import identical_bits, row_structured, shapes
from .stages import StageSpec, StageSplit, tensors_in

__all__ = ["BatchedEvaluator", "StreamedBatches", "resolve_device", "available_devices", "free_memory",
           "WORK_FRACTION", "DATA_FRACTION", "AUTO_MAX", "STREAM_KEEP", "STACK_MODES"]

#: Share of the device's free memory that the working activations of a population batch may take.
WORK_FRACTION = 0.25

#: Share of the device's free memory the validation data may take before they are streamed instead.
DATA_FRACTION = 0.25

#: Largest population batch ``population_batch="auto"`` chooses.
AUTO_MAX = 64

#: Streamed batches kept on the device (the one in use and the one before).
STREAM_KEEP = 2

#: Values of ``stack``.
STACK_MODES = ("auto", True, False)


# ---------------------------------------------------------------------------- devices
def available_devices() -> list[str]:
    """The devices a model can be evaluated on here: ``cpu``, then ``cuda:0``, ``cuda:1``, ..."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found.extend(f"cuda:{index}" for index in range(torch.cuda.device_count()))
    return found


def resolve_device(device: Union[None, str, torch.device], module: Optional[nn.Module] = None) -> torch.device:
    """The :class:`torch.device` meant by ``device``, checked to exist here.

    ``None`` is ``module``'s own device (its first floating parameter's; the CPU if it has none);
    otherwise ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a :class:`torch.device`. Raises a one-line
    ``ValueError`` naming the devices available here for anything else, or for a CUDA device
    this machine does not have.
    """
    available = ", ".join(available_devices())
    if device is None:
        placed = model_placement(module)[0] if module is not None else None
        return placed if placed is not None else torch.device("cpu")
    if isinstance(device, str):
        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device={device!r} is not valid; use 'cpu', 'cuda' or 'cuda:N' "
                             f"(available here: {available})") from None
    elif isinstance(device, torch.device):
        parsed = device
    else:
        raise ValueError(f"device={device!r} is not valid; use None (the model's own device), 'cpu', 'cuda', "
                         f"'cuda:N' or a torch.device (available here: {available})")
    if parsed.type not in SUPPORTED_DEVICES:
        raise ValueError(f"device={str(parsed)!r} is not supported; quantized models run on "
                         f"{' or '.join(SUPPORTED_DEVICES)} (available here: {available})")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(parsed)!r} is not available: torch {torch.__version__} finds no CUDA "
                             f"device here (available here: {available})")
        index = torch.cuda.current_device() if parsed.index is None else parsed.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device={str(parsed)!r} is not available: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s) (available here: {available})")
        parsed = torch.device("cuda", index)
    return parsed


def free_memory(device: Optional[torch.device]) -> Optional[int]:
    """Bytes free for new allocations on ``device`` (CUDA: the device's; else the host's), if known.

    The one probe of free memory this module uses (tests replace it)."""
    return available_memory(device)


# ---------------------------------------------------------------------------- nested values
def _leaves(value: Any) -> list[torch.Tensor]:
    """The tensors of a nested value, in order."""
    return list(tensors_in(value))


def _rebuild(value: Any, leaves: Iterable[torch.Tensor]) -> Any:
    """``value``'s structure (tuples, lists, dicts) with its tensors replaced by ``leaves``, in order."""
    iterator = iter(leaves)

    def build(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            return next(iterator)
        if isinstance(item, dict):
            return {key: build(sub) for key, sub in item.items()}
        built = [build(sub) for sub in item]
        return type(item)(built) if isinstance(item, tuple) else built
    return build(value)


def _is_nested_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return all(_is_nested_tensors(item) for item in value) and (type(value) in (tuple, list))
    if isinstance(value, dict):
        return all(_is_nested_tensors(item) for item in value.values())
    return False


def _map_tensors(value: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` (nested tuples, lists, dicts) with ``function`` applied to every tensor in it."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_map_tensors(item, function) for item in value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, function) for key, item in value.items()}
    return value


def _to_device(value: Any, device: torch.device) -> Any:
    return _map_tensors(value, lambda tensor: tensor.to(device, non_blocking=tensor.is_pinned()))


def _pin(tensor: torch.Tensor) -> torch.Tensor:
    try:
        return tensor.pin_memory()
    except RuntimeError:  # no CUDA driver to pin with: plain host memory still works
        return tensor


def _pinned(value: Any) -> Any:
    return _map_tensors(value, _pin)


class StreamedBatches(Sequence):
    """Validation batches kept in host memory (pinned for CUDA) and moved to ``device`` when used.

    Indexing returns ``(inputs, targets)`` on the device, floating inputs in ``dtype``; the last
    :data:`STREAM_KEEP` batches used stay there, so a batch read twice in a row moves once.
    ``transfers`` counts the batches moved.
    """

    def __init__(self, batches: Sequence[tuple[Any, Any]], device: torch.device, dtype: Optional[torch.dtype] = None,
                 keep: int = STREAM_KEEP):
        pin = torch.device(device).type == "cuda"
        self.device = torch.device(device)
        self.host = [(_pinned(place(inputs, None, dtype)) if pin else place(inputs, None, dtype),
                      _pinned(targets) if pin else targets) for inputs, targets in batches]
        self.keep = max(1, keep)
        self.transfers = 0
        self._recent: OrderedDict[int, tuple[Any, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.host)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        index = range(len(self))[index]
        batch = self._recent.get(index)
        if batch is None:
            inputs, targets = self.host[index]
            batch = (_to_device(inputs, self.device), _to_device(targets, self.device))
            self.transfers += 1
            self._recent[index] = batch
            while len(self._recent) > self.keep:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(index)
        return batch

    @property
    def nbytes(self) -> int:
        """Bytes of the batches in host memory."""
        return sum(state_bytes(batch) for batch in self.host)


# ---------------------------------------------------------------------------- jobs
@dataclass(eq=False)
class _Job:
    """One genome being computed (the state of IncrementalEvaluator._compute, for many at once)."""

    key: tuple
    signature: tuple
    ancestor: Optional[CacheEntry]
    start: int
    channels: list[int]
    first: int
    reuse_from: Optional[int]
    order: list[int]
    needed: list
    at_stage: dict[int, tuple]
    store: bool
    reserved: int
    new_states: list
    scratch: Any
    batch_scores: Optional[list]
    correct: int = 0
    loss: float = 0.0
    seen: int = 0
    bound: Optional[tuple[float, float]] = None
    weights: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(eq=False)
class _Runner:
    """A job on one validation batch during a sweep: ``state`` is the input of stage ``stage``."""

    job: _Job
    batch: int
    state: Any
    stage: int


class _Wrapped(nn.Module):
    """Calls ``fn`` with ``root``'s parameters reachable by name (for ``functional_call``)."""

    def __init__(self, root: nn.Module, fn: Callable[[Any], Any]):
        super().__init__()
        self.root = root
        self.fn = fn

    def forward(self, state: Any) -> Any:
        return self.fn(state)


def _sole_argument(state: Any) -> tuple:
    return (state,)


def _spread(state: Any) -> tuple:
    return tuple(state)


# ---------------------------------------------------------------------------- evaluator
class BatchedEvaluator(IncrementalEvaluator):
    """An :class:`~deap_quant.evaluation.incremental.IncrementalEvaluator` that evaluates many genomes per call.

    ``population_batch``: genomes run together (``"auto"``: from free memory, see the module
    docstring; an integer ``K >= 1``: at most ``K``, fewer when memory is short).
    ``stack``: run a group's stages as stacked batches (``True``), one genome after another
    (``False``), or stacked on CUDA only (``"auto"``, default); stacked forms are verified
    before use. ``data_bytes``: device memory the validation data may take before
    they are streamed (``None``: :data:`DATA_FRACTION` of the free memory; CPU data are never
    streamed). Other options are :class:`IncrementalEvaluator`'s. Fitness values are those of
    :class:`IncrementalEvaluator`, bit for bit.

    Use :meth:`map` as DEAP's ``toolbox.map`` (``toolbox.register("map", evaluator.map)``):
    ``toolbox.map(toolbox.evaluate, individuals)`` then evaluates them all in one call.
    """

    def __init__(self, qmodel: QuantizedModel, data: DataSpec, metric: MetricSpec = "accuracy",
                 batch_size: int = 512, *, population_batch: Union[int, str] = "auto",
                 stack: Union[bool, str] = "auto", store: str = "promising", data_bytes: Optional[int] = None,
                 stages: StageSpec = "auto", cache_bytes: Optional[int] = None, early_rejection: bool = True,
                 memoize: bool = True, memo_size: int = 100_000, prune: bool = True, reuse_rows: bool = True,
                 keep_states: str = "auto", threads: Optional[int] = None):
        super().__init__(qmodel, data, metric=metric, batch_size=batch_size, stages=stages, cache_bytes=cache_bytes,
                         early_rejection=early_rejection, memoize=memoize, memo_size=memo_size, prune=prune,
                         reuse_rows=reuse_rows, keep_states=keep_states, store=store, threads=threads)
        if population_batch != "auto" and (isinstance(population_batch, bool) or not isinstance(population_batch, int)
                                           or population_batch < 1):
            raise ValueError(f"population_batch={population_batch!r} is not valid; use an integer >= 1 or 'auto'")
        if not any(stack is mode for mode in (True, False)) and stack != "auto":
            raise ValueError(f"stack={stack!r} is not valid; use 'auto', True or False")
        if data_bytes is not None and (isinstance(data_bytes, bool) or not isinstance(data_bytes, int)
                                       or data_bytes < 0):
            raise ValueError(f"data_bytes={data_bytes!r} is not valid; use a number of bytes >= 0 or None")
        self.population_batch = population_batch
        self.stack = stack
        self.data_bytes = data_bytes
        self.memory_share = 1  # processes of one parallel map on this machine (they split its free memory)
        self.last_population_batch: Optional[int] = None
        self._reset_batch_counters()

    # ------------------------------------------------------------------ set-up
    def _unprepare(self) -> None:
        super()._unprepare()
        self._verdicts: dict[tuple, bool] = {}
        self._functional: dict[int, Optional[tuple[nn.Module, dict[int, str], Callable[[Any], tuple]]]] = {}
        self._job_bytes = 0
        self._protect: Counter = Counter()
        self._kept: set = set()

    def _reset_counters(self) -> None:
        super()._reset_counters()
        self._reset_batch_counters()

    def _reset_batch_counters(self) -> None:
        self.calls_many = 0
        self.groups = 0
        self.concat_runs = 0
        self.vmap_runs = 0
        self.single_runs = 0
        self.verifications = 0

    def _build(self) -> None:
        super()._build()
        self._verdicts = {}
        self._functional = {}
        sample = self.batches[0][0]
        peak = 0
        with torch.inference_mode():
            state = sample
            for stage in self._split.stages:
                output = stage(state)
                peak = max(peak, state_bytes(state) + state_bytes(output))
                state = output
        self._job_bytes = 2 * peak  # input, output, and the stacked copies of a sweep

    def batches_for(self, module: nn.Module, placement: Optional[tuple] = None) -> list[tuple[Any, Any]]:
        """The batches placed for ``module``: on its device when they fit in ``data_bytes``; on a CUDA
        device where they do not, a :class:`StreamedBatches` moving one batch at a time."""
        if self._batches is None:
            self._batches = materialize(self.data, self.batch_size)
        device, dtype = key = model_placement(module) if placement is None else placement
        placed = getattr(self, "_placed", None)
        if placed is not None and placed[0] == key:
            return placed[1]
        if device is not None and device.type == "cuda" and not self._data_fits(device, dtype):
            self._placed = (key, StreamedBatches(self._batches, device, dtype))
            return self._placed[1]
        return super().batches_for(module, placement)

    def _data_fits(self, device: torch.device, dtype: Optional[torch.dtype]) -> bool:
        size = 0
        for inputs, targets in self._batches:
            for tensor in (*_leaves(inputs), *_leaves(targets)):
                itemsize = (torch.empty((), dtype=dtype).element_size()
                            if dtype is not None and tensor.is_floating_point() else tensor.element_size())
                size += tensor.numel() * itemsize
        budget = self.data_bytes
        if budget is None:
            free = free_memory(device)
            if free is None:
                return True
            budget = int(free * DATA_FRACTION)
        return size <= budget

    @property
    def streamed(self) -> bool:
        """Whether the validation data are streamed to the device batch by batch."""
        placed = getattr(self, "_placed", None)
        return placed is not None and isinstance(placed[1], StreamedBatches)

    def _lengths(self) -> list[int]:
        if self._batches is None:
            self._batches = materialize(self.data, self.batch_size)
        return [_batch_length(batch) for batch in self._batches]

    @property
    def n_samples(self) -> int:
        return sum(self._lengths())

    @property
    def stacking(self) -> bool:
        """Whether groups run as stacked batches now (``stack``, and for ``"auto"`` the model's device)."""
        if self.stack == "auto":
            device = model_placement(self.qmodel.module)[0]
            return device is not None and device.type == "cuda"
        return bool(self.stack)

    def population_batch_now(self, count: Optional[int] = None) -> int:
        """``K``: genomes run together now (see the module docstring), at most ``count`` if given."""
        self._prepare()
        requested = self.population_batch
        device = model_placement(self.qmodel.module)[0]
        free = free_memory(device)
        if free is None:
            cap = requested if requested != "auto" else 8
        else:
            cap = max(1, int(free * WORK_FRACTION / max(1, self.memory_share)) // max(1, self._job_bytes))
        size = min(cap, AUTO_MAX) if requested == "auto" else min(requested, cap)
        if count is not None:
            size = min(size, max(1, count))
        return max(1, size)

    # ------------------------------------------------------------------ the population interface
    def map(self, func: Callable[[Any], Any], *iterables: Iterable[Any]) -> list[Any]:
        """DEAP's ``toolbox.map``: ``func`` on every item, in order, as a list.

        When ``func`` is this evaluator (or ``toolbox.evaluate`` registered as it), the items are
        evaluated together (:meth:`evaluate_many`); any other function is mapped one by one.
        """
        if len(iterables) != 1 or not self._is_me(func):
            return list(map(func, *iterables))
        return self.evaluate_many(iterables[0])

    def _is_me(self, func: Any) -> bool:
        if func is self:
            return True
        return (isinstance(func, functools.partial) and func.func is self and not func.args
                and not func.keywords)

    def evaluate_many(self, genomes: Iterable[Iterable[Sequence[int]]]) -> list[tuple[float, ...]]:
        """The fitness of each gene list (as ``self(genes)`` would give it, in order), computed together."""
        genomes = [list(genes) for genes in genomes]
        self.evaluations += len(genomes)
        threshold = self.threshold if self.early_rejection and self.rejecting_metric else None
        return [outcome.fitness for outcome in self._evaluate_many(genomes, threshold)]

    def __call__(self, genes: Iterable[Sequence[int]] = ()) -> tuple[float, ...]:
        return self.evaluate_many([genes])[0]

    def _evaluate_many(self, genomes: list[list], threshold: Optional[tuple[float, float]]) -> list[Outcome]:
        split = self._prepare()
        self.calls_many += 1
        outcomes: list[Optional[Outcome]] = [None] * len(genomes)
        pending: dict[tuple, list[int]] = {}
        for position, genes in enumerate(genomes):
            key = self.genome_key(genes)
            known = self._memo.get(key)
            if known is not None and (known.exact or (threshold is not None and known.fitness < threshold)):
                self._memo.move_to_end(key)
                self.memo_hits += 1
                outcomes[position] = known
            elif key in pending:  # computed once, like a memo hit right after the first
                self.memo_hits += 1
                pending[key].append(position)
            else:
                pending[key] = [position]
        if pending:
            with self._evaluating():
                computed = self._compute_many(list(pending), split, threshold)
            for key, outcome in computed.items():
                self._remember(key, outcome)
                for position in pending[key]:
                    outcomes[position] = outcome
        return outcomes  # type: ignore[return-value]

    def _compute(self, key: tuple, split: StageSplit, threshold: Optional[tuple[float, float]]) -> Outcome:
        return self._run_jobs([key], split, threshold)[key]

    # ------------------------------------------------------------------ scheduling
    def _compute_many(self, keys: list[tuple], split: StageSplit,
                      threshold: Optional[tuple[float, float]]) -> dict[tuple, Outcome]:
        """Outcomes of distinct genome ``keys``: grouped by cached ancestor, up to ``K`` at a time.

        A group also ends early when the cache cannot hold the activations of one more member (the
        member then starts the next group), so that later members still find room to store theirs.
        """
        cache = self._cache
        self.last_population_batch = self.population_batch_now(len(keys))
        # Unstacked, a group is only a sequence: one at a time, each genome finds its siblings' activations.
        size = self.last_population_batch if self.stacking else 1
        planned = []
        for position, key in enumerate(keys):
            ancestor, start = cache.closest(self._signature(key)) if cache is not None else (None, 0)
            planned.append((None if ancestor is None else ancestor.key, start, position, key))
        first_seen: dict[Any, int] = {}
        for ancestor_key, _, position, _ in planned:
            first_seen.setdefault(ancestor_key, position)
        planned.sort(key=lambda item: (first_seen[item[0]], item[1], item[2]))
        self._protect = Counter(item[0] for item in planned if item[0] is not None)
        self._kept = set()
        rejecting = threshold is not None and self.rejecting_metric
        lengths = self._lengths()
        results: dict[tuple, Outcome] = {}
        try:
            index = 0
            while index < len(planned):
                jobs: list[_Job] = []
                try:
                    while index < len(planned) and len(jobs) < size:
                        job = self._new_job(planned[index][3], split, rejecting, lengths, must=not jobs)
                        if job is None:
                            break
                        jobs.append(job)
                        index += 1
                    self.groups += 1
                    results.update(self._run_chunk(jobs, split, threshold, lengths))
                finally:
                    self._release(jobs)
                for item in planned[index - len(jobs):index]:
                    if item[0] is not None:
                        self._protect[item[0]] -= 1
        finally:
            self._protect = Counter()
            self._kept = set()
        return results

    def _run_jobs(self, keys: list[tuple], split: StageSplit,
                  threshold: Optional[tuple[float, float]]) -> dict[tuple, Outcome]:
        """Compute ``keys`` as one group (each stores its activations if there is room)."""
        rejecting = threshold is not None and self.rejecting_metric
        lengths = self._lengths()
        jobs: list[_Job] = []
        try:
            for key in keys:
                jobs.append(self._new_job(key, split, rejecting, lengths, must=True))
            return self._run_chunk(jobs, split, threshold, lengths)
        finally:
            self._release(jobs)

    def _weights(self, changes: Sequence) -> contextlib.AbstractContextManager:
        """``changes`` (a genome key's entries) written into the model inside, reverted on exit."""
        return self.qmodel.states_set(changes) if changes else contextlib.nullcontext()

    def _release(self, jobs: list[_Job]) -> None:
        for job in jobs:
            if job.reserved:
                self._cache.release(job.reserved)
                job.reserved = 0

    def _protected(self, ancestor: Optional[CacheEntry]) -> tuple:
        """Keys not to evict now: ancestors of genomes still to run in this call, entries stored in it."""
        keys = {key for key, count in self._protect.items() if count > 0} | self._kept
        if ancestor is not None:
            keys.add(ancestor.key)
        return tuple(keys)

    # ------------------------------------------------------------------ jobs
    def _new_job(self, key: tuple, split: StageSplit, rejecting: bool, lengths: list[int],
                 must: bool) -> Optional[_Job]:
        """A job for ``key``, with room reserved for its activations; ``None`` if there is no room and
        not ``must`` (it then waits for the next group; with ``must`` it runs without storing)."""
        cache = self._cache
        n_stages, n_batches = len(split), len(lengths)
        signature = self._signature(key) if cache is not None else ()
        ancestor, start = cache.closest(signature) if cache is not None else (None, 0)
        start = self._resume(ancestor, start)
        if ancestor is None and cache is not None and 0 in self._patches:
            ancestor = cache.latest()  # nothing shared, but the first convolution may still be patched
        reserved, store = 0, cache is not None and start < n_stages and self._storing
        if store:
            reserved = self._new_bytes[start]
            store = cache.reserve(reserved, keep=self._protected(ancestor))
            if not store:
                if not must:
                    return None
                reserved = 0
        if ancestor is not None:
            cache.touch(ancestor.key)
        new_states = self._fresh_states(start, n_batches, store)
        if start == n_stages:  # the same weights are cached (memo forgotten or off): reuse the outputs
            new_states[n_stages] = list(ancestor.states[n_stages])
        order = list(range(n_batches))
        if rejecting and ancestor is not None and ancestor.batch_scores is not None:
            scores = ancestor.batch_scores
            order.sort(key=lambda b: (scores[b][0] / max(1, lengths[b]), -scores[b][1]))
        scratch = copy.copy(self.metric) if self.rejecting_metric else None
        channels = self._changed_channels(start, signature, ancestor)
        first = start + 1 if channels else start
        reuse_from = self._reuse_from(signature, ancestor) if self.reuse_rows and ancestor is not None else None
        needed = [change for change in key if self._layer_last[change[0]] >= start]
        at_stage = {stage: tuple(change for change in needed
                                 if self._layer_stage[change[0]] <= stage <= self._layer_last[change[0]])
                    for stage in range(first, n_stages)}
        self.computed += 1
        self.start_stages += start
        self.patched += bool(channels)
        return _Job(key=key, signature=signature, ancestor=ancestor, start=start, channels=channels, first=first,
                    reuse_from=reuse_from, order=order, needed=needed, at_stage=at_stage, store=store,
                    reserved=reserved, new_states=new_states, scratch=scratch,
                    batch_scores=[(0, 0.0)] * n_batches if scratch is not None else None)

    def _run_chunk(self, jobs: list[_Job], split: StageSplit, threshold: Optional[tuple[float, float]],
                   lengths: list[int]) -> dict[tuple, Outcome]:
        """Compute ``jobs`` together, validation batch by batch (see the module docstring)."""
        batches = self.batches
        n_batches, total = len(lengths), sum(lengths)
        rejecting = threshold is not None and self.rejecting_metric
        bar = threshold if rejecting else None
        with torch.inference_mode():
            if not (self.stacking and len(jobs) > 1):  # one after another, as the one-at-a-time evaluator
                for job in jobs:
                    with self._weights(job.needed):
                        for slot in range(n_batches):
                            runner = self._enter(job, job.order[slot], split, batches, written=True)
                            self._run_alone(runner, split, batches)
                            self._score(runner, slot, batches, lengths, total, bar)
                            if job.bound is not None:
                                break
                return {job.key: self._finish(job, batches, lengths, total) for job in jobs}
            for slot in range(n_batches):  # together: batch by batch, stage by stage
                live = [job for job in jobs if job.bound is None]
                if not live:
                    break
                runners = [self._enter(job, job.order[slot], split, batches) for job in live]
                if len(runners) > 1:
                    self._sweep(runners, split, batches)
                else:
                    with self._weights(runners[0].job.needed):
                        self._run_alone(runners[0], split, batches)
                for runner in runners:
                    self._score(runner, slot, batches, lengths, total, bar)
            return {job.key: self._finish(job, batches, lengths, total) for job in jobs}

    def _enter(self, job: _Job, b: int, split: StageSplit, batches: Sequence, written: bool = False) -> _Runner:
        """The runner of ``job`` on batch ``b``: its input state, patched where a few channels changed
        (``written``: the job's weights are in force already)."""
        n_stages = len(split)
        if job.start == n_stages:
            return _Runner(job, b, job.new_states[n_stages][b], n_stages)
        state = batches[b][0] if job.start == 0 else job.ancestor.states[job.start][b]
        if job.channels:  # a few output channels of one convolution changed: patch the ancestor's output
            with contextlib.nullcontext() if written else self._weights(job.needed):
                state = self._patched(split.stages[job.start], state, job.ancestor.states[job.start + 1][b],
                                      job.channels)
            if job.new_states[job.first] is not None:
                job.new_states[job.first][b] = state
            self.stage_batches += 1
        return _Runner(job, b, state, job.first)

    def _run_alone(self, runner: _Runner, split: StageSplit, batches: Sequence) -> None:
        """Run the runner's remaining stages (its job's weights in force), as the one-at-a-time evaluator does."""
        job, b, n_stages = runner.job, runner.batch, len(split)
        for stage in range(runner.stage, n_stages):
            if stage == job.reuse_from:  # later stages are the ancestor's: rerun only the changed samples
                reused = self._reuse_rows(split, b, runner.state, stage, job.ancestor, job.new_states)
                if reused is not None:
                    runner.state, runner.stage = reused, n_stages
                    return
            try:
                state = split.stages[stage](runner.state)
            except RuntimeError as error:
                misfit = inputs_do_not_fit(error, batches[b][0])
                if misfit is None:
                    raise
                raise misfit from error
            runner.state, runner.stage = state, stage + 1
            if job.new_states[stage + 1] is not None:
                job.new_states[stage + 1][b] = state
            self.stage_batches += 1
            self.single_runs += 1

    def _sweep(self, runners: list[_Runner], split: StageSplit, batches: Sequence) -> None:
        """Run every runner's remaining stages, stage by stage, runners at the same stage together."""
        n_stages = len(split)
        waiting = [runner.stage for runner in runners if runner.stage < n_stages]
        if not waiting:
            return
        for stage in range(min(waiting), n_stages):
            here = []
            for runner in runners:
                if runner.stage != stage:
                    continue
                job = runner.job
                if stage == job.reuse_from:  # later stages are the ancestor's: rerun only the changed samples
                    with self._weights(job.needed):
                        reused = self._reuse_rows(split, runner.batch, runner.state, stage, job.ancestor,
                                                  job.new_states)
                    if reused is not None:
                        runner.state, runner.stage = reused, n_stages
                        continue
                here.append(runner)
            if not here:
                continue
            try:
                outputs, shared = self._run_stage(split, stage, here)
            except RuntimeError as error:
                inputs = batches[here[0].batch][0]
                misfit = inputs_do_not_fit(error, inputs)
                if misfit is None:
                    raise
                raise misfit from error
            for runner, output, sliced in zip(here, outputs, shared):
                runner.state, runner.stage = output, stage + 1
                job = runner.job
                if job.new_states[stage + 1] is not None:
                    # a slice of a stacked output would keep the whole stack alive in the cache
                    job.new_states[stage + 1][runner.batch] = (_rebuild(output, [t.clone() for t in _leaves(output)])
                                                               if sliced and job.store else output)
                self.stage_batches += 1

    def _score(self, runner: _Runner, slot: int, batches: Sequence, lengths: list[int], total: int,
               threshold: Optional[tuple[float, float]]) -> None:
        """Count batch ``runner.batch`` into its job's metric; reject the job if it cannot reach ``threshold``."""
        job, b = runner.job, runner.batch
        self.stage_batches_full += len(job.new_states) - 1
        job.seen += lengths[b]
        scratch = job.scratch
        if scratch is None:
            return
        scratch.reset()
        scratch.update(runner.state, batches[b][1])  # the metric's own counting, on this batch alone
        job.batch_scores[b] = (scratch.correct, scratch.loss_sum)
        job.correct += scratch.correct
        job.loss += scratch.loss_sum
        if threshold is not None and slot + 1 < len(lengths):
            job.bound = _upper_bound(job.correct, job.loss, total - job.seen, total, threshold)

    def _finish(self, job: _Job, batches: Sequence, lengths: list[int], total: int) -> Outcome:
        self.samples_computed += job.seen
        if job.bound is not None:
            self.rejected_count += 1
            self.samples_skipped += total - job.seen
            return Outcome(job.bound, None, exact=False)
        metric = self.metric
        metric.reset()
        n_stages = len(job.new_states) - 1
        if job.batch_scores is not None:  # Accuracy: add up the per-batch counts as update() does
            for b, (correct, loss) in enumerate(job.batch_scores):
                metric.correct += correct
                metric.count += lengths[b]
                metric.loss_sum += loss
        else:
            outputs = job.new_states[n_stages]
            for b in range(len(lengths)):
                metric.update(outputs[b], batches[b][1])
        outcome = Outcome(tuple(metric.fitness()), metric.summary(), exact=True)
        if job.store:
            if self._worth_storing(outcome):
                cache = self._cache
                for key in self._protected(None):  # evicted last, if room must be made
                    cache.touch(key)
                entry = (CacheEntry.extending(job.ancestor, job.start, job.key, job.signature, job.new_states,
                                              job.batch_scores)
                         if job.ancestor is not None else
                         CacheEntry(job.key, job.signature, job.new_states, job.batch_scores))
                if cache.insert(entry, reserved=job.reserved):
                    self._kept.add(job.key)
                job.reserved = 0
            else:
                self.not_stored += 1
        return outcome

    # ------------------------------------------------------------------ running a stage for many
    def _run_stage(self, split: StageSplit, stage: int, runners: list[_Runner]) -> tuple[list[Any], list[bool]]:
        """Outputs of ``stage`` for each runner, and for each whether it is a slice of a stacked output.

        Runners whose states have the same shapes run together: all with their weights stacked
        (``vmap``) where their weights differ, else each set sharing weights as one concatenated
        batch; whatever is not verified (or cannot be stacked) runs one by one.
        """
        call = split.stages[stage]
        outputs: list[Any] = [None] * len(runners)
        shared = [False] * len(runners)
        by_shape: dict[Any, list[int]] = {}
        for index, runner in enumerate(runners):
            by_shape.setdefault(shapes(runner.state) if _is_nested_tensors(runner.state) else ("alone", index),
                                []).append(index)
        for members in by_shape.values():
            group = [runners[i] for i in members]
            parts: dict[tuple, list[int]] = {}
            for position, runner in enumerate(group):
                parts.setdefault(runner.job.at_stage.get(stage, ()), []).append(position)
            stacking = self.stacking and len(group) > 1
            if stacking and len(parts) > 1:
                stacked = self._try_vmap(split, stage, group, parts)
                if stacked is not None:
                    for position, output in enumerate(stacked[0]):
                        outputs[members[position]], shared[members[position]] = output, stacked[1]
                    continue
            for changes, positions in parts.items():
                with self._weights(changes):
                    states = [group[p].state for p in positions]
                    result = self._try_concat(call, stage, states) if stacking and len(positions) > 1 else None
                    if result is None:
                        result = ([call(state) for state in states], False)
                        self.single_runs += len(states)
                    for p, output in zip(positions, result[0]):
                        outputs[members[p]], shared[members[p]] = output, result[1]
        return outputs, shared

    def _stackable(self, states: list[Any]) -> bool:
        first = states[0]
        if not _is_nested_tensors(first) or not _leaves(first):
            return False
        rows = _leaves(first)[0].shape[0] if _leaves(first)[0].ndim else 0
        key = shapes(first)
        return rows > 0 and row_structured(first, rows) and all(shapes(state) == key for state in states[1:])

    def _try_concat(self, call: Callable[[Any], Any], stage: int, states: list[Any]) -> Optional[tuple[list[Any], bool]]:
        """``call`` on ``states`` (same weights) as one batch concatenated along the samples, if verified."""
        if not self._stackable(states):
            return None
        key = ("cat", stage, len(states), shapes(states[0]))
        verdict = self._verdicts.get(key)
        if verdict is False:
            return None
        if verdict is None:  # first time: the reference one by one, then the concatenation, compared bit for bit
            self.verifications += 1
            reference = [call(state) for state in states]
            self.single_runs += len(states)
            try:
                joined = self._concatenated(call, states)
                self._verdicts[key] = joined is not None and all(
                    identical_bits(a, b) for a, b in zip(joined, reference))
            except Exception:  # noqa: BLE001 - a stage that cannot run stacked simply runs one by one
                self._verdicts[key] = False
            return reference, False
        self.concat_runs += 1
        return self._concatenated(call, states), True

    @staticmethod
    def _concatenated(call: Callable[[Any], Any], states: list[Any]) -> Optional[list[Any]]:
        count = len(states)
        rows = _leaves(states[0])[0].shape[0]
        columns = list(zip(*(_leaves(state) for state in states)))
        output = call(_rebuild(states[0], [torch.cat(column) for column in columns]))
        if not _is_nested_tensors(output) or not row_structured(output, rows * count):
            return None
        pieces = [leaf.split(rows) for leaf in _leaves(output)]
        return [_rebuild(output, [piece[i] for piece in pieces]) for i in range(count)]

    def _functional_target(self, split: StageSplit, stage: int
                           ) -> Optional[tuple[nn.Module, dict[int, str], Callable[[Any], tuple]]]:
        """``(module, {layer: parameter name in it}, arguments)`` to call stage ``stage`` with other weights."""
        if stage in self._functional:
            return self._functional[stage]
        fn = split.stages[stage].fn
        code = getattr(fn, "code", None)
        if isinstance(fn, nn.Module):
            module, arguments = fn, _sole_argument
        elif isinstance(code, nn.Module):
            module, arguments = code, _spread
        else:
            module, arguments = _Wrapped(self.qmodel.module, fn), _sole_argument
        names: dict[int, str] = {}
        for layer in range(len(self.qmodel.layers)):
            if not self._layer_stage[layer] <= stage <= self._layer_last[layer]:
                continue
            weight = self.qmodel._module_of(layer).weight
            found = [name for name, parameter in module.named_parameters(remove_duplicate=False)
                     if parameter is weight]
            if found:
                names[layer] = found[0]
        target = (module, names, arguments)
        self._functional[stage] = target
        return target

    def _lane_weight(self, job: _Job, layer: int) -> torch.Tensor:
        weight = job.weights.get(layer)
        if weight is None:
            changes = [change for change in job.needed if change[0] == layer]
            with self._weights(changes):
                weight = self.qmodel._live(layer).clone()
            job.weights[layer] = weight
        return weight

    def _try_vmap(self, split: StageSplit, stage: int, runners: list[_Runner], parts: dict[tuple, list[int]]
                  ) -> Optional[tuple[list[Any], bool]]:
        """Stage ``stage`` for runners with different weights there, vmapped over stacked weights, if verified."""
        states = [runner.state for runner in runners]
        if not self._stackable(states):
            return None
        target = self._functional_target(split, stage)
        layers = sorted({change[0] for changes in parts for change in changes})
        if target is None or any(layer not in target[1] for layer in layers):
            return None
        module, names, arguments = target
        key = ("vmap", stage, len(runners), shapes(states[0]))
        verdict = self._verdicts.get(key)
        if verdict is False:
            return None
        weights = {names[layer]: torch.stack([self._lane_weight(runner.job, layer) for runner in runners])
                   for layer in layers}
        stacked = _rebuild(states[0], [torch.stack(column) for column in zip(*(_leaves(s) for s in states))])

        def run(parameters: dict[str, torch.Tensor]) -> list[Any]:
            output = torch.func.vmap(lambda p, s: torch.func.functional_call(module, p, arguments(s)))(
                parameters, stacked)
            leaves = [leaf.unbind(0) for leaf in _leaves(output)]
            return [_rebuild(output, [leaf[i] for leaf in leaves]) for i in range(len(runners))]

        if verdict is None:  # first time: one by one, then stacked (and poisoned: the weights must reach it)
            self.verifications += 1
            reference: list[Any] = [None] * len(runners)
            for changes, indices in parts.items():
                with self._weights(changes):
                    for i in indices:
                        reference[i] = split.stages[stage](runners[i].state)
            self.single_runs += len(runners)
            try:
                ok = all(identical_bits(a, b) for a, b in zip(run(weights), reference))
                for name in weights if ok else ():
                    poisoned = dict(weights)
                    poisoned[name] = weights[name].clone()
                    poisoned[name][0] = math.nan
                    outputs = run(poisoned)
                    ok = (any(bool(leaf.isnan().any()) for leaf in _leaves(outputs[0]))
                          and all(identical_bits(a, b) for a, b in zip(outputs[1:], reference[1:])))
                    if not ok:
                        break
            except Exception:  # noqa: BLE001 - a stage that cannot be vmapped simply runs one by one
                ok = False
            self._verdicts[key] = ok
            return reference, False
        self.vmap_runs += 1
        return run(weights), True

    # ------------------------------------------------------------------ reporting, copies, pickling
    def batching_stats(self) -> dict[str, Any]:
        """The population batching counters: ``K`` last used, calls, groups, stacked and single stage runs,
        verifications, genomes whose activations were not stored, whether data are streamed."""
        return {"population_batch": self.last_population_batch, "stacking": self.stacking,
                "calls_many": self.calls_many, "groups": self.groups, "concat_runs": self.concat_runs,
                "vmap_runs": self.vmap_runs, "single_runs": self.single_runs, "verifications": self.verifications,
                "not_stored": self.not_stored, "streamed": self.streamed}

    def stats(self) -> dict[str, Any]:
        """:meth:`IncrementalEvaluator.stats` plus :meth:`batching_stats`."""
        return {**super().stats(), **self.batching_stats()}

    def with_data(self, data: DataSpec) -> BatchedEvaluator:
        """A new evaluator with the same model, metric, batch size and options on other data."""
        return BatchedEvaluator(self.qmodel, data, metric=copy.copy(self.metric), batch_size=self.batch_size,
                                population_batch=self.population_batch, stack=self.stack, store=self.store,
                                data_bytes=self.data_bytes, stages=self.stages_spec, cache_bytes=self.cache_bytes,
                                early_rejection=self.early_rejection, memoize=self.memoize, memo_size=self.memo_size,
                                prune=self.prune, reuse_rows=self.reuse_rows, keep_states=self.keep_states,
                                threads=self.threads)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for name in ("_verdicts", "_functional", "_job_bytes", "_protect", "_kept"):
            state.pop(name, None)
        return state

