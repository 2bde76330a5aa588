"""Activation quantization (``act_bits``): calibrated on calibration data only, frozen, seen by every evaluator."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch.utils.data import Dataset

from deap_quant import Evaluator, IncrementalEvaluator, QuantConfig, quantize
from deap_quant.baselines import adaround
from deap_quant.cli import main
from deap_quant.quantization import ActivationQuantizer
from deap_quant.quantization import activations as act_module
from deap_quant.quantization.activations import input_quantizer_of
from tests.test_incremental import lineage


def signed_data(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=generator), torch.randint(0, 4, (n,), generator=generator)


def test_grid_rounds_half_to_even_and_holds_zero():
    quantizer = ActivationQuantizer(bits=8, scale=0.5, zero_point=10, signed_input=True)
    x = torch.tensor([0.0, 0.25, 0.75, -0.25, 1000.0, -1000.0])
    # 0.25/0.5 = 0.5 -> 0 (even), 0.75/0.5 = 1.5 -> 2, -0.5 -> -0 ; the grid spans (0-10)*0.5 .. (255-10)*0.5
    assert quantizer(x).tolist() == [0.0, 0.0, 1.0, 0.0, 122.5, -5.0]
    assert quantizer.range == (-5.0, 122.5)
    unsigned = ActivationQuantizer.from_range(4, 0.0, 3.0)
    assert unsigned.zero_point == 0 and not unsigned.signed_input and unsigned.scale == pytest.approx(0.2)
    assert ActivationQuantizer.from_range(4, 0.5, 3.0).range[0] == 0.0  # the range always holds zero


def test_act_bits_8_with_identity_ranges_stays_close_to_float_outputs(tiny_model):
    inputs, _ = signed_data()
    weights_only = quantize(tiny_model, bits=4)
    with_acts = quantize(tiny_model, bits=4, act_bits=8, act_calibration=inputs)
    with torch.no_grad():
        reference, quantized = weights_only(inputs), with_acts(inputs)
    assert (reference - quantized).abs().max() < 1e-2
    assert not torch.equal(reference, quantized)  # the inputs really are rounded
    first, second = with_acts.act_quantizers
    assert first.signed_input and first.zero_point > 0  # raw inputs are signed
    assert not second.signed_input and second.zero_point == 0  # the Linear reads after ReLU + max-pool
    assert input_quantizer_of(with_acts.module.conv) is first


def test_observers_fit_the_ranges_they_promise(tiny_model):
    inputs, _ = signed_data(256)
    ranges = {observer: quantize(tiny_model, bits=4, act_bits=4, act_observer=observer, act_calibration=inputs)
              .act_quantizers[0] for observer in ("minmax", "percentile", "mse")}
    low, high = float(inputs.min()), float(inputs.max())
    step = ranges["minmax"].scale  # the zero point, an integer, shifts the range by under one step
    assert ranges["minmax"].scale == pytest.approx((high - low) / 15)
    assert ranges["minmax"].range[0] == pytest.approx(low, abs=step)
    assert ranges["minmax"].range[1] == pytest.approx(high, abs=step)
    for observer in ("percentile", "mse"):  # clipped inside the min-max range
        assert ranges[observer].scale < ranges["minmax"].scale

    def error(quantizer: ActivationQuantizer) -> float:
        return float((quantizer(inputs) - inputs).square().mean())
    assert error(ranges["mse"]) < error(ranges["minmax"])


class RecordingData(Dataset):
    """A dataset that records every index read from it."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.inputs, self.targets, self.read = inputs, targets, set()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        self.read.add(index)
        return self.inputs[index], self.targets[index]


def test_calibration_reads_only_the_calibration_data_and_ranges_stay_frozen(tiny_model):
    from deap_quant import evolve
    calibration, val, test = (RecordingData(*signed_data(48, seed)) for seed in (1, 2, 3))
    qmodel = quantize(tiny_model, bits=3, act_bits=8, act_calibration=calibration)
    assert calibration.read == set(range(48)) and not val.read and not test.read
    before = list(qmodel.act_quantizers)
    calibration.read.clear()
    result = evolve(qmodel, val, test, mu=4, lambda_=6, ngen=2, seed=0, progress=False)
    assert val.read and test.read and not calibration.read  # the search never recalibrates
    assert qmodel.act_quantizers == before
    assert [input_quantizer_of(qmodel.module.get_submodule(layer.name)) for layer in qmodel.layers] == before
    assert result.best["val"] is not None


def test_cli_calibrates_on_the_training_split(tmp_path, digits_zoo, monkeypatch):
    seen = []
    original = act_module.calibrate_activations

    def recording(module, names, inputs, *args, **kwargs):
        seen.append(inputs.clone())
        return original(module, names, inputs, *args, **kwargs)
    monkeypatch.setitem(quantize.__globals__, "calibrate_activations", recording)
    out = tmp_path / "run"
    assert main(["run", "--bits", "4", "--act-bits", "8", "--mu", "4", "--lambda", "6", "--ngen", "1",
                 "--no-progress", "--out", str(out)]) == 0
    assert len(seen) == 1 and torch.equal(seen[0], digits_zoo.data.train[0])
    config = json.loads((out / "results.json").read_text())["config"]["quantization"]
    assert config["act_bits"] == 8 and config["act_observer"] == "minmax"


def test_fast_evaluator_is_bit_identical_with_quantized_activations(tiny_model):
    data = signed_data(48)
    qmodel = quantize(tiny_model, bits=3, act_bits=4, act_calibration=signed_data(64, 9)[0])
    plain = Evaluator(qmodel, data, batch_size=16)
    fast = IncrementalEvaluator(qmodel, data, batch_size=16)
    genomes = lineage(qmodel, seed=0, n=30)
    for genes in genomes:
        assert fast(genes) == plain(genes), genes
    assert fast.stats()["patched"] > 0  # the channel patch quantizes the conv's input as the module does
    no_acts = Evaluator(quantize(tiny_model, bits=3), data, batch_size=16)
    assert any(no_acts(genes) != plain(genes) for genes in genomes)  # the fitness sees the activation grid


def test_adaround_reconstructs_from_quantized_inputs(tiny_model, monkeypatch):
    calibration = signed_data(64, 5)[0]
    qmodel = quantize(tiny_model, bits=3, act_bits=4, act_calibration=calibration)
    captured = []
    original = adaround.__globals__["_round_layer"]

    def recording(module, grid, position, inputs, *args, **kwargs):
        captured.append((module, inputs))
        return original(module, grid, position, inputs, *args, **kwargs)
    monkeypatch.setitem(adaround.__globals__, "_round_layer", recording)
    result = adaround(qmodel, calibration, steps=20, samples=32)
    assert len(captured) == len(qmodel.layers) == len(result.states)
    for (_, inputs), quantizer in zip(captured, qmodel.act_quantizers):
        assert torch.equal(quantizer(inputs), inputs)  # every layer input is on its activation grid
        assert not torch.equal(inputs.round(), inputs)


def test_quantized_activations_survive_pickling_and_process_workers(tiny_model):
    import pickle

    from deap_quant import evolve
    data = signed_data(48)
    qmodel = quantize(tiny_model, bits=3, act_bits=6, act_calibration=signed_data(64, 4)[0])
    clone = pickle.loads(pickle.dumps(qmodel))
    inputs = data[0]
    with torch.no_grad():
        assert torch.equal(clone(inputs), qmodel(inputs))
    assert clone.act_quantizers == qmodel.act_quantizers
    options = {"mu": 4, "lambda_": 6, "ngen": 2, "seed": 0, "progress": False}
    serial = evolve(qmodel, data, data, **options)
    workers = evolve(qmodel, data, data, backend="processes", workers=2, **options)
    assert [list(ind) for ind in workers.hall_of_fame] == [list(ind) for ind in serial.hall_of_fame]
    assert workers.best["val"] == serial.best["val"]


def test_pt_export_round_trip_keeps_the_activation_grids(tiny_model, tmp_path):
    from deap_quant import evolve
    from deap_quant.export import export, load
    data = signed_data(48)
    qmodel = quantize(tiny_model, bits=3, act_bits=4, act_calibration=signed_data(64, 4)[0])
    result = evolve(qmodel, data, data, mu=4, lambda_=6, ngen=1, seed=0, progress=False)
    path = export(result, tmp_path / "model.pt", qmodel=qmodel)
    module = load(path, allow_pickle=True)
    with torch.no_grad(), qmodel.applied(result.best["genes"]):
        expected = qmodel(data[0])
    with torch.no_grad():
        assert torch.equal(module(data[0]), expected)


@pytest.mark.parametrize("options, message", [
    ({"act_bits": 9}, "act_bits=9 is not valid"),
    ({"act_bits": True}, "act_bits=True is not valid"),
    ({"act_bits": 8, "act_observer": "max"}, "act_observer='max' is not valid"),
])
def test_bad_activation_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**options)


def test_act_bits_without_calibration_data_is_refused(tiny_model):
    with pytest.raises(ValueError, match="act_bits=8 needs act_calibration"):
        quantize(tiny_model, act_bits=8)


def test_cli_refuses_bad_act_bits_in_one_line(tmp_path, capsys):
    assert main(["run", "--act-bits", "12", "--out", str(tmp_path / "x"), "--ngen", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "act_bits=12 is not valid" in err[0]


def test_random_genomes_keep_outputs_on_the_activation_grid(tiny_model):
    """With genes applied, the last layer still reads grid values (the hook runs whatever the weights)."""
    qmodel = quantize(tiny_model, bits=3, act_bits=3, act_calibration=signed_data(64, 4)[0])
    seen = []
    handle = qmodel.module.fc.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    rng = random.Random(0)
    try:
        for genes in lineage(qmodel, seed=1, n=5):
            with torch.no_grad(), qmodel.applied(genes):
                qmodel(signed_data(8, rng.randrange(100))[0])
    finally:
        handle.remove()
    fc_quantizer = qmodel.act_quantizers[1]
    assert all(torch.equal(fc_quantizer(x), x) and len(torch.unique(x)) <= 2 ** 3 for x in seen)


def test_adaround_targets_come_from_float_activations(tiny_model):
    from deap_quant.baselines.common import float_module
    qmodel = quantize(tiny_model, bits=3, act_bits=4, act_calibration=signed_data(64, 5)[0])
    float_copy = float_module(qmodel)
    assert all(input_quantizer_of(module) is None for module in float_copy.modules())
    inputs = signed_data(16, 6)[0]
    with torch.no_grad():
        assert (float_copy(inputs) - tiny_model(inputs)).abs().max() < 1e-5
    kept = float_module(qmodel, input_quantizers=True)
    assert input_quantizer_of(kept.conv) == qmodel.act_quantizers[0]


def test_teacher_fitness_scores_the_quantized_activations_against_the_float_model(tiny_model):
    from deap_quant import TeacherEvaluator, evolve
    calibration = signed_data(64, 7)[0]
    qmodel = quantize(tiny_model, bits=3, act_bits=3, act_calibration=signed_data(64, 4)[0])
    weights_only = quantize(tiny_model, bits=3)
    teacher = TeacherEvaluator(qmodel, calibration, teacher=tiny_model)
    reference = TeacherEvaluator(weights_only, calibration, teacher=tiny_model)
    assert teacher([]) != reference([])  # the student runs with its activation grid, the teacher without
    with torch.no_grad():
        student = qmodel(calibration).log_softmax(1)
        target = tiny_model(calibration).log_softmax(1)
    kl = float(torch.nn.functional.kl_div(student, target, log_target=True, reduction="sum")) / len(calibration)
    assert teacher.scores([])["kl"] == pytest.approx(kl, rel=1e-4)
    result = evolve(qmodel, evaluator=teacher, mu=4, lambda_=6, ngen=2, seed=0, progress=False)
    assert result.best["genes"] is not None
