"""Export of the evolved quantized model, and loading it back: exact scores, exact weights, real int8 layers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.ao.nn.quantized as nnq

import deap_quant as dq
from deap_quant import Evaluator, ExportError, evolve, quantize, read_export
from deap_quant.cli import main
from deap_quant.export import export

from .conftest import make_tiny_model

TINY = ["--mu", "4", "--lambda", "4", "--ngen", "2", "--no-progress"]


def bits_of(tensor: torch.Tensor) -> torch.Tensor:
    """A float tensor's raw bits, so that comparisons are bit-exact (0.0 and -0.0 differ)."""
    return tensor.detach().contiguous().view(torch.int32)


def assert_weights_are_the_evolved_ones(module: torch.nn.Module, qmodel: dq.QuantizedModel, genes) -> None:
    with qmodel.applied(genes):
        for number, info in enumerate(qmodel.layer_table()):
            assert torch.equal(bits_of(module.get_submodule(info.name).weight), bits_of(qmodel.dequantized_weights(number)))


def test_export_of_a_run_folder_reproduces_the_reported_test_score_exactly(tmp_path, digits_zoo, capsys):
    out = tmp_path / "run"
    assert main(["run", "--bits", "2", "--seed", "2", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--format", "pt"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'model.pt'}" in printed and "checked exactly" in printed and "int8 module" in printed
    results = json.loads((out / "results.json").read_text())

    module = dq.load(out / "model.pt")
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    qmodel = quantize(digits_zoo.model, bits=2, scale_method="mse")
    score = Evaluator(qmodel, digits_zoo.data.test, batch_size=512).score_module(module)
    assert score["accuracy"] == results["best"]["test"]  # exactly, not approximately
    assert_weights_are_the_evolved_ones(module, qmodel, results["best"]["genes"])
    with torch.inference_mode(), qmodel.applied(results["best"]["genes"]):
        assert torch.equal(module(digits_zoo.data.test[0]), qmodel(digits_zoo.data.test[0]))

    content = torch.load(out / "model.pt", weights_only=True)  # plain tensors and data: no code runs on load
    assert content["architecture"] == {"kind": "recipe", "recipe": "digits-cnn"}
    assert [layer["name"] for layer in content["layers"]] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert all(layer["states"].dtype == torch.uint8 and int(layer["states"].max()) < 4 for layer in content["layers"])
    assert {"scale", "zero_point"} <= set(content["layers"][0]["grid"])
    assert content["genes"] == results["best"]["genes"] and content["library"]["deap_quant"] == dq.__version__
    assert module.deap_quant_export["genes"] == results["best"]["genes"]


def test_an_8_bit_export_also_gives_a_real_int8_module_whose_accuracy_matches(tmp_path, digits_zoo):
    qmodel = quantize(digits_zoo.model, bits=8, scale_method="mse")
    result = evolve(qmodel, digits_zoo.data.val, digits_zoo.data.test, mu=4, lambda_=4, ngen=1, progress=False)
    path = export(result, tmp_path / "model.pt", qmodel=qmodel, recipe="digits-cnn",
                  calibration=digits_zoo.data.val, test=digits_zoo.data.test)
    content = read_export(path)
    simulated = dq.load(path)
    int8 = dq.load(path, int8=True)
    kinds = {type(m) for m in int8.modules()}
    assert nnq.Conv2d in kinds and nnq.Linear in kinds and torch.nn.Conv2d not in kinds
    for layer in content["layers"]:  # the int8 weights are the evolved states, shifted into int8
        weight = int8.get_submodule(layer["name"]).layer.weight()
        assert weight.dtype == torch.qint8
        assert torch.equal(weight.int_repr().to(torch.int64), layer["states"].to(torch.int64) - 128)
        assert torch.equal(weight.q_per_channel_scales().float(), layer["grid"]["scale"])
    evaluator = Evaluator(qmodel, digits_zoo.data.test, batch_size=512)
    simulated_accuracy = evaluator.score_module(simulated)["accuracy"]
    int8_accuracy = evaluator.score_module(int8)["accuracy"]
    assert simulated_accuracy == result.best["test"]
    assert content["scores"]["int8_test"] == int8_accuracy
    # activations are quantized too (calibrated on val): the int8 module may differ by an image or two
    assert abs(int8_accuracy - simulated_accuracy) <= 3 / len(digits_zoo.data.test[1])


@pytest.mark.parametrize("per_channel, symmetric", [(True, True), (False, False)])
def test_int8_weights_are_exact_for_per_tensor_and_asymmetric_grids(tiny_data, tmp_path, per_channel, symmetric):
    qmodel = quantize(make_tiny_model(), bits=8, per_channel=per_channel, symmetric=symmetric)
    result = evolve(qmodel, tiny_data, tiny_data, mu=3, lambda_=3, ngen=1, init_genes=5, progress=False)
    path = export(result, tmp_path / "m.pt", qmodel=qmodel, calibration=tiny_data[0])
    int8 = dq.load(path, int8=True, allow_pickle=True)
    states = qmodel.states_with(result.best["genes"])
    for number, info in enumerate(qmodel.layer_table()):
        weight = int8.get_submodule(info.name).layer.weight()
        values = weight.dequantize()
        with qmodel.applied(result.best["genes"]):
            assert torch.equal(values, qmodel.dequantized_weights(number))
        assert torch.equal(weight.int_repr().to(torch.int64), states[number].to(torch.int64) - 128)
    with torch.inference_mode():
        assert int8(tiny_data[0]).shape == (len(tiny_data[0]), 4)


def test_a_pickled_architecture_is_only_unpickled_when_allowed(tiny_data, tmp_path):
    qmodel = quantize(make_tiny_model(), bits=3)
    result = evolve(qmodel, tiny_data, tiny_data, mu=4, lambda_=6, ngen=2, init_genes=4, progress=False)
    path = export(result, tmp_path / "m.pt", qmodel=qmodel, test=tiny_data, calibration=tiny_data)
    with pytest.raises(ExportError, match="pickled module, and unpickling runs code from the file; pass allow_pickle"):
        dq.load(path)
    module = dq.load(path, allow_pickle=True)
    assert_weights_are_the_evolved_ones(module, qmodel, result.best["genes"])
    assert read_export(path)["scores"]["test_checked"] is True


def test_a_codebook_export_round_trips_and_refuses_int8_clearly(tiny_data, tmp_path):
    qmodel = quantize(make_tiny_model(), bits=2, scheme="kmeans")
    result = evolve(qmodel, tiny_data, tiny_data, mu=4, lambda_=6, ngen=2, init_genes=4, progress=False)
    path = export(result, tmp_path / "m.pt", qmodel=qmodel, test=tiny_data, calibration=tiny_data)
    assert read_export(path)["layers"][0]["grid"]["kind"] == "kmeans"
    assert_weights_are_the_evolved_ones(dq.load(path, allow_pickle=True), qmodel, result.best["genes"])
    with pytest.raises(ExportError, match="no int8 calibration: int8 modules need uniform grids"):
        dq.load(path, int8=True, allow_pickle=True)


def test_export_refuses_a_model_that_does_not_reproduce_the_reported_score(tiny_data, tmp_path):
    qmodel = quantize(make_tiny_model(), bits=2)
    result = evolve(qmodel, tiny_data, tiny_data, mu=4, lambda_=6, ngen=1, progress=False)
    result.best["test"] = result.best["test"] + 0.5  # as if the data or model had changed since the run
    with pytest.raises(ExportError, match="scores accuracy=.* on test, but the run reported"):
        export(result, tmp_path / "m.pt", qmodel=qmodel, test=tiny_data)
    assert not (tmp_path / "m.pt").exists()


def test_damaged_or_foreign_files_are_refused_clearly(tmp_path, tiny_data):
    qmodel = quantize(make_tiny_model(), bits=2)
    result = evolve(qmodel, tiny_data, tiny_data, mu=3, lambda_=3, ngen=1, progress=False)
    path = export(result, tmp_path / "m.pt", qmodel=qmodel)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ExportError, match="is not a readable deap_quant export .* truncated"):
        dq.load(truncated)
    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(ExportError, match="is a torch file but not a deap_quant export"):
        dq.load(foreign)
    with pytest.raises(ExportError, match="does not exist"):
        dq.load(tmp_path / "missing.pt")
    with pytest.raises(ExportError, match="exporting an EvolutionResult needs the QuantizedModel"):
        export(result, tmp_path / "x.pt")


@pytest.mark.parametrize("argv, message", [
    (["export", "{tmp}/nowhere"], "run folder '{tmp}/nowhere' does not exist"),
    (["export", "{tmp}", "--format", "tflite"], "argument --format: invalid choice: 'tflite'"),
    (["export", "{tmp}"], "holds no results.json"),
])
def test_cli_export_errors_are_one_line(tmp_path, capsys, argv, message):
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(tmp=tmp_path) in err[0]


def test_export_of_a_torchscript_run_reproduces_the_reported_test_score_exactly(tmp_path, digits_zoo, capsys):
    scripted = tmp_path / "model.ts"
    torch.jit.script(digits_zoo.model).save(str(scripted))
    out = tmp_path / "run"
    assert main(["run", "--model", str(scripted), "--dataset", "digits", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["export", str(out)]) == 0
    captured = capsys.readouterr()
    assert "checked exactly" in captured.out and captured.err == ""
    results = json.loads((out / "results.json").read_text())
    content = read_export(out / "model.pt")
    assert content["architecture"]["kind"] == "torchscript" and content["int8"] is None

    module = dq.load(out / "model.pt")
    assert isinstance(module, torch.jit.ScriptModule) and not module.training
    qmodel = quantize(digits_zoo.model, bits=2, scale_method="mse")
    assert Evaluator(qmodel, digits_zoo.data.test, batch_size=512).score_module(module)["accuracy"] == \
        results["best"]["test"]
    with qmodel.applied(results["best"]["genes"]):
        for number, info in enumerate(qmodel.layer_table()):
            assert torch.equal(bits_of(getattr(module, info.name).weight), bits_of(qmodel.dequantized_weights(number)))
    with pytest.raises(ExportError, match="TorchScript.*int8"):
        dq.load(out / "model.pt", int8=True)


def test_export_of_a_fold_bn_recipe_run_rebuilds_the_folded_architecture(tmp_path, capsys):
    from deap_quant.zoo import RECIPES

    torch.manual_seed(3)
    model = RECIPES["digits-resnet"].build().eval()
    generator = torch.Generator().manual_seed(4)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics worth folding
        norm.running_mean.copy_(0.1 * torch.randn(norm.num_features, generator=generator))
        norm.running_var.copy_(0.5 + torch.rand(norm.num_features, generator=generator))
    weights = tmp_path / "resnet.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "run"
    assert main(["run", "--model", "digits-resnet", "--weights", str(weights), "--fold-bn", "--out", str(out),
                 *TINY]) == 0
    capsys.readouterr()
    assert main(["export", str(out)]) == 0
    assert "checked exactly" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    content = read_export(out / "model.pt")
    assert content["architecture"] == {"kind": "recipe", "recipe": "digits-resnet"}
    assert content["quantization"]["fold_bn"] is True

    module = dq.load(out / "model.pt")
    assert isinstance(module.bn1, torch.nn.Identity) and module.conv1.bias is not None
    qmodel = quantize(model, bits=2, scale_method="mse", fold_bn=True)
    data = RECIPES["digits-resnet"].data(0)
    assert Evaluator(qmodel, data.test, batch_size=512).score_module(module)["accuracy"] == results["best"]["test"]
    assert_weights_are_the_evolved_ones(module, qmodel, results["best"]["genes"])


def _regression_run(name: str):
    """A tiny conv net scored by a user's BatchMetric (lower is better) called ``name``."""
    from deap_quant.evaluation.metrics import BatchMetric

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 1, 3, padding=1)).eval()
    inputs = torch.randn(24, 1, 6, 6)
    with torch.no_grad():
        targets = net(inputs)
    metric = BatchMetric(lambda outputs, targets: float((outputs - targets).square().mean()), higher_is_better=False,
                         name=name)
    qmodel = quantize(net, bits=3)
    result = evolve(qmodel, (inputs[:12], targets[:12]), (inputs[12:], targets[12:]), metric=metric, mu=2, lambda_=4,
                    ngen=1, progress=False)
    return qmodel, result, metric, (inputs[12:], targets[12:])


@pytest.mark.parametrize("name", ["mse", "mae"])  # a built-in metric's name, and a name no metric has
def test_export_checks_a_custom_metric_with_the_runs_own_metric(tmp_path, name):
    qmodel, result, metric, test = _regression_run(name)
    path = export(result, tmp_path / "m.pt", qmodel=qmodel, test=test, metric=metric)
    content = read_export(path)
    assert content["scores"]["test_checked"] is True and content["scores"]["metric"] == name
    with pytest.raises(ExportError, match=f"metric= is named 'other'.*the run's metric is {name!r}"):
        export(result, tmp_path / "other.pt", qmodel=qmodel, test=test,
               metric=dq.evaluation.BatchMetric(metric.fn, name="other"))


@pytest.mark.parametrize("name", ["mse", "mae"])
def test_export_without_the_runs_custom_metric_warns_and_writes_unchecked(tmp_path, name):
    """Only the metric's name is known: the built-in 'mse' is another metric, 'mae' no metric at all. The
    export is written, unchecked, with a warning saying why (never refused for a score it cannot compare)."""
    qmodel, result, _, test = _regression_run(name)
    with pytest.warns(UserWarning, match=f"test score was not checked.*{name!r}.*pass metric="):
        path = export(result, tmp_path / "m.pt", qmodel=qmodel, test=test)
    assert read_export(path)["scores"]["test_checked"] is False
    assert_weights_are_the_evolved_ones(dq.load(path, allow_pickle=True), qmodel, result.best["genes"])


def test_the_int8_module_of_a_run_with_quantized_activations_uses_the_runs_activation_grid(tiny_data, tmp_path):
    qmodel = quantize(make_tiny_model(), bits=4, act_bits=4, act_calibration=tiny_data[0])
    result = evolve(qmodel, tiny_data, tiny_data, mu=2, lambda_=2, ngen=1, progress=False)
    path = export(result, tmp_path / "m.pt", qmodel=qmodel, calibration=tiny_data[0], test=tiny_data)
    int8 = dq.load(path, int8=True, allow_pickle=True)
    simulated = dq.load(path, allow_pickle=True)
    seen = {}

    def keep(name):
        def hook(module, args, output):
            seen.setdefault(name, args[0])
        return hook

    for number, info in enumerate(qmodel.layer_table()):
        run_grid = qmodel.act_quantizers[number]
        assert run_grid is not None and run_grid.bits == 4
        int8.get_submodule(info.name).layer.register_forward_hook(keep(info.name))
        simulated.get_submodule(info.name).register_forward_hook(keep("float " + info.name))  # after the run's grid
    with torch.inference_mode():
        int8(tiny_data[0])
        simulated(tiny_data[0])
    for number, info in enumerate(qmodel.layer_table()):
        run_grid, codes = qmodel.act_quantizers[number], seen[info.name]
        assert codes.q_scale() == pytest.approx(run_grid.scale, rel=1e-6)
        assert codes.q_zero_point() == run_grid.zero_point
        assert 0 <= int(codes.int_repr().min()) and int(codes.int_repr().max()) <= run_grid.quant_max
    first = qmodel.layer_table()[0].name  # same input to both: the int8 codes are the run's codes
    assert torch.equal(seen[first].int_repr().to(torch.int64),
                       qmodel.act_quantizers[0].integers(tiny_data[0]).to(torch.int64))
    assert torch.allclose(seen[first].dequantize(), seen["float " + first], rtol=0, atol=1e-6)


def test_onnx_export_without_test_data_warns_that_it_is_unchecked(tiny_data, tmp_path):
    pytest.importorskip("onnxruntime")
    from deap_quant.onnx_export import read_onnx_metadata

    qmodel = quantize(make_tiny_model(), bits=2)
    result = evolve(qmodel, tiny_data, tiny_data, mu=2, lambda_=2, ngen=1, progress=False)
    with pytest.warns(UserWarning, match="unchecked.*pass test="):
        path = export(result, tmp_path / "m.onnx", format="onnx", qmodel=qmodel, calibration=tiny_data[0])
    assert path.is_file() and read_onnx_metadata(path)["check"]["checked"] is False
