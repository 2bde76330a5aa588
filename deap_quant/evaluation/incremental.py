"""Fast fitness: resume from cached activations, stop hopeless individuals early, never evaluate twice.

:class:`IncrementalEvaluator` is a drop-in :class:`~deap_quant.evaluation.evaluator.Evaluator`
(same call, ``scores``, ``score_module``, ``with_data``, ``headline``, ``evaluations``) that
returns bit-identical fitness values, faster:

* **Stages and cached activations.** The model runs as a :class:`~.stages.StageSplit`. The
  activations of fully evaluated genomes are kept per validation batch in an
  :class:`~.cache.ActivationCache` (LRU, byte budget). A new genome starts from the cached
  genome that agrees with it on the longest prefix of stages (its parent, usually, found by
  comparing genes per stage, so DEAP's clone-then-mutate needs no bookkeeping) and recomputes
  only the stages from the first one its genes change. Where that stage is a convolution
  followed by channel-wise operations and only a few of its output channels changed, only those
  channels are recomputed (a :class:`~.patches.ChannelPatch`, used only where it was found to
  reproduce the full stage bit for bit for that number of channels and batch shape). Between
  ``(mu+lambda)`` generations only the parents' and hall of fame's activations are kept; during
  one, they are evicted last, and an offspring below the selection bar is not stored (it can
  never be a parent). When every stage input of the parents' genomes would not fit in the
  budget, each cached genome keeps only the inputs of some stages, chosen to lose the least
  recomputation per byte; a genome whose ancestor dropped the input it needs resumes from the
  last kept one before it.
* **Changed samples only.** After the last stage whose weights differ from the ancestor's, the
  samples whose activations are still bit-for-bit the ancestor's keep its outputs; only the
  others run through the remaining stages, as a smaller batch whose size was verified to give
  the full batch's bits (see :mod:`.rows`).
* **Memoisation.** A genome is keyed by the weights it actually changes (merged, clipped to
  the grid, no-ops dropped); a key seen before returns its stored fitness.
* **Exact early rejection** (accuracy-type metrics, when a threshold is set by
  :meth:`IncrementalEvaluator.prepare_generation`, which :func:`~deap_quant.evolve` calls before
  each ``(mu+lambda)`` generation): batches are evaluated one at a time, those where the
  closest cached ancestor did worst first, and the evaluation stops once the fitness
  ``(accuracy, -loss)`` is certain to end strictly below the threshold: even a perfect
  remainder would leave the accuracy below the threshold's, or level with it while the loss so
  far already exceeds the threshold's loss. The individual then gets an upper bound of its
  fitness that still ranks below every parent that set the threshold -- ``(best possible
  accuracy, inf)``, or ``(best possible accuracy, -loss so far)`` in the second case -- and
  :meth:`IncrementalEvaluator.is_rejected` is true for it (with ``memoize``, the default). Its exact value is computed if it is
  ever asked for without a threshold that excludes it.

Batches are those of the plain evaluator (same size, same order of metric updates), so every
complete fitness equals ``Evaluator(...)(genes)`` bit for bit.

**Change detection.** Stored activations and fitness values hold for the weights the model has
without genes. Before every evaluation the evaluator compares the model's state with the one
they were computed for: the quantized model's :attr:`~deap_quant.QuantizedModel.revision` (a
new base, writes still in force), the module's submodules, the data's device and dtype, and
every parameter and buffer -- its storage address, version counter, dtype, shape and strides
(the storages described are kept alive, so no new tensor can take their address). Any in-place
edit of a tensor (``weight[0] += 1`` under ``no_grad``, ``running_mean.fill_(0)``), any new tensor
assigned to it (``.to()``, ``.double()``, ``.half()``, ``param.data = ...``) and any replaced
submodule is noticed exactly. Edits through ``tensor.data`` bypass version counters: whole-layer rewrites of quantized
weights are still caught (a fixed sample of weights is compared), others need
:meth:`QuantizedModel.mark_modified` or :meth:`IncrementalEvaluator.reset`. The split and its
verified patches and row counts are rebuilt when the module's structure, or the dtype, device or
layout of a tensor, changes. Everything that is verified (the split, channel patches, row
subsets) is verified under the evaluation's own thread count. This module imports torch only.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from ..quantization.model import QuantizedModel
from .cache import ActivationCache, CacheEntry, _storages, default_budget
from .evaluator import DataSpec, Evaluator, eval_mode, inputs_do_not_fit, model_placement
from .metrics import Accuracy, MetricSpec
from .rows import bucket, changed_rows, identical_bits, put_rows, row_structured, shapes, take_rows
from .stages import StageSpec, StageSplit, split_model

__all__ = ["IncrementalEvaluator", "Outcome", "announce_parents", "REJECTED_TIE_BREAK"]

#: Weights per quantized layer compared before every evaluation, to notice rewrites through ``.data``
#: (which no version counter records).
PROBES_PER_LAYER = 64

#: Gene lists whose genome key is remembered (cleared when full).
KEY_CACHE_SIZE = 65_536

#: Relative margin on a partial loss sum used as a lower bound of the complete one: far above
#: the rounding error of adding up to a million non-negative per-batch values in any order.
LOSS_BOUND_MARGIN = 1e-9

#: A convolution stage is patched when at most 1/PATCH_FRACTION of its output channels changed.
PATCH_FRACTION = 4

#: Genomes assumed to share the activation cache before :meth:`IncrementalEvaluator.prepare_generation`
#: announces the parents and hall of fame (evolve's defaults: 20 parents, 5 in the hall of fame).
DEFAULT_MEMBERS = 25

#: Tie-break component of a rejected individual's fitness: marks it, and keeps it an upper bound.
REJECTED_TIE_BREAK = math.inf


@dataclass(frozen=True)
class Outcome:
    """Result of one evaluation: the fitness, the named scores (if complete) and whether it is exact."""

    fitness: tuple[float, ...]
    summary: Optional[dict[str, float]]
    exact: bool


class IncrementalEvaluator(Evaluator):
    """An :class:`~deap_quant.evaluation.evaluator.Evaluator` with staged caching, memoisation and early rejection.

    ``stages``: how the model is split (see :func:`~.stages.split_model`; ``"auto"`` by
    default, a list of stages for a user-declared split, ``"single"`` to disable reuse).
    ``cache_bytes``: budget of the activation cache in bytes (``None``: a quarter of the memory
    available when the evaluator starts; ``0``: no cache). ``early_rejection``: allow
    rejection when a threshold is set (accuracy-type metrics only). ``memoize``: return stored
    fitness for genomes evaluated before (``memo_size`` most recent genomes). ``prune``: keep
    only the parents' and hall of fame's activations between generations (see
    :meth:`prepare_generation`; without it, the cache is purely LRU). ``keep_states``: ``"auto"``
    (default) keeps only some stage inputs per cached genome when every input of the parents'
    genomes would not fit in the budget (see :meth:`_choose_kept`), ``"all"`` keeps them all.
    ``store``: ``"promising"`` (default) caches a computed genome's activations only if it is at or
    above the selection bar when one is set (see :meth:`prepare_generation`), ``"all"`` caches
    every computed genome's. ``threads``:
    torch intra-op threads while evaluating, and while the split, its channel patches and row
    subsets are verified (``None`` leaves torch's setting alone).
    """

    def __init__(self, qmodel: QuantizedModel, data: DataSpec, metric: MetricSpec = "accuracy",
                 batch_size: int = 512, *, stages: StageSpec = "auto", cache_bytes: Optional[int] = None,
                 early_rejection: bool = True, memoize: bool = True, memo_size: int = 100_000,
                 prune: bool = True, reuse_rows: bool = True, keep_states: str = "auto", store: str = "promising",
                 threads: Optional[int] = None):
        super().__init__(qmodel, data, metric=metric, batch_size=batch_size)
        if keep_states not in ("auto", "all"):
            raise ValueError(f"keep_states={keep_states!r} is not valid; use 'auto' or 'all'")
        if store not in ("promising", "all"):
            raise ValueError(f"store={store!r} is not valid; use 'promising' or 'all'")
        if cache_bytes is not None and (isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int)
                                        or cache_bytes < 0):
            raise ValueError(f"cache_bytes={cache_bytes!r} is not valid; use a number of bytes >= 0 or None")
        for name, value in (("early_rejection", early_rejection), ("memoize", memoize), ("prune", prune),
                            ("reuse_rows", reuse_rows)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} is not valid; use True or False")
        if isinstance(memo_size, bool) or not isinstance(memo_size, int) or memo_size < 1:
            raise ValueError(f"memo_size={memo_size!r} is not valid; use an integer >= 1")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads={threads!r} is not valid; use an integer >= 1 or None")
        self.stages_spec = stages
        self.cache_bytes = cache_bytes
        self.early_rejection = early_rejection
        self.memoize = memoize
        self.memo_size = memo_size
        self.prune = prune
        self.reuse_rows = reuse_rows
        self.keep_states = keep_states
        self.store = store
        self.threads = threads
        self._members = DEFAULT_MEMBERS
        self.threshold: Optional[tuple[float, float]] = None
        self._memo: OrderedDict[Hashable, Outcome] = OrderedDict()
        self._keys: dict[tuple, tuple] = {}  # gene tuples -> genome key, for the current base
        self._base_flat = [qmodel.base_states(layer).view(-1).numpy() for layer in range(len(qmodel.layers))]
        self._reset_counters()
        self._unprepare()

    # ------------------------------------------------------------------ set-up
    def _unprepare(self) -> None:
        self._split: Optional[StageSplit] = None
        self._split_layout: Optional[tuple] = None  # what the split was built and verified for
        self._cache: Optional[ActivationCache] = None
        self._layer_stage: list[int] = []
        self._layer_last: list[int] = []
        self._new_bytes: list[int] = []
        self._kept_inputs: tuple[bool, ...] = ()
        self._storing = False
        self._stage_profile: Optional[tuple[list[dict[int, int]], list[float], list[float]]] = None
        self._probes: list[tuple[Any, torch.Tensor]] = []  # (module, flat weight indices) per quantized layer
        self._patches: dict[int, tuple[int, int]] = {}
        self._row_verdicts: dict[tuple, bool] = {}
        self._token: Optional[tuple] = None
        self._held: list[Any] = []  # the modules and tensor storages the token refers to, kept alive

    def _reset_counters(self) -> None:
        self.memo_hits = 0
        self.computed = 0
        self.rejected_count = 0
        self.samples_computed = 0
        self.samples_skipped = 0
        self.stage_batches = 0.0
        self.stage_batches_full = 0
        self.unchanged_batches = 0
        self.subset_batches = 0
        self.start_stages = 0
        self.patched = 0
        self.not_stored = 0

    @property
    def rejecting_metric(self) -> bool:
        """Whether the metric allows exact early rejection: accuracy or top-k (exactly :class:`Accuracy`)."""
        return type(self.metric) is Accuracy

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """The evaluation's torch thread count (``threads``; unchanged if ``None``) and eval mode
        (:func:`~.evaluator.eval_mode`) in force inside."""
        previous = torch.get_num_threads()
        change = self.threads is not None and self.threads != previous
        if change:
            torch.set_num_threads(self.threads)
        try:
            with eval_mode(self.qmodel.module):
                yield
        finally:
            if change:
                torch.set_num_threads(previous)

    def _model_state(self) -> tuple[list[Any], list[torch.Tensor]]:
        """Every submodule of the model and every parameter and buffer (``None`` entries included)."""
        modules, tensors = [self.qmodel.module], []
        for module in modules:  # (the list grows while it is walked: breadth first)
            modules.extend(child for child in module._modules.values() if child is not None)
            tensors.extend(module._parameters.values())
            tensors.extend(module._buffers.values())
        return modules, tensors

    def _current_token(self, placement: tuple) -> tuple[tuple, list[Any], list[torch.Tensor]]:
        """Identifies the model's state without genes, except for the probes (see "Change detection"
        in the module docstring): ``(token, modules, tensors)``.

        Per tensor: its storage address, version counter, dtype, shape and strides. Once accepted,
        the modules and storages it describes are kept alive (:attr:`_held`), so that no new
        module or tensor can take the identity or the address of one it describes.
        """
        qmodel = self.qmodel
        modules, tensors = self._model_state()
        fingerprint = tuple((t.data_ptr(), t._version, t.dtype, t.shape, t.stride()) if t is not None else None
                            for t in tensors)
        versions = tuple(state._version for state in qmodel._states)
        token = (qmodel.revision, versions, tuple(map(id, modules)), fingerprint, placement)
        return token, modules, tensors

    def _probed(self) -> Optional[torch.Tensor]:
        """The bits of the probed quantized weights, as bytes (they see rewrites through ``.data``)."""
        if not self._probes:
            return None
        return torch.cat([module.weight.take(index) for module, index in self._probes]).view(torch.uint8)

    @staticmethod
    def _layout(token: tuple) -> tuple:
        """What a split is built and verified for: the submodules, the data's device and dtype, and
        each tensor's dtype, shape and strides (not its values)."""
        return token[2], token[4], tuple(entry and entry[2:] for entry in token[3])

    def _prepare(self) -> StageSplit:
        placement = model_placement(self.qmodel.module)
        self.batches_for(self.qmodel.module, placement)  # the data follows the model's device and dtype
        token, modules, tensors = self._current_token(placement)
        if self._token is not None and token == self._token[0]:
            probed, known = self._probed(), self._token[1]
            if probed is None or torch.equal(probed, known):
                return self._split
        # other weights or buffers: every stored activation and fitness is stale
        if self._split is None or self._split_layout != self._layout(token):
            with self._evaluating():  # verified as it will be evaluated
                self._build()
            self._split_layout = self._layout(token)
        if self._cache is not None:
            self._cache.clear()
        self._memo.clear()
        self._keys.clear()
        self._token = (token, self._probed())
        self._held = [*modules, *(tensor.data for tensor in tensors if tensor is not None)]
        return self._split

    def _build(self) -> None:
        sample = self.batches[0][0]
        names = [layer.name for layer in self.qmodel.layers]
        try:
            split = split_model(self.qmodel.module, self.stages_spec, quantized=names, sample=sample)
        except RuntimeError as error:
            misfit = inputs_do_not_fit(error, sample)
            if misfit is None:
                raise
            raise misfit from error
        shapes = {}
        for inputs, _ in self.batches:
            shapes.setdefault(tuple(inputs.shape) if hasattr(inputs, "shape") else None, inputs)
        split.verify_patches(shapes.values())
        modules = dict(self.qmodel.module.named_modules())
        weights = [modules[name].weight for name in names]
        self._layer_stage = split.stages_of_weights(weights)
        self._layer_last = split.last_stages_of_weights(weights)
        layer_of = {id(modules[name]): layer for layer, name in enumerate(names)}
        self._row_verdicts = {}
        self._patches = {}  # stage -> (layer, weights per output channel) where a ChannelPatch applies
        for index, stage in enumerate(split.stages):
            layer = layer_of.get(id(stage.patch.module)) if stage.patch is not None else None
            if layer is not None and self._layer_stage[layer] == index:
                self._patches[index] = (layer, self.qmodel.layers[layer].numel // stage.patch.channels)
        generator = torch.Generator().manual_seed(0)
        self._probes = [(modules[name], torch.randint(weight.numel(), (min(weight.numel(), PROBES_PER_LAYER),),
                                                      generator=generator).to(weight.device))
                        for name, weight in zip(names, weights)]
        device = model_placement(self.qmodel.module)[0]
        budget = default_budget(device=device) if self.cache_bytes is None else self.cache_bytes
        self._cache = ActivationCache(budget) if len(split) > 1 and budget > 0 else None
        self._stage_profile = self._profile_stages(split, sample) if self._cache is not None else None
        self._choose_kept()
        self._memo.clear()
        self._keys.clear()
        self._split, self._token = split, None

    def _profile_stages(self, split: StageSplit, sample: Any) -> tuple[list[dict[int, int]], list[float], list[float]]:
        """Per stage on one batch: the storages of its input (``[0]``: none, the data), its seconds (least of
        two runs) and how likely a genome's first change is to fall in it (its share of the quantized layers)."""
        seconds, outputs = _timed_walk(split, sample, repeats=2)
        per_stage = [{}] + [_storages(state) for state in outputs]
        first = [0.0] * len(split)
        for stage in self._layer_stage:
            first[stage] += 1.0 / len(self._layer_stage)
        return per_stage, seconds, first

    def _choose_kept(self) -> None:
        """Which stage inputs a new cache entry keeps (:attr:`_kept_inputs`), and the bytes it adds (:attr:`_new_bytes`).

        With ``keep_states="all"``, or when every stage input of one genome fits in the budget's
        share per genome (the budget over :attr:`_members` genomes, the parents and hall of fame
        that :meth:`prepare_generation` last announced, plus two), all are kept. Otherwise stage
        inputs are dropped one at a time, each time the one whose loss costs least expected
        recomputation per byte freed, until a genome fits its share. A genome whose first change
        falls in a stage whose input its ancestor dropped resumes from the ancestor's last kept
        stage input before it (and cannot patch that stage where its output was dropped). The
        expectation weighs stages by measured seconds and first changes by the share of quantized
        layers per stage (a uniform choice of layer, evolve's default). Which inputs are kept
        changes only the speed, never a fitness value.
        """
        if self._cache is None or self._stage_profile is None:
            self._kept_inputs, self._new_bytes, self._storing = (), [], False
            return
        per_stage, seconds, first = self._stage_profile
        n_stages = len(seconds)
        scale = self.n_samples / max(1, _batch_length(self.batches[0]))
        kept = [False] + [True] * n_stages

        def held(keep: Sequence[bool], start: int = 0) -> int:
            shared = set().union(*(per_stage[s] for s in range(1, start + 1) if keep[s])) if start else set()
            fresh: dict[int, int] = {}
            for s in range(start + 1, n_stages + 1):
                if keep[s]:
                    fresh.update({k: v for k, v in per_stage[s].items() if k not in shared})
            return int(math.ceil(sum(fresh.values()) * scale))

        def expected(keep: Sequence[bool]) -> float:
            extra = 0.0
            for stage in range(n_stages):
                if first[stage]:
                    resume = max(s for s in range(stage + 1) if s == 0 or keep[s])
                    lost_patch = stage in self._patches and not keep[stage + 1]
                    extra += first[stage] * (sum(seconds[resume:stage]) + (seconds[stage] if lost_patch else 0.0))
            return extra

        share = self._cache.budget // (self._members + 2)
        if self.keep_states == "auto":
            cost, size = expected(kept), held(kept)
            while size > share:
                best = None
                for stage in range(1, n_stages):  # the outputs (stage n_stages) are always kept
                    if not kept[stage]:
                        continue
                    trial = kept.copy()
                    trial[stage] = False
                    freed = size - held(trial)
                    if freed <= 0:
                        continue
                    trial_cost = expected(trial)
                    rank = (trial_cost - cost) / freed
                    if best is None or rank < best[0]:
                        best = (rank, stage, trial_cost, size - freed)
                if best is None:
                    break
                kept[best[1]] = False
                cost, size = best[2], best[3]
        self._kept_inputs = tuple(kept)
        self._storing = any(kept[1:n_stages])  # outputs alone would save no stage: store nothing
        self._new_bytes = [held(kept, start) for start in range(n_stages + 1)]

    def _resume(self, ancestor: Optional[CacheEntry], start: int) -> int:
        """Where a genome sharing ``start`` stages with ``ancestor`` resumes: ``start``, or the last stage
        before it whose input the ancestor kept (``0``: from the data)."""
        if ancestor is None:
            return start
        while start > 0 and ancestor.states[start] is None:
            start -= 1
        return start

    def _fresh_states(self, start: int, n_batches: int, store: bool) -> list[Optional[list[Any]]]:
        """Slots for the activations an evaluation resuming at ``start`` writes (``None``: not written): the
        outputs always; with ``store``, also the kept inputs of the later stages."""
        n_stages = len(self._split)
        states: list[Optional[list[Any]]] = [None] * (n_stages + 1)
        for stage in range(start + 1, n_stages + 1):
            if stage == n_stages or (store and (not self._kept_inputs or self._kept_inputs[stage])):
                states[stage] = [None] * n_batches
        return states

    def reset(self) -> None:
        """Forget cached activations and stored fitness (needed only after editing weights through
        ``tensor.data``; see "Change detection" in the module docstring)."""
        if self._cache is not None:
            self._cache.clear()
        self._memo.clear()
        self._keys.clear()
        self._token = None

    @property
    def split(self) -> StageSplit:
        """The stage split in use (built, and verified, on first use)."""
        return self._prepare()

    # ------------------------------------------------------------------ genomes
    def genome_key(self, genes: Iterable[Sequence[int]]) -> tuple:
        """The weights ``genes`` actually change, as ``((layer, indices, states), ...)``.

        Genes are merged and clipped exactly as :meth:`QuantizedModel.apply_` does; genes that
        leave a weight on its base state are dropped. Invalid genes raise ``GeneError``.
        """
        genes = list(genes)
        try:
            raw = tuple(tuple(gene) for gene in genes)
            known = self._keys.get(raw)
        except TypeError:  # unhashable values: let the model's validation speak
            raw, known = None, None
        if known is not None:
            return known
        key = self._fast_key(genes)
        if key is None:  # something unusual: the model's own (validating, vectorised) grouping
            changes = []
            for layer, index, states in self.qmodel._grouped(genes):
                base = self.qmodel.base_states(layer).view(-1)[index].to(torch.int64)
                keep = states != base
                if bool(keep.any()):
                    changes.append((layer, tuple(index[keep].tolist()), tuple(states[keep].tolist())))
            key = tuple(changes)
        if raw is not None:
            if len(self._keys) >= KEY_CACHE_SIZE:
                self._keys.clear()
            self._keys[raw] = key
        return key

    def _fast_key(self, genes: list) -> Optional[tuple]:
        """:meth:`genome_key` in plain Python for well-formed genes (``None`` for anything else).

        Mirrors :meth:`QuantizedModel._grouped`: each offset clipped to the number of levels,
        offsets on one weight added up, the state clamped to the grid.
        """
        layers = self.qmodel.layers
        merged: dict[tuple[int, int], int] = {}
        for gene in genes:
            if len(gene) != 3 or not all(type(value) is int for value in gene):
                return None
            layer, index, offset = gene
            if not (0 <= layer < len(layers) and 0 <= index < layers[layer].numel and abs(offset) < 2 ** 62):
                return None
            limit = layers[layer].n_levels
            merged[layer, index] = merged.get((layer, index), 0) + max(-limit, min(limit, offset))
        by_layer: dict[int, list[tuple[int, int]]] = {}
        for (layer, index), offset in sorted(merged.items()):
            base = int(self._base_flat[layer][index])
            state = max(0, min(layers[layer].n_levels - 1, base + offset))
            if state != base:
                by_layer.setdefault(layer, []).append((index, state))
        return tuple((layer, tuple(i for i, _ in pairs), tuple(v for _, v in pairs))
                     for layer, pairs in by_layer.items())

    def _signature(self, key: tuple) -> tuple:
        by_stage: list[list] = [[] for _ in range(len(self._split))]
        for change in key:
            by_stage[self._layer_stage[change[0]]].append(change)
        return tuple(tuple(changes) for changes in by_stage)

    def stored(self, genes: Iterable[Sequence[int]]) -> Optional[Outcome]:
        """The stored :class:`Outcome` of ``genes`` (memoised), or ``None``."""
        self._prepare()
        return self._memo.get(self.genome_key(genes))

    def is_rejected(self, genes: Iterable[Sequence[int]]) -> bool:
        """Whether the stored fitness of ``genes`` is an early-rejection upper bound, not its value.

        It reads the memo: with ``memoize=False`` nothing is stored and this is always false, so
        only a threshold set to ``None`` guarantees exact values there."""
        outcome = self.stored(genes)
        return outcome is not None and not outcome.exact

    # ------------------------------------------------------------------ thresholds
    def reject_below(self, threshold: Union[None, float, Sequence[float]]) -> None:
        """Allow rejecting individuals whose fitness is certain to be strictly below ``threshold``.

        ``threshold`` is a fitness tuple ``(accuracy, tie-break)`` compared lexicographically, or
        a number (the accuracy alone); ``None`` switches rejection off. Only :meth:`__call__`
        rejects; :meth:`scores` is always complete.
        """
        if threshold is None:
            self.threshold = None
            return
        values = (threshold, -math.inf) if isinstance(threshold, (int, float)) else tuple(threshold)
        if (len(values) != 2 or not all(isinstance(v, (int, float)) for v in values)
                or any(math.isnan(v) for v in values)):
            raise ValueError(f"threshold={threshold!r} is not valid; use a number, a pair of numbers, or None")
        self.threshold = (float(values[0]), float(values[1]))

    def prepare_generation(self, parents: Sequence[Any], mu: int, hall_of_fame: Optional[Sequence[Any]] = None,
                           reject: bool = True) -> Optional[tuple[float, float]]:
        """Before a ``(mu+lambda)`` generation: keep the parents' activations, set the threshold.

        Offspring descend from the parents only, so with ``prune`` (an option of the evaluator)
        the cached activations of every other genome are dropped, except the genome without
        genes; the parents' and hall of fame's become the most recently used. With ``reject``, the threshold is the smaller (lexicographically) of the ``mu``-th best
        parent's fitness and the worst hall-of-fame member's (when the hall of fame is full):
        an offspring strictly below both can neither be selected by ``selBest`` nor enter the
        hall of fame. Every individual needs a valid two-value fitness with positive weights
        (maximised) and no NaN (which orders nothing); otherwise no threshold is set. Returns the
        threshold.
        """
        self._prepare()
        members = list(parents) + list(hall_of_fame or [])
        if len(members) != self._members:
            self._members = max(1, len(members))
            self._choose_kept()
        if self._cache is not None:
            keys = [self.genome_key(individual) for individual in members]
            if self.prune:
                keep = {(), *keys}
                for key in self._cache.keys():
                    if key not in keep:
                        self._cache.evict(key)
            for key in keys:
                self._cache.touch(key)
            self._cache.pin(keys)
        threshold = None
        usable = all(getattr(ind, "fitness", None) is not None and ind.fitness.valid
                     and len(ind.fitness.values) == 2 and all(w > 0 for w in ind.fitness.weights)
                     and not any(math.isnan(v) for v in ind.fitness.values)
                     for ind in members)
        if reject and usable and mu >= 1 and len(parents) >= mu:
            threshold = sorted((tuple(ind.fitness.values) for ind in parents), reverse=True)[mu - 1]
            if hall_of_fame is not None:
                maxsize = getattr(hall_of_fame, "maxsize", None)
                if maxsize is None or len(hall_of_fame) < maxsize:
                    threshold = None
                elif len(hall_of_fame):
                    threshold = min(threshold, tuple(hall_of_fame[-1].fitness.values))
        self.reject_below(threshold)
        return self.threshold

    # ------------------------------------------------------------------ evaluation
    def __call__(self, genes: Iterable[Sequence[int]] = ()) -> tuple[float, ...]:
        """Fitness of ``genes``: exact, or an upper bound if rejected early (see the module docstring)."""
        self.evaluations += 1
        threshold = self.threshold if self.early_rejection and self.rejecting_metric else None
        return self._evaluate(genes, threshold).fitness

    def scores(self, genes: Iterable[Sequence[int]] = ()) -> dict[str, float]:
        """Named metric values of the quantized model with ``genes`` applied (never rejected)."""
        outcome = self._evaluate(genes, None)
        return dict(outcome.summary)

    def with_data(self, data: DataSpec) -> IncrementalEvaluator:
        """A new evaluator with the same model, metric, batch size and options on other data."""
        return IncrementalEvaluator(self.qmodel, data, metric=copy.copy(self.metric), batch_size=self.batch_size,
                                    stages=self.stages_spec, cache_bytes=self.cache_bytes,
                                    early_rejection=self.early_rejection, memoize=self.memoize,
                                    memo_size=self.memo_size, prune=self.prune, reuse_rows=self.reuse_rows,
                                    keep_states=self.keep_states, store=self.store, threads=self.threads)

    def _remember(self, key: Hashable, outcome: Outcome) -> Outcome:
        if self.memoize:
            self._memo[key] = outcome
            self._memo.move_to_end(key)
            while len(self._memo) > self.memo_size:
                self._memo.popitem(last=False)
        return outcome

    def _evaluate(self, genes: Iterable[Sequence[int]], threshold: Optional[tuple[float, float]]) -> Outcome:
        genes = list(genes)
        split = self._prepare()
        key = self.genome_key(genes)
        known = self._memo.get(key)
        if known is not None and (known.exact or (threshold is not None and known.fitness < threshold)):
            self._memo.move_to_end(key)
            self.memo_hits += 1
            return known
        with self._evaluating():
            outcome = self._compute(key, split, threshold)
        return self._remember(key, outcome)

    def _compute(self, key: tuple, split: StageSplit, threshold: Optional[tuple[float, float]]) -> Outcome:
        batches = self.batches
        n_stages, n_batches, total = len(split), len(batches), self.n_samples
        cache = self._cache
        signature = self._signature(key) if cache is not None else ()
        ancestor, start = cache.closest(signature) if cache is not None else (None, 0)
        start = self._resume(ancestor, start)
        if ancestor is None and cache is not None and 0 in self._patches:
            ancestor = cache.latest()  # nothing shared, but the first convolution may still be patched
        if ancestor is not None:
            cache.touch(ancestor.key)
        reserved = 0
        store = cache is not None and start < n_stages and self._storing
        if store:
            reserved = self._new_bytes[start]
            store = cache.reserve(reserved, keep=(ancestor.key,) if ancestor is not None else ())
            if not store:
                reserved = 0
        new_states = self._fresh_states(start, n_batches, store)
        if start == n_stages:  # the same weights are cached (memo forgotten or off): reuse the outputs
            new_states[n_stages] = list(ancestor.states[n_stages])
        rejecting = threshold is not None and self.rejecting_metric
        order = list(range(n_batches))
        if rejecting and ancestor is not None and ancestor.batch_scores is not None:
            # The batches where the ancestor did worst first: a hopeless offspring is caught sooner.
            scores = ancestor.batch_scores
            order.sort(key=lambda b: (scores[b][0] / max(1, _batch_length(batches[b])), -scores[b][1]))
        scratch = copy.copy(self.metric) if self.rejecting_metric else None
        batch_scores: Optional[list[tuple[int, float]]] = [(0, 0.0)] * n_batches if scratch is not None else None
        correct, loss, seen = 0, 0.0, 0
        bound: Optional[tuple[float, float]] = None
        channels = self._changed_channels(start, signature, ancestor)
        first = start + 1 if channels else start
        reuse_from = self._reuse_from(signature, ancestor) if self.reuse_rows and ancestor is not None else None
        self.computed += 1
        self.start_stages += start
        self.patched += bool(channels)
        try:
            # Only the changes of layers that a stage from ``start`` on uses need to be in the weights.
            needed = [change for change in key if self._layer_last[change[0]] >= start]
            with self.qmodel.states_set(needed), torch.inference_mode():
                for done, b in enumerate(order, start=1):
                    inputs, targets = batches[b]
                    state = inputs if start == 0 else ancestor.states[start][b]
                    if channels:  # a few output channels of one convolution changed: patch the ancestor's output
                        state = self._patched(split.stages[start], state, ancestor.states[start + 1][b], channels)
                        if new_states[first] is not None:
                            new_states[first][b] = state
                        self.stage_batches += 1
                    for stage in range(first, n_stages):
                        if stage == reuse_from:  # later stages are the ancestor's: rerun only the changed samples
                            reused = self._reuse_rows(split, b, state, stage, ancestor, new_states)
                            if reused is not None:
                                state = reused
                                break
                        try:
                            state = split.stages[stage](state)
                        except RuntimeError as error:
                            misfit = inputs_do_not_fit(error, inputs)
                            if misfit is None:
                                raise
                            raise misfit from error
                        if new_states[stage + 1] is not None:
                            new_states[stage + 1][b] = state
                        self.stage_batches += 1
                    self.stage_batches_full += n_stages
                    seen += _batch_length((inputs, targets))
                    if scratch is None:
                        continue
                    scratch.reset()
                    scratch.update(state, targets)  # the metric's own counting, on this batch alone
                    batch_scores[b] = (scratch.correct, scratch.loss_sum)
                    correct += scratch.correct
                    loss += scratch.loss_sum
                    if rejecting and done < n_batches:
                        bound = _upper_bound(correct, loss, total - seen, total, threshold)
                        if bound is not None:
                            break
                self.samples_computed += seen
                if bound is not None:
                    self.rejected_count += 1
                    self.samples_skipped += total - seen
                    return Outcome(bound, None, exact=False)
                # The complete fitness: the metric's state as the plain evaluator leaves it, batches in order.
                metric = self.metric
                metric.reset()
                if batch_scores is not None:  # Accuracy: add up the per-batch counts as update() does
                    for b, batch in enumerate(batches):
                        metric.correct += batch_scores[b][0]
                        metric.count += _batch_length(batch)
                        metric.loss_sum += batch_scores[b][1]
                else:
                    outputs = new_states[n_stages]
                    for b, (_, targets) in enumerate(batches):
                        metric.update(outputs[b], targets)
                outcome = Outcome(tuple(metric.fitness()), metric.summary(), exact=True)
            if store and self._worth_storing(outcome):
                entry = (CacheEntry.extending(ancestor, start, key, signature, new_states, batch_scores)
                         if ancestor is not None else CacheEntry(key, signature, new_states, batch_scores))
                cache.insert(entry, reserved=reserved)
                reserved = 0
            elif store:
                self.not_stored += 1
            return outcome
        finally:
            if reserved:
                cache.release(reserved)

    def _worth_storing(self, outcome: Outcome) -> bool:
        """Whether to cache a computed genome's activations: with ``store="promising"`` and a selection bar
        set, only if it is at or above the bar (one below can never be a parent of later offspring)."""
        bar = self.threshold
        if self.store == "all" or bar is None or len(outcome.fitness) != len(bar):
            return True
        return outcome.fitness >= bar

    @staticmethod
    def _patched(stage: Any, state: Any, previous: Any, channels: list[int]) -> Any:
        """The stage's output by its patch, once the patch is verified for this case (else in full)."""
        patch = stage.patch
        verdict = patch.status(state, channels)
        if verdict:
            return patch(state, previous, channels)
        if verdict is None:  # first time with this many channels and this batch shape: check it
            try:
                return patch.check(stage, state, previous, channels)[0]
            except Exception:  # noqa: BLE001 - a patch that cannot run is simply not used
                patch.verified[len(channels), _shape_of(state, patch)] = False
        return stage(state)

    def _reuse_from(self, signature: tuple, ancestor: CacheEntry) -> Optional[int]:
        """The stage after the last one whose weights differ from ``ancestor``'s (``None`` if there is none)."""
        last = -1
        for stage, (mine, theirs) in enumerate(zip(signature, ancestor.signature)):
            if mine != theirs:  # a weight used by several stages changes all of them
                last = max(last, stage, *(self._layer_last[change[0]] for change in (*mine, *theirs)))
        if not 0 <= last < len(signature) - 1 or any(state is None for state in ancestor.states[last + 1:]):
            return None
        return last + 1

    def _reuse_rows(self, split: StageSplit, b: int, state: Any, stage: int, ancestor: CacheEntry,
                    new_states: list[Optional[list[Any]]]) -> Optional[Any]:
        """The final output of batch ``b`` from ``state`` (the input of ``stage``), rerunning only changed samples.

        Every stage from ``stage`` on has the ancestor's weights. Samples whose ``state`` equals the
        ancestor's bit for bit keep its activations; the others run as a smaller batch, if that
        batch size is verified to reproduce the full batch's rows (see :mod:`.rows`). Fills
        the slots of ``new_states`` that exist, like the plain loop; returns ``None`` where the batch must run in full.
        """
        n_stages = len(split)
        rows_total = _batch_length(self.batches[b])
        rows = changed_rows(state, ancestor.states[stage][b], rows_total)
        if rows is None:
            return None
        if len(rows) == 0:  # identical from here on: share the ancestor's activations
            for later in range(stage, n_stages + 1):
                if new_states[later] is not None:
                    new_states[later][b] = ancestor.states[later][b]
            self.unchanged_batches += 1
            return ancestor.states[n_stages][b]
        size = bucket(len(rows), rows_total)
        if size >= rows_total:
            return None
        index = rows
        if size > len(rows):  # pad with unchanged samples to a verified batch size
            unchanged = torch.ones(rows_total, dtype=torch.bool, device=rows.device)
            unchanged[rows] = False
            index = torch.cat([rows, unchanged.nonzero().flatten()[:size - len(rows)]])
        if not self._rows_verified(split, b, stage, index, ancestor):
            return None
        subset = take_rows(state, index)
        for later in range(stage, n_stages):
            subset = split.stages[later](subset)
            if new_states[later + 1] is not None:
                new_states[later + 1][b] = put_rows(ancestor.states[later + 1][b], rows, subset)
            self.stage_batches += size / rows_total
        self.subset_batches += 1
        return new_states[n_stages][b]

    def _rows_verified(self, split: StageSplit, b: int, stage: int, index: torch.Tensor, ancestor: CacheEntry) -> bool:
        """Whether stages ``stage..`` give each of ``len(index)`` rows the bits of the full batch ``b``.

        Checked once per (stage, rows, batch shape), on the ancestor's cached activations.
        """
        size, rows_total = len(index), _batch_length(self.batches[b])
        for later in range(stage, len(split)):
            source, target = ancestor.states[later][b], ancestor.states[later + 1][b]
            if not (row_structured(source, rows_total) and row_structured(target, rows_total)):
                return False  # e.g. detections per image: not a batch of rows
            key = (later, size, shapes(source))
            verdict = self._row_verdicts.get(key)
            if verdict is None:
                try:
                    verdict = identical_bits(split.stages[later](take_rows(source, index)), take_rows(target, index))
                except Exception:  # noqa: BLE001 - a stage that cannot run on fewer rows is simply run in full
                    verdict = False
                self._row_verdicts[key] = verdict
                self.stage_batches += size / max(1, rows_total)
            if not verdict:
                return False
        return True

    def _changed_channels(self, start: int, signature: tuple, ancestor: Optional[CacheEntry]) -> list[int]:
        """Output channels to recompute if stage ``start`` can be patched from ``ancestor``, else ``[]``."""
        if ancestor is None or start not in self._patches or ancestor.states[start + 1] is None:
            return []
        layer, per_channel = self._patches[start]
        mine = {i: v for change in signature[start] if change[0] == layer for i, v in zip(change[1], change[2])}
        theirs = {i: v for change in ancestor.signature[start] if change[0] == layer
                  for i, v in zip(change[1], change[2])}
        changed = sorted({i // per_channel for i in mine.keys() | theirs.keys() if mine.get(i) != theirs.get(i)})
        total = self._split.stages[start].patch.channels
        return changed if 0 < len(changed) <= max(1, total // PATCH_FRACTION) else []

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, Any]:
        """Counters of the work done and saved (calls, memo hits, rejections, samples, cache memory)."""
        possible = self.computed * self.n_samples if self.computed else 0
        return {
            "calls": self.evaluations, "memo_hits": self.memo_hits, "computed": self.computed,
            "rejected": self.rejected_count, "samples_computed": self.samples_computed,
            "samples_skipped": self.samples_skipped,
            "skipped_fraction": self.samples_skipped / possible if possible else 0.0,
            "stage_fraction": self.stage_batches / self.stage_batches_full if self.stage_batches_full else 0.0,
            "mean_start_stage": self.start_stages / self.computed if self.computed else 0.0,
            "patched": self.patched, "not_stored": self.not_stored,
            "unchanged_batches": self.unchanged_batches, "subset_batches": self.subset_batches,
            "split": self._split.kind if self._split is not None else None,
            "stages": len(self._split) if self._split is not None else None,
            "cache": self._cache.stats() if self._cache is not None else None,
        }

    # ------------------------------------------------------------------ how much reuse can give
    def stage_costs(self, repeats: int = 3) -> list[float]:
        """Seconds each stage of the split takes on the first validation batch (least of ``repeats`` runs),
        under the evaluation's thread count."""
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats={repeats!r} is not valid; use an integer >= 1")
        split = self._prepare()
        with self._evaluating():
            return _timed_walk(split, self.batches[0][0], repeats)[0]

    def stage_flops(self) -> list[int]:
        """Floating-point operations of each stage on the first validation batch, as
        :class:`torch.utils.flop_counter.FlopCounterMode` counts them (convolutions and matrix
        products; element-wise operations count zero): a load-independent alternative to
        :meth:`stage_costs`."""
        from torch.utils.flop_counter import FlopCounterMode

        split = self._prepare()
        flops = []
        with torch.inference_mode(), self._evaluating():
            state = self.batches[0][0]
            for stage in split.stages:
                with FlopCounterMode(display=False) as counter:
                    state = stage(state)
                flops.append(int(counter.get_total_flops()))
        return flops

    def reuse_bound(self, genomes: Iterable[Iterable[Sequence[int]]],
                    costs: Optional[Sequence[float]] = None) -> dict[str, float]:
        """The least work *any* evaluator that resumes from cached stage activations must do for ``genomes``.

        ``genomes`` are gene lists in the order they were evaluated (a run's stream). The bound
        assumes an unlimited cache: a genome seen before, or one that changes no weight, costs
        nothing (``memo_hits``); any other resumes from whichever genome evaluated before it (or
        the model without genes) shares the longest prefix of stages, recomputes every later stage
        in full, and its first changed stage is free where a channel patch applies (optimistic).
        Stages are weighted by ``costs`` (default: :meth:`stage_costs`; :meth:`stage_flops` is the
        load-independent choice). Samples skipped by row reuse and early rejection are not counted.

        Returns ``work_fraction`` (work done, in full forward passes per genome) and
        ``speedup_bound`` (``1 / work_fraction``: no such evaluator is faster than this multiple of
        a full forward pass on this stream), with ``genomes`` and ``memo_hits``.
        """
        split = self._prepare()
        costs = list(self.stage_costs() if costs is None else costs)
        if len(costs) != len(split) or any(not c >= 0 for c in costs) or sum(costs) <= 0:
            raise ValueError(f"costs={costs!r} is not valid; use {len(split)} non-negative numbers (one per stage), "
                             "not all zero")
        after = [sum(costs[index + 1:]) for index in range(len(costs))]
        unchanged = self._signature(())  # the model without genes: cached from the start
        seen_prefixes = {unchanged[:length] for length in range(len(split) + 1)}
        seen_keys: set = set()
        count = hits = 0
        work = 0.0
        for genes in genomes:
            count += 1
            key = self.genome_key(genes)
            if key in seen_keys or not key:
                hits += 1
                continue
            signature = self._signature(key)
            first = max(length for length in range(len(split) + 1) if signature[:length] in seen_prefixes)
            work += after[first] + (0.0 if first in self._patches else costs[first])
            seen_keys.add(key)
            seen_prefixes.update(signature[:length] for length in range(first + 1, len(split) + 1))
        fraction = work / (count * sum(costs)) if count else 0.0
        return {"genomes": count, "memo_hits": hits, "work_fraction": fraction,
                "speedup_bound": 1.0 / fraction if fraction > 0 else math.inf}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for name in ("_split", "_split_layout", "_cache", "_layer_stage", "_layer_last", "_new_bytes", "_kept_inputs",
                     "_storing", "_stage_profile", "_probes",
                     "_patches", "_row_verdicts", "_token", "_held", "_base_flat", "_keys"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._keys = {}
        self._base_flat = [self.qmodel.base_states(layer).view(-1).numpy() for layer in range(len(self.qmodel.layers))]
        self._unprepare()


def _timed_walk(split: StageSplit, sample: Any, repeats: int) -> tuple[list[float], list[Any]]:
    """Seconds of each stage of ``split`` on ``sample`` (least of ``repeats`` runs) and the stages' outputs."""
    seconds = [math.inf] * len(split)
    with torch.inference_mode():
        for _ in range(repeats):
            outputs, state = [], sample
            for index, stage in enumerate(split.stages):
                started = time.perf_counter()
                state = stage(state)
                seconds[index] = min(seconds[index], time.perf_counter() - started)
                outputs.append(state)
    return seconds, outputs


def _shape_of(state: Any, patch: Any) -> tuple:
    value = state if patch.source is None else state[patch.source]
    return tuple(value.shape) if hasattr(value, "shape") else ()


def _batch_length(batch: tuple[Any, Any]) -> int:
    targets = batch[1]
    return len(targets) if hasattr(targets, "__len__") else 1


def _upper_bound(correct: int, loss: float, remaining: int, total: int,
                 threshold: tuple[float, float]) -> Optional[tuple[float, float]]:
    """An upper bound of the final ``(accuracy, -loss)`` strictly below ``threshold``, or ``None``.

    ``correct`` and ``loss`` are the counts of the batches seen so far. With every remaining
    sample correct the accuracy is at most ``(correct + remaining) / total``: below the
    threshold's accuracy the individual is out (tie-break ``inf``). Level with it, the loss
    decides: losses are not negative, so the final loss sum is at least the sum so far, up to
    the rounding of adding the same per-batch values in another order, which
    :data:`LOSS_BOUND_MARGIN` covers.
    """
    accuracy = (correct + remaining) / total
    if accuracy < threshold[0]:
        return accuracy, REJECTED_TIE_BREAK
    if accuracy == threshold[0]:
        tie_break = -(loss * (1.0 - LOSS_BOUND_MARGIN)) / total
        if tie_break < threshold[1]:
            return accuracy, tie_break
    return None


def _selects_best(select: Any) -> bool:
    func = getattr(select, "func", select)
    plain = not getattr(select, "args", ()) and not getattr(select, "keywords", {})
    return plain and getattr(func, "__name__", "") == "selBest" and getattr(func, "__module__", "").startswith("deap")


def announce_parents(evaluator: Any, toolbox: Any, parents: Sequence[Any], mu: int,
                     hall_of_fame: Optional[Sequence[Any]] = None) -> Optional[float]:
    """Before a ``(mu+lambda)`` generation, pass the parents to a fast evaluator.

    Early rejection is enabled only where it is provably harmless: the toolbox evaluates with
    this very evaluator (no fitness transformation in between) and selects with DEAP's plain
    ``selBest``. Any other evaluator or toolbox is left alone. Returns the threshold set.
    """
    if not hasattr(evaluator, "prepare_generation"):
        return None
    evaluate = getattr(toolbox, "evaluate", None)
    direct = (getattr(evaluate, "func", evaluate) is evaluator and not getattr(evaluate, "args", ())
              and not getattr(evaluate, "keywords", {}))
    return evaluator.prepare_generation(parents, mu, hall_of_fame,
                                        reject=direct and _selects_best(getattr(toolbox, "select", None)))

