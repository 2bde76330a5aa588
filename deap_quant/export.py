"""Export an evolved quantized model to one file, and load it back as a module that scores exactly as reported.

An export (``format="pt"``, a ``torch.save`` file readable with ``weights_only=True``) holds, per
quantized layer, its name, the integer states with the evolved genes applied, and its grid
(scales and zero points, or a codebook); the genes; the float parameters of everything that is
not a quantized weight; how to rebuild the architecture (a zoo recipe name, or the module
pickled without its quantized weights, or a TorchScript model saved with them zeroed); the
quantization settings; the scores the run reported; and the library versions. A run with
``fold_bn`` stores the folded module (a recipe is rebuilt and folded the same way on load). :func:`load` rebuilds the module and writes every quantized
weight from its integer state with the same grid arithmetic as the run, so the module's outputs,
and hence its scores, are bit-identical to the evolved model's.

For uniform grids (any bit-width up to 8, since every state fits in int8) the export also holds
activation ranges calibrated on validation data (histogram observer, as torch's default qconfig), and ``load(path, int8=True)`` returns a real
int8 module: every quantized Conv/Linear becomes a :mod:`torch.ao.nn.quantized` layer with the
evolved integer weights (per-channel or per-tensor), fed by a calibrated quint8 ``Quantize``
and followed by a ``DeQuantize``; the rest of the network runs in float. Where the run quantized
activations (``act_bits``), each layer's ``Quantize`` uses the run's own activation grid (its scale
and zero point, codes clamped to ``0..2**act_bits - 1``) instead of a calibrated range. TorchScript models are
exported and loaded as TorchScript (their weights are set through the scripted submodules); they
get no int8 module, whose layers cannot be put into a scripted graph.

``format="onnx"`` writes a QDQ ONNX model instead (:mod:`deap_quant.onnx_export`: integer weight
initializers with ``DequantizeLinear``, activation ``QuantizeLinear``/``DequantizeLinear`` where
the run quantized activations), scored in onnxruntime on the test data first: it is written only
when that score is within one sample of the reported test score. From Python without test data it
is written unchecked, with a ``UserWarning``. k-means grids are refused.
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .quantization.grids import CodebookGrid, UniformGrid, _ChannelLayout
from .quantization.model import QuantizedModel, as_gene_array

__all__ = ["export", "load", "read_export", "int8_module", "ExportError", "FORMATS", "EXPORT_FORMAT_VERSION",
           "Int8Layer"]

FORMATS = ("pt", "onnx")
EXPORT_FORMAT_VERSION = 1
_MARKER = "deap_quant.export"
_INT8_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

PathLike = Union[str, "os.PathLike[str]"]


class ExportError(ValueError):
    """An export that cannot be written or read (missing run, wrong file, mismatching score)."""


# ---------------------------------------------------------------------------------------- writing
def _grid_state(grid: Any) -> dict[str, Any]:
    state = dict(grid.to_state())
    return {key: (value.detach().clone() if isinstance(value, torch.Tensor) else value) for key, value in state.items()}


def _submodule(module: nn.Module, name: str) -> nn.Module:
    """``module.get_submodule(name)``, also for TorchScript modules, which do not support it."""
    for part in name.split(".") if name else ():
        module = getattr(module, part)
    return module


def _is_script(module: nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


def _script_bytes(module: nn.Module, names: Sequence[str]) -> bytes:
    """A TorchScript module saved with its quantized weights zeroed (their values live in the states)."""
    stripped = copy.deepcopy(module)
    with torch.no_grad():
        for name in names:
            _submodule(stripped, name).weight.zero_()
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # torch.jit.save's FutureWarning would break the CLI's one-line rule
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(stripped, buffer)
    return buffer.getvalue()


def _strip_quantized_weights(module: nn.Module, names: Sequence[str]) -> nn.Module:
    stripped = copy.deepcopy(module)
    for name in names:
        stripped.get_submodule(name).weight = nn.Parameter(torch.empty(0), requires_grad=False)
    return stripped


def _content(qmodel: QuantizedModel, genes: Sequence[Sequence[int]], *, recipe: Optional[str],
             scores: dict[str, Any], run_info: Optional[dict[str, Any]]) -> dict[str, Any]:
    from .versions import versions

    gene_rows = as_gene_array(genes, len(qmodel.layers), [layer.numel for layer in qmodel.layers]).tolist()
    states = qmodel.states_with(gene_rows)
    names = [layer.name for layer in qmodel.layers]
    quantized = {f"{name}.weight" for name in names}
    float_state = {key: value.detach().clone() for key, value in qmodel.module.state_dict().items()
                   if key not in quantized}
    if recipe is not None:
        architecture: dict[str, Any] = {"kind": "recipe", "recipe": recipe}
    elif _is_script(qmodel.module):
        architecture = {"kind": "torchscript", "module": _script_bytes(qmodel.module, names)}
    else:
        buffer = io.BytesIO()
        torch.save(_strip_quantized_weights(qmodel.module, names), buffer)
        architecture = {"kind": "pickle", "module": buffer.getvalue()}
    layers = []
    for number, info in enumerate(qmodel.layers):
        layers.append({"name": info.name, "kind": info.kind, "shape": list(info.shape), "n_levels": info.n_levels,
                       "dtype": str(_submodule(qmodel.module, info.name).weight.dtype).replace("torch.", ""),
                       "states": states[number].clone(), "grid": _grid_state(qmodel.grids[number]),
                       "activation": _activation_state(qmodel, number)})
    return {"format": _MARKER, "format_version": EXPORT_FORMAT_VERSION, "library": versions(),
            "architecture": architecture, "float_state": float_state, "layers": layers, "genes": gene_rows,
            "quantization": dict(qmodel.config), "scores": scores, "run": json.loads(json.dumps(run_info or {})),
            "int8": None}


def _activation_state(qmodel: QuantizedModel, layer: int) -> Optional[dict[str, Any]]:
    """The layer's input quantizer (``act_bits``) as plain values, or ``None``."""
    quantizer = qmodel.act_quantizers[layer]
    return None if quantizer is None else quantizer.to_state()


def _calibrate(module: nn.Module, names: Sequence[str], inputs: Sequence[torch.Tensor],
               run_grids: Optional[Sequence[Optional[dict[str, Any]]]] = None) -> dict[str, Any]:
    """quint8 ranges of every quantized layer's input and output on calibration ``inputs``.

    As torch's default qconfig for the current engine: a histogram observer (ranges that minimise
    the quantization error), with 7-bit activations on x86/fbgemm, whose non-VNNI kernels could
    otherwise saturate int16 intermediate sums. Where the run quantized a layer's input
    (``act_bits``; ``run_grids[i]``, an :class:`~deap_quant.quantization.activations.ActivationQuantizer`
    state), its input range is the run's own grid instead (scale and zero point; codes
    ``0..2**act_bits - 1``, which fit quint8), marked ``"input_from": "run"``.
    """
    from torch.ao.quantization.observer import HistogramObserver

    engine = torch.backends.quantized.engine
    reduce_range = engine in ("x86", "fbgemm")
    quant_max = 127 if reduce_range else 255
    observers = {name: tuple(HistogramObserver(dtype=torch.quint8, quant_min=0, quant_max=quant_max)
                             for _ in range(2)) for name in names}
    hooks = []
    for name in names:
        def hook(_module, args, output, name=name):
            observers[name][0](args[0].detach())
            observers[name][1](output.detach())
        hooks.append(module.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for batch in inputs:
                module(batch)
    finally:
        for handle in hooks:
            handle.remove()
    activations = []
    for number, name in enumerate(names):
        (in_scale, in_zero), (out_scale, out_zero) = (observer.calculate_qparams() for observer in observers[name])
        entry = {"name": name, "input": [float(in_scale), int(in_zero)], "output": [float(out_scale), int(out_zero)]}
        grid = run_grids[number] if run_grids is not None else None
        if grid:  # the run's activation grid, not a re-calibrated one
            entry.update(input=[float(grid["scale"]), int(grid["zero_point"])], input_bits=int(grid["bits"]),
                         input_from="run")
        activations.append(entry)
    return {"engine": engine, "reduce_range": reduce_range, "activations": activations}


def _int8_supported(content: dict[str, Any], module: nn.Module) -> Optional[str]:
    """``None`` if an int8 module can be built, else why not."""
    if _is_script(module):
        return "the model is TorchScript; int8 layers cannot be put into a scripted graph"
    for layer in content["layers"]:
        if layer["grid"]["kind"] != "uniform":
            return f"layer {layer['name']} has a {layer['grid']['kind']} codebook grid, not a uniform one"
        sub = module.get_submodule(layer["name"])
        if type(sub) not in _INT8_TYPES:
            return f"layer {layer['name']} is a {type(sub).__name__}; int8 export covers Linear and Conv1d/2d/3d"
        if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and sub.padding_mode != "zeros":
            return f"layer {layer['name']} uses padding_mode={sub.padding_mode!r}; int8 export needs 'zeros'"
    return None


def _batches(data: Any, batch_size: int) -> list[torch.Tensor]:
    from .evaluation.evaluator import materialize

    if isinstance(data, torch.Tensor):
        return [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
    return [inputs for inputs, _ in materialize(data, batch_size)]


def _scores(module: nn.Module, data: Any, metric: Any, batch_size: int, qmodel: QuantizedModel) -> dict[str, float]:
    """Every value of ``metric`` (a name or a Metric; a Metric object is copied, never changed) on ``data``."""
    from .evaluation.evaluator import Evaluator

    evaluator = Evaluator(qmodel, data, metric=copy.deepcopy(metric), batch_size=batch_size)
    return evaluator.score_module(module)


def _score(module: nn.Module, data: Any, metric: Any, batch_size: int, qmodel: QuantizedModel) -> float:
    return _scores(module, data, metric, batch_size, qmodel)[_metric_name(metric)]


def _metric_name(metric: Any) -> str:
    from .evaluation.metrics import make_metric

    return metric if isinstance(metric, str) else make_metric(metric).name


def _check_metric(metric: Any, name: str) -> tuple[Any, Optional[str]]:
    """The metric to check the test score with, or ``None`` and why the check cannot be made.

    ``metric`` is the run's own metric as given to :func:`export` (a Metric object or spec), else
    ``None``: then only the run's metric *name* is known, and a name no built-in metric has
    cannot be scored."""
    from .evaluation.metrics import METRICS, make_metric

    if metric is not None:
        try:
            own = make_metric(copy.deepcopy(metric))
        except ValueError as error:
            raise ExportError(str(error)) from None
        if own.name != name:
            raise ExportError(f"metric= is named {own.name!r}, but the run's metric is {name!r}; pass the metric "
                              "the run was scored with")
        return metric, None
    if name not in METRICS:
        return None, (f"the run's metric {name!r} is not a built-in metric ({', '.join(METRICS)}), and only its "
                      "name is known here")
    return name, None


def _unchecked(reason: str) -> None:
    warnings.warn(f"the exported model's test score was not checked: {reason}; pass metric= (the run's own "
                  "Metric object) to check it", UserWarning, stacklevel=4)


def export(result_or_dir: Any, path: Optional[PathLike] = None, format: str = "pt", *,
           qmodel: Optional[QuantizedModel] = None, genes: Optional[Sequence[Sequence[int]]] = None,
           recipe: Optional[str] = None, calibration: Any = None, test: Any = None, batch_size: int = 512,
           cache_dir: Optional[str] = None, max_difference: int = 1, metric: Any = None) -> Path:
    """Write the evolved quantized model to ``path`` and return the path.

    ``result_or_dir`` is a run folder written by ``deap-quant run`` (the model is rebuilt from
    its ``results.json``, calibrated on its validation split and checked against the reported
    test score; ``path`` defaults to ``DIR/model.pt``), or an :class:`~deap_quant.EvolutionResult`
    together with the ``qmodel`` it evolved (``genes`` default to the best individual's). In the
    second case give ``recipe=`` (a zoo recipe name) to store the architecture by name instead of
    pickling it, ``calibration=`` (validation inputs or data) to add int8 activation ranges, and
    ``test=`` data to check that the exported module reproduces the result's test score.

    That check scores the exported module with the run's metric: ``metric=`` (the Metric object or
    spec the run was scored with; its name must be the result's ``metric``), else the built-in
    metric of that name. A run scored by a metric of its own (e.g. a ``BatchMetric``) should pass it:
    where only the name is known and no built-in metric has it, or the built-in one of that name
    reports other values than the run's (another metric), the export is written unchecked
    (``scores["test_checked"]`` False) with a ``UserWarning`` saying why, never refused.

    ``format="onnx"`` writes a QDQ ONNX model (default ``DIR/model.onnx``). Given ``test=`` data, it is
    written only when its onnxruntime test score is within one sample of the reported one (see
    :func:`deap_quant.onnx_export.export_checked`; ``max_difference`` raises that limit, see the
    README on why quantized activations can differ by a few samples); the check is in the file's metadata
    (:func:`deap_quant.onnx_export.read_onnx_metadata`). Without ``test=`` (``calibration=`` inputs
    only to trace it), or for a result with no test score, it is written **unchecked**
    (``check["checked"]`` False in the metadata) with a ``UserWarning``; pass ``test=`` to check it.
    A run folder is always checked on its test split.
    """
    if format not in FORMATS:
        raise ExportError(f"format={format!r} is not valid; use one of {', '.join(FORMATS)}")
    if isinstance(result_or_dir, (str, os.PathLike)):
        return _export_run_folder(Path(result_or_dir), path, cache_dir=cache_dir, format=format,
                                  max_difference=max_difference)
    if not hasattr(result_or_dir, "best") or not hasattr(result_or_dir, "metric"):
        raise ExportError(f"cannot export a {type(result_or_dir).__name__}; give a run folder or an "
                          "EvolutionResult with qmodel=")
    if not isinstance(qmodel, QuantizedModel):
        raise ExportError("exporting an EvolutionResult needs the QuantizedModel it evolved (qmodel=...)")
    if path is None:
        raise ExportError("give the file to write (path=...)")
    result = result_or_dir
    genes = result.best["genes"] if genes is None else genes
    run_info = result.config.get("run") if isinstance(result.config, dict) else None
    if recipe is None and run_info:
        from .zoo import RECIPES
        recipe = run_info.get("model") if run_info.get("model") in RECIPES else None
    scores = {"metric": result.metric, "batch_size": batch_size,
              "val": result.best.get("val"), "test": result.best.get("test")}
    if format == "onnx":
        return _write_onnx(qmodel, genes, Path(path), scores=scores, test=test, sample=calibration,
                           max_difference=max_difference)
    return _write(qmodel, genes, Path(path), recipe=recipe, scores=scores, run_info=run_info,
                  calibration=calibration, test=test, metric=metric, reported=result.best.get("test_scores"))


def _write(qmodel: QuantizedModel, genes: Sequence[Sequence[int]], path: Path, *, recipe: Optional[str],
           scores: dict[str, Any], run_info: Optional[dict[str, Any]], calibration: Any, test: Any,
           metric: Any = None, reported: Optional[dict[str, Any]] = None) -> Path:
    """``reported``: every test value the run reported (``best["test_scores"]``), to tell a built-in
    metric from the run's own metric of the same name."""
    from .report import check_writable

    check_writable(path.parent)
    content = _content(qmodel, genes, recipe=recipe, scores=scores, run_info=run_info)
    module = _rebuild(content, allow_pickle=True)
    names = [layer["name"] for layer in content["layers"]]
    if calibration is not None and _int8_supported(content, module) is None:
        content["int8"] = _calibrate(module, names, _batches(calibration, scores["batch_size"]),
                                     [layer.get("activation") for layer in content["layers"]])
    if test is not None and scores.get("test") is not None:
        check, why = _check_metric(metric, scores["metric"])
        measured = None
        if check is not None:
            values = _scores(module, test, check, scores["batch_size"], qmodel)
            measured = values[scores["metric"]]
            if metric is None and isinstance(reported, dict) and set(reported) != set(values):
                why = (f"the run's metric {scores['metric']!r} reported {sorted(reported)}, the built-in metric of "
                       f"that name reports {sorted(values)}: the run used another metric of that name")
                check = None
        if check is None:
            _unchecked(why)
            content["scores"]["test_checked"] = False
        else:
            if measured != scores["test"]:
                hint = ("" if metric is not None else "; if the run used its own metric of that name, pass it as "
                        "metric=")
                raise ExportError(f"the exported model scores {scores['metric']}={measured!r} on test, but the run "
                                  f"reported {scores['test']!r}; the model, data or genes differ from the run's{hint}")
            content["scores"]["test_checked"] = True
            if content["int8"] is not None:
                content["scores"]["int8_test"] = _score(int8_module(content, module), test, check,
                                                        scores["batch_size"], qmodel)
    buffer = io.BytesIO()
    torch.save(content, buffer)
    from .zoo.cache import atomic_write_bytes
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _export_run_folder(folder: Path, path: Optional[PathLike], *, cache_dir: Optional[str],
                       format: str = "pt", max_difference: int = 1) -> Path:
    from .quantization import QuantConfig, quantize

    results = folder / "results.json"
    if not folder.is_dir():
        raise ExportError(f"run folder {str(folder)!r} does not exist; give the --out folder of a deap-quant run")
    if not results.is_file():
        raise ExportError(f"{str(folder)!r} holds no results.json; give the --out folder of a finished "
                          "deap-quant run")
    try:
        content = json.loads(results.read_text())
        config, best, metric = content["config"], content["best"], content["metric"]
    except (ValueError, KeyError, TypeError) as error:
        raise ExportError(f"{results} is not a readable deap-quant results file ({error})") from None
    run = config.get("run") if isinstance(config, dict) else None
    if not run:
        raise ExportError(f"{results} does not say how its model was built (no config.run); it was not written "
                          "by deap-quant run; export from Python with export(result, path, qmodel=...)")
    from .zoo.loading import float_model_from_settings

    model, splits, _ = float_model_from_settings({**run, "cache_dir": cache_dir or run.get("cache_dir")})
    layers = [p.strip() for p in run["layers"].split(",") if p.strip()] if run.get("layers") else None
    quant = QuantConfig(**config["quantization"])
    qmodel = quantize(model, layers=layers, config=quant, act_calibration=splits.train if quant.act_bits else None)
    recipe = run["model"] if _is_recipe(run["model"]) else None
    scores = {"metric": metric, "batch_size": int(run.get("batch_size") or 512),
              "val": best.get("val"), "test": best.get("test")}
    if format == "onnx":
        return _write_onnx(qmodel, best["genes"], Path(path) if path is not None else folder / "model.onnx",
                           scores=scores, test=splits.test, sample=None, max_difference=max_difference)
    target = Path(path) if path is not None else folder / "model.pt"
    own_metric = None  # a zoo recipe's metric (may be a factory no name rebuilds), as the run used it
    if recipe is not None:
        from .zoo import RECIPES
        if RECIPES[recipe].metric_name == metric:
            own_metric = RECIPES[recipe].new_metric()
    return _write(qmodel, best["genes"], target, recipe=recipe, scores=scores, run_info=run,
                  calibration=splits.val, test=splits.test, metric=own_metric, reported=best.get("test_scores"))


def _write_onnx(qmodel: QuantizedModel, genes: Sequence[Sequence[int]], path: Path, *, scores: dict[str, Any],
                test: Any, sample: Any, max_difference: int = 1) -> Path:
    """The QDQ ONNX model, written only if onnxruntime scores it within ``max_difference`` samples of
    ``scores["test"]``; without ``test`` data or a reported test score it is written unchecked, with a
    ``UserWarning``."""
    from .onnx_export import export_checked

    if test is None and sample is None:
        raise ExportError("ONNX export traces the model on sample inputs: give test= data (which also checks the "
                          "onnxruntime score) or calibration= inputs")
    sample_input = _batches(sample, 2)[0] if sample is not None else None
    written, check = export_checked(qmodel, genes, path, test=test, sample_input=sample_input,
                                    metric=scores["metric"], reported_test=scores.get("test"),
                                    batch_size=scores["batch_size"],
                                    extra={"reported": {"metric": scores["metric"], "val": scores.get("val"),
                                                        "test": scores.get("test")}},
                                    max_difference=max_difference)
    if not check.get("checked"):
        why = ("no test= data was given, so its onnxruntime score was not compared with the run's; pass test= "
               "(the run's test data) to check it" if test is None else
               "the result reports no test score to compare its onnxruntime score with")
        warnings.warn(f"the ONNX model {str(written)!r} was written unchecked: {why}", UserWarning, stacklevel=3)
    return written


def _is_recipe(name: str) -> bool:
    from .zoo import RECIPES
    return name in RECIPES


# ---------------------------------------------------------------------------------------- reading
def read_export(path: PathLike) -> dict[str, Any]:
    """The verified content of an export file (loaded with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"export {str(path)!r} does not exist; write one with deap-quant export DIR")
    try:
        content = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or foreign file: say so in one line
        raise ExportError(f"{str(path)!r} is not a readable deap_quant export ({type(error).__name__}); "
                          "it may be truncated or another kind of file") from None
    if not isinstance(content, dict) or content.get("format") != _MARKER:
        raise ExportError(f"{str(path)!r} is a torch file but not a deap_quant export")
    if content.get("format_version", 0) > EXPORT_FORMAT_VERSION:
        raise ExportError(f"{str(path)!r} has export format {content['format_version']}; this deap_quant reads "
                          f"format {EXPORT_FORMAT_VERSION} or older; upgrade deap_quant")
    return content


def _grid(layer: dict[str, Any]) -> Union[UniformGrid, CodebookGrid]:
    state = layer["grid"]
    shape, axis = tuple(state["shape"]), int(state["axis"])
    layout = _ChannelLayout(shape, axis, shape[axis] if axis >= 0 else 1)
    if state["kind"] == "uniform":
        return UniformGrid(scale=state["scale"], zero_point=state["zero_point"], n_levels=int(state["n_levels"]),
                           layout=layout)
    if state["kind"] == "kmeans":
        return CodebookGrid(codebook=state["codebook"], layout=layout)
    raise ExportError(f"layer {layer['name']} has grid kind {state['kind']!r}; known kinds: uniform, kmeans")


def _architecture(content: dict[str, Any], allow_pickle: bool) -> nn.Module:
    architecture = content["architecture"]
    if architecture["kind"] == "recipe":
        from .zoo import RECIPES
        if architecture["recipe"] not in RECIPES:
            raise ExportError(f"the export needs zoo recipe {architecture['recipe']!r}, which this deap_quant "
                              f"does not have (known: {', '.join(sorted(RECIPES))})")
        module = RECIPES[architecture["recipe"]].build()
        if content["quantization"].get("fold_bn"):  # the run quantized the folded model: rebuild that one
            from .quantization.fold import fold_bn
            module = fold_bn(module)
        return module
    if architecture["kind"] == "torchscript":  # TorchScript, not a pickle: loading it runs no Python code
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(io.BytesIO(architecture["module"]), map_location="cpu")
    if architecture["kind"] != "pickle":
        raise ExportError(f"the export stores its architecture as {architecture['kind']!r}; this deap_quant "
                          "reads recipe, torchscript and pickle; upgrade deap_quant")
    if not allow_pickle:
        raise ExportError("this export stores its architecture as a pickled module, and unpickling runs code "
                          "from the file; pass allow_pickle=True if you trust it")
    return torch.load(io.BytesIO(architecture["module"]), map_location="cpu", weights_only=False)


def _rebuild(content: dict[str, Any], allow_pickle: bool) -> nn.Module:
    module = _architecture(content, allow_pickle)
    for layer in content["layers"]:
        weight = _grid(layer).dequantize(layer["states"].reshape(layer["shape"]))
        dtype = getattr(torch, layer.get("dtype", "float32"))
        target = _submodule(module, layer["name"])
        if _is_script(module):  # a scripted parameter is written in place (same shape and dtype)
            with torch.no_grad():
                target.weight.copy_(weight.to(dtype))
        else:
            target.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    missing, unexpected = module.load_state_dict(content["float_state"], strict=False)
    expected_missing = {f"{layer['name']}.weight" for layer in content["layers"]}
    if set(missing) != expected_missing or unexpected:
        raise ExportError(f"the export's parameters do not fit its architecture (missing "
                          f"{sorted(set(missing) - expected_missing)}, unexpected {sorted(unexpected)})")
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    if any(layer.get("activation") for layer in content["layers"]):  # the run quantized activations too
        from .quantization.activations import ActivationQuantizer, install_input_quantizers
        install_input_quantizers(module, [layer["name"] for layer in content["layers"]],
                                 [ActivationQuantizer.from_state(layer["activation"]) if layer.get("activation")
                                  else None for layer in content["layers"]])
    return module.eval()


class Int8Layer(nn.Module):
    """quint8 ``Quantize`` -> a :mod:`torch.ao.nn.quantized` Conv/Linear with int8 weights -> ``DeQuantize``.

    ``input_quantizer`` (the run's :class:`~deap_quant.quantization.activations.ActivationQuantizer`,
    for ``act_bits`` runs) first rounds and clamps the input to the run's grid, whose scale and zero
    point ``Quantize`` then uses: the layer gets exactly the run's integer codes (``0..2**bits - 1``)."""

    def __init__(self, layer: nn.Module, input_scale: float, input_zero_point: int,
                 input_quantizer: Any = None):
        super().__init__()
        import torch.ao.nn.quantized as nnq
        self.input_quantizer = input_quantizer
        self.quant = nnq.Quantize(input_scale, input_zero_point, torch.quint8)
        self.layer = layer
        self.dequant = nnq.DeQuantize()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:  # the run's clamp to 0..2**bits - 1 (quint8 alone clamps to 255)
            inputs = self.input_quantizer(inputs)
        return self.dequant(self.layer(self.quant(inputs)))


def _int8_weight(layer: dict[str, Any]) -> torch.Tensor:
    """The layer's integer states as a qint8 tensor whose dequantized values are the grid's values."""
    grid = layer["grid"]
    states = layer["states"].reshape(layer["shape"]).to(torch.int64)
    shift = 128 if int(grid["n_levels"]) > 128 else 0  # states 0..255 -> -128..127
    zero = grid["zero_point"].to(torch.int64) - shift
    scale = grid["scale"].to(torch.float64)
    axis = int(grid["axis"])
    expected = (states - shift).to(torch.int8)
    values = _grid(layer).dequantize(states)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATION)
        if axis < 0:
            weight = torch.quantize_per_tensor(values, float(scale[0]), int(zero[0]), torch.qint8)
        else:
            weight = torch.quantize_per_channel(values, scale, zero, axis, torch.qint8)
    if not torch.equal(weight.int_repr(), expected):
        raise ExportError(f"layer {layer['name']}: its grid values do not map back to its integer states in int8")
    return weight


_DEPRECATION = ".*quantized tensor creation functions.*deprecated"


def int8_module(content: dict[str, Any], float_module: Optional[nn.Module] = None,
                allow_pickle: bool = False) -> nn.Module:
    """A real int8 module from an export's content (see :func:`read_export`).

    Each quantized layer's input is quantized to quint8: on the run's own activation grid where the
    run quantized activations (``act_bits``: its scale and zero point, codes clamped to
    ``0..2**act_bits - 1`` as in the search), else on the export's calibrated range (histogram
    observer, 7-bit on x86/fbgemm). Layer outputs are requantized on calibrated ranges, as int8
    kernels need. With ``act_bits=8`` on x86/fbgemm the run's grid uses all 8 bits, which
    non-VNNI CPUs' kernels may saturate in int16 intermediate sums (torch's default qconfig keeps
    7 bits there for that reason).
    """
    if content["architecture"]["kind"] == "torchscript":
        raise ExportError("this export holds a TorchScript model, which has no int8 module (int8 layers cannot be "
                          "put into a scripted graph); load it without int8=True")
    if content.get("int8") is None:
        raise ExportError("this export has no int8 calibration: int8 modules need uniform grids and a run "
                          "folder export (or export(..., calibration=val_data))")
    module = copy.deepcopy(float_module) if float_module is not None else _rebuild(content, allow_pickle)
    engine = content["int8"].get("engine")
    if engine in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = engine
    activations = {entry["name"]: entry for entry in content["int8"]["activations"]}
    with warnings.catch_warnings():  # torch >= 2.10 flags its eager quantized tensors as deprecated
        warnings.filterwarnings("ignore", message=_DEPRECATION)
        for layer in content["layers"]:
            parent_name, _, child = layer["name"].rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, _int8_layer(layer, module.get_submodule(layer["name"]), activations[layer["name"]]))
    return module.eval()


def _int8_layer(layer: dict[str, Any], source: nn.Module, activation: dict[str, Any]) -> Int8Layer:
    import torch.ao.nn.quantized as nnq

    in_scale, in_zero = activation["input"]
    out_scale, out_zero = activation["output"]
    run_grid = None
    if layer.get("activation"):  # the run quantized this input (act_bits): its grid, not a calibrated one
        from .quantization.activations import ActivationQuantizer
        run_grid = ActivationQuantizer.from_state(layer["activation"])
        in_scale, in_zero = run_grid.scale, run_grid.zero_point
    bias = None if source.bias is None else source.bias.detach().float()
    if isinstance(source, nn.Linear):
        target = nnq.Linear(source.in_features, source.out_features, bias_=bias is not None)
    else:
        kind = {nn.Conv1d: nnq.Conv1d, nn.Conv2d: nnq.Conv2d, nn.Conv3d: nnq.Conv3d}[type(source)]
        target = kind(source.in_channels, source.out_channels, source.kernel_size, stride=source.stride,
                      padding=source.padding, dilation=source.dilation, groups=source.groups, bias=bias is not None)
    target.set_weight_bias(_int8_weight(layer), bias)
    target.scale, target.zero_point = float(out_scale), int(out_zero)
    return Int8Layer(target, float(in_scale), int(in_zero), input_quantizer=run_grid)


def load(path: PathLike, *, int8: bool = False, allow_pickle: bool = False) -> nn.Module:
    """Rebuild the evolved quantized model from an export written by :func:`export`.

    Returns an evaluable module in eval mode whose quantized weights are exactly the evolved
    grid values (it reproduces the run's scores bit for bit); ``int8=True`` returns the real
    int8 module instead. The module carries ``deap_quant_export``: genes, layer names, scores,
    quantization settings and library versions. An architecture stored as a pickle (models that
    are not zoo recipes) is only unpickled with ``allow_pickle=True``.
    """
    content = read_export(path)
    module = _rebuild(content, allow_pickle)
    if int8:
        module = int8_module(content, module)
    module.deap_quant_export = {
        "genes": content["genes"], "layers": [layer["name"] for layer in content["layers"]],
        "scores": content["scores"], "quantization": content["quantization"], "library": content["library"],
        "int8": None if content["int8"] is None else {k: v for k, v in content["int8"].items() if k != "activations"},
    }
    return module
