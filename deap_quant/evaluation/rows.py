"""Per-sample reuse: recompute only the samples whose activations a genome actually changed.

After the last stage whose weights differ from the cached ancestor's, every later stage is the
same function for both. A sample whose activations at that point are bit-for-bit the
ancestor's (a changed weight that only meets zero-padding or a ReLU-zeroed input, or a change
swallowed by a later ReLU) therefore ends with the ancestor's outputs too. Only the other
samples -- the *changed rows* of the batch -- are run through the remaining stages, as a
smaller batch, and written over a copy of the ancestor's activations.

That is exact only where a stage gives each sample the same bits in a batch of ``k`` rows as
in the full batch. Convolution and matrix kernels usually do, but not always (PyTorch's CPU
kernels take other paths for a handful of rows). So row counts are rounded up to a multiple of
:data:`ROW_BUCKET` (padding with unchanged rows), and each (stage, bucket, batch shape) case is
verified once on the ancestor's own cached activations before it is used, like
:class:`~.patches.ChannelPatch`. This module imports torch only.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

__all__ = ["ROW_BUCKET", "row_structured", "changed_rows", "bucket", "take_rows", "put_rows", "identical_bits",
           "shapes"]

#: Changed rows are padded to a multiple of this many (small batches take other kernel paths).
ROW_BUCKET = 16

_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def row_structured(state: Any, rows: int) -> bool:
    """Whether ``state`` is made only of tensors (in tuples, lists, dicts) whose first dimension is ``rows``."""
    if isinstance(state, torch.Tensor):
        return state.ndim >= 1 and state.shape[0] == rows
    if isinstance(state, (tuple, list)):
        return all(row_structured(item, rows) for item in state)
    if isinstance(state, dict):
        return all(row_structured(item, rows) for item in state.values())
    return False


def _leaves(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    items = state.values() if isinstance(state, dict) else state
    return [leaf for item in items for leaf in _leaves(item)]


def shapes(state: Any) -> tuple:
    """The shapes and dtypes of the tensors in ``state`` (a key for kernel-dependent verdicts)."""
    return tuple((tuple(leaf.shape), leaf.dtype) for leaf in _leaves(state))


def _map(fn: Callable[..., torch.Tensor], state: Any, *others: Any) -> Any:
    """``fn`` applied leaf by leaf to ``state`` and the same-structured ``others``."""
    if isinstance(state, torch.Tensor):
        return fn(state, *others)
    if isinstance(state, dict):
        return {key: _map(fn, value, *(other[key] for other in others)) for key, value in state.items()}
    mapped = [_map(fn, item, *(other[i] for other in others)) for i, item in enumerate(state)]
    return type(state)(mapped) if isinstance(state, tuple) else mapped


def _differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row of ``a`` and ``b`` (same shape), whether any element differs in its bits (so -0.0 != 0.0)."""
    bits = _BITS.get(a.dtype)
    if bits is not None and b.dtype == a.dtype and a.is_contiguous() and b.is_contiguous():
        a, b = a.view(bits), b.view(bits)
    return (a != b).reshape(a.shape[0], -1).any(dim=1)


def changed_rows(new: Any, old: Any, rows: int) -> Optional[torch.Tensor]:
    """Indices of the rows where ``new`` and ``old`` differ in any bit, or ``None`` if they cannot be compared."""
    if not (row_structured(new, rows) and row_structured(old, rows)):
        return None
    new_leaves, old_leaves = _leaves(new), _leaves(old)
    if len(new_leaves) != len(old_leaves):
        return None
    mask = torch.zeros(rows, dtype=torch.bool, device=new_leaves[0].device if new_leaves else None)
    for a, b in zip(new_leaves, old_leaves):
        if a.shape != b.shape or a.dtype != b.dtype:
            return None
        mask |= _differs(a, b)
    return mask.nonzero().flatten()


def identical_bits(a: Any, b: Any) -> bool:
    """Whether two same-structured states are equal bit for bit."""
    leaves_a, leaves_b = _leaves(a), _leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        x.shape == y.shape and x.dtype == y.dtype and not bool(_differs(x, y).any()) for x, y in zip(leaves_a, leaves_b))


def bucket(count: int, rows: int) -> int:
    """``count`` rounded up to a multiple of :data:`ROW_BUCKET`, at most ``rows``."""
    return min(rows, -(-count // ROW_BUCKET) * ROW_BUCKET)


def take_rows(state: Any, index: torch.Tensor) -> Any:
    """The rows ``index`` of every tensor in ``state`` (new tensors)."""
    return _map(lambda tensor: tensor.index_select(0, index), state)


def put_rows(base: Any, index: torch.Tensor, values: Any) -> Any:
    """A copy of ``base`` with rows ``index`` replaced by the first ``len(index)`` rows of ``values``."""
    count = len(index)
    return _map(lambda tensor, value: tensor.clone().index_copy_(0, index, value[:count]), base, values)
