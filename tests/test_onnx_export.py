"""ONNX export as a QDQ graph: it runs in onnxruntime with deap_quant's predictions, holds integer weights,
refuses k-means grids, and a run folder's export is only written when onnxruntime reproduces the test score."""

from __future__ import annotations

import inspect
import json
import shutil
import sys
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from deap_quant import ExportError, evolve, quantize
from deap_quant.cli import main
from deap_quant.export import export

ort = pytest.importorskip("onnxruntime")  # a guard only: the test extra installs it
onnx = pytest.importorskip("onnx")

from deap_quant.onnx_export import (  # noqa: E402  (after the guard)
    METADATA_KEY,
    export_checked,
    onnx_bytes,
    onnx_scores,
    read_onnx_metadata,
    to_onnx,
)

GENES = [[0, 3, 1], [0, 40, -1], [1, 10, -1], [1, 200, 1], [2, 7, 1], [2, 100, -1]]
TINY = ["--mu", "4", "--lambda", "4", "--ngen", "2", "--no-progress"]


def conv_net() -> nn.Module:
    """conv-relu-conv-relu-pool-linear on 1x8x8 inputs, 5 classes."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 6, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(6, 8, 3, padding=1)), ("relu2", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(2)), ("flatten", nn.Flatten()), ("fc", nn.Linear(32, 5)),
    ])).eval()


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"inputs": torch.randn(200, 1, 8, 8, generator=generator),
            "targets": torch.randint(0, 5, (200,), generator=generator),
            "calibration": torch.randn(64, 1, 8, 8, generator=generator)}


def deap_quant_outputs(qmodel, genes, inputs: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(), qmodel.applied(genes):
        return qmodel.module(inputs)


def run_onnx(payload: bytes, inputs: torch.Tensor, outputs: tuple[str, ...] = (), optimize: bool = True) -> list:
    """Outputs of the model in onnxruntime (``outputs``: intermediate tensors to return as well)."""
    model = onnx.load_from_string(payload)
    for name in outputs:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": inputs.numpy()})


def initializers(payload: bytes) -> dict[str, np.ndarray]:
    model = onnx.load_from_string(payload)
    return {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


def needs_act_bits() -> None:
    """Activation quantization is part of issue 14: fail (never skip) until ``quantize`` takes ``act_bits``."""
    assert "act_bits" in inspect.signature(quantize).parameters, \
        "quantize(..., act_bits=, act_calibration=) has not landed yet; the activation QDQ tests need it"


# ---------------------------------------------------------------------------------------- agreement
def test_a_4_bit_per_channel_conv_net_runs_in_onnxruntime_with_deap_quants_argmax_on_every_sample(tmp_path, data):
    qmodel = quantize(conv_net(), bits=4, per_channel=True)
    path = to_onnx(qmodel, GENES, tmp_path / "net.onnx", data["inputs"][:3])
    expected = deap_quant_outputs(qmodel, GENES, data["inputs"])

    scores = onnx_scores(path, (data["inputs"], data["targets"]), "accuracy", batch_size=64)
    assert scores.count == 200
    assert torch.equal(scores.predictions, expected.argmax(dim=1))  # every sample
    correct = int((expected.argmax(dim=1) == data["targets"]).sum())
    assert scores.correct == correct and scores.score == correct / 200
    # the graph is the same arithmetic: with onnxruntime's fusions off, the logits agree to float rounding
    (plain,) = run_onnx(path.read_bytes(), data["inputs"], optimize=False)
    np.testing.assert_allclose(plain, expected.numpy(), rtol=0, atol=1e-5)
    # the genes are in the file: without them the weights differ
    assert not np.array_equal(initializers(onnx_bytes(qmodel, [], data["inputs"]))["conv1.weight_quantized"],
                              initializers(path.read_bytes())["conv1.weight_quantized"])


@pytest.mark.parametrize("act_bits", [8, 4])
def test_with_activation_quantization_onnxruntime_gives_deap_quants_argmax_on_every_sample(data, act_bits):
    needs_act_bits()
    qmodel = quantize(conv_net(), bits=4, per_channel=True, act_bits=act_bits, act_calibration=data["calibration"])
    assert all(quantizer is not None for quantizer in qmodel.act_quantizers)
    payload = onnx_bytes(qmodel, GENES, data["inputs"][:3])
    expected = deap_quant_outputs(qmodel, GENES, data["inputs"])

    scores = onnx_scores(payload, (data["inputs"], data["targets"]), "accuracy", batch_size=64)
    assert torch.equal(scores.predictions, expected.argmax(dim=1))
    # the first layer's QDQ input is exactly deap_quant's fake-quantized input (rounding, clamp to 2**bits - 1)
    logits, quantized_input = run_onnx(payload, data["inputs"], outputs=("conv1.input_dequantized",), optimize=False)
    assert np.array_equal(quantized_input, qmodel.act_quantizers[0](data["inputs"]).numpy())
    assert len(np.unique(quantized_input)) <= 2 ** act_bits
    np.testing.assert_allclose(logits, expected.numpy(), rtol=0, atol=1e-3)

    graph = onnx.load_from_string(payload).graph
    kinds = [node.op_type for node in graph.node]
    assert kinds.count("QuantizeLinear") == 3 and kinds.count("Clip") == (3 if act_bits < 8 else 0)
    values = initializers(payload)
    for info, quantizer in zip(qmodel.layers, qmodel.act_quantizers):
        assert values[f"{info.name}.input_scale"] == np.float32(quantizer.scale)
        assert values[f"{info.name}.input_zero_point"].dtype == np.uint8
        assert int(values[f"{info.name}.input_zero_point"]) == quantizer.zero_point
        if act_bits < 8:
            assert int(values[f"{info.name}.input_max"]) == 2 ** act_bits - 1
    for node in graph.node:  # the QDQ pair feeds its layer's node only
        if node.op_type in ("Conv", "Gemm"):
            assert node.input[0].endswith(".input_dequantized")


def folded_bn_net() -> nn.Module:
    """digits-resnet-like: conv-BN-ReLU twice, pool, linear (folding BN gives the convolutions a float bias)."""
    torch.manual_seed(4)  # a seed on which onnxruntime's default level flips several of the 200 predictions
    net = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 8, 3, padding=1, bias=False)), ("bn1", nn.BatchNorm2d(8)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(8, 8, 3, padding=1, bias=False)), ("bn2", nn.BatchNorm2d(8)), ("relu2", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(2)), ("flatten", nn.Flatten()), ("fc", nn.Linear(32, 5)),
    ]))
    with torch.no_grad():
        for norm in (net.bn1, net.bn2):
            norm.running_mean.uniform_(-0.5, 0.5), norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    return net.eval()


def test_the_check_runs_onnxruntime_unoptimized_and_reports_its_default_level_apart(tmp_path, data):
    """With folded BN and 4-bit activations, onnxruntime's default optimizations round each convolution's float
    bias to int32 (and fuse QLinearConv), flipping predictions deap_quant never made. The check that decides the
    export runs with optimizations off, where the file computes exactly the evolved model; the default level is
    scored as well and reported beside it, without refusing."""
    needs_act_bits()
    qmodel = quantize(folded_bn_net(), bits=4, per_channel=True, fold_bn=True, act_bits=4,
                      act_calibration=data["calibration"])
    inputs = data["inputs"]
    expected = deap_quant_outputs(qmodel, [], inputs)
    targets = expected.argmax(dim=1)  # deap_quant scores 100%: every prediction onnxruntime moves costs a sample
    payload = onnx_bytes(qmodel, [], inputs[:2])
    (default,) = run_onnx(payload, inputs)  # onnxruntime's default level, independently of the module
    flips = int((torch.from_numpy(default).argmax(dim=1) != targets).sum())
    assert flips >= 2, "the model no longer reproduces the default-level drift; pick another seed"

    path, check = export_checked(qmodel, [], tmp_path / "net.onnx", test=(inputs, targets), reported_test=1.0)
    assert path.exists() and read_onnx_metadata(path)["check"] == check
    assert check["checked"] and check["optimization"] == "disabled"
    assert check["onnxruntime_test"] == 1.0 and check["difference_samples"] == 0
    assert check["predictions_differing"] == 0 and check["max_logit_difference"] <= 1e-5
    (plain,) = run_onnx(payload, inputs, optimize=False)
    np.testing.assert_allclose(plain, expected.numpy(), rtol=0, atol=1e-5)
    level = check["default_level"]
    assert level["optimization"] == "all"
    assert level["predictions_differing"] == flips
    assert level["difference_samples"] == level["correct_difference"] == -flips
    assert level["onnxruntime_test"] == (len(targets) - flips) / len(targets)
    assert level["max_logit_difference"] == pytest.approx(float(np.abs(default - expected.numpy()).max()))
    # onnx_scores runs at the check's level unless asked for another
    assert torch.equal(onnx_scores(path, (inputs, targets)).predictions, targets)
    assert onnx_scores(path, (inputs, targets), optimization="all").correct == len(targets) - flips
    with pytest.raises(ExportError, match="optimization='fast' is not valid; use one of disabled, basic, extended, all"):
        onnx_scores(path, (inputs, targets), optimization="fast")


# ---------------------------------------------------------------------------------------- the graph
def test_the_graph_holds_integer_weights_feeding_dequantize_linear_per_channel(data):
    qmodel = quantize(conv_net(), bits=4, per_channel=True)
    payload = onnx_bytes(qmodel, GENES, data["inputs"][:2])
    model = onnx.load_from_string(payload)
    onnx.checker.check_model(model, full_check=True)
    values = initializers(payload)
    dequantize = {node.output[0]: node for node in model.graph.node if node.op_type == "DequantizeLinear"}
    states = qmodel.states_with(GENES)
    for number, info in enumerate(qmodel.layers):
        weight = f"{info.name}.weight"
        assert weight not in values  # no float copy of a quantized weight
        node = dequantize[weight]
        assert list(node.input) == [f"{weight}_quantized", f"{weight}_scale", f"{weight}_zero_point"]
        assert {a.name: a.i for a in node.attribute} == {"axis": 0}
        integers = values[f"{weight}_quantized"]
        assert integers.dtype == np.int8 and integers.shape == info.shape
        grid = qmodel.grids[number]
        assert np.array_equal(values[f"{weight}_scale"], grid.scale.numpy())
        assert values[f"{weight}_scale"].shape == (info.shape[0],)
        assert not values[f"{weight}_zero_point"].any()  # symmetric: state - zero point, zero point 0
        shift = grid.zero_point.view(-1, *([1] * (len(info.shape) - 1))).to(torch.int64)
        assert np.array_equal(integers, (states[number].to(torch.int64) - shift).numpy())
    assert not any(node.op_type == "QuantizeLinear" for node in model.graph.node)  # weight-only QDQ
    assert [value.name for value in model.graph.input] == ["input"]
    assert json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])["genes"] == len(GENES)


def test_per_tensor_and_asymmetric_8_bit_grids_are_exact(data):
    qmodel = quantize(conv_net(), bits=8, per_channel=False, symmetric=False)
    payload = onnx_bytes(qmodel, GENES, data["inputs"][:2])
    model = onnx.load_from_string(payload)
    values = initializers(payload)
    for number, info in enumerate(qmodel.layers):
        weight = f"{info.name}.weight"
        node = next(node for node in model.graph.node if node.output[0] == weight)
        assert not node.attribute  # per tensor: no axis, scalar scale and zero point
        assert values[f"{weight}_scale"].shape == () and values[f"{weight}_zero_point"].shape == ()
        assert values[f"{weight}_quantized"].dtype == np.uint8  # 0..255 around a zero point: not int8
        assert np.array_equal(values[f"{weight}_quantized"], qmodel.states_with(GENES)[number].numpy())
        assert int(values[f"{weight}_zero_point"]) == int(qmodel.grids[number].zero_point[0])
    (plain,) = run_onnx(payload, data["inputs"], optimize=False)
    np.testing.assert_allclose(plain, deap_quant_outputs(qmodel, GENES, data["inputs"]).numpy(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------- refusals
def test_k_means_grids_are_refused_in_one_line_and_nothing_is_written(tmp_path, data):
    qmodel = quantize(conv_net(), bits=2, scheme="kmeans")
    with pytest.raises(ExportError, match="k-means codebook grid, which cannot be expressed as QDQ") as caught:
        to_onnx(qmodel, [], tmp_path / "net.onnx", data["inputs"][:2])
    assert "--format pt" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "net.onnx").exists()


def test_a_missing_onnx_package_names_the_extra(tmp_path, data, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(ExportError, match=r'pip install "deap_quant\[onnx\]"'):
        to_onnx(quantize(conv_net(), bits=4), [], tmp_path / "net.onnx", data["inputs"][:2])


def test_an_evolution_result_exports_to_onnx_checked_against_its_test_score(tmp_path, data):
    qmodel = quantize(conv_net(), bits=3)
    split = (data["inputs"][:100], data["targets"][:100]), (data["inputs"][100:], data["targets"][100:])
    result = evolve(qmodel, *split, mu=3, lambda_=3, ngen=1, init_genes=4, progress=False)
    path = export(result, tmp_path / "net.onnx", format="onnx", qmodel=qmodel, test=split[1])
    check = read_onnx_metadata(path)["check"]
    assert check["checked"] and abs(check["difference_samples"]) <= 1 and check["test_samples"] == 100
    assert check["reported_test"] == result.best["test"]


# ---------------------------------------------------------------------------------------- the CLI on a run folder
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits_zoo):
    out = tmp_path_factory.mktemp("onnx") / "run"
    assert main(["run", "--bits", "4", "--seed", "1", "--out", str(out), *TINY]) == 0
    return out


def test_the_cli_exports_a_run_folder_to_onnx_and_prints_the_onnxruntime_score(digits_run, capsys):
    capsys.readouterr()
    assert main(["export", str(digits_run), "--format", "onnx"]) == 0
    printed = capsys.readouterr().out
    path = digits_run / "model.onnx"
    assert f"wrote {path}: 5 quantized layers as QDQ" in printed
    results = json.loads((digits_run / "results.json").read_text())
    check = read_onnx_metadata(path)["check"]
    assert check["checked"] and check["reported_test"] == results["best"]["test"]
    assert abs(check["difference_samples"]) <= 1
    assert f"difference {check['difference_samples']:+d} samples of {check['test_samples']}" in printed
    assert "onnxruntime: accuracy test" in printed
    level = check["default_level"]
    assert (f"onnxruntime at its default level ({level['optimization']}; reported, never refused)" in printed
            and f"{level['predictions_differing']} predictions differ" in printed)
    # the file itself reproduces the check
    from deap_quant.zoo import load_model
    test = load_model("digits-cnn", verbose=False).data.test
    assert onnx_scores(path, test, "accuracy").score == check["onnxruntime_test"]


@pytest.mark.parametrize("shift, written, limit", [(1, True, None), (2, False, None), (2, True, 2), (3, False, 2)])
def test_the_export_is_refused_when_onnxruntime_differs_by_more_than_one_sample(digits_run, tmp_path, capsys,
                                                                               shift, written, limit):
    folder = tmp_path / "run"
    shutil.copytree(digits_run, folder, ignore=shutil.ignore_patterns("model.*"))
    results = json.loads((folder / "results.json").read_text())
    honest = onnxruntime_check_of(digits_run)
    n_test = honest["test_samples"]
    # report `shift` fewer correct samples than onnxruntime measures
    results["best"]["test"] = (round(honest["onnxruntime_test"] * n_test) - shift) / n_test
    (folder / "results.json").write_text(json.dumps(results))
    capsys.readouterr()
    code = main(["export", str(folder), "--format", "onnx", *(["--max-difference", str(limit)] if limit else [])])
    captured = capsys.readouterr()
    assert (folder / "model.onnx").exists() == written
    assert not [p for p in folder.iterdir() if p.name.startswith(".model.onnx")]  # no temporary left behind
    if written:
        assert code == 0 and f"difference +{shift} samples of {n_test}" in captured.out
    else:
        lines = captured.err.strip().splitlines()
        assert code == 2 and len(lines) == 1
        assert f"+{shift} samples of {n_test} (at most {limit or 1} allowed); nothing was written" in lines[0]
        assert f"the run reported {results['best']['test']!r}" in lines[0]


def onnxruntime_check_of(folder):
    """The onnxruntime check of the run folder's ONNX export (exported first if need be)."""
    path = folder / "model.onnx"
    if not path.exists():
        assert main(["export", str(folder), "--format", "onnx"]) == 0
    return read_onnx_metadata(path)["check"]


def test_the_cli_refuses_a_k_means_run_for_onnx_in_one_line(tmp_path, digits_zoo, capsys):
    out = tmp_path / "run"
    assert main(["run", "--bits", "2", "--scheme", "kmeans", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--format", "onnx"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cannot be expressed as QDQ" in lines[0] and "--format pt" in lines[0]
    assert not (out / "model.onnx").exists()


def test_an_unknown_format_names_the_valid_ones(tmp_path):
    with pytest.raises(ExportError, match="format='tflite' is not valid; use one of pt, onnx"):
        export(tmp_path, format="tflite")


def test_a_torchscript_model_exports_with_the_same_argmax(data):
    with warnings.catch_warnings():  # torch.jit.script is deprecated in recent torch
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(conv_net())
    qmodel = quantize(scripted, bits=4)
    payload = onnx_bytes(qmodel, GENES, data["inputs"][:2])
    scores = onnx_scores(payload, (data["inputs"], data["targets"]), "accuracy")
    assert torch.equal(scores.predictions, deap_quant_outputs(qmodel, GENES, data["inputs"]).argmax(dim=1))


def test_the_one_sample_check_needs_a_metric_that_counts_samples(tmp_path, data):
    qmodel = quantize(conv_net(), bits=4)
    with pytest.raises(ExportError, match="needs an accuracy metric .* this run's metric is 'loss'; use --format pt"):
        export_checked(qmodel, [], tmp_path / "net.onnx", test=(data["inputs"], data["targets"]), metric="loss",
                       reported_test=1.0)
    assert not (tmp_path / "net.onnx").exists()
