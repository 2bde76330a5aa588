"""A memory-bounded LRU cache of stage activations, keyed by genome.

Each :class:`CacheEntry` holds, for one fully evaluated genome, the input of every stage after
the first (and the final outputs), per validation batch. An offspring's entry shares the
tensors of the stages it did not recompute with its ancestor's entry, so memory is counted per
tensor storage, once, however many entries refer to it; a storage is freed when the last
entry holding it is evicted. Pinned entries (:meth:`ActivationCache.pin`: the parents of the
offspring being evaluated) are evicted only after every other entry. An entry may hold ``None``
for the inputs of stages it did not keep (see ``keep_states`` of the incremental evaluator).

The budget bounds the bytes held by the cache plus the bytes an evaluation in progress has
reserved for its new activations. An entry that cannot fit even after evicting every other
entry is simply not stored, so a budget of 0 (or one too small for any entry) degrades to
plain evaluation. This module imports torch only.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .stages import tensors_in

__all__ = ["CacheEntry", "ActivationCache", "available_memory", "default_budget", "DEFAULT_CACHE_FRACTION",
           "state_bytes"]

#: Share of the memory available at start-up that the activation cache may use by default.
DEFAULT_CACHE_FRACTION = 0.25

#: Budget assumed when the available memory cannot be read.
FALLBACK_BUDGET = 512 * 2 ** 20


def available_memory(device: Optional[Any] = None) -> Optional[int]:
    """Bytes of memory available to new allocations, if known: on a CUDA ``device`` its free memory,
    else the host's (``MemAvailable`` in ``/proc/meminfo``)."""
    if device is not None and torch.device(device).type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def default_budget(fraction: float = DEFAULT_CACHE_FRACTION, device: Optional[Any] = None) -> int:
    """``fraction`` of the memory available where the activations live (``device``: the model's; the
    host's for ``None`` or a CPU), or :data:`FALLBACK_BUDGET` if it cannot be read."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} is not valid; use a number in [0, 1]")
    available = available_memory(device)
    return FALLBACK_BUDGET if available is None else int(available * fraction)


def _storages(value: Any) -> dict[int, int]:
    """``{storage address: bytes}`` of the tensors in ``value`` (views of one storage count once)."""
    found: dict[int, int] = {}
    for tensor in tensors_in(value):
        storage = tensor.untyped_storage()
        if storage.nbytes():
            found[storage.data_ptr()] = storage.nbytes()
    return found


@dataclass
class CacheEntry:
    """Activations of one fully evaluated genome.

    ``signature[s]`` describes the genome's changes within stage ``s``; ``states[s]`` is the list
    (one per batch) of inputs of stage ``s`` for ``s >= 1``, and ``states[n_stages]`` the outputs.
    ``states[0]`` is ``None`` (stage 0 reads the data), and so is ``states[s]`` for a stage input
    the entry did not keep (the outputs are always kept). ``batch_scores[b]`` is ``(correct, loss)``
    of batch ``b`` (to order batches when rejecting early), if the metric counts them.
    """

    key: Hashable
    signature: tuple
    states: list[Optional[list[Any]]]
    batch_scores: Optional[list[tuple[int, float]]] = None
    stage_storages: Optional[list[dict[int, int]]] = field(default=None, repr=False)
    storages: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.stage_storages is None:
            self.stage_storages = [_storages(state) for state in self.states]
        if not self.storages:
            for found in self.stage_storages:
                self.storages.update(found)

    @classmethod
    def extending(cls, ancestor: CacheEntry, start: int, key: Hashable, signature: tuple,
                  new_states: list[Optional[list[Any]]], batch_scores: Optional[list[tuple[int, float]]] = None
                  ) -> CacheEntry:
        """An entry sharing ``ancestor``'s states up to stage ``start`` and holding ``new_states`` after it."""
        states = [None] + [ancestor.states[s] if s <= start else new_states[s] for s in range(1, len(new_states))]
        stage_storages = [ancestor.stage_storages[s] if s <= start else _storages(states[s])
                          for s in range(len(states))]
        return cls(key, signature, states, batch_scores, stage_storages)


class ActivationCache:
    """LRU cache of :class:`CacheEntry` with a byte budget (see the module docstring)."""

    def __init__(self, budget: int):
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"budget={budget!r} is not valid; use a number of bytes >= 0")
        self.budget = budget
        self._entries: OrderedDict[Hashable, CacheEntry] = OrderedDict()  # least recently used first
        self._prefixes: dict[tuple, dict[Hashable, None]] = {}  # signature prefix -> keys sharing it
        self._refs: dict[int, list[int]] = {}  # storage address -> [entries holding it, bytes]
        self._pinned: set[Hashable] = set()  # evicted only once every other entry is gone
        self.used = 0
        self.reserved = 0
        self.peak = 0
        self.evictions = 0
        self.inserts = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def get(self, key: Hashable) -> Optional[CacheEntry]:
        return self._entries.get(key)

    def pin(self, keys: Iterable[Hashable]) -> None:
        """Evict ``keys`` (e.g. the parents of the next offspring) only after every other entry; replaces earlier pins."""
        self._pinned = set(keys)

    def touch(self, key: Hashable) -> None:
        """Mark ``key`` as recently used (no effect if it is not cached)."""
        if key in self._entries:
            self._entries.move_to_end(key)

    def closest(self, signature: Sequence) -> tuple[Optional[CacheEntry], int]:
        """The cached entry sharing the longest prefix of stages with ``signature``, and that length.

        Among entries sharing the longest prefix, the one whose last stage that differs from
        ``signature`` comes earliest (the parent of a mutant, usually: everything after the
        mutation is then its as well), the most recently stored one on ties.
        ``(None, 0)`` if no entry shares even stage 0.
        """
        for length in range(len(signature), 0, -1):
            keys = self._prefixes.get(tuple(signature[:length]))
            if keys:
                best, best_last = None, len(signature)
                for key in reversed(keys):
                    entry = self._entries[key]
                    last = _last_difference(entry.signature, signature, length)
                    if best is None or last < best_last:
                        best, best_last = entry, last
                        if last <= length:
                            break
                return best, length
        return None, 0

    def latest(self) -> Optional[CacheEntry]:
        """The most recently used entry, or ``None`` if the cache is empty."""
        return self._entries[next(reversed(self._entries))] if self._entries else None

    # ------------------------------------------------------------------ memory
    def _note_peak(self) -> None:
        self.peak = max(self.peak, self.used + self.reserved)

    def _evict_until(self, free: int, keep: Iterable[Hashable] = ()) -> bool:
        """Evict least recently used entries (not those in ``keep``; pinned ones last) until ``free`` bytes fit."""
        if self.used + self.reserved + free <= self.budget:
            return True
        keep = set(keep)
        order = list(self._entries)
        for key in [k for k in order if k not in self._pinned] + [k for k in order if k in self._pinned]:
            if self.used + self.reserved + free <= self.budget:
                break
            if key not in keep:
                self.evict(key)
        return self.used + self.reserved + free <= self.budget

    def reserve(self, nbytes: int, keep: Iterable[Hashable] = ()) -> bool:
        """Make room for an evaluation's ``nbytes`` of new activations; ``False`` if they cannot fit.

        Entries in ``keep`` (the ancestor being read) are not evicted. A successful reservation
        must be ended with :meth:`release` (also when the evaluation fails).
        """
        if nbytes > self.budget or not self._evict_until(nbytes, keep):
            self.refused += 1
            return False
        self.reserved += nbytes
        self._note_peak()
        return True

    def release(self, nbytes: int) -> None:
        self.reserved = max(0, self.reserved - nbytes)

    def insert(self, entry: CacheEntry, reserved: int = 0) -> bool:
        """Store ``entry``, ending a reservation of ``reserved`` bytes. Returns whether it was kept.

        The entry's storages are counted first (so those it shares with an older entry stay
        alive), then least recently used entries are evicted until the budget holds again; if
        the entry alone does not fit, it is dropped.
        """
        self.release(reserved)
        self.evict(entry.key)
        for address, size in entry.storages.items():
            ref = self._refs.setdefault(address, [0, size])
            if ref[0] == 0:
                self.used += size
            ref[0] += 1
        self._entries[entry.key] = entry
        for length in range(1, len(entry.signature) + 1):
            self._prefixes.setdefault(tuple(entry.signature[:length]), {})[entry.key] = None
        self._note_peak()
        if not self._evict_until(0, keep=(entry.key,)):
            self.evict(entry.key)
            self.evictions -= 1
            self.refused += 1
            return False
        self.inserts += 1
        return True

    def evict(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        for length in range(1, len(entry.signature) + 1):
            prefix = tuple(entry.signature[:length])
            keys = self._prefixes[prefix]
            del keys[key]
            if not keys:
                del self._prefixes[prefix]
        for address in entry.storages:
            ref = self._refs[address]
            ref[0] -= 1
            if ref[0] == 0:
                self.used -= ref[1]
                del self._refs[address]
        self.evictions += 1

    def clear(self) -> None:
        for key in list(self._entries):
            self.evict(key)

    def stats(self) -> dict[str, Any]:
        mib = 2.0 ** 20
        return {"entries": len(self), "used_mb": self.used / mib, "peak_mb": self.peak / mib,
                "budget_mb": self.budget / mib, "inserts": self.inserts, "evictions": self.evictions,
                "refused": self.refused}


def _last_difference(a: Sequence, b: Sequence, start: int) -> int:
    """The last stage at which signatures ``a`` and ``b`` differ (``start - 1`` if none from ``start`` on)."""
    for stage in range(len(a) - 1, start - 1, -1):
        if a[stage] != b[stage]:
            return stage
    return start - 1


def state_bytes(value: Any) -> int:
    """Bytes of the distinct storages in ``value``."""
    return sum(_storages(value).values())
