"""Loaders for users' local data, read with torchvision's dataset classes and returned as :class:`Splits`.

Classification: :func:`mnist`, :func:`cifar10`, :func:`imagefolder` give ``(images [N, C, H, W]
float in [0, 1], labels int64 [N])``. Detection: :func:`voc` and :func:`coco` give ``(images,
targets)`` with torchvision's target format ``{"boxes" [n, 4] xyxy pixels, "labels" [n],
"iscrowd" [n]}``; the images are one ``[N, C, H, W]`` tensor when they share a size, else a list.

Nothing is ever downloaded (``download=False``): a missing file raises :class:`DatasetNotFound`
naming the path that is missing and the layout that is expected. Everything is loaded into
memory, so use ``limit=`` (images per split) for large sets.
"""

from __future__ import annotations

import json
import os
import pickle
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from .digits import Splits

__all__ = ["DatasetNotFound", "mnist", "cifar10", "mnist_arrays", "cifar10_arrays", "imagefolder", "voc", "coco",
           "LOCAL_DATASETS", "VOC_CLASSES", "MNIST_LAYOUT", "CIFAR10_LAYOUT"]

PathLike = Union[str, os.PathLike]
Pair = tuple[torch.Tensor, torch.Tensor]

#: The 20 PASCAL VOC classes; labels are their position + 1 (0 is torchvision's background).
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


class DatasetNotFound(FileNotFoundError):
    """A local dataset is missing or incomplete; the message names the path and the expected layout."""


def _missing(dataset: str, path: Path, layout: str) -> DatasetNotFound:
    return DatasetNotFound(f"{dataset}: {str(path)!r} does not exist; nothing is downloaded. Expected layout: "
                           f"{layout}")


def _root(root: Optional[PathLike], dataset: str, layout: str) -> Path:
    if root is None:
        raise DatasetNotFound(f"{dataset} needs a data folder (data_root / --data-root). Expected layout: {layout}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise _missing(dataset, path, layout)
    return path


def _check_limit(limit: Optional[int]) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} is not valid; use a positive integer or None")


def _check_fraction(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name}={value!r} is not valid; use a number between 0 and 1")


def _stratified(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, part) with ``fraction`` of the samples in ``part``, stratified when every class allows it."""
    index = np.arange(len(labels))
    counts = np.unique(labels, return_counts=True)[1]
    n_part = int(round(fraction * len(labels)))
    if n_part < 1 or n_part >= len(labels):
        raise ValueError(f"cannot split {len(labels)} samples with fraction {fraction}: too few samples")
    stratify = labels if counts.min() >= 2 and n_part >= len(counts) and len(labels) - n_part >= len(counts) else None
    rest, part = train_test_split(index, test_size=n_part, stratify=stratify, random_state=seed)
    return np.sort(rest), np.sort(part)


def _take(images: torch.Tensor, labels: torch.Tensor, index: np.ndarray, limit: Optional[int],
          seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if limit is not None and len(index) > limit:
        index = np.sort(np.random.default_rng(seed).choice(index, size=limit, replace=False))
    chosen = torch.from_numpy(np.ascontiguousarray(index))
    return images[chosen], labels[chosen]


def _classification_splits(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                           num_classes: int, name: str, seed: int, val_fraction: float,
                           limit: Optional[int]) -> Splits:
    """Carve a stratified validation split out of ``train``; keep ``test`` as given."""
    rest, val = _stratified(train[1].numpy(), val_fraction, seed)
    all_test = np.arange(len(test[1]))
    return Splits(_take(*train, rest, limit, seed), _take(*train, val, limit, seed),
                  _take(*test, all_test, limit, seed), num_classes=num_classes, name=name)


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.to(torch.float32).div_(255.0)


# ---------------------------------------------------------------------------------------------- MNIST
MNIST_LAYOUT = ("ROOT/MNIST/raw/{" + ",".join(MNIST_FILES) + "} (uncompressed IDX files, as torchvision writes them), "
                "or .npz files: ROOT/mnist.npz with x_train, y_train, x_test, y_test (uint8 [N,28,28]) or "
                "ROOT/{train*.npz,test.npz} each with x, y")


def _npz_train_test(root: Path, dataset: str, shape: tuple[int, ...], num_classes: int) -> tuple[Pair, Pair]:
    """(train, test) from an npz data root, checked against the data set's image shape and classes."""
    from .npz import NPZ_LAYOUT, read_npz

    found = read_npz(root)
    where = ", ".join(str(p) for p in found.files)
    if set(found.parts) != {"train", "test"}:
        raise ValueError(f"{dataset}: {where!r} holds the splits {sorted(found.parts)}; {dataset} needs exactly "
                         f"train and test (validation is carved from train). Expected {NPZ_LAYOUT}")
    for split, (images, labels) in found.parts.items():
        if tuple(images.shape[1:]) != shape:
            raise ValueError(f"{dataset}: the {split} images in {where!r} have shape {tuple(images.shape[1:])} per "
                             f"image; {dataset} has {shape}")
        if len(labels) and int(labels.max()) >= num_classes:
            raise ValueError(f"{dataset}: the {split} labels in {where!r} reach {int(labels.max())}; {dataset} has "
                             f"{num_classes} classes (0..{num_classes - 1})")
        low, high = float(images.min()), float(images.max())
        if low < 0.0 or high > 1.0:  # uint8 arrays were scaled to [0, 1]: only float arrays get here
            raise ValueError(f"{dataset}: the {split} images ({_npz_array(found.files, split)}) range from {low} to "
                             f"{high}; {dataset} images must be uint8 (0..255) or floats in [0, 1] (divide 0..255 "
                             "floats by 255; undo any mean/std normalisation)")
    return found.parts["train"], found.parts["test"]


def _npz_array(files: tuple[Path, ...], split: str) -> str:
    """Which array of which file holds the ``split`` images of a train/test npz root (as read by read_npz)."""
    if len(files) == 1:
        return f"array x_{split} in {str(files[0])!r}"
    path = next((p for p in files if p.name.startswith(split)), files[0])
    return f"array x in {str(path)!r}"


def _data_path(root: Optional[PathLike], dataset: str, layout: str) -> Path:
    """``root`` as a path: an existing folder, or an existing ``.npz`` file."""
    if root is not None and Path(root).expanduser().is_file():
        path = Path(root).expanduser()
        if path.suffix != ".npz":
            raise DatasetNotFound(f"{dataset}: {str(path)!r} is a file but not an .npz file. Expected layout: {layout}")
        return path
    return _root(root, dataset, layout)


def _uses_npz(path: Path, folder: str) -> bool:
    from .npz import is_npz_root

    return path.suffix == ".npz" or (not (path / folder).is_dir() and path.name != folder and is_npz_root(path))


def mnist_arrays(root: Optional[PathLike]) -> tuple[Pair, Pair]:
    """MNIST's official (train, test) images ``[N, 1, 28, 28]`` in ``[0, 1]`` with int64 labels, from
    torchvision's ``MNIST/raw`` folder or from npz files (see :data:`MNIST_LAYOUT`)."""
    path = _data_path(root, "mnist", MNIST_LAYOUT)
    if _uses_npz(path, "MNIST"):
        return _npz_train_test(path, "mnist", (1, 28, 28), 10)
    from torchvision.datasets import MNIST

    if path.name == "MNIST" and (path / "raw").is_dir():
        path = path.parent
    for name in MNIST_FILES:
        if not (path / "MNIST" / "raw" / name).is_file():
            raise _missing("mnist", path / "MNIST" / "raw" / name, MNIST_LAYOUT)
    try:
        parts = [MNIST(str(path), train=train, download=False) for train in (True, False)]
    except (RuntimeError, AssertionError, ValueError) as error:
        raise ValueError(f"mnist: the files under {str(path / 'MNIST' / 'raw')!r} are not valid IDX files "
                         f"({error})") from None
    train, test = ((_to_float(p.data[:, None]), p.targets.to(torch.int64)) for p in parts)
    return train, test


def mnist(root: Optional[PathLike], seed: int = 0, val_fraction: float = 0.1, limit: Optional[int] = None) -> Splits:
    """MNIST from torchvision's layout: train (minus a stratified ``val_fraction``) / val / the official test.

    ``root`` is the folder holding ``MNIST/`` (as for ``torchvision.datasets.MNIST``) or ``MNIST/`` itself,
    or npz files (see :data:`MNIST_LAYOUT`). Images are ``[N, 1, 28, 28]`` floats in ``[0, 1]``.
    """
    _check_fraction("val_fraction", val_fraction)
    _check_limit(limit)
    train, test = mnist_arrays(root)
    return _classification_splits(train, test, 10, "mnist", seed, val_fraction, limit)


# ---------------------------------------------------------------------------------------------- CIFAR-10
CIFAR10_LAYOUT = ("ROOT/cifar-10-batches-py/{" + ",".join(CIFAR10_FILES) + "[,batches.meta]} (the python "
                  "version of CIFAR-10, pickled batches), or .npz files: ROOT/{train*.npz,test.npz} each with x "
                  "(uint8 [N,32,32,3]) and y, or one .npz with x_train, y_train, x_test, y_test")


def _cifar10_class() -> type:
    from torchvision.datasets import CIFAR10

    class LocalCIFAR10(CIFAR10):
        """torchvision's CIFAR-10 reader without the MD5 checks, so that local copies and subsets load."""

        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            path = Path(self.root) / self.base_folder / self.meta["filename"]
            if path.is_file():
                with open(path, "rb") as stream:
                    self.classes = pickle.load(stream, encoding="latin1")[self.meta["key"]]
            else:
                self.classes = [str(i) for i in range(10)]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    return LocalCIFAR10


def cifar10_arrays(root: Optional[PathLike]) -> tuple[Pair, Pair]:
    """CIFAR-10's (train, test) images ``[N, 3, 32, 32]`` in ``[0, 1]`` with int64 labels, from the python
    batches (``cifar-10-batches-py``) or from npz files (see :data:`CIFAR10_LAYOUT`)."""
    path = _data_path(root, "cifar10", CIFAR10_LAYOUT)
    if _uses_npz(path, "cifar-10-batches-py"):
        return _npz_train_test(path, "cifar10", (3, 32, 32), 10)
    if path.name == "cifar-10-batches-py":
        path = path.parent
    for name in CIFAR10_FILES:
        if not (path / "cifar-10-batches-py" / name).is_file():
            raise _missing("cifar10", path / "cifar-10-batches-py" / name, CIFAR10_LAYOUT)
    reader = _cifar10_class()
    try:
        parts = [reader(str(path), train=train, download=False) for train in (True, False)]
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"cifar10: the batches under {str(path / 'cifar-10-batches-py')!r} are not valid "
                         f"CIFAR-10 python pickles ({type(error).__name__}: {error})") from None
    train, test = ((_to_float(torch.from_numpy(p.data).permute(0, 3, 1, 2)), torch.tensor(p.targets, dtype=torch.int64))
                   for p in parts)
    return train, test


def cifar10(root: Optional[PathLike], seed: int = 0, val_fraction: float = 0.1,
            limit: Optional[int] = None) -> Splits:
    """CIFAR-10 (python batches or npz): train (minus a stratified ``val_fraction``) / val / the official test.

    ``root`` holds ``cifar-10-batches-py/`` (or is that folder), or npz files (see :data:`CIFAR10_LAYOUT`).
    Images are ``[N, 3, 32, 32]`` in ``[0, 1]``.
    """
    _check_fraction("val_fraction", val_fraction)
    _check_limit(limit)
    train, test = cifar10_arrays(root)
    return _classification_splits(train, test, 10, "cifar10", seed, val_fraction, limit)


# ---------------------------------------------------------------------------------------------- ImageFolder
IMAGEFOLDER_LAYOUT = ("ROOT/CLASS/IMAGE (split 60/20/20 here), or ROOT/train/CLASS/IMAGE with optional "
                      "ROOT/val/CLASS/IMAGE and ROOT/test/CLASS/IMAGE (missing splits are carved from train)")


def _load_folder(folder: Path, image_size: Optional[tuple[int, int]], grayscale: bool,
                 classes: Optional[list[str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    steps: list[Callable] = [transforms.Grayscale()] if grayscale else []
    if image_size is not None:
        steps.append(transforms.Resize(image_size))
    steps.append(transforms.PILToTensor())
    try:
        dataset = ImageFolder(str(folder), transform=transforms.Compose(steps))
    except FileNotFoundError as error:
        raise DatasetNotFound(f"imagefolder: {error}. Expected layout: {IMAGEFOLDER_LAYOUT}") from None
    if classes is None:
        classes = list(dataset.classes)
    unknown = sorted(set(dataset.classes) - set(classes))
    if unknown:
        raise ValueError(f"imagefolder: {str(folder)!r} has classes {unknown} that the train split lacks; "
                         f"train classes: {classes}")
    remap = [classes.index(name) for name in dataset.classes]
    images, labels = [], []
    for index in range(len(dataset)):
        image, label = dataset[index]
        images.append(image)
        labels.append(remap[label])
    shapes = sorted({tuple(image.shape) for image in images})
    if len(shapes) > 1:
        raise ValueError(f"imagefolder: images under {str(folder)!r} differ in shape ({shapes[0]} and {shapes[-1]}); "
                         "pass image_size=(height, width) to resize them")
    return _to_float(torch.stack(images)), torch.tensor(labels, dtype=torch.int64), classes


def imagefolder(root: Optional[PathLike], seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                image_size: Optional[Union[int, tuple[int, int]]] = None, grayscale: bool = False,
                limit: Optional[int] = None) -> Splits:
    """Images in class folders, read with ``torchvision.datasets.ImageFolder``.

    With ``ROOT/CLASS/IMAGE`` the images are split stratified by ``fractions`` (train/val/test). With
    ``ROOT/train/`` (and optionally ``ROOT/val/``, ``ROOT/test/``) those folders are the splits, and a
    missing one is carved out of train with its fraction. Labels follow the train folder's sorted class
    names. ``image_size`` resizes; otherwise all images must share one size.
    """
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions={fractions!r} is not valid; use three positive numbers summing to 1")
    _check_limit(limit)
    path = _root(root, "imagefolder", IMAGEFOLDER_LAYOUT)
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    if not (path / "train").is_dir():
        images, labels, classes = _load_folder(path, size, grayscale, None)
        rest, test = _stratified(labels.numpy(), fractions[2], seed)
        inner_train, inner_val = _stratified(labels[rest].numpy(), fractions[1] / (fractions[0] + fractions[1]), seed)
        train, val = rest[inner_train], rest[inner_val]
        return Splits(_take(images, labels, train, limit, seed), _take(images, labels, val, limit, seed),
                      _take(images, labels, test, limit, seed), num_classes=len(classes), name="imagefolder")
    images, labels, classes = _load_folder(path / "train", size, grayscale, None)
    keep = np.arange(len(labels))
    given: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split, fraction in (("test", fractions[2]), ("val", fractions[1])):
        if (path / split).is_dir():
            split_images, split_labels, _ = _load_folder(path / split, size, grayscale, classes)
            given[split] = (split_images, split_labels)
        else:
            inner_rest, inner_part = _stratified(labels[keep].numpy(), fraction / (fraction + fractions[0])
                                                 if split == "val" else fraction, seed)
            given[split] = (images[keep[inner_part]], labels[keep[inner_part]])
            keep = keep[inner_rest]
    every = {split: np.arange(len(pair[1])) for split, pair in given.items()}
    return Splits(_take(images, labels, keep, limit, seed), _take(*given["val"], every["val"], limit, seed),
                  _take(*given["test"], every["test"], limit, seed), num_classes=len(classes), name="imagefolder")


# ---------------------------------------------------------------------------------------------- detection
Target = dict[str, torch.Tensor]


def _image_tensor(image: Any) -> torch.Tensor:
    from torchvision.transforms.functional import pil_to_tensor

    return _to_float(pil_to_tensor(image.convert("RGB")))


def _stack_if_same(images: list[torch.Tensor]) -> Union[torch.Tensor, list[torch.Tensor]]:
    return torch.stack(images) if images and len({tuple(i.shape) for i in images}) == 1 else images


def _detection_splits(parts: dict[str, tuple[list[torch.Tensor], list[Target]]], num_classes: int, name: str,
                      seed: int, limit: Optional[int]) -> Splits:
    """train/val/test from ``parts``; a missing test split is half of val (seeded)."""
    if "test" not in parts:
        images, targets = parts["val"]
        if len(targets) < 2:
            raise ValueError(f"{name}: the val split has {len(targets)} image(s); at least 2 are needed to halve it "
                             "into val and test (or provide a test split)")
        order = np.random.default_rng(seed).permutation(len(targets))
        half = len(order) // 2
        parts = {**parts, "val": ([images[i] for i in sorted(order[:half])], [targets[i] for i in sorted(order[:half])]),
                 "test": ([images[i] for i in sorted(order[half:])], [targets[i] for i in sorted(order[half:])])}

    def pair(split: str) -> tuple[Any, list[Target]]:
        images, targets = parts[split]
        if limit is not None and len(targets) > limit:
            chosen = sorted(np.random.default_rng(seed).choice(len(targets), size=limit, replace=False).tolist())
            images, targets = [images[i] for i in chosen], [targets[i] for i in chosen]
        return _stack_if_same(images), targets

    return Splits(pair("train"), pair("val"), pair("test"), num_classes=num_classes, name=name)


VOC_LAYOUT = ("ROOT/VOCdevkit/VOC<year>/{JPEGImages/ID.jpg, Annotations/ID.xml, ImageSets/Main/{train,val[,test]}.txt} "
              "(ROOT may also be the VOCdevkit or the VOC<year> folder)")


def _find_voc(path: Path) -> tuple[Path, str]:
    """(the folder torchvision's VOCDetection wants as root, year) for a VOC tree given at any level."""
    candidates = [path] if path.name.startswith("VOC20") else sorted(path.glob("VOC20??")) + sorted(
        path.glob("VOCdevkit/VOC20??")) + sorted(path.glob("TrainVal/VOCdevkit/VOC20??"))
    for folder in candidates:
        year = folder.name[3:]
        if folder.is_dir() and year in {str(y) for y in range(2007, 2013)}:
            expected = Path("TrainVal", "VOCdevkit") if year == "2011" else Path("VOCdevkit")
            root = folder.parent
            for part in reversed(expected.parts):
                if root.name != part:
                    raise DatasetNotFound(f"voc: {str(folder)!r} must sit in a {expected.as_posix()}/ folder for "
                                          f"torchvision's VOCDetection. Expected layout: {VOC_LAYOUT}")
                root = root.parent
            return root, year
    raise _missing("voc", path / "VOCdevkit" / "VOC2012", VOC_LAYOUT)


def _image_set_ids(list_file: Path) -> list[int]:
    """Positions of the non-blank lines of a VOC image-set list, read as torchvision reads it (one id a line)."""
    with open(list_file) as stream:
        return [i for i, line in enumerate(stream.readlines()) if line.strip()]


def _voc_objects(annotation: Any, xml: str) -> list[tuple[str, list[float], int]]:
    """(name, [xmin, ymin, xmax, ymax], difficult) per ``<object>`` of a parsed VOC annotation file."""
    if not isinstance(annotation, dict) or not isinstance(annotation.get("annotation"), dict):
        raise ValueError(f"voc: {xml!r} has no <annotation> root element holding the image's objects")
    objects = annotation["annotation"].get("object", [])
    found = []
    for number, obj in enumerate(objects if isinstance(objects, list) else [objects], 1):
        where = f"voc: object {number} in {xml!r}"
        needs = "each <object> needs <name> and <bndbox> with numeric <xmin>, <ymin>, <xmax>, <ymax>"
        try:
            name, box = obj["name"], obj["bndbox"]
            coordinates = [float(box[key]) for key in ("xmin", "ymin", "xmax", "ymax")]
            difficult = int(obj.get("difficult", "0"))
        except KeyError as error:
            raise ValueError(f"{where} has no <{error.args[0]}>; {needs}") from None
        except (TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{where} is malformed ({error}); {needs} (and <difficult> 0 or 1 if given)") from None
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where} has an empty or nested <name>; {needs}")
        found.append((name, coordinates, difficult))
    return found


def voc(root: Optional[PathLike], seed: int = 0, year: Optional[str] = None, classes: Optional[Sequence[str]] = None,
        limit: Optional[int] = None) -> Splits:
    """A PASCAL-VOC-style detection set, read with ``torchvision.datasets.VOCDetection``.

    Splits are the ``train``, ``val`` and (if listed) ``test`` image sets; without a test list the val
    images are halved into val and test. Labels are 1 + the class's position in ``classes`` (default:
    the 20 VOC classes, or the sorted names found if any is not a VOC class); ``num_classes`` counts the
    background. Objects marked ``difficult`` become ``iscrowd=1`` (ignored by COCO-style mAP).
    """
    from PIL import UnidentifiedImageError
    from torchvision.datasets import VOCDetection

    _check_limit(limit)
    path = _root(root, "voc", VOC_LAYOUT)
    voc_root, found_year = _find_voc(path)
    year = year or found_year
    folder = voc_root / ("TrainVal/VOCdevkit" if year == "2011" else "VOCdevkit") / f"VOC{year}"
    lists = folder / "ImageSets" / "Main"
    for needed in ("JPEGImages", "Annotations", "ImageSets/Main/train.txt", "ImageSets/Main/val.txt"):
        if not (folder / needed).exists():
            raise _missing("voc", folder / needed, VOC_LAYOUT)
    raw: dict[str, list[tuple[Any, list[tuple[str, list[float], int]]]]] = {}
    for split in ("train", "val", "test"):
        if split == "test" and not (lists / "test.txt").is_file():
            continue
        if split == "test" and year != "2007":
            raise ValueError(f"voc: torchvision reads a test image set only for VOC2007, not VOC{year}; remove "
                             f"{str(lists / 'test.txt')!r} to halve val into val and test instead")
        dataset = VOCDetection(str(voc_root), year=year, image_set=split, download=False)
        raw[split] = []
        for i in _image_set_ids(lists / f"{split}.txt"):  # blank lines would name 'JPEGImages/.jpg'
            try:
                image, annotation = dataset[i]
            except FileNotFoundError as error:
                raise _missing("voc", Path(error.filename or folder), VOC_LAYOUT) from None
            except UnidentifiedImageError:
                raise ValueError(f"voc: {dataset.images[i]!r} is not a readable image") from None
            except (ET.ParseError, ValueError) as error:
                raise ValueError(f"voc: {dataset.annotations[i]!r} is not valid XML ({error})") from None
            raw[split].append((image, _voc_objects(annotation, dataset.annotations[i])))
    names = sorted({name for items in raw.values() for _, objects in items for name, _, _ in objects})
    if classes is None:
        classes = VOC_CLASSES if set(names) <= set(VOC_CLASSES) else tuple(names)
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"voc: object names {unknown} are not in classes={list(classes)}")
    label_of = {name: i + 1 for i, name in enumerate(classes)}

    def convert(image: Any, objects: list[tuple[str, list[float], int]]) -> tuple[torch.Tensor, Target]:
        box_tensor = torch.tensor([box for _, box, _ in objects], dtype=torch.float32).reshape(-1, 4)
        box_tensor[:, :2] -= 1.0  # VOC's 1-based inclusive pixels -> 0-based corners
        return _image_tensor(image), {
            "boxes": box_tensor,
            "labels": torch.tensor([label_of[name] for name, _, _ in objects], dtype=torch.int64),
            "iscrowd": torch.tensor([difficult for _, _, difficult in objects], dtype=torch.int64)}

    parts = {}
    for split, items in raw.items():
        converted = [convert(image, objects) for image, objects in items]
        parts[split] = ([image for image, _ in converted], [target for _, target in converted])
    return _detection_splits(parts, len(classes) + 1, f"voc{year}", seed, limit)


COCO_LAYOUT = ("ROOT/annotations/instances_<split>[suffix].json with images in ROOT/<split>[suffix]/ for split "
               "train and val (test optional), e.g. annotations/instances_val2017.json + val2017/")


def _coco_target(annotations: list[Any], json_file: Path) -> Target:
    """torchvision's target for one image's COCO annotations (``bbox`` xywh -> ``boxes`` xyxy)."""
    boxes, labels, crowd = [], [], []
    for a in annotations:
        where = (f"coco: annotation {a.get('id', '?')} (image {a.get('image_id', '?')}) in {str(json_file)!r}"
                 if isinstance(a, dict) else f"coco: an annotation in {str(json_file)!r}")
        if not isinstance(a, dict) or "bbox" not in a or "category_id" not in a:
            missing = "bbox" if not isinstance(a, dict) or "bbox" not in a else "category_id"
            raise ValueError(f"{where} has no {missing}; each annotation needs bbox [x, y, width, height] and an "
                             "integer category_id")
        box = a["bbox"]
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise ValueError(f"{where} has bbox {box!r}; use four numbers [x, y, width, height]")
        for key, value in (("category_id", a["category_id"]), ("iscrowd", a.get("iscrowd", 0))):
            whole = isinstance(value, (int, float)) and float(value).is_integer()
            if not whole or (isinstance(value, bool) and key == "category_id"):
                raise ValueError(f"{where} has {key} {value!r}; use an integer")
        boxes.append([float(v) for v in box])
        labels.append(int(a["category_id"]))
        crowd.append(int(a.get("iscrowd", 0)))
    box_tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    box_tensor[:, 2:] += box_tensor[:, :2]
    return {"boxes": box_tensor, "labels": torch.tensor(labels, dtype=torch.int64),
            "iscrowd": torch.tensor(crowd, dtype=torch.int64)}


def coco(root: Optional[PathLike], seed: int = 0, limit: Optional[int] = None) -> Splits:
    """A COCO-style detection set, read with ``torchvision.datasets.CocoDetection`` (needs pycocotools).

    Labels are the json's ``category_id`` values (as in torchvision's COCO models); ``num_classes`` is
    the largest id + 1. Boxes are converted from ``[x, y, w, h]`` to ``[x1, y1, x2, y2]``; ``iscrowd`` is
    kept. Without a test annotation file the val images are halved into val and test.
    """
    from PIL import UnidentifiedImageError
    from torchvision.datasets import CocoDetection

    _check_limit(limit)
    path = _root(root, "coco", COCO_LAYOUT)
    try:
        import pycocotools  # noqa: F401 - CocoDetection needs it
    except ImportError:
        raise ValueError("coco needs pycocotools; install it with pip install 'deap_quant[detection]'") from None
    found: dict[str, tuple[Path, Path]] = {}
    for split in ("train", "val", "test"):
        for annotation in sorted((path / "annotations").glob(f"instances_{split}*.json")):
            images = path / annotation.stem[len("instances_"):]
            if not images.is_dir():
                raise _missing("coco", images, COCO_LAYOUT)
            found[split] = (images, annotation)
            break
    for split in ("train", "val"):
        if split not in found:
            raise _missing("coco", path / "annotations" / f"instances_{split}.json", COCO_LAYOUT)
    categories: set[int] = set()
    parts = {}
    for split, (images, annotation) in found.items():
        try:
            categories |= {int(c["id"]) for c in json.loads(annotation.read_text()).get("categories", [])}
            dataset = CocoDetection(str(images), str(annotation))
        except (ValueError, KeyError, TypeError, AttributeError, AssertionError) as error:
            raise ValueError(f"coco: {str(annotation)!r} is not a valid COCO annotation file "
                             f"({type(error).__name__}: {error})") from None
        split_images, split_targets = [], []
        for index in range(len(dataset)):
            try:
                image, annotations = dataset[index]
            except FileNotFoundError as error:
                raise _missing("coco", Path(error.filename or images), COCO_LAYOUT) from None
            except UnidentifiedImageError as error:
                raise ValueError(f"coco: an image under {str(images)!r} is not readable ({error})") from None
            split_images.append(_image_tensor(image))
            split_targets.append(_coco_target(annotations, annotation))
        parts[split] = (split_images, split_targets)
    used = {int(label) for _, targets in parts.values() for t in targets for label in t["labels"]}
    return _detection_splits(parts, max(categories | used | {0}) + 1, "coco", seed, limit)


def _npz_splits(root: Optional[PathLike], seed: int) -> Splits:
    from .npz import npz

    return npz(root, seed)


#: Loaders by name, in the ``DATASETS`` form ``loader(data_root, seed)``.
LOCAL_DATASETS: dict[str, Callable[[Optional[str], int], Splits]] = {
    "npz": _npz_splits,
    "mnist": mnist, "cifar10": cifar10, "imagefolder": imagefolder, "voc": voc, "coco": coco,
}
