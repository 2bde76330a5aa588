"""Local data loaders: tiny files written in each format (MNIST IDX, CIFAR-10 pickles, ImageFolder PNGs,
VOC XML + JPEG, COCO json + images) are read back through torchvision's dataset classes."""

from __future__ import annotations

import json
import pickle
import re
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from deap_quant.data import (
    DATASETS,
    DatasetNotFound,
    cifar10,
    cifar10_arrays,
    coco,
    imagefolder,
    load_dataset,
    mnist,
    mnist_arrays,
    voc,
)


# ------------------------------------------------------------------------------------------ writers
def write_idx(path, array: np.ndarray) -> None:
    magic = 0x0800 | array.ndim  # 0x08 = unsigned byte
    path.write_bytes(struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape)
                     + array.astype(np.uint8).tobytes())


def write_mnist(root, n_train: int = 40, n_test: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        data[prefix] = (images, labels)
    return data


def write_cifar10(root, per_batch: int = 6, n_test: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=n)]
        labels[:10] = list(range(min(n, 10)))
        with open(folder / name, "wb") as stream:
            pickle.dump({"data": rows, "labels": labels}, stream)
        batches[name] = (rows, labels)
    with open(folder / "batches.meta", "wb") as stream:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, stream)
    return batches


def write_png(path, value: int, size=(6, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


VOC_XML = """<annotation><filename>{name}.jpg</filename><size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>"""
VOC_OBJECT = ("<object><name>{cls}</name><difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
              "<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")


def write_voc(root, splits: dict[str, list[str]], objects: dict[str, list[tuple]], sizes: dict[str, tuple[int, int]]):
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for split, names in splits.items():
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
    for name, boxes in objects.items():
        w, h = sizes[name]
        Image.fromarray(np.full((h, w, 3), 128, dtype=np.uint8)).save(base / "JPEGImages" / f"{name}.jpg")
        xml = VOC_XML.format(name=name, w=w, h=h, objects="".join(
            VOC_OBJECT.format(cls=c, difficult=d, x1=a, y1=b, x2=x, y2=y) for c, d, a, b, x, y in boxes))
        (base / "Annotations" / f"{name}.xml").write_text(xml)
    return base


def write_coco(root, split: str, images: list[tuple[int, str, int, int]], annotations: list[dict],
               categories=({"id": 1, "name": "cat"}, {"id": 3, "name": "dog"})):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    for _, file_name, w, h in images:
        Image.fromarray(np.full((h, w, 3), 200, dtype=np.uint8)).save(folder / file_name)
    content = {"images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
               "annotations": annotations, "categories": list(categories)}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))


# ------------------------------------------------------------------------------------------ MNIST
def test_mnist_reads_idx_files_and_carves_a_stratified_val_split(tmp_path):
    data = write_mnist(tmp_path)
    splits = mnist(tmp_path, seed=0, val_fraction=0.25)
    assert splits.sizes() == {"train": 30, "val": 10, "test": 10}
    assert splits.num_classes == 10 and splits.name == "mnist"
    images, labels = splits.test
    assert images.shape == (10, 1, 28, 28) and images.dtype == torch.float32
    assert torch.equal(images, torch.from_numpy(data["t10k"][0]).float()[:, None] / 255)
    assert labels.tolist() == data["t10k"][1].tolist()
    assert sorted(splits.val[1].tolist()) == list(range(10))  # one of each class: stratified
    train_rows = {bytes((x * 255).round().to(torch.uint8).numpy()) for x in torch.cat([splits.train[0], splits.val[0]])}
    assert train_rows == {bytes(image[None]) for image in data["train"][0]}  # train and val partition train


def test_mnist_accepts_the_mnist_folder_itself_and_limit(tmp_path):
    write_mnist(tmp_path)
    splits = mnist(tmp_path / "MNIST", limit=5)
    assert splits.sizes() == {"train": 5, "val": 4, "test": 5}


def test_mnist_missing_file_names_the_path_and_layout(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFound, match="t10k-labels-idx1-ubyte.*nothing is downloaded.*Expected layout"):
        mnist(tmp_path)
    with pytest.raises(DatasetNotFound, match="needs a data folder"):
        load_dataset("mnist", None)


# ------------------------------------------------------------------------------------------ CIFAR-10
def test_cifar10_reads_pickled_batches_channels_first(tmp_path):
    batches = write_cifar10(tmp_path)
    splits = cifar10(tmp_path, val_fraction=0.2)
    assert splits.sizes() == {"train": 24, "val": 6, "test": 8}
    images, labels = splits.test
    rows, expected = batches["test_batch"]
    assert images.shape == (8, 3, 32, 32)
    assert labels.tolist() == expected
    # a CIFAR row is 1024 red, 1024 green, 1024 blue values, row-major
    assert torch.equal(images[3, 1], torch.from_numpy(rows[3, 1024:2048].reshape(32, 32)).float() / 255)


def test_cifar10_missing_batch_and_damaged_batch(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not valid CIFAR-10"):
        cifar10(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFound, match="data_batch_3"):
        cifar10(tmp_path)


def test_cifar10_batch_that_is_not_a_dict_is_one_line_naming_the_folder(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as stream:
        pickle.dump([1, 2, 3], stream)  # unpickles fine, but to a list (torchvision indexes it by "data")
    with pytest.raises(ValueError, match=r"cifar-10-batches-py' are not valid CIFAR-10 python pickles \(TypeError"):
        cifar10(tmp_path)


# ------------------------------------------------------------------------------------------ npz for mnist/cifar10
def save_npz(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def _uint8(n, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


@pytest.mark.parametrize("dataset", ["cifar10", "mnist"])
def test_npz_float_images_outside_0_1_are_refused_for_mnist_and_cifar10(tmp_path, dataset):
    shape, reader = ((32, 32, 3), cifar10_arrays) if dataset == "cifar10" else ((28, 28), mnist_arrays)
    y = np.arange(20) % 10
    x_train, x_test = _uint8(20, shape, seed=1), _uint8(20, shape, seed=2)
    # floats still on the 0..255 scale, in one Keras-style file: the test array is named
    raw = save_npz(tmp_path / "raw" / "data.npz", x_train=x_train.astype(np.float32) / 255, y_train=y,
                   x_test=x_test.astype(np.float32), y_test=y)
    with pytest.raises(ValueError) as caught:
        reader(raw)
    text = str(caught.value)
    assert "\n" not in text and text.startswith(f"{dataset}: ")
    assert f"array x_test in {str(raw)!r}" in text and f"to {float(x_test.max())}" in text
    assert "uint8 (0..255) or floats in [0, 1]" in text
    # mean/std-normalised floats (negative values) in a train/test folder: the train file is named
    folder = tmp_path / "normalised"
    save_npz(folder / "train.npz", x=(x_train.astype(np.float64) / 255 - 0.5) / 0.25, y=y)
    save_npz(folder / "test.npz", x=x_test.astype(np.float64) / 255, y=y)
    with pytest.raises(ValueError, match=rf"^{dataset}: the train images \(array x in {re.escape(repr(str(folder / 'train.npz')))}\) "
                                         r"range from -2\.0 to"):
        reader(folder)
    # floats in [0, 1] and uint8 read as before, and the same images
    scaled = save_npz(tmp_path / "scaled" / "data.npz", x_train=x_train.astype(np.float32) / 255, y_train=y,
                      x_test=x_test.astype(np.float32) / 255, y_test=y)
    whole = save_npz(tmp_path / "uint8" / "data.npz", x_train=x_train, y_train=y, x_test=x_test, y_test=y)
    for a, b in zip(reader(scaled), reader(whole)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the generic npz loader documents "floats kept": 0..255 floats still load there
    assert float(load_dataset("npz", str(raw)).test[0].max()) == float(x_test.max())


# ------------------------------------------------------------------------------------------ ImageFolder
def test_imagefolder_flat_layout_splits_every_class(tmp_path):
    for c, name in enumerate(["ant", "bee", "cow"]):
        for i in range(5):
            write_png(tmp_path / name / f"{i}.png", value=40 * c + i)
    splits = imagefolder(tmp_path, seed=1)
    assert splits.num_classes == 3 and sum(splits.sizes().values()) == 15
    for images, labels in (splits.train, splits.val, splits.test):
        assert images.shape[1:] == (3, 6, 6)
        assert torch.equal((images[:, 0, 0, 0] * 255).round().long() // 40, labels)  # the pixel encodes the class
    assert set(splits.test[1].tolist()) == {0, 1, 2}


def test_imagefolder_split_folders_map_classes_by_name(tmp_path):
    for split, classes in (("train", ["ant", "bee"]), ("val", ["bee"]), ("test", ["ant", "bee"])):
        for c in classes:
            for i in range(3):
                write_png(tmp_path / split / c / f"{i}.png", value=100 if c == "bee" else 10)
    splits = imagefolder(tmp_path, grayscale=True)
    assert splits.sizes() == {"train": 6, "val": 3, "test": 6}
    assert splits.val[1].tolist() == [1, 1, 1]  # "bee" is class 1 of train, though val has no "ant"
    assert splits.val[0].shape == (3, 1, 6, 6)
    write_png(tmp_path / "test" / "cow" / "0.png", value=0)
    with pytest.raises(ValueError, match="cow"):
        imagefolder(tmp_path)


def test_imagefolder_sizes_must_agree_unless_resized(tmp_path):
    for c in ("a", "b"):
        for i in range(5):
            write_png(tmp_path / c / f"{i}.png", value=i, size=(6, 6) if i else (9, 7))
    with pytest.raises(ValueError, match="image_size"):
        imagefolder(tmp_path)
    assert imagefolder(tmp_path, image_size=8).train[0].shape[1:] == (3, 8, 8)


# ------------------------------------------------------------------------------------------ VOC
def voc_tree(tmp_path, with_test=False):
    objects = {"a": [("dog", 0, 11, 21, 40, 50)], "b": [("cat", 0, 1, 1, 10, 10), ("person", 1, 5, 5, 20, 30)],
               "c": [("dog", 0, 3, 4, 30, 30)], "d": [], "e": [("cat", 0, 2, 2, 12, 12)]}
    sizes = {"a": (64, 48), "b": (64, 48), "c": (50, 40), "d": (64, 48), "e": (64, 48)}
    splits = {"train": ["a", "b"], "val": ["c", "d", "e"]}
    if with_test:
        splits["test"] = ["e"]
    return write_voc(tmp_path, splits, objects, sizes)


def test_voc_reads_xml_boxes_labels_and_difficult(tmp_path):
    voc_tree(tmp_path)
    splits = voc(tmp_path)
    assert splits.num_classes == 21 and splits.name == "voc2012"
    images, targets = splits.train
    assert isinstance(images, torch.Tensor) and images.shape == (2, 3, 48, 64)  # same size: stacked
    assert targets[0]["boxes"].tolist() == [[10.0, 20.0, 40.0, 50.0]]  # 1-based VOC pixels -> 0-based corners
    assert targets[0]["labels"].tolist() == [12]  # "dog" is VOC class 12 (1-based)
    assert targets[1]["labels"].tolist() == [8, 15] and targets[1]["iscrowd"].tolist() == [0, 1]
    val_and_test = splits.val[1] + splits.test[1]
    assert len(splits.val[1]) == 1 and len(splits.test[1]) == 2  # no test list: val is halved
    assert sorted(len(t["labels"]) for t in val_and_test) == [0, 1, 1]


def test_voc_accepts_inner_folders_and_custom_classes(tmp_path):
    base = voc_tree(tmp_path)
    by_devkit = voc(tmp_path / "VOCdevkit")
    by_year = voc(base, classes=["cat", "dog", "person"])
    assert by_devkit.train[1][0]["labels"].tolist() == [12]
    assert by_year.num_classes == 4 and by_year.train[1][0]["labels"].tolist() == [2]
    with pytest.raises(ValueError, match="not in classes"):
        voc(base, classes=["cat"])


def test_voc_images_of_different_sizes_stay_a_list(tmp_path):
    voc_tree(tmp_path)
    splits = voc(tmp_path, seed=3)
    mixed = splits.val[0] if len(splits.val[1]) > 1 else splits.test[0]
    if isinstance(mixed, list):
        assert {tuple(image.shape) for image in mixed} == {(3, 40, 50), (3, 48, 64)}
    else:  # the seed put the 50x40 image on its own side
        assert mixed.shape[0] == 2


def test_voc_missing_pieces_are_named(tmp_path):
    with pytest.raises(DatasetNotFound, match="VOCdevkit.*Expected layout"):
        voc(tmp_path)
    base = voc_tree(tmp_path)
    (base / "ImageSets" / "Main" / "val.txt").unlink()
    with pytest.raises(DatasetNotFound, match="val.txt"):
        voc(tmp_path)


def test_voc_malformed_annotation_files_are_one_line_naming_the_file(tmp_path):
    base = voc_tree(tmp_path)
    xml = base / "Annotations" / "a.xml"
    for content, problem in (("<annotation><object>", "is not valid XML"),
                             ("<annotation><object><name>dog</name></object></annotation>", "bndbox"),
                             ("<annotation><object><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax>"
                              "</bndbox></object></annotation>", "name"),
                             ("<annotation><object><name>dog</name><bndbox><xmin>left</xmin><ymin>1</ymin><xmax>5"
                              "</xmax><ymax>5</ymax></bndbox></object></annotation>", "xmin")):
        xml.write_text(content)
        with pytest.raises(ValueError) as caught:
            voc(tmp_path)
        text = str(caught.value)
        assert text.startswith("voc: ") and str(xml) in text and problem in text and "\n" not in text, text


def test_voc_image_set_lists_ignore_blank_lines(tmp_path):
    base = voc_tree(tmp_path)
    (base / "ImageSets" / "Main" / "train.txt").write_text("a\n\n  \nb\n\n")
    (base / "ImageSets" / "Main" / "val.txt").write_text("\nc\nd\n\ne\n")
    splits = voc(tmp_path)
    assert splits.sizes() == {"train": 2, "val": 1, "test": 2}
    assert splits.train[1][0]["boxes"].tolist() == [[10.0, 20.0, 40.0, 50.0]]  # still image "a" first


# ------------------------------------------------------------------------------------------ COCO
def test_coco_reads_annotations_json_and_images(tmp_path):
    pytest.importorskip("pycocotools")
    write_coco(tmp_path, "train", [(1, "1.jpg", 40, 30), (2, "2.jpg", 40, 30)],
               [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 6, 10, 12], "area": 120, "iscrowd": 0},
                {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 1}])
    write_coco(tmp_path, "val", [(7, "7.jpg", 20, 20), (8, "8.jpg", 24, 20), (9, "9.jpg", 20, 20)],
               [{"id": 3, "image_id": 8, "category_id": 1, "bbox": [1, 2, 3, 4], "area": 12, "iscrowd": 0}])
    splits = coco(tmp_path)
    assert splits.num_classes == 4  # ids 1 and 3: labels are category ids, 0 free for background
    images, targets = splits.train
    assert images.shape == (2, 3, 30, 40)
    assert targets[0]["boxes"].tolist() == [[5.0, 6.0, 15.0, 18.0], [0.0, 0.0, 4.0, 4.0]]  # xywh -> xyxy
    assert targets[0]["labels"].tolist() == [3, 1] and targets[0]["iscrowd"].tolist() == [0, 1]
    assert targets[1]["boxes"].shape == (0, 4)
    assert len(splits.val[1]) + len(splits.test[1]) == 3


def test_coco_missing_annotations_or_images(tmp_path):
    pytest.importorskip("pycocotools")
    write_coco(tmp_path, "train", [(1, "1.jpg", 8, 8)], [])
    with pytest.raises(DatasetNotFound, match="instances_val.json"):
        coco(tmp_path)
    write_coco(tmp_path, "val", [(2, "2.jpg", 8, 8), (3, "3.jpg", 8, 8)], [])
    (tmp_path / "val" / "3.jpg").unlink()
    with pytest.raises(DatasetNotFound, match="3.jpg"):
        coco(tmp_path)


def test_coco_malformed_annotations_are_one_line_naming_the_file(tmp_path):
    pytest.importorskip("pycocotools")
    write_coco(tmp_path, "val", [(2, "2.jpg", 8, 8), (3, "3.jpg", 8, 8)], [])
    json_file = tmp_path / "annotations" / "instances_train.json"
    for annotation, problem in (({"id": 5, "image_id": 1, "category_id": 3, "area": 1, "iscrowd": 0}, "has no bbox"),
                                ({"id": 5, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3]}, "has bbox [1, 2, 3]"),
                                ({"id": 5, "image_id": 1, "category_id": "dog", "bbox": [1, 2, 3, 4]},
                                 "has category_id 'dog'"),
                                ({"id": 5, "image_id": 1, "bbox": [1, 2, 3, 4]}, "KeyError: 'category_id'")):
        write_coco(tmp_path, "train", [(1, "1.jpg", 8, 8)], [annotation])
        with pytest.raises(ValueError) as caught:
            coco(tmp_path)
        text = str(caught.value)
        assert text.startswith("coco: ") and str(json_file) in text and problem in text and "\n" not in text, text
    json_file.write_text("[]")  # valid JSON, but not a COCO object
    with pytest.raises(ValueError, match=r"instances_train\.json' is not a valid COCO annotation file"):
        coco(tmp_path)


def test_every_loader_is_registered():
    assert {"digits", "digit-canvases", "mnist", "cifar10", "imagefolder", "voc", "coco"} <= set(DATASETS)
    with pytest.raises(ValueError, match="not valid; use one of"):
        load_dataset("imagenet", "/nowhere")


def test_cli_runs_a_saved_model_on_local_cifar10(tmp_path):
    from collections import OrderedDict

    from deap_quant.cli import main

    write_cifar10(tmp_path / "data")
    torch.manual_seed(0)
    model = torch.nn.Sequential(OrderedDict([("conv", torch.nn.Conv2d(3, 4, 3, stride=4)), ("flatten", torch.nn.Flatten()),
                                             ("fc", torch.nn.Linear(4 * 8 * 8, 10))]))
    torch.save(model, tmp_path / "model.pt")
    out = tmp_path / "run"
    assert main(["run", "--model", str(tmp_path / "model.pt"), "--dataset", "cifar10", "--data-root",
                 str(tmp_path / "data"), "--mu", "2", "--lambda", "2", "--ngen", "1", "--no-progress",
                 "--out", str(out)]) == 0
    content = json.loads((out / "results.json").read_text())
    assert content["metric"] == "accuracy" and 0.0 <= content["best"]["test"] <= 1.0
    assert main(["run", "--model", str(tmp_path / "model.pt"), "--dataset", "cifar10", "--data-root",
                 str(tmp_path / "nowhere"), "--out", str(out)]) == 2
