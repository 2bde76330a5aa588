"""Devices, dtypes, memory formats and exact change detection.

Genes must reach the tensors the module computes with, whatever happened to the module after
quantizing (``.double()``, ``.half()``, ``.to(memory_format=...)``, ``.to(device)``); every
evaluator must move its data to the model's device and floating dtype; and a fast evaluator must
notice any edit of the model's parameters and buffers.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from deap_quant import Evaluator, IncrementalEvaluator, quantize
from deap_quant.evaluation import StageSplit, TeacherEvaluator
from deap_quant.evaluation import incremental as incremental_module

DTYPES = (torch.float16, torch.bfloat16, torch.float64)


def bn_model(seed: int = 0) -> nn.Sequential:
    """Conv + BatchNorm (non-trivial statistics) + ReLU + pool + Linear on 1x8x8 inputs."""
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(1, 4, 3, padding=1)), ("bn", nn.BatchNorm2d(4)), ("relu", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)), ("flatten", nn.Flatten()), ("fc", nn.Linear(4 * 4 * 4, 4)),
    ]))
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def rgb_model(seed: int = 0) -> nn.Sequential:
    """Conv(3->4) + Linear on 3x8x8 inputs: channels_last really reorders its conv weight in memory."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(3, 4, 3, padding=1)), ("relu", nn.ReLU()), ("pool", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()), ("fc", nn.Linear(4 * 4 * 4, 4)),
    ])).eval()


def expected_weight(qmodel, reference, layer: int) -> torch.Tensor:
    """What ``qmodel``'s layer must hold: ``reference``'s (float32, contiguous) values in its own dtype."""
    live = dict(qmodel.module.named_modules())[qmodel.layers[layer].name].weight
    return reference.dequantized_weights(layer).to(live.dtype)


GENES = [(0, 7, 1), (0, 30, -2), (1, 5, 1), (1, 200, -1), (1, 201, 3)]


# ---------------------------------------------------------------------------- stale views (defect 1)
@pytest.mark.parametrize("convert", [
    pytest.param(lambda m: m.double(), id="double"),
    pytest.param(lambda m: m.half(), id="half"),
    pytest.param(lambda m: m.bfloat16(), id="bfloat16"),
    pytest.param(lambda m: m.to(memory_format=torch.channels_last), id="channels_last"),
    pytest.param(lambda m: m.to(torch.float64).to(torch.float32), id="double-and-back"),
])
def test_genes_reach_the_live_weights_after_the_module_is_converted(convert):
    qmodel = quantize(rgb_model(), bits=3)
    reference = quantize(rgb_model(), bits=3)
    convert(qmodel.module)
    modules = dict(qmodel.module.named_modules())
    with qmodel.applied(GENES), reference.applied(GENES):
        for layer, info in enumerate(qmodel.layers):
            live = modules[info.name].weight
            assert torch.equal(live, expected_weight(qmodel, reference, layer))
            assert torch.equal(qmodel.dequantized_weights(layer), live)
    for layer, info in enumerate(qmodel.layers):  # reverted bit for bit
        assert torch.equal(modules[info.name].weight, expected_weight(qmodel, reference, layer))


def test_channels_last_genes_use_the_logical_flat_index():
    qmodel = quantize(rgb_model(), bits=3)
    qmodel.module.to(memory_format=torch.channels_last)
    weight = qmodel.module.conv.weight
    assert not weight.is_contiguous()  # the case under test: memory order != logical order
    for index in (1, 9, 17, 35, 100):
        before = weight.detach().clone()
        step = 1 if int(qmodel.base_states(0).reshape(-1)[index]) < qmodel.layers[0].n_levels - 1 else -1
        with qmodel.applied([(0, index, step)]):
            changed = (weight != before).reshape(-1).nonzero().flatten().tolist()
        assert changed == [index]
        assert torch.equal(weight, before)


def test_fitness_follows_genes_after_double(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=3)
    reference = quantize(tiny_model, bits=3)
    qmodel.module.double()
    genes = [(1, 5, 3), (1, 77, -3)]
    plain = Evaluator(qmodel, tiny_data, batch_size=16)  # float32 inputs, moved to the model's dtype
    fast = IncrementalEvaluator(qmodel, tiny_data, batch_size=16)
    baseline = plain([])
    assert plain(genes) != baseline
    assert fast(genes) == plain(genes) and fast([]) == baseline
    # the float64 model computes what the float32 reference computes, up to float32 rounding
    assert plain(genes)[0] == Evaluator(reference, tiny_data, batch_size=16)(genes)[0]
    assert plain(genes)[1] == pytest.approx(Evaluator(reference, tiny_data, batch_size=16)(genes)[1], rel=1e-5)


def test_incremental_evaluator_notices_a_conversion_between_calls(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=3)
    fast = IncrementalEvaluator(qmodel, tiny_data, batch_size=16)
    genes = [(1, 5, 3)]
    fast(genes), fast([])
    qmodel.module.double()
    plain = Evaluator(qmodel, tiny_data, batch_size=16)
    assert fast(genes) == plain(genes) != plain([])
    assert fast([]) == plain([])
    qmodel.module.float().to(memory_format=torch.channels_last)
    assert fast(genes) == plain(genes) and fast([]) == plain([])


# ---------------------------------------------------------------------------- dtypes (defect 2)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_and_evaluate_in_other_dtypes(dtype, tiny_data):
    model = bn_model().to(dtype)
    qmodel = quantize(model, bits=4)
    for layer, info in enumerate(qmodel.layers):
        weight = dict(qmodel.module.named_modules())[info.name].weight
        assert weight.dtype == dtype
        assert torch.equal(weight, qmodel.grids[layer].dequantize(qmodel.base_states(layer)).to(dtype))
    residuals = qmodel.residuals()
    assert all(isinstance(r, np.ndarray) and r.dtype == np.float32 for r in residuals)
    plain = Evaluator(qmodel, tiny_data, batch_size=16)
    fast = IncrementalEvaluator(qmodel, tiny_data, batch_size=16)
    baseline = plain([])
    before = [w.detach().clone() for w in qmodel.module.parameters()]
    genes = [(1, 5, 3), (1, 77, -3), (0, 3, 2)]
    assert plain(genes) != baseline
    assert fast(genes) == plain(genes) and fast([]) == baseline
    assert fast([(1, 5, 3)]) == plain([(1, 5, 3)])
    assert all(torch.equal(a, b) for a, b in zip(before, qmodel.module.parameters()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_teacher_evaluator_in_other_dtypes(dtype, tiny_data):
    model = bn_model().to(dtype)
    qmodel = quantize(model, bits=4)
    inputs = tiny_data[0]  # float32: moved to the teacher's and the quantized model's dtype
    for fast in (False, True):
        teacher = TeacherEvaluator(qmodel, inputs, teacher=model, batch_size=16, fast=fast)
        assert teacher([(1, 5, 3)]) != teacher([])


@pytest.mark.filterwarnings("ignore:Complex modules")
def test_unsupported_dtype_and_device_are_refused_in_one_line():
    complex_model = nn.Linear(4, 2).to(torch.complex64)
    with pytest.raises(ValueError) as error:
        quantize(complex_model)
    assert "torch.complex64" in str(error.value) and "\n" not in str(error.value)
    meta_model = nn.Linear(4, 2, device="meta")
    with pytest.raises(ValueError) as error:
        quantize(meta_model)
    assert "'meta'" in str(error.value) and "\n" not in str(error.value)


def test_only_shape_errors_read_as_inputs_that_do_not_fit(tiny_model, tiny_data):
    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 4)

        def forward(self, x):
            raise RuntimeError("a kernel failed for its own reasons")

    qmodel = quantize(Failing())
    for kind in (Evaluator, IncrementalEvaluator):
        with pytest.raises(RuntimeError, match="its own reasons") as error:
            kind(qmodel, tiny_data, batch_size=16)([])
        assert not isinstance(error.value, ValueError)
    wrong = (torch.randn(8, 3, 8, 8), torch.zeros(8, dtype=torch.long))
    for kind in (Evaluator, IncrementalEvaluator):
        with pytest.raises(ValueError, match=r"inputs of shape \(8, 3, 8, 8\) do not fit the model: .*3 channels"):
            kind(quantize(tiny_model), wrong, batch_size=16)([])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_with_cpu_data(tiny_data):
    model = bn_model()
    cpu = quantize(model, bits=4)
    gpu = quantize(model.cuda(), bits=4)
    for layer in range(len(cpu.layers)):
        assert torch.equal(cpu.base_states(layer), gpu.base_states(layer))
        assert torch.equal(cpu.dequantized_weights(layer), gpu.dequantized_weights(layer).cpu())
    assert all(isinstance(r, np.ndarray) for r in gpu.residuals())
    genes = [(1, 5, 3), (1, 77, -3), (0, 3, 2)]
    plain = Evaluator(gpu, tiny_data, batch_size=16)
    fast = IncrementalEvaluator(gpu, tiny_data, batch_size=16)
    assert plain(genes) != plain([])
    assert fast(genes) == plain(genes) and fast([]) == plain([])
    on_cpu = Evaluator(cpu, tiny_data, batch_size=16)(genes)  # other kernels (TF32 convolutions): close, not equal
    assert abs(plain(genes)[0] - on_cpu[0]) <= 2 / 48 and plain(genes)[1] == pytest.approx(on_cpu[1], rel=2e-2)
    with gpu.applied(genes), cpu.applied(genes):
        for layer in range(len(cpu.layers)):
            assert torch.equal(cpu.dequantized_weights(layer), gpu.dequantized_weights(layer).cpu())
    teacher = TeacherEvaluator(gpu, tiny_data[0], teacher=model, batch_size=16)
    assert teacher(genes) != teacher([])
    gpu.module.cpu()  # moved back: genes follow, evaluators notice
    assert fast(genes) == Evaluator(gpu, tiny_data, batch_size=16)(genes)
    moved = quantize(bn_model(), bits=4)
    moved.module.cuda()  # quantized on the CPU, then moved: genes reach the CUDA weights
    assert IncrementalEvaluator(moved, tiny_data, batch_size=16)(genes) == Evaluator(moved, tiny_data, batch_size=16)(
        genes) != Evaluator(moved, tiny_data, batch_size=16)([])
    half = quantize(bn_model().cuda().half(), bits=4)
    assert IncrementalEvaluator(half, tiny_data, batch_size=16)(genes) == Evaluator(half, tiny_data, batch_size=16)(genes)


# ---------------------------------------------------------------------------- exact token (defect 5)
def edits():
    """Hand edits of a weight, a bias and BatchNorm buffers, in the usual in-place ways."""
    def weight(model, step):
        with torch.no_grad():
            model.fc.weight[step % 4, step] += 0.75

    def bias(model, step):
        with torch.no_grad():
            model.fc.bias[step % 4] += 0.5

    def running_mean(model, step):
        model.bn.running_mean[step % 4] += 0.5

    def running_var(model, step):
        model.bn.running_var.mul_(1.5)

    def bias_data(model, step):
        model.conv.bias.data = model.conv.bias.data + 0.25

    def buffer_replaced(model, step):
        model.bn.running_mean = model.bn.running_mean - 0.25

    return [weight, bias, running_mean, running_var, bias_data, buffer_replaced]


@pytest.mark.parametrize("edit", edits(), ids=lambda f: f.__name__)
def test_hand_edits_are_never_answered_with_a_stale_fitness(edit, tiny_data):
    qmodel = quantize(bn_model(), bits=3)
    fast = IncrementalEvaluator(qmodel, tiny_data, batch_size=16)
    genes = [(1, 5, 2), (0, 3, 1)]
    for step in range(6):  # single weights at several positions, not just a few probed ones
        old = fast(genes), fast([])
        edit(qmodel.module, step)
        plain = Evaluator(qmodel, tiny_data, batch_size=16)
        new = plain(genes), plain([])
        assert new != old  # the edit matters ...
        assert (fast(genes), fast([])) == new  # ... and is noticed


def test_writes_through_the_model_keep_the_cache(tiny_model, tiny_data):
    """Other evaluators' genes, written and reverted, leave the token (and the cache) alone."""
    qmodel = quantize(tiny_model, bits=3)
    fast = IncrementalEvaluator(qmodel, tiny_data, batch_size=16)
    other = IncrementalEvaluator(qmodel, tiny_data, batch_size=16)
    fast([(1, 5, 2)])
    for genes in ([(1, 6, 1)], [(0, 2, -1)], []):
        other(genes)
        Evaluator(qmodel, tiny_data, batch_size=16)(genes)
    hits = fast.memo_hits
    fast([(1, 5, 2)])
    assert fast.memo_hits == hits + 1
    # evaluating while other genes are in force is not confused with the base
    with qmodel.applied([(1, 9, 3)]):
        inside = fast([(1, 5, 2)])
    assert inside == Evaluator(qmodel, tiny_data, batch_size=16)([(1, 9, 3), (1, 5, 2)])
    assert fast([(1, 5, 2)]) == Evaluator(qmodel, tiny_data, batch_size=16)([(1, 5, 2)])


def test_split_and_patches_are_verified_under_the_evaluation_threads(tiny_model, tiny_data, monkeypatch):
    seen = {}
    split_model, verify = incremental_module.split_model, StageSplit.verify_patches

    def recording_split(*args, **kwargs):
        seen["split"] = torch.get_num_threads()
        return split_model(*args, **kwargs)

    def recording_verify(self, samples):
        seen["patches"] = torch.get_num_threads()
        return verify(self, samples)

    monkeypatch.setattr(incremental_module, "split_model", recording_split)
    monkeypatch.setattr(StageSplit, "verify_patches", recording_verify)
    outside = torch.get_num_threads()
    threads = 2 if outside != 2 else 1
    fast = IncrementalEvaluator(quantize(tiny_model, bits=3), tiny_data, batch_size=16, threads=threads)
    assert len(fast.split) > 1  # built on first use, outside any evaluation
    assert seen == {"split": threads, "patches": threads}
    assert torch.get_num_threads() == outside
