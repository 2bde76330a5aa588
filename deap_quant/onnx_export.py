"""ONNX export of a quantized model as a QDQ graph, and scoring it in onnxruntime.

:func:`to_onnx` writes the quantized model with the evolved genes applied as a standard QDQ
ONNX model that runs in onnxruntime or any QDQ-aware runtime:

* **weights**: every quantized layer's weight is an integer initializer holding its grid states,
  fed to a ``DequantizeLinear`` with the grid's scale and zero point (``axis`` set to the channel
  axis for per-channel grids: 0 for Conv/Linear, 1 for ConvTranspose; scalars for per-tensor
  ones). Where every state of the grid minus its zero point fits in int8 (``-128 .. 127``: any
  grid of up to 7 bits, and 8-bit symmetric grids of range ``"full"`` or ``"narrow"``) the
  initializer is **int8** holding ``state - zero_point`` with a zero point of 0; otherwise it is
  **uint8** holding the states with the grid's zero points. uint8 is what asymmetric 8-bit grids
  get, and also the library's default 8-bit grid (symmetric, ``range="auto"``) in every layer
  where some channel puts its extra level above zero (zero point 127, so ``state - zero_point``
  reaches 128): on digits-cnn, 4 of its 5 layers. Either way ``DequantizeLinear`` gives
  ``(state - zero_point) * scale``, the grid's own float32 arithmetic, bit for bit.
* **activations**: where ``qmodel.act_quantizers[i]`` is set, the input of that layer's node (and
  only that node's, even where the tensor also feeds other nodes) goes through
  ``QuantizeLinear`` (uint8, the calibrated scale and zero point) -> ``DequantizeLinear``. For
  fewer than 8 bits a ``Clip`` to ``0 .. 2**bits - 1`` (on the uint8 values) sits between them, so
  the graph holds exactly the restricted integer range the search used:
  ``clamp(round(x / scale) + zero_point, 0, 2**bits - 1)``, rounding half to even as deap_quant
  does. Without activation quantization the graph is weight-only QDQ.
* everything else (biases, BatchNorm, pooling, the rest of the network) stays float32, as
  deap_quant runs it.

**onnxruntime's optimization levels.** With graph optimizations disabled (``"disabled"``,
``ORT_DISABLE_ALL``) onnxruntime computes the graph as written, which is deap_quant's arithmetic up
to float summation order; the export's check (:func:`export_checked`) and :func:`onnx_scores` run
at that level by default. onnxruntime's default level (``"all"``, ``ORT_ENABLE_ALL``) is not the
same model where activations are quantized and a Conv or Gemm with a float bias has its output
quantized by the next layer's ``QuantizeLinear`` alone (directly or through ReLU and max pooling;
a Conv with its own bias, or one that took a BatchNorm with ``fold_bn``): from the basic level up,
onnxruntime's ``BiasQuantization`` rewrite rounds that bias to int32 on the
``input_scale * weight_scale`` grid (moving each output by up to half that step), and from the
extended level up it fuses the pattern into ``QLinearConv`` / ``QGemm``. The rounded bias alone
accounts for the difference: the basic level, which rounds the bias but fuses nothing, already
gives the default level's activation codes, and with the bias put on that grid beforehand the
fused ``QLinearConv`` gives deap_quant's codes exactly (onnxruntime 1.32). Outputs near an
activation rounding boundary move one code, and with 4-bit activations that flips predictions
(W4A4 test split: digits-resnet with ``fold_bn``, 7 of 360; digits-cnn, 1 of 360 with logits up
to 2.4 apart). So the export is accepted on the disabled level, and the default level is scored
beside it and reported, never refused on. Where nothing matches the pattern (digits-resnet or
ResNet-20 without ``fold_bn``: every convolution feeds a BatchNorm) all levels agree.

The float graph comes from PyTorch's TorchScript ONNX exporter (``dynamo=False``; the dynamo
exporter needs onnxscript), and the QDQ nodes are then put in with the ``onnx`` package. The
file's ``metadata_props`` hold a ``deap_quant`` JSON entry (layers, encodings, activation bits,
and the onnxruntime score check when there was one; :func:`read_onnx_metadata`).

k-means (codebook) grids are not affine, so they cannot be expressed as QDQ: they are refused
(the ``pt`` format keeps them). Needs the optional ``onnx`` extra (``onnx``, ``onnxruntime``).
This module imports torch and onnx only.
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from .export import ExportError, _submodule
from .quantization.grids import CodebookGrid, UniformGrid
from .quantization.model import QuantizedModel, as_gene_array

__all__ = ["to_onnx", "onnx_bytes", "onnx_scores", "OnnxScores", "export_checked", "read_onnx_metadata",
           "sample_difference", "DEFAULT_OPSET", "MAX_SAMPLE_DIFFERENCE", "METADATA_KEY", "OPTIMIZATION_LEVELS",
           "CHECK_OPTIMIZATION", "DEFAULT_OPTIMIZATION"]

#: ONNX opset written by default (per-channel ``DequantizeLinear`` needs 13 or later).
DEFAULT_OPSET = 17
#: The most samples by which the onnxruntime test score may differ from the run's reported one.
MAX_SAMPLE_DIFFERENCE = 1
#: Key of the JSON entry in the model's ``metadata_props``.
METADATA_KEY = "deap_quant"
#: onnxruntime graph optimization levels by name (``"all"``, ``ORT_ENABLE_ALL``, is onnxruntime's default).
OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")
#: Level of the reproduction check: no graph rewrites, onnxruntime computes the graph as written.
CHECK_OPTIMIZATION = "disabled"
#: onnxruntime's default level, what a deployment gets unless it sets one; scored and reported, never refused on.
DEFAULT_OPTIMIZATION = "all"

PathLike = Union[str, "os.PathLike[str]"]
#: Ops through which a quantized weight may reach its layer's node (e.g. Linear on >2-D inputs: Transpose -> MatMul).
_PASS_THROUGH = ("Transpose", "Identity", "Reshape", "Cast", "Unsqueeze", "Squeeze", "Flatten")
_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _require(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ExportError(f"ONNX export needs the {name} package, which is not installed; "
                          'pip install "deap_quant[onnx]"') from None


# ---------------------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class _WeightEncoding:
    values: np.ndarray  # int8 or uint8, shaped like the weight
    scale: np.ndarray  # float32, [channels] or a scalar
    zero_point: np.ndarray  # same dtype as values, [channels] or a scalar
    axis: Optional[int]  # None: per tensor


def _encode_weight(name: str, grid: UniformGrid, states: torch.Tensor) -> _WeightEncoding:
    """The integers, scale and zero point whose ``DequantizeLinear`` is exactly ``grid.dequantize(states)``."""
    layout = grid.layout
    shape = layout.broadcast_shape()
    zero = grid.zero_point.detach().to("cpu", torch.float64)
    if not torch.equal(zero, zero.round()):
        raise ExportError(f"layer {name}: its grid's zero points are not integers; it cannot be written as QDQ")
    zero = zero.to(torch.int64)
    states = states.reshape(layout.shape).to(torch.int64)
    if int(zero.max()) <= 128 and grid.n_levels - 1 - int(zero.min()) <= 127:  # state - zero_point fits in int8
        values = (states - zero.view(shape)).to(torch.int8)
        zero_out = torch.zeros_like(zero).to(torch.int8)
    else:
        values = states.to(torch.uint8)
        zero_out = zero.to(torch.uint8)
    scale = grid.scale.detach().to("cpu", torch.float32)
    # what DequantizeLinear computes: float(int32(x) - int32(zero_point)) * scale
    check = (values.to(torch.int32) - zero_out.to(torch.int32).view(shape)).to(torch.float32) * scale.view(shape)
    if not torch.equal(check, grid.dequantize(states).to("cpu", torch.float32)):
        raise ExportError(f"layer {name}: its grid values do not map back to its integer states exactly")
    per_channel = layout.axis >= 0
    return _WeightEncoding(values=values.numpy(), scale=scale.numpy() if per_channel else scale.numpy().reshape(()),
                           zero_point=zero_out.numpy() if per_channel else zero_out.numpy().reshape(()),
                           axis=layout.axis if per_channel else None)


def _float_graph(module: nn.Module, sample: torch.Tensor, opset: int) -> bytes:
    """The float module as ONNX bytes, every parameter an initializer under its state_dict name."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer warnings
        warnings.simplefilter("ignore")
        # keep_initializers_as_inputs=True: no de-duplication of equal initializers, so every
        # quantized weight keeps its own name (the inputs are removed again afterwards)
        torch.onnx.export(module, (sample,), buffer, dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          keep_initializers_as_inputs=True, do_constant_folding=False)
    return buffer.getvalue()


def _layer_nodes(graph: Any, weight: str) -> list[tuple[Any, int]]:
    """The nodes computing with ``weight`` (Conv, Gemm, ...) and the index of their data input."""
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    found, frontier = [], [weight]
    while frontier:
        tensor = frontier.pop()
        for node, index in consumers.get(tensor, []):
            if node.op_type in _LAYER_OPS and (node.op_type.startswith("Conv") and index == 1 or
                                               node.op_type in ("Gemm", "MatMul") and index in (0, 1)):
                found.append((node, 0 if node.op_type.startswith("Conv") else 1 - index))
            elif node.op_type in _PASS_THROUGH and index == 0:
                frontier.extend(node.output)
            else:
                raise ExportError(f"weight {weight} feeds a {node.op_type} node ({node.name}); activation QDQ "
                                  f"is placed on the data input of {', '.join(_LAYER_OPS)} nodes only")
    if not found:
        raise ExportError(f"weight {weight} feeds no {', '.join(_LAYER_OPS)} node in the exported graph")
    return found


def _metadata(qmodel: QuantizedModel, genes: list, encodings: list[_WeightEncoding]) -> dict[str, Any]:
    from . import __version__
    quantizers = qmodel.act_quantizers
    return {
        "deap_quant": __version__, "torch": torch.__version__, "genes": len(genes),
        "quantization": json.loads(json.dumps(dict(qmodel.config), default=str)),
        "layers": [{"name": info.name, "kind": info.kind, "weight": str(encoding.values.dtype),
                    "axis": encoding.axis, "act_bits": None if quantizer is None else quantizer.bits}
                   for info, encoding, quantizer in zip(qmodel.layers, encodings, quantizers)],
    }


def onnx_bytes(qmodel: QuantizedModel, genes: Sequence[Sequence[int]], sample_input: torch.Tensor, *,
               opset: int = DEFAULT_OPSET, metadata: Optional[dict[str, Any]] = None) -> bytes:
    """The QDQ ONNX model of ``qmodel`` with ``genes`` applied, as bytes (see :func:`to_onnx`)."""
    onnx = _require("onnx")
    from onnx import helper, numpy_helper

    if not isinstance(qmodel, QuantizedModel):
        raise ExportError(f"to_onnx needs a QuantizedModel, got {type(qmodel).__name__}")
    for info, grid in zip(qmodel.layers, qmodel.grids):
        if isinstance(grid, CodebookGrid) or not isinstance(grid, UniformGrid):
            raise ExportError(f"layer {info.name} has a k-means codebook grid, which cannot be expressed as QDQ "
                              "(ONNX quantization is affine); export it with --format pt, which keeps codebooks")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 13:
        raise ExportError(f"opset={opset!r} is not valid; per-channel QDQ needs an integer opset of 13 or later")
    if not isinstance(sample_input, torch.Tensor) or not sample_input.is_floating_point() or sample_input.ndim < 1:
        raise ExportError("sample_input must be a float tensor of inputs with a batch dimension (a few samples)")
    gene_rows = as_gene_array(genes, len(qmodel.layers), [layer.numel for layer in qmodel.layers]).tolist()
    states = qmodel.states_with(gene_rows)
    names = [info.name for info in qmodel.layers]
    encodings = [_encode_weight(name, grid, state) for name, grid, state in zip(names, qmodel.grids, states)]

    with qmodel.applied(gene_rows):
        module = copy.deepcopy(qmodel.module)
    if any(tensor.device.type != "cpu" for tensor in module.state_dict().values()):
        module = module.to("cpu")
    module.eval()
    if any(q is not None for q in qmodel.act_quantizers):
        from .quantization.activations import remove_input_quantizers
        remove_input_quantizers(module)  # put back below as QDQ nodes
    for name in names:
        weight = _submodule(module, name).weight
        if weight.dtype != torch.float32:
            raise ExportError(f"layer {name} holds {str(weight.dtype).replace('torch.', '')} weights; ONNX QDQ "
                              "export writes float32 graphs (convert the model with .float() before quantizing)")
    sample = sample_input[:2].detach().to("cpu", torch.float32)
    try:
        proto = onnx.load_from_string(_float_graph(module, sample, opset))
    except ExportError:
        raise
    except Exception as error:  # the exporter's own errors: one line
        raise ExportError(f"torch.onnx.export could not export the model ({type(error).__name__}: "
                          f"{' '.join(str(error).split())[:300]})") from None
    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    del graph.input[:]
    graph.input.extend(inputs)

    first: list[Any] = []  # weight DequantizeLinear nodes, placed before everything
    before: dict[str, list[Any]] = {}  # node name -> activation QDQ nodes placed just before it
    seen: set[str] = set()
    for number, node in enumerate(graph.node):  # unique node names: they key the insertion points below
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{number}"
        seen.add(node.name)
    quantizers = qmodel.act_quantizers
    for name, info, encoding, quantizer in zip(names, qmodel.layers, encodings, quantizers):
        weight = f"{name}.weight" if name else "weight"
        if weight not in initializers:
            raise ExportError(f"layer {name}'s weight is not an initializer of the exported graph; the model "
                              "computes with its weight in a way the QDQ export does not follow")
        stored = initializers[weight]
        if tuple(stored.dims) != tuple(info.shape):
            raise ExportError(f"layer {name}'s weight has shape {tuple(stored.dims)} in the exported graph, "
                              f"not {tuple(info.shape)}")
        graph.initializer.remove(stored)
        graph.initializer.extend([numpy_helper.from_array(encoding.values, f"{weight}_quantized"),
                                  numpy_helper.from_array(encoding.scale, f"{weight}_scale"),
                                  numpy_helper.from_array(encoding.zero_point, f"{weight}_zero_point")])
        attributes = {} if encoding.axis is None else {"axis": encoding.axis}
        first.append(helper.make_node("DequantizeLinear", [f"{weight}_quantized", f"{weight}_scale",
                                                           f"{weight}_zero_point"], [weight],
                                      name=f"{weight}_DequantizeLinear", **attributes))
        if quantizer is None:
            continue
        prefix = f"{name}.input" if name else "input_q"
        graph.initializer.extend([
            numpy_helper.from_array(np.array(quantizer.scale, dtype=np.float32), f"{prefix}_scale"),
            numpy_helper.from_array(np.array(quantizer.zero_point, dtype=np.uint8), f"{prefix}_zero_point")])
        if quantizer.bits < 8:
            graph.initializer.extend([
                numpy_helper.from_array(np.array(0, dtype=np.uint8), f"{prefix}_min"),
                numpy_helper.from_array(np.array(2 ** quantizer.bits - 1, dtype=np.uint8), f"{prefix}_max")])
        for number, (node, index) in enumerate(_layer_nodes(graph, weight)):
            tag = f"{prefix}{'' if number == 0 else f'_{number}'}"
            quantized = f"{tag}_quantized"
            nodes = [helper.make_node("QuantizeLinear", [node.input[index], f"{prefix}_scale",
                                                         f"{prefix}_zero_point"], [quantized],
                                      name=f"{tag}_QuantizeLinear")]
            if quantizer.bits < 8:
                nodes.append(helper.make_node("Clip", [quantized, f"{prefix}_min", f"{prefix}_max"],
                                              [f"{tag}_clipped"], name=f"{tag}_Clip"))
                quantized = f"{tag}_clipped"
            nodes.append(helper.make_node("DequantizeLinear", [quantized, f"{prefix}_scale", f"{prefix}_zero_point"],
                                          [f"{tag}_dequantized"], name=f"{tag}_DequantizeLinear"))
            node.input[index] = f"{tag}_dequantized"
            before.setdefault(node.name, []).extend(nodes)
    ordered = list(first)
    for node in graph.node:
        ordered.extend(before.get(node.name, []))
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)

    entry = _metadata(qmodel, gene_rows, encodings)
    entry.update(metadata or {})
    helper.set_model_props(proto, {METADATA_KEY: json.dumps(entry, default=str)})
    proto.producer_name = "deap_quant"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as error:
        raise ExportError(f"the QDQ graph did not pass onnx.checker ({type(error).__name__}: "
                          f"{' '.join(str(error).split())[:300]})") from None
    return proto.SerializeToString()


def to_onnx(qmodel: QuantizedModel, genes: Sequence[Sequence[int]], path: PathLike, sample_input: torch.Tensor, *,
            opset: int = DEFAULT_OPSET) -> Path:
    """Write ``qmodel`` with ``genes`` applied as a QDQ ONNX model to ``path`` and return the path.

    ``sample_input`` is a float tensor of a few inputs (only their shape matters; the batch axis
    is dynamic). See the module docstring for what the graph holds. Raises :class:`ExportError`
    for k-means grids, non-float32 models and missing ``onnx``.
    """
    payload = onnx_bytes(qmodel, genes, sample_input, opset=opset)
    return _write(Path(path), payload)


def _write(path: Path, payload: bytes) -> Path:
    from .report import check_writable
    from .zoo.cache import atomic_write_bytes

    check_writable(path.parent)
    atomic_write_bytes(path, payload)
    return path


# ---------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class OnnxScores:
    """What :func:`onnx_scores` measured: the metric's values and every sample's top-1 prediction."""

    metric: str
    score: float  # the headline value, summary[metric]
    summary: dict[str, float]
    predictions: torch.Tensor  # int64 [samples]: argmax of the model's output
    count: int  # samples scored
    correct: Optional[int] = None  # samples counted as hits (accuracy metrics), else None


def _session(source: Union[PathLike, bytes], optimization: str = CHECK_OPTIMIZATION) -> Any:
    ort = _require("onnxruntime")
    if optimization not in OPTIMIZATION_LEVELS:
        raise ExportError(f"optimization={optimization!r} is not valid; use one of {', '.join(OPTIMIZATION_LEVELS)}")
    level = ort.GraphOptimizationLevel
    options = ort.SessionOptions()
    options.graph_optimization_level = {"disabled": level.ORT_DISABLE_ALL, "basic": level.ORT_ENABLE_BASIC,
                                        "extended": level.ORT_ENABLE_EXTENDED, "all": level.ORT_ENABLE_ALL}[optimization]
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    model = source if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and not Path(model).is_file():
        raise ExportError(f"ONNX model {model!r} does not exist; write one with deap-quant export DIR --format onnx")
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ExportError(f"onnxruntime cannot load the model ({type(error).__name__}: "
                          f"{' '.join(str(error).split())[:300]})") from None


def _fresh_metric(metric: Any) -> Any:
    """A reset Metric for ``metric`` (a name or a Metric, which is copied, never changed)."""
    from .evaluation.metrics import make_metric

    meter = make_metric(copy.copy(metric) if not isinstance(metric, str) else metric)
    meter.reset()
    return meter


def _check_batch_size(batch_size: Any) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ExportError(f"batch_size={batch_size!r} is not valid; use a positive integer")


class _Scorer:
    """One onnxruntime session scored batch by batch, optionally compared with deap_quant's outputs."""

    def __init__(self, source: Union[PathLike, bytes], metric: Any, optimization: str) -> None:
        self.session = _session(source, optimization)
        self.feed = self.session.get_inputs()[0].name
        self.meter = _fresh_metric(metric)
        self.predictions: list[torch.Tensor] = []
        self.differing, self.max_gap = 0, 0.0

    def update(self, inputs: torch.Tensor, targets: Any, reference: Optional[torch.Tensor] = None) -> None:
        array = inputs.detach().to("cpu", torch.float32).numpy()
        outputs = torch.from_numpy(np.ascontiguousarray(self.session.run(None, {self.feed: array})[0]))
        self.meter.update(outputs, targets)
        predicted = outputs.reshape(len(outputs), -1).argmax(dim=1)
        self.predictions.append(predicted)
        if reference is not None:
            reference = reference.reshape(len(reference), -1)
            self.differing += int((predicted != reference.argmax(dim=1)).sum())
            self.max_gap = max(self.max_gap, float((outputs.reshape(len(outputs), -1) - reference).abs().max()))

    def scores(self) -> OnnxScores:
        from .evaluation.metrics import Accuracy, CrossEntropy

        meter, predicted = self.meter, torch.cat(self.predictions)
        summary = meter.summary()
        correct = meter.correct if isinstance(meter, Accuracy) and not isinstance(meter, CrossEntropy) else None
        return OnnxScores(metric=meter.name, score=float(summary[meter.name]), summary=summary, predictions=predicted,
                          count=len(predicted), correct=correct)


def onnx_scores(path: Union[PathLike, bytes], data: Any, metric: Any = "accuracy", batch_size: int = 512, *,
                optimization: str = CHECK_OPTIMIZATION) -> OnnxScores:
    """Run the ONNX model ``path`` (a file, or its bytes) in onnxruntime on ``data`` and score it.

    ``data`` is anything an :class:`~deap_quant.Evaluator` takes (an ``(inputs, targets)`` pair,
    a Dataset or a DataLoader); ``metric`` a name in :data:`~deap_quant.evaluation.metrics.METRICS`
    or a Metric. Runs on the CPUExecutionProvider with ``torch.get_num_threads()`` threads, at the
    graph optimization level ``optimization`` (one of :data:`OPTIMIZATION_LEVELS`): by default
    ``"disabled"``, where onnxruntime computes the graph as written, as the export's check does;
    ``"all"`` is onnxruntime's own default, what a deployment gets unless it sets a level.
    """
    from .evaluation.evaluator import materialize

    _check_batch_size(batch_size)
    scorer = _Scorer(path, metric, optimization)
    for inputs, targets in materialize(data, batch_size):
        scorer.update(inputs, targets)
    return scorer.scores()


def sample_difference(scores: OnnxScores, reported: float) -> int:
    """By how many samples the onnxruntime score differs from a reported accuracy (signed: + means more hits)."""
    if scores.correct is None:
        _check_counting(scores.metric)
    return scores.correct - round(float(reported) * scores.count)


def _check_counting(metric: Any) -> None:
    """The one-sample rule needs a metric that counts samples (top-k accuracy)."""
    from .evaluation.metrics import Accuracy, CrossEntropy

    counting = metric in ("accuracy", "top5") if isinstance(metric, str) else (
        isinstance(metric, Accuracy) and not isinstance(metric, CrossEntropy))
    if not counting:
        name = metric if isinstance(metric, str) else getattr(metric, "name", type(metric).__name__)
        raise ExportError(f"the onnxruntime check counts samples, so it needs an accuracy metric (accuracy, top5); "
                          f"this run's metric is {name!r}; use --format pt for it")


# ---------------------------------------------------------------------------------------- checked export
def export_checked(qmodel: QuantizedModel, genes: Sequence[Sequence[int]], path: PathLike, *, test: Any = None,
                   sample_input: Optional[torch.Tensor] = None, metric: Any = "accuracy",
                   reported_test: Optional[float] = None, batch_size: int = 512, opset: int = DEFAULT_OPSET,
                   extra: Optional[dict[str, Any]] = None,
                   max_difference: int = MAX_SAMPLE_DIFFERENCE) -> tuple[Path, dict[str, Any]]:
    """Write the QDQ model to ``path`` only if onnxruntime reproduces ``reported_test`` on ``test``.

    The model is built in memory and scored in onnxruntime on ``test`` first, with graph
    optimizations **disabled** (:data:`CHECK_OPTIMIZATION`): onnxruntime then computes the graph as
    written, so the check tests that the file encodes exactly the evolved model. When its score
    differs from ``reported_test`` by more than ``max_difference`` sample(s) (default
    :data:`MAX_SAMPLE_DIFFERENCE`, one) nothing is written (an existing file at ``path`` is left as
    it was) and :class:`ExportError` names both scores and the difference.

    The same pass also scores the model at onnxruntime's default level (:data:`DEFAULT_OPTIMIZATION`,
    what a deployment sees unless it sets a level; see the module docstring for why it can differ)
    and compares both levels with deap_quant's own outputs; the default level is reported, never
    refused on. Returns the path and the check (also stored in the file's metadata)::

        {"metric", "reported_test", "checked", "test_samples",
         "optimization": "disabled", "onnxruntime_test", "difference_samples",   # the check
         "predictions_differing", "max_logit_difference",   # disabled level vs deap_quant's outputs
         "default_level": {"optimization": "all", "onnxruntime_test", "difference_samples",
                           "predictions_differing", "max_logit_difference", "correct_difference"}}

    ``difference_samples`` counts correct samples against ``reported_test``; ``correct_difference``
    against deap_quant's outputs on the same samples. Without ``test`` data or a reported score the
    model is written unchecked (``checked: False``, ``default_level: None``).
    """
    from .evaluation.evaluator import eval_mode, materialize, model_placement, place

    if isinstance(max_difference, bool) or not isinstance(max_difference, int) or max_difference < 0:
        raise ExportError(f"max_difference={max_difference!r} is not valid; use a number of samples >= 0")
    if sample_input is None:
        if test is None:
            raise ExportError("ONNX export needs sample inputs to trace the model: give test= data or sample_input=")
        sample_input = materialize(test, 2)[0][0]
    check: dict[str, Any] = {"metric": metric if isinstance(metric, str) else getattr(metric, "name", "metric"),
                             "reported_test": reported_test, "checked": False, "test_samples": None,
                             "optimization": CHECK_OPTIMIZATION, "onnxruntime_test": None, "difference_samples": None,
                             "predictions_differing": None, "max_logit_difference": None, "default_level": None}
    if test is not None and reported_test is not None:
        _check_counting(metric)
    payload = onnx_bytes(qmodel, genes, sample_input, opset=opset, metadata=extra)
    if test is not None and reported_test is not None:
        _check_batch_size(batch_size)
        checked, default = (_Scorer(payload, metric, level) for level in (CHECK_OPTIMIZATION, DEFAULT_OPTIMIZATION))
        own = _fresh_metric(metric)  # deap_quant's own outputs, scored alike
        device, dtype = model_placement(qmodel.module)
        with torch.inference_mode(), eval_mode(qmodel.module), qmodel.applied(genes):
            for inputs, targets in materialize(test, batch_size):
                reference = qmodel(place(inputs, device, dtype)).to("cpu", torch.float32)
                own.update(reference, targets)
                for scorer in (checked, default):
                    scorer.update(inputs, targets, reference)
        scores, default_scores = checked.scores(), default.scores()
        difference = sample_difference(scores, reported_test)
        check.update(onnxruntime_test=scores.score, difference_samples=difference, test_samples=scores.count,
                     checked=True, predictions_differing=checked.differing, max_logit_difference=checked.max_gap,
                     default_level={"optimization": DEFAULT_OPTIMIZATION, "onnxruntime_test": default_scores.score,
                                    "difference_samples": sample_difference(default_scores, reported_test),
                                    "predictions_differing": default.differing,
                                    "max_logit_difference": default.max_gap,
                                    "correct_difference": default_scores.correct - own.correct})
        if abs(difference) > max_difference:
            raise ExportError(f"the ONNX model scores {scores.metric}={scores.score!r} on test in onnxruntime "
                              f"(optimizations disabled), but the run reported {float(reported_test)!r}: "
                              f"{difference:+d} samples of {scores.count} (at most {max_difference} allowed); "
                              "nothing was written")
    onnx = _require("onnx")
    proto = onnx.load_from_string(payload)
    entry = json.loads({prop.key: prop.value for prop in proto.metadata_props}[METADATA_KEY])
    entry["check"] = check
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(entry, default=str)})
    return _write(Path(path), proto.SerializeToString()), check


def read_onnx_metadata(path: PathLike) -> dict[str, Any]:
    """The ``deap_quant`` metadata of an ONNX model written by this module (``{}`` if it has none)."""
    onnx = _require("onnx")
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX model {str(path)!r} does not exist; write one with deap-quant export DIR --format onnx")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise ExportError(f"{str(path)!r} is not a readable ONNX model ({type(error).__name__})") from None
    props = {prop.key: prop.value for prop in proto.metadata_props}
    return json.loads(props[METADATA_KEY]) if METADATA_KEY in props else {}
