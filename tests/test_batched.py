"""BatchedEvaluator and devices: many genomes per call, bit-identical to one at a time, on the model's device."""

from __future__ import annotations

import json
import math
import pickle
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from deap import algorithms, tools
from torch import nn

import deap_quant as dq
from deap_quant import BatchedEvaluator, Evaluator, IncrementalEvaluator, quantize
from deap_quant.checkpoint import load_checkpoint
from deap_quant.cli import main
from deap_quant.evaluation import Stage, StreamedBatches, resolve_device
from deap_quant.evaluation import batched as batched_module

from .checks import SEARCH
from .checks import run_fingerprint as fingerprint
from .conftest import make_tiny_model
from .test_incremental import lineage

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def reference(problem):
    """The one-at-a-time run (fast evaluator, early rejection on) every batched run must reproduce."""
    qmodel, val = problem
    evaluator = IncrementalEvaluator(qmodel, val, batch_size=SEARCH["batch_size"])
    result = dq.evolve(qmodel, val, evaluator=evaluator, **SEARCH)
    assert evaluator.rejected_count > 0  # the threshold path matters in this run
    return fingerprint(result)


def assert_batched_identical(qmodel, data, genomes, batch_size, calls=2, **options) -> BatchedEvaluator:
    """Every genome's fitness from a BatchedEvaluator (in ``calls`` calls) equals the plain and the incremental one."""
    plain = Evaluator(qmodel, data, batch_size=batch_size)
    single = IncrementalEvaluator(qmodel, data, batch_size=batch_size)
    expected = [plain(genes) for genes in genomes]
    assert [single(genes) for genes in genomes] == expected
    batched = BatchedEvaluator(qmodel, data, batch_size=batch_size, **options)
    step = -(-len(genomes) // calls)
    got = [fitness for begin in range(0, len(genomes), step) for fitness in batched.evaluate_many(genomes[begin:begin + step])]
    assert got == expected
    for genes in genomes[:3]:
        assert batched.scores(genes) == plain.scores(genes)
    return batched


# ---------------------------------------------------------------------------- bit-identical fitness
@pytest.mark.parametrize("stack", [True, False])
@pytest.mark.parametrize("k", [1, 4, 64])
def test_sequential_batched_equals_one_at_a_time(tiny_model, tiny_data, stack, k):
    qmodel = quantize(tiny_model, bits=3)
    batched = assert_batched_identical(qmodel, tiny_data, lineage(qmodel, seed=0, n=30), batch_size=16,
                                       population_batch=k, stack=stack)
    stats = batched.stats()
    assert stats["split"] == "fx" and stats["stage_fraction"] < 1.0 and stats["patched"] > 0
    assert (stats["population_batch"] == 1) == (k == 1) and stats["population_batch"] <= min(k, 15)
    if stack and k > 1:  # genomes with different fc weights ran vmapped over stacked weights
        assert stats["vmap_runs"] > 0 and stats["verifications"] > 0
    else:
        assert stats["vmap_runs"] == stats["concat_runs"] == 0


@pytest.mark.parametrize("stack", [True, False])
def test_resnet_batched_equals_one_at_a_time(resnet_setup, stack):
    qmodel, data = resnet_setup
    batched = assert_batched_identical(qmodel, data, lineage(qmodel, seed=1, n=16), batch_size=16,
                                       population_batch=8, stack=stack)
    stats = batched.stats()
    assert stats["stages"] > 10 and stats["mean_start_stage"] > 0 and stats["patched"] > 0
    assert stats["unchanged_batches"] > 0  # changed-sample reuse still works inside a group
    if stack:  # siblings past their changed layer ran concatenated, others with stacked weights
        assert stats["concat_runs"] > 0 and stats["vmap_runs"] > 0


def test_declared_split_batched_equals_one_at_a_time(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=3)
    module = qmodel.module
    stages = [Stage("features", lambda x: module.flatten(module.pool(module.relu(module.conv(x)))), modules=("conv",)),
              Stage("head", module.fc)]
    batched = assert_batched_identical(qmodel, tiny_data, lineage(qmodel, seed=2, n=20), batch_size=16,
                                       population_batch=6, stack=True, stages=stages)
    assert batched.stats()["split"] == "declared" and batched.stats()["vmap_runs"] > 0


class BatchCentred(nn.Module):
    """Subtracts the batch mean: a stage whose rows depend on the other rows of its batch."""

    def forward(self, x):
        return x - x.mean(dim=0, keepdim=True)


def test_stacked_forms_that_change_bits_are_not_used(tiny_data):
    """A batch-dependent stage cannot run concatenated, and a stage reading a weight captured in a closure
    cannot run with stacked weights: both are found out on first use and run one by one, exactly."""
    torch.manual_seed(4)
    model = nn.Sequential(OrderedDict([("conv", nn.Conv2d(1, 4, 3, padding=1)), ("centre", BatchCentred()),
                                       ("relu", nn.ReLU()), ("flatten", nn.Flatten()),
                                       ("fc", nn.Linear(4 * 8 * 8, 4))])).eval()
    qmodel = quantize(model, bits=3)
    module = qmodel.module
    weight, bias = module.fc.weight, module.fc.bias  # the tensors genes are written into, captured as such
    stages = [Stage("conv", module.conv, modules=("conv",)),
              Stage("rest", lambda x: F.linear(module.flatten(module.relu(module.centre(x))), weight, bias),
                    modules=("centre", "fc"))]
    # siblings that change only the conv's weights share the fc stage's weights: concatenated there
    genomes = [[(0, 3, 1)], [(0, 3, 1), (0, 7, -1)], [(0, 3, 1), (0, 20, 1)], [(0, 3, 1), (0, 30, -1)]]
    genomes += [[(0, 3, 1), (1, i, 1)] for i in (5, 60, 200, 250)]  # and these differ in fc: stacked weights
    batched = assert_batched_identical(qmodel, tiny_data, genomes, batch_size=16, calls=2, population_batch=8,
                                       stack=True, stages=stages)
    again = [batched.evaluate_many(genomes)]  # memo hits: nothing recomputed, nothing changes
    assert again[0] == [Evaluator(qmodel, tiny_data, batch_size=16)(g) for g in genomes]
    rest = {kind: verdict for (kind, stage, *_), verdict in batched._verdicts.items() if stage == 1}
    assert rest == {"cat": False, "vmap": False}  # found inexact on first use, so never used
    assert batched.stats()["concat_runs"] == 0  # (the conv stage itself may run vmapped: it is exact)


def test_larger_k_than_offspring_and_duplicates(problem):
    qmodel, val = problem
    genomes = lineage(qmodel, seed=5, n=12)
    genomes += [list(reversed(genomes[3])), genomes[0]]  # the same genomes again, written differently
    batched = BatchedEvaluator(qmodel, val, batch_size=8, population_batch=500, stack=True)
    values = batched.evaluate_many(genomes)
    assert values == [Evaluator(qmodel, val, batch_size=8)(genes) for genes in genomes]
    distinct = len({batched.genome_key(genes) for genes in genomes})
    assert batched.last_population_batch == distinct < 500
    assert batched.stats()["computed"] == distinct and batched.evaluations == len(genomes)
    assert batched.stats()["groups"] == 1


def test_memory_driven_k_falls_back_to_one(problem, monkeypatch):
    qmodel, val = problem
    genomes = lineage(qmodel, seed=6, n=10)
    expected = [Evaluator(qmodel, val, batch_size=8)(genes) for genes in genomes]
    batched = BatchedEvaluator(qmodel, val, batch_size=8, population_batch="auto", stack=True)
    assert batched.population_batch_now() > 1  # plenty of memory here
    seen = []
    monkeypatch.setattr(batched_module, "free_memory", lambda device: seen.append(device) or 1024)
    assert batched.population_batch_now() == 1
    assert batched.evaluate_many(genomes) == expected
    assert batched.last_population_batch == 1 and batched.stats()["groups"] == batched.stats()["computed"] > 1
    assert seen and all(device == torch.device("cpu") for device in seen)
    monkeypatch.setattr(batched_module, "free_memory", lambda device: None)  # unknown: the request stands
    assert BatchedEvaluator(qmodel, val, batch_size=8, population_batch=3).population_batch_now() == 3


def test_batched_evaluator_pickles(problem):
    qmodel, val = problem
    batched = BatchedEvaluator(qmodel, val, batch_size=8, population_batch=4, stack=True)
    genomes = lineage(qmodel, seed=7, n=8)
    first = batched.evaluate_many(genomes)
    copy = pickle.loads(pickle.dumps(batched))
    assert copy.evaluate_many(genomes) == first and copy.population_batch == 4 and copy.stack is True


@pytest.mark.parametrize("options, message", [
    ({"population_batch": 0}, "population_batch=0 is not valid; use an integer >= 1 or 'auto'"),
    ({"population_batch": "many"}, "population_batch='many' is not valid"),
    ({"population_batch": True}, "population_batch=True is not valid"),
    ({"stack": "yes"}, "stack='yes' is not valid; use 'auto', True or False"),
    ({"store": "some"}, "store='some' is not valid; use 'promising' or 'all'"),
    ({"data_bytes": -1}, "data_bytes=-1 is not valid"),
])
def test_bad_options_are_refused(problem, options, message):
    qmodel, val = problem
    with pytest.raises(ValueError) as error:
        BatchedEvaluator(qmodel, val, **options)
    assert message in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------------------- in DEAP loops and evolve
def test_toolbox_map_batches_a_users_own_deap_loop(problem):
    qmodel, val = problem

    def run(evaluator, batched):
        toolbox = dq.make_toolbox(qmodel, evaluator, init_genes=3)
        if batched:
            toolbox.register("map", evaluator.map)
        random.seed(11)
        population = toolbox.population(n=8)
        hof = tools.HallOfFame(3, similar=toolbox.gene_effects.same)
        stats = tools.Statistics(lambda ind: ind.fitness.values[0])
        stats.register("max", np.max)
        population, logbook = algorithms.eaMuPlusLambda(population, toolbox, mu=8, lambda_=12, cxpb=0.2, mutpb=0.8,
                                                        ngen=3, stats=stats, halloffame=hof, verbose=False)
        return ([(list(i), i.fitness.values) for i in population], [(list(i), i.fitness.values) for i in hof],
                list(logbook))

    batched = BatchedEvaluator(qmodel, val, batch_size=8, population_batch=16, stack=True)
    assert run(batched, True) == run(IncrementalEvaluator(qmodel, val, batch_size=8), False)
    assert batched.calls_many == 4 and batched.last_population_batch > 1  # one call per generation
    assert batched.map(len, [[1, 2], [3]]) == [2, 1]  # other functions are mapped one by one


@pytest.mark.parametrize("population_batch", [1, 5, "auto"])
def test_evolve_with_population_batch_gives_the_one_at_a_time_run(problem, reference, population_batch):
    qmodel, val = problem
    result = dq.evolve(qmodel, val, population_batch=population_batch, **SEARCH)
    assert fingerprint(result) == reference
    details = result.details["population_batch"]
    assert details["calls_many"] == SEARCH["ngen"] + 1 and details["population_batch"] >= 1
    assert details["not_stored"] > 0  # offspring below the selection bar kept no activations
    assert result.details["device"] == "cpu"


def test_evolve_uses_a_given_batched_evaluator_and_stacks(problem, reference):
    qmodel, val = problem
    evaluator = BatchedEvaluator(qmodel, val, batch_size=SEARCH["batch_size"], population_batch=12, stack=True)
    result = dq.evolve(qmodel, val, evaluator=evaluator, **SEARCH)
    assert fingerprint(result) == reference
    assert evaluator.calls_many == SEARCH["ngen"] + 1 and evaluator.vmap_runs > 0


def test_evolve_refuses_population_batch_it_cannot_use(problem):
    qmodel, val = problem
    evaluator = IncrementalEvaluator(qmodel, val)
    with pytest.raises(ValueError, match="with evaluator=..., pass a BatchedEvaluator"):
        dq.evolve(qmodel, val, evaluator=evaluator, population_batch=4, **SEARCH)
    with pytest.raises(ValueError, match=r"population_batch=4 needs the fast evaluator \(fast=True\)"):
        dq.evolve(qmodel, val, fast=False, population_batch=4, **SEARCH)
    with pytest.raises(ValueError, match="population_batch=0 is not valid"):
        dq.evolve(qmodel, val, population_batch=0, **SEARCH)


def test_processes_with_batching_give_the_serial_run(problem, reference):
    qmodel, val = problem
    result = dq.evolve(qmodel, val, population_batch=6, backend="processes", workers=2, **SEARCH)
    assert fingerprint(result) == reference
    parallel = result.details["parallel"]
    assert parallel["backend"] == "processes" and parallel["workers_started"] == 2
    assert parallel["batch_size"] == SEARCH["lambda_"] // 2  # each worker gets its share as one batch


# ---------------------------------------------------------------------------- devices
def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(None, make_tiny_model()) == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    for bad, message in (("tpu", "device='tpu' is not valid"), (3.5, "device=3.5 is not valid"),
                         ("meta", "device='meta' is not supported")):
        with pytest.raises(ValueError) as error:
            resolve_device(bad)
        assert message in str(error.value) and "available here: cpu" in str(error.value)
    if not CUDA:
        with pytest.raises(ValueError) as error:
            resolve_device("cuda")
        assert str(error.value).startswith("device='cuda' is not available") and "available here: cpu" in str(
            error.value) and "\n" not in str(error.value)


def test_evolve_on_cpu_device_and_bad_devices(problem, reference):
    qmodel, val = problem
    assert fingerprint(dq.evolve(qmodel, val, device="cpu", **SEARCH)) == reference
    if not CUDA:
        with pytest.raises(ValueError, match="device='cuda' is not available"):
            dq.evolve(qmodel, val, device="cuda", **SEARCH)
    with pytest.raises(ValueError, match="device='gpu' is not valid"):
        dq.evolve(qmodel, val, device="gpu", **SEARCH)


def checkpointed_then_resumed(qmodel, val, tmp_path, device):
    """A run checkpointed on ``device`` and interrupted after generation 2, resumed on the CPU."""
    class Stop(Exception):
        pass

    def stop(state):
        if state["gen"] == 3:
            raise Stop

    with pytest.raises(Stop):
        dq.evolve(qmodel, val, device=device, population_batch=4, checkpoint=tmp_path, callback=stop, **SEARCH)
    saved = (tmp_path / "checkpoint.json").read_text()
    assert "cuda" not in saved and load_checkpoint(tmp_path).generation == 2
    return dq.evolve(qmodel, val, resume=tmp_path, device="cpu", population_batch=4, progress=False,
                     batch_size=SEARCH["batch_size"])


def test_checkpoint_written_with_a_device_resumes_on_cpu(problem, reference, tmp_path):
    qmodel, val = problem
    resumed = checkpointed_then_resumed(qmodel, val, tmp_path, "cpu")
    assert fingerprint(resumed) == reference and resumed.details["resumed_from_generation"] == 2


def test_streamed_batches_move_one_batch_at_a_time(tiny_data):
    batches = [(tiny_data[0][i:i + 16], tiny_data[1][i:i + 16]) for i in range(0, 48, 16)]
    streamed = StreamedBatches(batches, torch.device("cpu"), torch.float64, keep=2)
    assert len(streamed) == 3 and streamed.nbytes > 0
    inputs, targets = streamed[1]
    assert inputs.dtype == torch.float64 and torch.equal(inputs, batches[1][0].double())
    assert torch.equal(targets, batches[1][1])
    streamed[1], streamed[-1], streamed[1]
    assert streamed.transfers == 2  # batch 1 and batch 2, each moved once
    streamed[0]  # evicts batch 2 (least recently used)
    streamed[2]
    assert streamed.transfers == 4
    assert [len(t) for _, t in streamed] == [16, 16, 16]


def test_cli_device_option(tmp_path, digits_zoo, capsys):
    tiny = ["--mu", "4", "--lambda", "6", "--ngen", "1", "--no-progress"]
    assert main(["run", "--device", "tpu", "--out", str(tmp_path / "x"), *tiny]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deap-quant: error: device='tpu' is not valid") and len(err.splitlines()) == 1
    if not CUDA:
        assert main(["run", "--device", "cuda", "--out", str(tmp_path / "x"), *tiny]) == 2
        err = capsys.readouterr().err.strip()
        assert "device='cuda' is not available" in err and "available here: cpu" in err and len(err.splitlines()) == 1
    out = tmp_path / "run"
    assert main(["run", "--device", "cpu", "--bits", "2", "--out", str(out), *tiny]) == 0
    content = json.loads((out / "results.json").read_text())
    assert content["details"]["device"] == "cpu"


def test_cli_population_batch_gives_the_one_at_a_time_run(tmp_path, digits_zoo, capsys):
    tiny = ["--mu", "4", "--lambda", "6", "--ngen", "2", "--no-progress", "--bits", "2"]
    runs = (["--population-batch", "off"], "plain"), ([], "default"), (["--population-batch", "3"], "k3")
    for flag, folder in runs:
        assert main(["run", *flag, "--out", str(tmp_path / folder), *tiny]) == 0
    read = {folder: json.loads((tmp_path / folder / "results.json").read_text()) for _, folder in runs}
    assert read["plain"]["details"]["population_batch"] is None  # off: one at a time
    for folder in ("default", "k3"):  # batched by default
        assert read[folder]["hall_of_fame"] == read["plain"]["hall_of_fame"]
        assert read[folder]["best"] == read["plain"]["best"]
        assert read[folder]["details"]["population_batch"] is not None
    assert main(["run", "--population-batch", "0", "--out", str(tmp_path / "x"), *tiny]) == 2
    assert "0 is not valid" in capsys.readouterr().err


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_batched_equals_one_at_a_time_and_streams(problem, tmp_path):
    qmodel, val = problem
    cpu_model = qmodel.module
    assert resolve_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    gpu = quantize(make_tiny_model(), bits=2)
    gpu.module.cuda()
    genomes = lineage(gpu, seed=8, n=16)
    expected = [IncrementalEvaluator(gpu, val, batch_size=8)(genes) for genes in genomes]
    assert [Evaluator(gpu, val, batch_size=8)(genes) for genes in genomes] == expected
    for options in ({"stack": True}, {"stack": "auto"}, {"stack": True, "data_bytes": 0}):
        batched = BatchedEvaluator(gpu, val, batch_size=8, population_batch=8, **options)
        assert batched.evaluate_many(genomes[:8]) + batched.evaluate_many(genomes[8:]) == expected
        assert batched.stacking and batched.streamed == (options.get("data_bytes") == 0)
        assert batched._split is not None
    # evolve on CUDA: the model goes there for the run and comes back
    result = dq.evolve(qmodel, val, device="cuda", population_batch=6, **SEARCH)
    assert result.details["device"].startswith("cuda") and qmodel.module is cpu_model
    assert all(p.device.type == "cpu" for p in qmodel.module.parameters())
    # a checkpoint written on CUDA resumes on the CPU
    resumed = checkpointed_then_resumed(qmodel, val, tmp_path, "cuda")
    assert resumed.details["device"] == "cpu" and resumed.evaluations == result.evaluations
    assert all(math.isfinite(ind.fitness.values[0]) for ind in resumed.population)


def test_benchmark_quick_reports_population_batching(digits_zoo, tmp_path):
    """benchmarks/eval_throughput.py --quick with the batched evaluator: the documented JSON, identical results."""
    import runpy
    from pathlib import Path

    benchmark = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "eval_throughput.py"),
                               run_name="eval_throughput")
    path = tmp_path / "throughput.json"
    results = benchmark["main"](["--quick", "--quiet", "--models", "digits_cnn", "--population-batches", "1,4",
                                 "--stack", "on", "--device", "cpu", "--json", str(path)])
    written = json.loads(path.read_text())
    assert results["identical"] is True and written["population_batched"]["identical"] is True
    figures = written["population_batched"]["digits_cnn"]
    assert figures["speedup_vs_fast"] > 0 and figures["best_k"] in (1, 4)
    runs = written["digits_cnn"]["batched"]
    assert set(runs) == {"1", "4"} and all(run["identical"] for run in runs.values())
    assert runs["4"]["stacking"] is True and runs["4"]["population_batch"] > 1
    assert written["digits_cnn"]["device"] == "cpu"
    for argv in (["--population-batches", "0"], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as error:
            benchmark["main"](["--quick", "--quiet", *argv])
        assert error.value.code == 2
