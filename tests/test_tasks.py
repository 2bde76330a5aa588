"""Tasks beyond classification: the reconstruction and detection metrics, BatchNorm folding, the digit
canvases, the four vision recipes end to end through evolve, and torchvision models with local weights."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from deap_quant import Evaluator, evolve, quantize
from deap_quant.cli import main
from deap_quant.data import CanvasConfig, digit_canvases, digits
from deap_quant.evaluation.metrics import METRICS, make_metric
from deap_quant.evaluation.tasks import DetectionMAP, ReconstructionError, evaluate_module
from deap_quant.quantization.fold import fold_bn, foldable_pairs
from deap_quant.zoo import RECIPES, load_model
from deap_quant.zoo.vision import (
    DigitsAutoencoder,
    digits_resnet,
    digits_vgg,
    load_weights,
    torchvision_model,
    train_digits_detector,
)
from tests.checks import assert_rescored

TINY = {"mu": 4, "lambda_": 6, "ngen": 2, "progress": False}


# ------------------------------------------------------------------------------------------ detection metric
def box(*xyxy: float) -> list[float]:
    return list(xyxy)


def hand_example() -> tuple[list[dict], list[dict]]:
    """Two images. Class 0: 3 ground-truth boxes, detections TP(.9) FP(.8) TP(.7) TP(.6) at IoU 1.
    Class 1: 1 ground-truth box, one detection at IoU 100/120 = 0.833 (a TP up to threshold 0.80)."""
    targets = [{"boxes": torch.tensor([box(0, 0, 10, 10), box(20, 20, 30, 30)]), "labels": torch.tensor([0, 0])},
               {"boxes": torch.tensor([box(0, 0, 10, 10), box(50, 50, 60, 60)]), "labels": torch.tensor([0, 1])}]
    outputs = [{"boxes": torch.tensor([box(0, 0, 10, 10), box(40, 40, 50, 50), box(20, 20, 30, 30)]),
                "scores": torch.tensor([0.9, 0.8, 0.6]), "labels": torch.tensor([0, 0, 0])},
               {"boxes": torch.tensor([box(0, 0, 10, 10), box(50, 50, 60, 62)]),
                "scores": torch.tensor([0.7, 0.5]), "labels": torch.tensor([0, 1])}]
    return outputs, targets


# COCO's 101-point interpolated AP, by hand. Class 0: precision 1 up to recall 1/3 (recall points 0.00..0.33,
# 34 of them), then 0.75 (the best precision at recall >= 2/3) for the other 67 points.
AP_CLASS0 = (34 * 1.0 + 67 * 0.75) / 101
MAP_50 = (AP_CLASS0 + 1.0) / 2  # class 1 is a TP at IoU 0.5
MAP = (AP_CLASS0 + 7 / 10) / 2  # class 1 is a TP at 7 of the 10 thresholds 0.50..0.95


def pycocotools_reference(outputs: list[dict], targets: list[dict]) -> tuple[float, float]:
    """(mAP@[.5:.95], mAP@.5) straight from pycocotools' COCOeval, the reference implementation."""
    import contextlib
    import io

    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b: torch.Tensor) -> list[float]:
        return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]

    images = [{"id": i, "width": 100, "height": 100} for i in range(len(targets))]
    annotations = [{"id": len(images) * 100 + k * 10 + j, "image_id": k, "category_id": int(label) + 1,
                    "bbox": xywh(b), "area": float((b[2] - b[0]) * (b[3] - b[1])), "iscrowd": 0}
                   for k, t in enumerate(targets) for j, (b, label) in enumerate(zip(t["boxes"], t["labels"]))]
    results = [{"image_id": k, "category_id": int(label) + 1, "bbox": xywh(b), "score": float(s)}
               for k, o in enumerate(outputs) for b, label, s in zip(o["boxes"], o["labels"], o["scores"])]
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = {"images": images, "annotations": annotations,
                         "categories": [{"id": c} for c in sorted({a["category_id"] for a in annotations})]}
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0]), float(evaluation.stats[1])


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_detection_map_matches_the_hand_computed_value_and_pycocotools(backend):
    pytest.importorskip("torchmetrics")  # the detection extra
    pytest.importorskip(backend)
    outputs, targets = hand_example()
    metric = DetectionMAP(backend=backend)
    metric.update(outputs[:1], targets[:1])  # two batches accumulate like one
    metric.update(outputs[1:], targets[1:])
    values = metric.summary()
    assert values["map_50"] == pytest.approx(MAP_50, abs=1e-6)
    assert values["map"] == pytest.approx(MAP, abs=1e-6)
    reference_map, reference_map_50 = pycocotools_reference(outputs, targets)
    assert (values["map"], values["map_50"]) == pytest.approx((reference_map, reference_map_50), abs=1e-6)
    assert metric.fitness() == pytest.approx((MAP_50, MAP), abs=1e-6)
    metric.reset()
    metric.update(outputs, [{**t, "labels": t["labels"] * 0 + 5} for t in targets])  # every label wrong
    assert metric.summary()["map_50"] == pytest.approx(0.0)


def test_detection_map_primary_choice_copy_and_misuse():
    pytest.importorskip("torchmetrics")
    outputs, targets = hand_example()
    metric = make_metric("map")
    assert isinstance(metric, DetectionMAP) and metric.name == "map"
    metric.update(outputs, targets)
    assert metric.fitness() == pytest.approx((MAP, MAP_50), abs=1e-6)
    import copy
    fresh = copy.copy(metric)  # Evaluator.with_data copies metrics: the copy must not share the state
    with pytest.raises(ValueError, match="has seen no images"):
        fresh.summary()
    with pytest.raises(ValueError, match="detection outputs"):
        DetectionMAP().update(torch.zeros(2, 10), targets)
    with pytest.raises(ValueError, match="primary"):
        DetectionMAP(primary="map_75")
    assert {"mse", "map_50", "map"} <= set(METRICS)


# ------------------------------------------------------------------------------------------ reconstruction metric
def test_reconstruction_error_reports_mse_and_psnr_over_all_batches():
    metric = ReconstructionError()
    metric.update(torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.1))  # squared error 0.01 per element
    metric.update(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.4))  # 0.16 per element
    expected = (8 * 0.01 + 4 * 0.16) / 12
    assert metric.summary()["mse"] == pytest.approx(expected)
    assert metric.summary()["psnr"] == pytest.approx(10 * math.log10(1 / expected))
    assert metric.fitness() == pytest.approx((-expected, 0.0))
    with pytest.raises(ValueError, match="same shape"):
        metric.update(torch.zeros(2, 4), torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------ BatchNorm folding
def randomize_batchnorm(model: nn.Module, seed: int = 0, negative: bool = True) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            if module.track_running_stats:
                module.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            gamma = torch.rand(size, generator=generator) + 0.5
            module.weight.data.copy_(gamma * torch.where(torch.rand(size, generator=generator) < 0.3, -1.0, 1.0)
                                     if negative else gamma)
            module.bias.data.copy_(torch.rand(size, generator=generator) - 0.5)
    return model.eval()


@pytest.mark.parametrize("build", [digits_vgg, digits_resnet])
def test_fold_bn_keeps_the_function_and_removes_every_batchnorm(build):
    torch.manual_seed(0)
    model = randomize_batchnorm(build())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_bn(model)
    inputs = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(folded(inputs), model(inputs), atol=1e-5, rtol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    assert len(foldable_pairs(model)) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


class SharedOutput(nn.Module):
    """conv -> bn, but the conv output also feeds a skip: folding would change the skip, so it must not fold."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn2 = nn.BatchNorm2d(3, track_running_stats=False)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y + self.bn2(self.conv2(y))


def test_fold_bn_leaves_unsafe_pairs_alone():
    model = randomize_batchnorm(SharedOutput())
    assert foldable_pairs(model) == []
    folded = fold_bn(model)
    assert isinstance(folded.bn, nn.BatchNorm2d) and isinstance(folded.bn2, nn.BatchNorm2d)


def changed_states(first, second) -> float:
    """The share of weights whose integer grid state differs between two quantizations of one model."""
    changed = sum(int((first.base_states(i) != second.base_states(i)).sum()) for i in range(len(first.layers)))
    return changed / first.n_weights


def test_quantize_with_fold_bn_per_channel_nearly_matches_unfolded_and_per_tensor_differs():
    torch.manual_seed(0)
    model = randomize_batchnorm(digits_resnet(), negative=False)
    plain = quantize(model, bits=4, per_channel=True)
    folded = quantize(model, bits=4, per_channel=True, fold_bn=True)
    assert folded.config["fold_bn"] is True and plain.config["fold_bn"] is False
    assert [layer.name for layer in folded.layers] == [layer.name for layer in plain.layers]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.module.modules())
    # per-channel grids absorb a positive BatchNorm factor: only weights on an exact rounding tie may move
    assert changed_states(plain, folded) < 0.001
    tensor_plain = quantize(model, bits=4, per_channel=False)
    tensor_folded = quantize(model, bits=4, per_channel=False, fold_bn=True)
    assert changed_states(tensor_plain, tensor_folded) > 0.05
    with pytest.raises(ValueError, match="fold_bn"):
        quantize(model, fold_bn="yes")


# ------------------------------------------------------------------------------------------ digit canvases
def test_digit_canvases_are_deterministic_boxed_and_disjoint():
    config = CanvasConfig(n_train=30, n_val=10, n_test=10)
    first, again = digit_canvases(3, config), digit_canvases(3, config)
    assert torch.equal(first.train[0], again.train[0])
    assert first.sizes() == {"train": 30, "val": 10, "test": 10} and first.num_classes == 10
    images, targets = first.val
    assert images.shape == (10, 1, 64, 64) and 0 <= float(images.min()) and float(images.max()) <= 1
    for image, target in zip(images, targets):
        assert 1 <= len(target["labels"]) <= 4 and target["boxes"].shape == (len(target["labels"]), 4)
        for (x1, y1, x2, y2) in target["boxes"].long().tolist():
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            assert float(image[0, y1:y2, x1:x2].max()) > 0.25  # ink inside the box
    source = digits(3)  # val canvases use val digits only: every pasted patch comes from the val images
    assert set(source.val[1].tolist()) >= set(torch.cat([t["labels"] for t in targets]).tolist())
    with pytest.raises(ValueError, match="min_scale"):
        CanvasConfig(min_scale=40, max_scale=30)


# ------------------------------------------------------------------------------------------ recipes end to end
@pytest.fixture(scope="session")
def vision_zoo():
    """The three quick vision recipes, trained once per session (~30 s on 2 cores)."""
    return {name: load_model(name, verbose=False) for name in ("digits-vgg", "digits-resnet", "digits-autoencoder")}


@pytest.mark.parametrize("name,bits", [("digits-vgg", 3), ("digits-resnet", 3)])
def test_classifier_recipes_evolve_end_to_end(vision_zoo, name, bits):
    zoo = vision_zoo[name]
    assert zoo.float_scores["test"] > 0.95 and zoo.recipe.metric_name == "accuracy"
    qmodel = quantize(zoo.model, bits=bits, scale_method="mse")
    result = evolve(qmodel, zoo.data.val, zoo.data.test, metric=zoo.recipe.new_metric(), float_model=zoo.model,
                    seed=1, **TINY)
    assert result.metric == "accuracy" and result.float_scores["test"] == pytest.approx(zoo.float_scores["test"])
    assert result.evaluations == 4 + 2 * 6
    assert_rescored(result, qmodel, zoo.data.val, zoo.data.test, zoo.recipe.new_metric())


def test_autoencoder_recipe_evolves_with_mse(vision_zoo, tmp_path):
    zoo = vision_zoo["digits-autoencoder"]
    assert zoo.float_scores["val"] < 0.02
    inputs, targets = zoo.data.val
    assert torch.equal(inputs, targets)  # an autoencoder's target is its input
    qmodel = quantize(zoo.model, bits=3, scale_method="mse")
    assert "decoder.deconv" in [layer.name for layer in qmodel.layers]  # ConvTranspose2d is quantized too
    result = evolve(qmodel, zoo.data.val, zoo.data.test, metric=zoo.recipe.new_metric(), float_model=zoo.model,
                    seed=0, **TINY)
    assert result.metric == "mse"
    assert_rescored(result, qmodel, zoo.data.val, zoo.data.test, zoo.recipe.new_metric())
    assert result.baseline["val"] > result.float_scores["val"]  # 3 bits hurt the reconstruction
    assert result.best["val_scores"]["psnr"] == pytest.approx(10 * math.log10(1 / result.best["val"]))
    out = tmp_path / "run"
    assert main(["run", "--model", "digits-autoencoder", "--bits", "3", "--mu", "2", "--lambda", "2", "--ngen", "1",
                 "--no-progress", "--out", str(out)]) == 0
    content = json.loads((out / "results.json").read_text())
    assert content["metric"] == "mse" and content["float"]["val"] == pytest.approx(zoo.float_scores["val"])


def test_detector_recipe_evolves_with_map(monkeypatch):
    """The real digits-detector recipe (FCOS, canvases, mAP) with fewer canvases and two epochs, for speed."""
    import dataclasses

    from deap_quant.zoo import recipes

    pytest.importorskip("torchmetrics")

    recipe = RECIPES["digits-detector"]
    quick = dataclasses.replace(recipe, name="digits-detector-quick",
                                data=lambda seed: digit_canvases(seed, CanvasConfig(n_train=96, n_val=24, n_test=24)),
                                train=lambda model, splits, seed: train_digits_detector(model, splits, seed, epochs=2))
    monkeypatch.setitem(recipes.RECIPES, quick.name, quick)
    zoo = load_model(quick.name, verbose=False)
    assert type(zoo.model).__name__ == "FCOS" and zoo.recipe.metric_name == "map_50"
    assert 0.0 <= zoo.float_scores["val"] <= 1.0
    qmodel = quantize(zoo.model, bits=4, scale_method="mse")
    names = [layer.name for layer in qmodel.layers]
    assert "head.classification_head.cls_logits" in names and any(n.startswith("backbone.") for n in names)
    result = evolve(qmodel, zoo.data.val, zoo.data.test, metric=zoo.recipe.new_metric(), float_model=zoo.model,
                    seed=0, mu=2, lambda_=2, ngen=1, progress=False)
    assert result.metric == "map_50"
    assert_rescored(result, qmodel, zoo.data.val, zoo.data.test, zoo.recipe.new_metric())
    assert {"map_50", "map", "map_75"} <= set(result.best["test_scores"])
    assert result.float_scores["val"] == pytest.approx(zoo.float_scores["val"], abs=1e-6)
    again = load_model(quick.name, verbose=False)  # cached: same weights, no retraining
    assert again.from_cache and all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(),
                                                                       zoo.model.state_dict().values()))


# ------------------------------------------------------------------------------------------ users' torchvision models
def test_torchvision_resnet18_through_the_python_api():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()  # random weights: nothing is downloaded
    generator = torch.Generator().manual_seed(0)
    data = (torch.rand(12, 3, 32, 32, generator=generator), torch.randint(0, 4, (12,), generator=generator))
    qmodel = quantize(model, bits=4, scale_method="minmax", fold_bn=True)
    assert len(qmodel.layers) == 21  # 20 convs + fc
    evaluator = Evaluator(qmodel, data, metric="loss")
    result = evolve(qmodel, data, data, evaluator=evaluator, mu=2, lambda_=2, ngen=1, progress=False)
    assert result.best["val"] <= result.baseline["val"]  # loss: lower is better


def test_torchvision_weights_file_loads_with_its_class_count(tmp_path):
    import torchvision

    torch.manual_seed(0)
    saved = torchvision.models.squeezenet1_1(num_classes=7)
    path = tmp_path / "squeeze.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in saved.state_dict().items()}}, path)  # wrapped, DDP-style
    loaded = torchvision_model("squeezenet1_1", path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), saved.state_dict().values()))
    with pytest.raises(ValueError, match="do not fit"):
        load_weights(DigitsAutoencoder(), path)
    with pytest.raises(ValueError, match="no model"):
        torchvision_model("resnet9000", path)


def test_cli_runs_a_torchvision_detector_on_local_voc_data(tmp_path, capsys):
    import torchvision

    pytest.importorskip("torchmetrics")
    from tests.test_local_data import write_voc

    objects = {f"i{k}": [("cat" if k % 2 else "dog", 0, 5 + k, 6, 30 + k, 40)] for k in range(4)}
    write_voc(tmp_path / "voc", {"train": ["i0", "i1"], "val": ["i2", "i3"]}, objects,
              {name: (48, 48) for name in objects})
    torch.manual_seed(0)
    model = torchvision.models.get_model("ssdlite320_mobilenet_v3_large", weights=None, weights_backbone=None,
                                         num_classes=21)  # VOC's 20 classes and the background
    torch.save(model.state_dict(), tmp_path / "ssd.pt")
    out = tmp_path / "run"
    code = main(["run", "--model", "torchvision:ssdlite320_mobilenet_v3_large", "--weights", str(tmp_path / "ssd.pt"),
                 "--dataset", "voc", "--data-root", str(tmp_path / "voc"), "--bits", "4", "--scale-method", "minmax",
                 "--layers", "head.*", "--mu", "2", "--lambda", "2", "--ngen", "1", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    content = json.loads((out / "results.json").read_text())
    assert content["metric"] == "map_50" and "map" in content["best"]["test_scores"]
    assert main(["run", "--model", "torchvision:resnet18", "--dataset", "voc", "--out", str(out)]) == 2
    assert "needs --weights" in capsys.readouterr().err


def test_evaluate_module_scores_any_float_module():
    source = digits(0)
    model = nn.Sequential(OrderedDict([("flatten", nn.Flatten()), ("fc", nn.Linear(64, 10))]))
    scores = evaluate_module(model, source.val, "accuracy")
    assert 0.0 <= scores["accuracy"] <= 1.0 and scores["loss"] > 0
    assert np.isfinite(evaluate_module(DigitsAutoencoder(), (source.val[0], source.val[0]), ReconstructionError())["psnr"])
