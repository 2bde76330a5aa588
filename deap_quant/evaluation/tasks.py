"""Metrics of the non-classification tasks: reconstruction (autoencoders) and object detection.

Both follow :class:`~deap_quant.evaluation.metrics.Metric`: :meth:`fitness` is higher-is-better,
:meth:`summary` keeps natural units. Detection mAP is computed by torchmetrics'
``MeanAveragePrecision`` (COCO protocol via pycocotools or faster-coco-eval), not by our own code.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from .metrics import METRICS, Metric, MetricSpec, make_metric

__all__ = ["ReconstructionError", "DetectionMAP", "evaluate_module", "detection_backend", "DETECTION_KEYS"]

#: Summary keys of :class:`DetectionMAP` (COCO names: ``map`` is mAP@[.5:.95]).
DETECTION_KEYS = ("map_50", "map", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")


class ReconstructionError(Metric):
    """Mean squared error between outputs and targets over all elements; PSNR reported from it.

    ``summary()`` is ``{"mse": ..., "psnr": ...}`` (PSNR in dB for signals with peak value
    ``peak``); the fitness is ``(-mse, 0.0)`` so that higher is better.
    """

    name = "mse"

    def __init__(self, peak: float = 1.0):
        if not isinstance(peak, (int, float)) or isinstance(peak, bool) or not peak > 0:
            raise ValueError(f"peak={peak!r} is not valid; use a positive number (1.0 for images in [0, 1])")
        self.peak = float(peak)
        self.reset()

    def reset(self) -> None:
        self.squared_sum = 0.0
        self.count = 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        if not isinstance(outputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise ValueError(f"mse needs tensor outputs and targets, got {type(outputs).__name__} and "
                             f"{type(targets).__name__}")
        if outputs.shape != targets.shape:
            raise ValueError(f"mse needs outputs and targets of the same shape, got {tuple(outputs.shape)} "
                             f"and {tuple(targets.shape)}; for an autoencoder the targets are the inputs")
        self.squared_sum += float((outputs.double() - targets.double()).pow(2).sum())
        self.count += outputs.numel()

    def summary(self) -> dict[str, float]:
        mse = self.squared_sum / max(self.count, 1)
        psnr = 10.0 * math.log10(self.peak ** 2 / mse) if mse > 0 else math.inf
        return {"mse": mse, "psnr": psnr}

    def fitness(self) -> tuple[float, float]:
        return -self.summary()["mse"], 0.0


def detection_backend(preferred: Optional[str] = None) -> str:
    """The COCO evaluation backend: ``preferred`` if given, else the first installed of faster-coco-eval
    (same numbers as pycocotools, about 4x faster on small sets) and pycocotools."""
    backends = ("faster_coco_eval", "pycocotools")
    if preferred is not None:
        if preferred not in backends:
            raise ValueError(f"backend={preferred!r} is not valid; use one of {', '.join(backends)}")
        candidates: Sequence[str] = (preferred,)
    else:
        candidates = backends
    for backend in candidates:
        if importlib.util.find_spec(backend) is not None:
            return backend
    raise ImportError(f"detection mAP needs {' or '.join(candidates)}; install the extra: "
                      "pip install 'deap_quant[detection]'")


class DetectionMAP(Metric):
    """COCO-style box mAP of torchvision-format detections, via torchmetrics ``MeanAveragePrecision``.

    Outputs are a list of ``{"boxes" [n, 4] xyxy, "scores" [n], "labels" [n]}`` (what torchvision
    detection models return in eval mode), targets a list of ``{"boxes", "labels"}`` (optionally
    ``"iscrowd"``). ``primary`` picks the fitness: ``"map_50"`` (mAP at IoU 0.5, default) or ``"map"``
    (mAP averaged over IoU 0.5:0.95); the other one breaks ties. :meth:`summary` reports both and
    the rest of :data:`DETECTION_KEYS`.
    """

    def __init__(self, primary: str = "map_50", backend: Optional[str] = None):
        if primary not in ("map_50", "map"):
            raise ValueError(f"primary={primary!r} is not valid; use 'map_50' or 'map'")
        self.primary = primary
        self.name = primary
        self.backend = detection_backend(backend)
        self._map: Any = None
        self.reset()

    def _new(self) -> Any:
        from torchmetrics.detection import MeanAveragePrecision

        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend=self.backend)
        metric.warn_on_many_detections = False  # COCO counts the best 100 per image; that is the protocol
        return metric

    def reset(self) -> None:
        if self._map is not None:
            self._map.reset()
        self._result: Optional[dict[str, float]] = None
        self.count = 0

    def update(self, outputs: Any, targets: Any) -> None:
        if not isinstance(outputs, (list, tuple)) or not all(isinstance(o, dict) for o in outputs):
            raise ValueError(f"{self.name} needs detection outputs (a list of dicts with boxes, scores, labels), "
                             f"got {type(outputs).__name__}; is the model a detector in eval mode?")
        if not isinstance(targets, (list, tuple)) or len(targets) != len(outputs):
            raise ValueError(f"{self.name} needs one target dict per image: got {len(outputs)} outputs and "
                             f"{len(targets) if hasattr(targets, '__len__') else type(targets).__name__} targets")
        preds = [{key: output[key].detach() for key in ("boxes", "scores", "labels")} for output in outputs]
        truth = [{key: value.detach() for key, value in target.items()
                  if key in ("boxes", "labels", "iscrowd", "area")} for target in targets]
        if self._map is None:  # torchmetrics is imported on first use only (it takes seconds)
            self._map = self._new()
        self._map.update(preds, truth)
        self._result = None
        self.count += len(outputs)

    def summary(self) -> dict[str, float]:
        if self._result is None:
            if self._map is None or self.count == 0:
                raise ValueError(f"{self.name} has seen no images; call update() before summary()")
            with torch.inference_mode():
                values = self._map.compute()
            self._result = {key: float(values[key]) for key in DETECTION_KEYS if key in values}
            self._result = {self.primary: self._result[self.primary],
                            **{k: v for k, v in self._result.items() if k != self.primary}}
        return dict(self._result)

    def fitness(self) -> tuple[float, float]:
        values = self.summary()
        return values[self.primary], values["map" if self.primary == "map_50" else "map_50"]

    def __copy__(self) -> DetectionMAP:  # never share the accumulating torchmetrics object
        return DetectionMAP(self.primary, self.backend)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_map"] = None  # rebuilt empty in the worker
        state["_result"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.reset()


def evaluate_module(module: nn.Module, data: Any, metric: MetricSpec, batch_size: int = 512) -> dict[str, float]:
    """Summary of ``metric`` for any float ``module`` on data (a pair, a DataLoader or a Dataset)."""
    from .evaluator import eval_mode, materialize, model_placement, place

    metric = make_metric(metric)
    metric.reset()
    device, dtype = model_placement(module)
    with torch.inference_mode(), eval_mode(module):
        for inputs, targets in materialize(data, batch_size):
            metric.update(module(place(inputs, device, dtype)), place(targets, device))
    return metric.summary()


METRICS.setdefault("mse", ReconstructionError)
METRICS.setdefault("map_50", DetectionMAP)
METRICS.setdefault("map", lambda: DetectionMAP(primary="map"))
