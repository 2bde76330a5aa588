"""Image classification data in NumPy ``.npz`` files (``--dataset npz --data-root FILE_OR_DIR``).

Accepted layouts (:data:`NPZ_LAYOUT`):

* one file with arrays ``x`` (images) and ``y`` (integer labels): train, val and test are carved
  from it, stratified;
* one file with ``x_train``/``y_train`` and ``x_test``/``y_test`` (optionally ``x_val``/``y_val``),
  as Keras' ``mnist.npz``;
* a folder with one ``train*.npz`` and optionally ``test*.npz`` and ``val*.npz``, each holding
  ``x`` and ``y`` (e.g. ``train-10k.npz`` + ``test.npz``); a folder with a single ``.npz`` is that file.

Images are ``uint8`` (scaled by 1/255) or floating point (kept as they are), laid out ``[N, H, W,
C]``, ``[N, C, H, W]`` (C = 1 or 3) or ``[N, H, W]`` (one channel); they become ``[N, C, H, W]``
float32. A missing or malformed file raises one line naming the file and the arrays expected.
Torch and NumPy only.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .digits import Splits
from .local import DatasetNotFound, _check_fraction, _check_limit, _stratified, _take

__all__ = ["NPZ_LAYOUT", "NpzParts", "read_npz", "is_npz_root", "npz", "images_to_tensor", "labels_to_tensor",
           "fingerprint"]

PathLike = Union[str, os.PathLike]
Pair = tuple[torch.Tensor, torch.Tensor]

NPZ_LAYOUT = ("a .npz file with arrays x (images: uint8 or float, [N,H,W,C], [N,C,H,W] or [N,H,W]) and y "
              "(integer labels [N]), or with x_train, y_train, x_test, y_test (optionally x_val, y_val); or a "
              "folder with train*.npz and optionally test*.npz, val*.npz, each holding x and y")

_CHANNELS = (1, 3)


def _bad(path: Path, problem: str) -> ValueError:
    return ValueError(f"npz: {str(path)!r} {problem}. Expected {NPZ_LAYOUT}")


def images_to_tensor(x: np.ndarray, source: str = "x") -> torch.Tensor:
    """``x`` as ``[N, C, H, W]`` float32: uint8 scaled to ``[0, 1]``, floats kept; NHWC, NCHW or NHW."""
    if not isinstance(x, np.ndarray) or x.dtype == object:
        raise ValueError(f"{source} is not a numeric array")
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{source} has dtype {x.dtype}; use uint8 (0..255) or a float type")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        last, second = x.shape[3] in _CHANNELS, x.shape[1] in _CHANNELS
        if last and second and x.shape[1] != x.shape[3]:
            raise ValueError(f"{source} has shape {x.shape}, which is ambiguous between [N,H,W,C] and [N,C,H,W]")
        if last and not second:
            x = x.transpose(0, 3, 1, 2)
        elif not second:
            raise ValueError(f"{source} has shape {x.shape}: no axis of 1 or 3 channels at position 1 or 3")
    else:
        raise ValueError(f"{source} has shape {x.shape}; use [N,H,W,C], [N,C,H,W] or [N,H,W]")
    if x.shape[0] == 0:
        raise ValueError(f"{source} holds no images")
    tensor = torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype == np.uint8:
        return tensor.to(torch.float32).div_(255.0)
    tensor = tensor.to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{source} holds NaN or infinite values")
    return tensor


def labels_to_tensor(y: np.ndarray, count: int, source: str = "y") -> torch.Tensor:
    """``y`` as int64 ``[count]``; integer labels >= 0 only."""
    if not isinstance(y, np.ndarray) or not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise ValueError(f"{source} has dtype {getattr(y, 'dtype', type(y).__name__)}; use integer labels")
    y = y.reshape(-1) if y.ndim == 2 and 1 in y.shape else y
    if y.ndim != 1 or len(y) != count:
        raise ValueError(f"{source} has shape {y.shape}; use one label per image ({count})")
    if len(y) and y.min() < 0:
        raise ValueError(f"{source} holds negative labels (min {int(y.min())}); use 0..C-1")
    return torch.from_numpy(y.astype(np.int64))


def _load(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetNotFound(f"npz: {str(path)!r} does not exist; nothing is downloaded. Expected {NPZ_LAYOUT}")
    try:
        with np.load(path, allow_pickle=False) as content:
            if not isinstance(content, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
            return {key: content[key] for key in content.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise _bad(path, f"is not a readable .npz file ({type(error).__name__}: {error})") from None


def _pair(path: Path, arrays: dict[str, np.ndarray], suffix: str) -> Pair:
    x_key, y_key = f"x{suffix}", f"y{suffix}"
    try:
        images = images_to_tensor(arrays[x_key], f"array {x_key}")
        return images, labels_to_tensor(arrays[y_key], len(images), f"array {y_key}")
    except ValueError as error:
        raise _bad(path, f"is malformed: {error}") from None


@dataclass(frozen=True)
class NpzParts:
    """The splits an npz data root holds (``all`` for a lone ``x``/``y`` file), and the files read."""

    parts: dict[str, Pair]
    files: tuple[Path, ...] = field(default=())


def read_npz(root: PathLike) -> NpzParts:
    """Read an npz data root (a file or a folder, see :data:`NPZ_LAYOUT`)."""
    path = Path(root).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
        by_split = {split: [p for p in files if p.name.startswith(split)] for split in ("train", "val", "test")}
        if not by_split["train"]:
            if len(files) == 1:
                return read_npz(files[0])
            raise DatasetNotFound(f"npz: {str(path)!r} holds {len(files)} .npz files but no train*.npz; "
                                    f"nothing is downloaded. Expected {NPZ_LAYOUT}")
        parts, used = {}, []
        for split, found in by_split.items():
            if len(found) > 1:
                raise _bad(path, f"holds {len(found)} {split}*.npz files ({', '.join(p.name for p in found)}); "
                                 "keep one")
            if found:
                arrays = _load(found[0])
                if "x" not in arrays or "y" not in arrays:
                    raise _bad(found[0], f"lacks array {'x' if 'x' not in arrays else 'y'} (has "
                                         f"{', '.join(sorted(arrays)) or 'none'})")
                parts[split] = _pair(found[0], arrays, "")
                used.append(found[0])
        return _checked(NpzParts(parts, tuple(used)), path)
    arrays = _load(path)
    if "x_train" in arrays or "y_train" in arrays:
        needed = ["x_train", "y_train"] + [f"{a}_{s}" for s in ("test", "val") for a in "xy"
                                           if f"x_{s}" in arrays or f"y_{s}" in arrays]
        missing = [key for key in needed if key not in arrays]
        if missing:
            raise _bad(path, f"lacks array {missing[0]} (has {', '.join(sorted(arrays))})")
        parts = {split: _pair(path, arrays, f"_{split}") for split in ("train", "val", "test")
                 if f"x_{split}" in arrays}
        return _checked(NpzParts(parts, (path,)), path)
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise _bad(path, f"lacks array {missing[0]} (has {', '.join(sorted(arrays)) or 'none'})")
    return _checked(NpzParts({"all": _pair(path, arrays, "")}, (path,)), path)


def _checked(found: NpzParts, path: Path) -> NpzParts:
    shapes = {split: tuple(pair[0].shape[1:]) for split, pair in found.parts.items()}
    if len(set(shapes.values())) > 1:
        raise _bad(path, f"has splits with different image shapes {shapes}")
    return found


def is_npz_root(root: Optional[PathLike]) -> bool:
    """Whether ``root`` is an ``.npz`` file or a folder holding ``.npz`` files."""
    if root is None:
        return False
    path = Path(root).expanduser()
    if path.is_file():
        return path.suffix == ".npz"
    return path.is_dir() and any(p.suffix == ".npz" for p in path.iterdir())


def fingerprint(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' shapes, dtypes and bytes (identifies a data set whatever file it came from)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{array.dtype}{array.shape};".encode())
        digest.update(array.data)
    return digest.hexdigest()


def npz(root: Optional[PathLike], seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2,
        limit: Optional[int] = None) -> Splits:
    """An npz data set as :class:`Splits` (see :data:`NPZ_LAYOUT`).

    Given splits are kept; a missing test split is carved from train (stratified, ``test_fraction``),
    then a missing val split (``val_fraction``). ``num_classes`` is the largest label + 1.
    """
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    _check_limit(limit)
    if root is None:
        raise DatasetNotFound(f"npz needs a data file or folder (data_root / --data-root). Expected {NPZ_LAYOUT}")
    parts = dict(read_npz(root).parts)
    train = parts.pop("all", None) or parts["train"]
    keep = np.arange(len(train[1]))
    carved: dict[str, np.ndarray] = {}
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        if split not in parts:
            rest, part = _stratified(train[1][keep].numpy(), fraction, seed)
            carved[split], keep = keep[part], keep[rest]
    pairs = {split: _take(*train, carved[split], limit, seed) if split in carved
             else _take(*parts[split], np.arange(len(parts[split][1])), limit, seed) for split in ("val", "test")}
    labels = [train[1]] + [pair[1] for pair in parts.values()]
    num_classes = int(max(int(t.max()) for t in labels if len(t))) + 1
    return Splits(_take(*train, keep, limit, seed), pairs["val"], pairs["test"], num_classes=num_classes, name="npz")
