"""Real data and pretrained models: the npz loader, CIFAR-10/MNIST from npz or torchvision folders, the
CIFAR ResNet family, the cifar10-resnetN and mnist-cnn recipes, and the float-model loader below the CLI.

Tests that need the shared real data (``../shared/data``) skip, saying so, only when it is absent; they use
small subsets of it written to ``tmp_path``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deap_quant.cli import main
from deap_quant.data import (
    DatasetNotFound,
    cifar10,
    cifar10_arrays,
    load_dataset,
    mnist,
    mnist_arrays,
    npz,
    read_npz,
)
from deap_quant.data.npz import images_to_tensor
from deap_quant.zoo import RECIPES, ModelSpecError, load_float_model, load_model
from deap_quant.zoo.cifar_resnet import CifarResNet, cifar_resnet, depth_of_state_dict, load_cifar_resnet
from deap_quant.zoo.real import carve
from tests.test_local_data import write_cifar10, write_mnist

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESNET20 = SHARED / "models" / "cifar10-resnet20.th"
needs_shared = pytest.mark.skipif(not (SHARED / "cifar10" / "test.npz").is_file() or not RESNET20.is_file()
                                  or not (SHARED / "mnist" / "mnist.npz").is_file(),
                                  reason=f"the shared real data ({SHARED}) is absent")


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def images(n: int, shape=(32, 32, 3), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def labels(n: int, classes: int = 10) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % classes


# ------------------------------------------------------------------------------------------ npz loader
def test_images_to_tensor_reads_nhwc_nchw_nhw_and_float():
    x = images(4, (5, 6, 3))
    expected = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(images_to_tensor(x), expected)
    assert torch.equal(images_to_tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), expected)
    gray = images(4, (7, 7))
    assert torch.equal(images_to_tensor(gray), torch.from_numpy(gray)[:, None].float() / 255)
    floats = np.random.default_rng(1).standard_normal((3, 1, 4, 4)).astype(np.float64)
    assert torch.equal(images_to_tensor(floats), torch.from_numpy(floats).float())  # floats are kept as they are
    with pytest.raises(ValueError, match="dtype int32"):
        images_to_tensor(np.zeros((2, 4, 4, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="ambiguous"):
        images_to_tensor(np.zeros((2, 3, 8, 1), dtype=np.uint8))


def test_npz_single_file_is_split_stratified_into_train_val_test(tmp_path):
    x, y = images(100), labels(100)
    path = save_npz(tmp_path / "data.npz", x=x, y=y)
    splits = npz(path, seed=0)
    assert splits.sizes() == {"train": 72, "val": 8, "test": 20} and splits.num_classes == 10
    assert sorted(splits.test[1].tolist()) == sorted(list(range(10)) * 2)  # stratified
    found = [bytes(image) for t in (splits.train[0], splits.val[0], splits.test[0])
             for image in (t * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()]
    assert sorted(found) == sorted(bytes(image) for image in x)  # the three splits partition the file's images
    assert load_dataset("npz", str(path)).sizes() == splits.sizes()


def test_npz_keras_style_file_and_folder_layouts(tmp_path):
    x_train, x_test = images(50, seed=1), images(20, seed=2)
    keras = save_npz(tmp_path / "keras" / "mnist.npz", x_train=x_train, y_train=labels(50), x_test=x_test,
                     y_test=labels(20))
    from_file = npz(keras)
    assert from_file.sizes() == {"train": 45, "val": 5, "test": 20}
    assert torch.equal(from_file.test[0], torch.from_numpy(x_test).permute(0, 3, 1, 2).float() / 255)
    assert npz(keras.parent).sizes() == from_file.sizes()  # a folder with one .npz is that file
    folder = tmp_path / "folder"
    save_npz(folder / "train-50.npz", x=x_train, y=labels(50))
    save_npz(folder / "test.npz", x=x_test, y=labels(20))
    found = read_npz(folder)
    assert set(found.parts) == {"train", "test"} and [p.name for p in found.files] == ["train-50.npz", "test.npz"]
    assert npz(folder).sizes() == from_file.sizes()


@pytest.mark.parametrize("arrays, message", [
    ({"x": images(4)}, r"lacks array y"),
    ({"x_train": images(4), "y_train": labels(4), "x_test": images(2)}, r"lacks array y_test"),
    ({"x": images(4), "y": labels(3)}, r"array y has shape \(3,\); use one label per image \(4\)"),
    ({"x": images(4), "y": np.zeros(4, dtype=np.float32)}, r"array y has dtype float32; use integer labels"),
    ({"x": images(4).astype(np.int16), "y": labels(4)}, r"array x has dtype int16"),
])
def test_npz_malformed_file_names_the_file_and_the_expected_arrays(tmp_path, arrays, message):
    path = save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message) as caught:
        npz(path)
    text = str(caught.value)
    assert "\n" not in text and str(path) in text and "Expected a .npz file with arrays x" in text


def test_npz_missing_or_unreadable_file_is_one_line(tmp_path):
    with pytest.raises(DatasetNotFound, match=r"nothing is downloaded\. Expected a \.npz file with arrays x"):
        npz(tmp_path / "absent.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=r"broken\.npz' is not a readable \.npz file"):
        npz(tmp_path / "broken.npz")
    (tmp_path / "two").mkdir()
    save_npz(tmp_path / "two" / "a.npz", x=images(2), y=labels(2))
    save_npz(tmp_path / "two" / "b.npz", x=images(2), y=labels(2))
    with pytest.raises(DatasetNotFound, match=r"holds 2 \.npz files but no train\*\.npz"):
        npz(tmp_path / "two")


def test_cli_runs_a_saved_model_on_an_npz_file(tmp_path, capsys):
    from tests.conftest import make_tiny_model

    torch.save(make_tiny_model(), tmp_path / "model.pt")
    rng = np.random.default_rng(0)
    save_npz(tmp_path / "data.npz", x=rng.random((60, 8, 8, 1), dtype=np.float32), y=labels(60, classes=4))
    out = tmp_path / "run"
    run_cli(capsys, "run", "--model", str(tmp_path / "model.pt"), "--dataset", "npz", "--data-root",
            str(tmp_path / "data.npz"), "--bits", "2", "--mu", "2", "--lambda", "2", "--ngen", "1", "--no-progress",
            "--out", str(out))
    assert json.loads((out / "results.json").read_text())["config"]["run"]["dataset"] == "npz"
    assert main(["run", "--model", str(tmp_path / "model.pt"), "--dataset", "npz", "--data-root",
                 str(tmp_path / "absent.npz"), "--out", str(tmp_path / "other")]) == 2
    assert "does not exist or is not a folder (or .npz file)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ CIFAR-10 / MNIST
def test_cifar10_reads_the_same_images_from_batches_and_from_npz(tmp_path):
    batches = write_cifar10(tmp_path / "folder", per_batch=4, n_test=6)
    train_rows = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    to_nhwc = lambda rows: rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # noqa: E731
    save_npz(tmp_path / "npz" / "train.npz", x=to_nhwc(train_rows),
             y=np.array(sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])))
    save_npz(tmp_path / "npz" / "test.npz", x=to_nhwc(batches["test_batch"][0]), y=np.array(batches["test_batch"][1]))
    from_folder, from_npz = cifar10_arrays(tmp_path / "folder"), cifar10_arrays(tmp_path / "npz")
    for a, b in zip(from_folder, from_npz):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert from_folder[0][0].shape == (20, 3, 32, 32)
    assert cifar10(tmp_path / "npz").sizes() == cifar10(tmp_path / "folder").sizes()
    save_npz(tmp_path / "small" / "train.npz", x=images(4, (28, 28, 3)), y=labels(4))
    save_npz(tmp_path / "small" / "test.npz", x=images(4, (28, 28, 3)), y=labels(4))
    with pytest.raises(ValueError, match=r"cifar10: the (test|train) images in .* have shape \(3, 28, 28\) per image; "
                                         r"cifar10 has \(3, 32, 32\)"):
        cifar10_arrays(tmp_path / "small")
    with pytest.raises(DatasetNotFound, match=r"data_batch_1.*or \.npz files"):
        cifar10_arrays(tmp_path / "small" / "..")


def test_mnist_reads_the_same_images_from_raw_and_from_npz(tmp_path):
    data = write_mnist(tmp_path / "raw", n_train=30, n_test=10)
    save_npz(tmp_path / "npz" / "mnist.npz", x_train=data["train"][0], y_train=data["train"][1],
             x_test=data["t10k"][0], y_test=data["t10k"][1])
    for a, b in zip(mnist_arrays(tmp_path / "raw"), mnist_arrays(tmp_path / "npz" / "mnist.npz")):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert mnist(tmp_path / "npz").sizes() == {"train": 27, "val": 3, "test": 10}
    save_npz(tmp_path / "only" / "mnist.npz", x=data["train"][0], y=data["train"][1])
    with pytest.raises(ValueError, match=r"holds the splits \['all'\]; mnist needs exactly train and test"):
        mnist_arrays(tmp_path / "only")


def test_carve_gives_disjoint_stratified_subsets_of_the_exact_sizes():
    y = torch.arange(1000) % 10
    (a, b), rest = carve(y, (100, 250), seed=3)
    assert len(a) == 100 and len(b) == 250 and len(rest) == 650
    assert not set(a) & set(b) and sorted([*a, *b, *rest]) == list(range(1000))
    assert torch.bincount(y[torch.from_numpy(a)]).tolist() == [10] * 10
    assert torch.bincount(y[torch.from_numpy(b)]).tolist() == [25] * 10
    (again, _), _ = carve(y, (100, 250), seed=3)
    assert np.array_equal(a, again)
    with pytest.raises(ModelSpecError, match="do not fit in the 1000 training images"):
        carve(y, (600, 500), seed=0)


# ------------------------------------------------------------------------------------------ CIFAR ResNets
def reference_keys(depth: int) -> list[str]:
    """The state-dict keys the shared README documents for the pretrained CIFAR ResNets."""
    bn = ["weight", "bias", "running_mean", "running_var"]
    keys = ["conv1.weight"] + [f"bn1.{k}" for k in bn]
    for stage in (1, 2, 3):
        for block in range((depth - 2) // 6):
            prefix = f"layer{stage}.{block}"
            keys += [f"{prefix}.conv1.weight"] + [f"{prefix}.bn1.{k}" for k in bn]
            keys += [f"{prefix}.conv2.weight"] + [f"{prefix}.bn2.{k}" for k in bn]
    return keys + ["linear.weight", "linear.bias"]


@pytest.mark.parametrize("depth, weights", [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018)])
def test_cifar_resnet_family_has_the_checkpoint_key_layout(depth, weights):
    model = cifar_resnet(depth)
    keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    assert keys == reference_keys(depth)
    assert sum(p.numel() for p in model.parameters()) == weights  # the published 0.27M/0.46M/0.66M/0.85M
    assert depth_of_state_dict(model.state_dict()) == depth
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    torch.fx.symbolic_trace(model)  # the staged (incremental) evaluator traces it


def test_cifar_resnet_option_a_shortcut_subsamples_and_zero_pads():
    block = cifar_resnet(20).layer2[0]
    x = torch.randn(1, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (1, 32, 4, 4) and not list(block.shortcut.parameters())
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2]) and not out[:, :8].any() and not out[:, 24:].any()


def test_cifar_resnet_loading_takes_module_prefix_and_refuses_a_wrong_depth(tmp_path):
    torch.manual_seed(0)
    source = cifar_resnet(32)
    state = {f"module.{k}": v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state, "best_prec1": 92.6}, tmp_path / "r32.th")
    loaded = load_cifar_resnet(tmp_path / "r32.th")  # depth from the file; no num_batches_tracked needed
    assert loaded.depth == 32
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items()
               if not k.endswith("num_batches_tracked"))
    with pytest.raises(ValueError, match=r"holds a CIFAR ResNet-32 \(5 blocks per stage\), not the ResNet-20"):
        load_cifar_resnet(tmp_path / "r32.th", depth=20)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a CIFAR ResNet checkpoint"):
        load_cifar_resnet(tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"depth=21 is not a CIFAR ResNet depth; use 6n\+2"):
        CifarResNet(21)


@needs_shared
def test_pretrained_resnet20_scores_above_88_percent_on_the_first_1000_test_images():
    model = load_cifar_resnet(RESNET20, depth=20)
    with np.load(SHARED / "cifar10" / "test.npz") as data:
        x, y = images_to_tensor(data["x"][:1000]), torch.from_numpy(data["y"][:1000])
    with torch.inference_mode():
        correct = sum(int((model(x[i:i + 250]).argmax(1) == y[i:i + 250]).sum()) for i in range(0, 1000, 250))
    assert correct / 1000 > 0.88


# ------------------------------------------------------------------------------------------ recipes
@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """600 training and 300 official test images of CIFAR-10 as train.npz + test.npz."""
    if not (SHARED / "cifar10" / "test.npz").is_file():
        pytest.skip(f"the shared real data ({SHARED}) is absent")
    root = tmp_path_factory.mktemp("cifar10")
    with np.load(SHARED / "cifar10" / "train-10k.npz") as data:
        save_npz(root / "train.npz", x=data["x"][:600], y=data["y"][:600])
    with np.load(SHARED / "cifar10" / "test.npz") as data:
        save_npz(root / "test.npz", x=data["x"][:300], y=data["y"][:300])
    return root


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    """800 MNIST training and 300 test images in one mnist.npz."""
    if not (SHARED / "mnist" / "mnist.npz").is_file():
        pytest.skip(f"the shared real data ({SHARED}) is absent")
    root = tmp_path_factory.mktemp("mnist")
    with np.load(SHARED / "mnist" / "mnist.npz") as data:
        save_npz(root / "mnist.npz", x_train=data["x_train"][:800], y_train=data["y_train"][:800],
                 x_test=data["x_test"][:300], y_test=data["y_test"][:300])
    return root


def test_recipe_requests_that_cannot_be_met_say_which_flag_in_one_line(tmp_path):
    cases = [
        (dict(model="cifar10-resnet20", data_root=str(tmp_path)), r"needs pretrained weights: pass weights=PATH "
                                                                  r"\(--weights PATH\)"),
        (dict(model="cifar10-resnet20", weights=str(tmp_path / "none.th"), data_root=str(tmp_path)),
         r"--weights '.*none\.th' does not exist"),
        (dict(model="mnist-cnn"), r"reads its data from local files: pass data_root \(--data-root PATH\)"),
        (dict(model="mnist-cnn", data_root=str(tmp_path), options={"calibration_size": 8}),
         r"option calibration_size \(--calibration-size\) does not apply to recipe mnist-cnn; its options: "
         r"val_size \(--val-size\)"),
        (dict(model="digits-cnn", data_root=str(tmp_path)), r"brings its own data; drop data_root"),
        (dict(model="mnist-cnn", dataset="mnist"), r"--dataset mnist cannot be combined with zoo model mnist-cnn"),
        (dict(model="torchvision:resnet18", options={"val_size": 10}), r"--val-size set a zoo recipe's options"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ModelSpecError, match=message) as caught:
            load_float_model(**kwargs)
        assert "\n" not in str(caught.value)


@needs_shared
def test_cifar10_resnet20_recipe_follows_the_protocol_and_caches_its_float_scores(cifar_root, tmp_path):
    zoo = load_model("cifar10-resnet20", weights=RESNET20, data_root=cifar_root, options={"val_size": 100,
                     "calibration_size": 64}, cache=str(tmp_path), verbose=False)
    assert zoo.data.sizes() == {"train": 64, "val": 100, "test": 300} and not zoo.from_cache
    with np.load(cifar_root / "train.npz") as data:
        train = images_to_tensor(data["x"])
    with np.load(cifar_root / "test.npz") as data:
        assert torch.equal(zoo.data.test[0], images_to_tensor(data["x"]))  # the official test images, in order
    index = {bytes(image.numpy().tobytes()): i for i, image in enumerate(train)}
    val = {index[bytes(image.numpy().tobytes())] for image in zoo.data.val[0]}
    calibration = {index[bytes(image.numpy().tobytes())] for image in zoo.data.train[0]}
    assert len(val) == 100 and len(calibration) == 64 and not val & calibration  # disjoint training images
    with np.load(cifar_root / "train.npz") as data:
        shares = np.bincount(data["y"], minlength=10) / len(data["y"])
    assert np.abs(np.bincount(zoo.data.val[1].numpy(), minlength=10) - 100 * shares).max() < 1  # stratified
    assert zoo.float_scores["test"] > 0.85
    again = load_model("cifar10-resnet20", weights=RESNET20, data_root=cifar_root, options={"val_size": 100,
                       "calibration_size": 64}, cache=str(tmp_path), verbose=False)
    assert again.from_cache and again.float_scores == zoo.float_scores
    other = load_model("cifar10-resnet20", weights=RESNET20, data_root=cifar_root, options={"val_size": 120,
                       "calibration_size": 64}, cache=str(tmp_path), verbose=False)
    assert not other.from_cache and len(other.data.val[1]) == 120
    with pytest.raises(ModelSpecError, match=r"holds a CIFAR ResNet-20 .* not the ResNet-32 asked for"):
        load_model("cifar10-resnet32", weights=RESNET20, data_root=cifar_root, verbose=False)
    with pytest.raises(ModelSpecError, match=r"sizes 1000 \+ 2048 = 3048 do not fit in the 600 training images"):
        load_model("cifar10-resnet20", weights=RESNET20, data_root=cifar_root, verbose=False)


@needs_shared
def test_cifar10_validation_from_test_images_leaves_test_disjoint_and_calibration_unchanged(cifar_root, tmp_path,
                                                                                            capsys):
    options = {"val_size": 100, "calibration_size": 64}
    seen = load_model("cifar10-resnet20", weights=RESNET20, data_root=cifar_root, options=options,
                      cache=str(tmp_path), verbose=False)
    unseen = load_model("cifar10-resnet20", weights=RESNET20, data_root=cifar_root,
                        options={**options, "val_from": "test"}, cache=str(tmp_path), verbose=False)
    assert unseen.data.sizes() == {"train": 64, "val": 100, "test": 200} and not unseen.from_cache
    assert torch.equal(unseen.data.train[0], seen.data.train[0])  # the same calibration images
    with np.load(cifar_root / "test.npz") as data:
        official = images_to_tensor(data["x"])
    index = {bytes(image.numpy().tobytes()): i for i, image in enumerate(official)}
    val = {index[bytes(image.numpy().tobytes())] for image in unseen.data.val[0]}
    test = {index[bytes(image.numpy().tobytes())] for image in unseen.data.test[0]}
    assert len(val) == 100 and len(test) == 200 and not val & test and val | test == set(range(300))
    assert unseen.float_scores["val"] < seen.float_scores["val"]  # unseen images, not memorised ones
    with pytest.raises(ModelSpecError, match=r"val_from='valid' is not valid; use one of train, test"):
        load_model("cifar10-resnet20", weights=RESNET20, data_root=cifar_root,
                   options={**options, "val_from": "valid"}, verbose=False)
    with pytest.raises(ModelSpecError, match=r"val_size=300 leaves no test image of the 300"):
        load_model("cifar10-resnet20", weights=RESNET20, data_root=cifar_root,
                   options={"val_size": 300, "calibration_size": 64, "val_from": "test"}, verbose=False)
    out = tmp_path / "run"
    run_cli(capsys, "run", "--model", "cifar10-resnet20", "--weights", str(RESNET20), "--data-root", str(cifar_root),
            "--val-size", "100", "--calibration-size", "64", "--val-from", "test", "--bits", "3", "--threads", "1",
            "--mu", "2", "--lambda", "4", "--ngen", "1", "--no-progress", "--out", str(out))
    result = json.loads((out / "results.json").read_text())
    assert result["config"]["run"]["val_from"] == "test" and result["float"]["val"] == unseen.float_scores["val"]


def run_cli(capsys, *argv: str) -> str:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@needs_shared
def test_cifar10_resnet20_runs_exports_and_compares_end_to_end(cifar_root, tmp_path, capsys):
    model = ["--model", "cifar10-resnet20", "--weights", str(RESNET20), "--data-root", str(cifar_root),
             "--val-size", "100", "--calibration-size", "64", "--bits", "3", "--threads", "1"]
    out = tmp_path / "run"
    text = run_cli(capsys, "run", *model, "--mu", "2", "--lambda", "4", "--ngen", "1", "--no-progress",
                   "--out", str(out))
    result = json.loads((out / "results.json").read_text())
    assert result["config"]["model"] == "cifar10-resnet20" and result["config"]["run"]["val_size"] == 100
    assert result["float"]["test"] > 0.85 and "float" in text
    exported = run_cli(capsys, "export", str(out))  # reloads the float model from the run's saved settings
    assert "checked exactly" in exported
    compared = run_cli(capsys, "compare", *model[:-2], "--seeds", "1", "--only", "nearest-mse,teacher-kl-from-nearest",
                       "--ngen", "1", "--no-progress", "--threads", "1", "--out", str(tmp_path / "compare"))
    assert "teacher-kl-from-nearest" in compared


@needs_shared
def test_cifar10_resnet20_w4a8_run_exports_to_onnx_within_one_sample(cifar_root, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "w4a8"
    run_cli(capsys, "run", "--model", "cifar10-resnet20", "--weights", str(RESNET20), "--data-root", str(cifar_root),
            "--val-size", "100", "--calibration-size", "64", "--bits", "4", "--act-bits", "8", "--threads", "1",
            "--mu", "2", "--lambda", "4", "--ngen", "1", "--no-progress", "--out", str(out))
    result = json.loads((out / "results.json").read_text())
    assert result["config"]["quantization"]["act_bits"] == 8 and result["best"]["test"] > 0.85
    exported = run_cli(capsys, "export", str(out), "--format", "onnx")
    assert (out / "model.onnx").is_file() and "onnxruntime: accuracy test" in exported
    difference = int(exported.split("difference ")[1].split(" samples")[0])
    assert abs(difference) <= 1


@needs_shared
def test_mnist_cnn_trains_caches_and_runs_with_checkpoints_and_processes(mnist_root, tmp_path, capsys):
    zoo = load_model("mnist-cnn", data_root=mnist_root, options={"val_size": 200}, verbose=False)
    assert zoo.data.sizes() == {"train": 600, "val": 200, "test": 300} and not zoo.from_cache
    assert zoo.float_scores["test"] > 0.5  # 600 images, a few epochs: well above chance
    assert load_model("mnist-cnn", data_root=mnist_root, options={"val_size": 200}, verbose=False).from_cache
    common = ["--model", "mnist-cnn", "--data-root", str(mnist_root), "--val-size", "200", "--bits", "2",
              "--mu", "2", "--lambda", "4", "--no-progress", "--threads", "1"]
    out = tmp_path / "run"
    run_cli(capsys, "run", *common, "--ngen", "1", "--checkpoint-every", "1", "--out", str(out))
    run_cli(capsys, "run", "--resume", str(out), "--ngen", "2")
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["config"]["ngen"] == 2 and resumed["config"]["run"]["data_root"] == str(mnist_root)
    assert "checked exactly" in run_cli(capsys, "export", str(out))
    serial, parallel = tmp_path / "serial", tmp_path / "processes"
    run_cli(capsys, "run", *common, "--ngen", "2", "--out", str(serial))
    run_cli(capsys, "run", *common, "--ngen", "2", "--backend", "processes", "--workers", "2", "--out", str(parallel))
    best = [json.loads((folder / "results.json").read_text())["best"] for folder in (serial, parallel)]
    assert best[0]["genes"] == best[1]["genes"] and best[0]["test"] == best[1]["test"]


def test_recipes_are_registered_with_their_options():
    assert RECIPES["cifar10-resnet20"].pretrained and RECIPES["cifar10-resnet20"].defaults == {
        "val_size": 1000, "calibration_size": 2048, "val_from": "train"}
    assert not RECIPES["mnist-cnn"].pretrained and RECIPES["mnist-cnn"].defaults == {"val_size": 5000}
    assert {f"cifar10-resnet{d}" for d in (20, 32, 44, 56)} <= set(RECIPES)


def test_export_reloads_a_run_without_importing_the_command_line(digits_zoo, tmp_path, capsys):
    """The library sits below its front end: exporting a run folder uses deap_quant.zoo.loading, not the CLI."""
    run_cli(capsys, "run", "--model", "digits-cnn", "--ngen", "0", "--mu", "2", "--lambda", "2", "--no-progress",
            "--out", str(tmp_path / "run"))
    code = ("import sys; from deap_quant.export import export; export(sys.argv[1], sys.argv[2]); "
            "sys.exit(3 if 'deap_quant.cli' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run"), str(tmp_path / "model.pt")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "model.pt").is_file()
