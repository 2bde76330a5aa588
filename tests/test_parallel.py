"""Parallel evaluation: identical runs on every backend and worker count, worker faults, optional Ray."""

from __future__ import annotations

import functools
import math
import os
import random
import signal
import sys
import time

import pytest
import torch

import deap_quant as dq
from deap_quant.evaluation.incremental import IncrementalEvaluator
from deap_quant.parallel import MapConfig, WorkersLostError, make_map, plan_batch_size, ray_available
from deap_quant.parallel.base import share_memory
from deap_quant.quantization import GeneError

from .checks import SEARCH
from .checks import run_fingerprint as fingerprint
from .conftest import make_tiny_model


@pytest.fixture(scope="module")
def reference(problem):
    """The serial run every other backend must reproduce (fast evaluator, early rejection on)."""
    qmodel, val = problem
    evaluator = IncrementalEvaluator(qmodel, val, batch_size=SEARCH["batch_size"])
    result = dq.evolve(qmodel, val, evaluator=evaluator, **SEARCH)
    assert evaluator.rejected_count > 0  # the threshold path matters in this run
    return fingerprint(result)


# ---------------------------------------------------------------------------- helpers run in workers
PICKLED = {"count": 0}


class Tally:
    """Counts its calls, in whichever process holds it; counts its pickling in the driver."""

    def __init__(self):
        self.calls = 0

    def __call__(self, genes):
        self.calls += 1
        return float(self.calls), float(os.getpid())

    def __getstate__(self):
        PICKLED["count"] += 1
        return self.__dict__.copy()


def type_name(item) -> str:
    return type(item).__name__


class DieOnce:
    """Delegates to ``inner``; once ``armed`` exists, the first worker to evaluate genes SIGKILLs itself.

    Exactly one worker dies (an exclusive-create of ``fired`` decides), in the middle of a batch.
    Never kills the driver.
    """

    def __init__(self, inner, armed: str, fired: str):
        self.inner, self.armed, self.fired, self.driver = inner, armed, fired, os.getpid()

    def __call__(self, genes):
        if genes and os.getpid() != self.driver and os.path.exists(self.armed):
            try:
                os.close(os.open(self.fired, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(genes)

    def __getattr__(self, name):  # threshold, reject_below, prepare_generation, scores, headline, ...
        if name.startswith("__") or name in ("inner", "armed", "fired", "driver"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def die_once_run(problem, tmp_path, **options) -> tuple[dq.EvolutionResult, str]:
    qmodel, val = problem
    armed, fired = str(tmp_path / "armed"), str(tmp_path / "fired")
    evaluator = DieOnce(IncrementalEvaluator(qmodel, val, batch_size=SEARCH["batch_size"]), armed, fired)

    def arm(state):
        if state["gen"] == 1:
            open(armed, "w").close()

    return dq.evolve(qmodel, val, evaluator=evaluator, callback=arm, **SEARCH, **options), fired


# ---------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("options, message", [
    ({"backend": "threads"}, "backend='threads' is not valid; use one of serial, processes, ray"),
    ({"backend": "processes", "workers": 0}, "workers=0 is not valid"),
    ({"backend": "processes", "batch_size": -1}, "batch_size=-1 is not valid"),
    ({"backend": "processes", "ray_address": "auto"}, "needs backend='ray'"),
    ({"backend": "processes", "start_method": "fork"}, "start_method='fork' is not valid"),
    ({"backend": "processes", "overhead_target": 1.5}, "overhead_target=1.5 is not valid"),
])
def test_bad_map_options(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MapConfig(**options)


def test_batch_size_keeps_overhead_under_target_without_starving_workers():
    # 1 ms per call, 0.1 ms per evaluation: 5 % needs batches of 200, but 40 items over 2 workers cap it at 20
    assert plan_batch_size(40, 2, 1e-3, 1e-4, 0.05) == 20
    assert plan_batch_size(4000, 2, 1e-3, 1e-4, 0.05) == 200
    # slow evaluations (10 ms): one item per batch already keeps the overhead at 1 %
    assert plan_batch_size(40, 2, 1e-4, 1e-2, 0.05) == 1
    assert plan_batch_size(40, 2, 1e-3, math.inf, 0.05) == 20


# ---------------------------------------------------------------------------- process pool
def test_process_map_ships_the_evaluator_once_and_then_only_gene_lists(problem):
    qmodel, _ = problem
    toolbox = dq.make_toolbox(qmodel, Tally())
    population = toolbox.population(n=10)
    PICKLED["count"] = 0
    with make_map("processes", 2, toolbox.evaluate) as pmap:
        results = [pmap(toolbox.evaluate, population) for _ in range(3)]
        assert pmap(type_name, population) == ["list"] * 10  # fitness stays in the driver
        assert pmap(len, population) == [len(ind) for ind in population]  # order kept
        assert pmap(len, []) == []
        assert pmap.workers == 2 and len(set(pmap.worker_pids())) == 2
    assert PICKLED["count"] == 1
    counts = [calls for batch in results for calls, _ in batch]
    assert max(counts) > 10  # one worker's evaluator saw more than one call's worth: it was kept, not resent
    assert len({pid for batch in results for _, pid in batch} - {float(os.getpid())}) == 2  # all in the workers


def test_worker_exceptions_reach_the_driver_and_the_pool_survives(problem):
    qmodel, val = problem
    evaluator = dq.Evaluator(qmodel, val)
    good = [[(0, 1, 1)], [], [(1, 3, -1)]]
    with make_map("processes", 2, evaluator) as pmap:
        with pytest.raises(GeneError, match="index=99999 is out of range"):
            pmap(evaluator, good + [[(0, 99999, 1)]])
        assert pmap(evaluator, good) == [evaluator(genes) for genes in good]
        with pytest.raises(TypeError, match="cannot be pickled"):
            pmap(lambda genes: 0, good)


def test_rejection_threshold_is_applied_in_the_workers(problem):
    qmodel, val = problem
    toolbox = dq.make_toolbox(qmodel, IncrementalEvaluator(qmodel, val, batch_size=8),
                              layer_choice="size", sampler="uniform")  # a population on both sides of 0.85
    random.seed(0)
    population = toolbox.population(n=12)
    exact = [dq.Evaluator(qmodel, val, batch_size=8)(ind) for ind in population]
    threshold = (0.85, -math.inf)
    assert any(fitness < threshold for fitness in exact) and any(fitness >= threshold for fitness in exact)
    with make_map("processes", 2, toolbox.evaluate, batch_size=1) as pmap:
        toolbox.evaluate.func.reject_below(threshold)  # set in the driver, as evolve does
        bounded = pmap(toolbox.evaluate, population)
        toolbox.evaluate.func.reject_below(None)
        assert pmap(toolbox.evaluate, population) == exact  # and lifted again
    assert bounded != exact  # the workers stopped some evaluations early
    # Whether (and where) an individual below the threshold is stopped depends on what its worker has
    # cached; either way it gets an upper bound that stays below the threshold. Nothing above is touched.
    for fitness, truth in zip(bounded, exact):
        if truth >= threshold:
            assert fitness == truth
        else:
            assert truth <= fitness < threshold


class CacheBudget:
    """Reports the activation-cache budget of the evaluator it wraps, as seen where it runs."""

    def __init__(self, evaluator):
        self.evaluator = evaluator

    def __call__(self, genes):
        return self.evaluator.cache_bytes


def test_workers_on_one_machine_split_the_default_cache_budget(problem):
    qmodel, val = problem
    explicit = IncrementalEvaluator(qmodel, val, cache_bytes=10_000)
    share_memory(functools.partial(explicit), 4)
    assert explicit.cache_bytes == 10_000  # a budget the user chose is kept
    wrapped = CacheBudget(IncrementalEvaluator(qmodel, val))
    assert wrapped([]) is None  # the driver's evaluator sizes its cache itself
    with make_map("processes", 2, wrapped) as pmap:
        budgets = pmap(wrapped, [[], []])
    assert all(isinstance(budget, int) and budget > 0 for budget in budgets)
    assert wrapped.evaluator.cache_bytes is None


@pytest.mark.parametrize("workers", [1, 2])
def test_processes_give_the_serial_run(problem, reference, workers):
    qmodel, val = problem
    result = dq.evolve(qmodel, val, backend="processes", workers=workers, **SEARCH)
    assert fingerprint(result) == reference
    assert result.details["parallel"]["backend"] == "processes"
    assert result.details["parallel"]["workers_started"] == workers


def test_processes_give_the_serial_run_with_the_plain_evaluator(problem):
    qmodel, val = problem
    serial = dq.evolve(qmodel, val, fast=False, **SEARCH)
    assert fingerprint(dq.evolve(qmodel, val, fast=False, backend="processes", workers=2, **SEARCH)) \
        == fingerprint(serial)


def test_worker_killed_mid_generation_is_replaced_by_a_rerun(problem, reference, tmp_path):
    result, fired = die_once_run(problem, tmp_path, backend="processes", workers=2)
    assert os.path.exists(fired)  # a worker really died, in generation 2, inside a batch
    assert fingerprint(result) == reference
    assert result.details["parallel"]["workers_lost"] == 1
    assert result.details["parallel"]["requeued_batches"] == 1


def test_user_toolbox_with_a_pool_survives_a_killed_worker(problem, reference):
    qmodel, val = problem
    evaluator = IncrementalEvaluator(qmodel, val, batch_size=SEARCH["batch_size"])
    config = dq.EvolutionConfig(**{k: v for k, v in SEARCH.items() if k not in ("batch_size", "progress")})
    toolbox = dq.make_toolbox(qmodel, evaluator, **config.toolbox_options)
    with make_map("processes", 2, toolbox.evaluate) as pmap:
        toolbox.register("map", pmap)

        def kill(state):
            if state["gen"] == 1:
                os.kill(pmap.worker_pids()[0], signal.SIGKILL)

        result = dq.evolve(qmodel, val, evaluator=evaluator, toolbox=toolbox, callback=kill, **SEARCH)
        assert pmap.workers == 1 and pmap.workers_lost == 1
    assert fingerprint(result) == reference
    assert "SIGKILL" in pmap.lost_reasons[0]


def test_evolve_gives_a_callers_toolbox_its_own_map_back(problem):
    qmodel, val = problem
    evaluator = dq.Evaluator(qmodel, val)
    toolbox = dq.make_toolbox(qmodel, evaluator)
    own_map = toolbox.map
    result = dq.evolve(qmodel, val, evaluator=evaluator, toolbox=toolbox, backend="processes", workers=1, mu=2,
                       lambda_=2, ngen=1, progress=False)
    assert result.details["parallel"]["items"] == result.evaluations
    assert toolbox.map is own_map


def test_losing_every_worker_is_a_clear_error(problem):
    qmodel, val = problem
    evaluator = dq.Evaluator(qmodel, val)
    with make_map("processes", 1, evaluator) as pmap:
        os.kill(pmap.worker_pids()[0], signal.SIGKILL)
        with pytest.raises(WorkersLostError, match="all 1 workers of the processes backend are gone .*SIGKILL"):
            pmap(evaluator, [[], [(0, 1, 1)]])
        with pytest.raises(WorkersLostError):
            pmap(evaluator, [[]])


# ---------------------------------------------------------------------------- Ray
def test_missing_ray_says_how_to_install_it(problem, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail, as if not installed
    assert not ray_available()
    qmodel, val = problem
    with pytest.raises(ImportError, match=r'pip install -e "\.\[ray\]"'):
        make_map("ray", 1, dq.Evaluator(qmodel, val))
    with pytest.raises(ImportError, match="needs Ray"):
        dq.evolve(qmodel, val, backend="ray", workers=1, **SEARCH)
    from deap_quant.cli import main
    assert main(["run", "--backend", "ray", "--workers", "2", "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("deap-quant: error:") and "pip install" in error and "\n" not in error


@pytest.fixture(scope="module")
def ray_instance():
    if not ray_available():
        pytest.skip('Ray is not installed (pip install -e ".[ray]"); the ray backend tests need it')
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_ray_gives_the_serial_run(problem, reference, ray_instance):
    qmodel, val = problem
    result = dq.evolve(qmodel, val, backend="ray", workers=1, **SEARCH)
    assert fingerprint(result) == reference
    assert result.details["parallel"]["backend"] == "ray"
    assert result.details["parallel"]["workers_started"] == 1
    assert ray_instance.is_initialized()  # a Ray instance the map did not start is left running


# Two actors (each Ray map costs seconds of actor start-up, so the two-actor runs double as fault tests):
# both actors evaluate generations 0 and 1, then one is lost and the other finishes the run.
def test_ray_actor_killed_between_generations(problem, reference, ray_instance):
    qmodel, val = problem
    evaluator = IncrementalEvaluator(qmodel, val, batch_size=SEARCH["batch_size"])
    config = dq.EvolutionConfig(**{k: v for k, v in SEARCH.items() if k not in ("batch_size", "progress")})
    toolbox = dq.make_toolbox(qmodel, evaluator, **config.toolbox_options)
    with make_map("ray", 2, toolbox.evaluate) as rmap:
        toolbox.register("map", rmap)

        def kill(state):
            if state["gen"] == 2:
                actor = rmap.actors[0]
                ray_instance.kill(actor)
                for _ in range(300):  # ray.kill is asynchronous: make sure it is dead before generation 3
                    try:
                        ray_instance.get(actor.ping.remote(), timeout=10)
                    except (ray_instance.exceptions.RayActorError, ray_instance.exceptions.GetTimeoutError):
                        break
                    time.sleep(0.1)

        result = dq.evolve(qmodel, val, evaluator=evaluator, toolbox=toolbox, callback=kill, **SEARCH)
        assert rmap.workers == 1 and rmap.workers_lost == 1 and rmap.requeued == 1
    assert fingerprint(result) == reference


def test_ray_actor_process_killed_mid_generation(problem, reference, ray_instance, tmp_path):
    result, fired = die_once_run(problem, tmp_path, backend="ray", workers=2)
    assert os.path.exists(fired)
    assert fingerprint(result) == reference
    assert result.details["parallel"]["workers_lost"] == 1


def test_ray_gives_the_serial_run_with_quantized_activations(problem, ray_instance):
    """Input quantizers (act_bits) travel to the actors with the model: the same run as serial."""
    model = make_tiny_model()
    _, val = problem
    qmodel = dq.quantize(model, bits=2, act_bits=4, act_calibration=torch.randn(32, 1, 8, 8))
    serial = dq.evolve(qmodel, val, **SEARCH)
    assert fingerprint(dq.evolve(qmodel, val, backend="ray", workers=1, **SEARCH)) == fingerprint(serial)
