"""Evaluations per second of the serial, processes and ray backends, with 1 and 2 workers.

    python benchmarks/parallel_throughput.py --json parallel_throughput.json
    python benchmarks/parallel_throughput.py --quick          # a smaller budget, for a smoke run

Models: ``digits-cnn`` (the zoo recipe, 360 validation images) and torchvision ``resnet18``
(``num_classes=10``, random init with seed 0, 512 fixed random 3x32x32 validation images
labelled by the float model's argmax), both quantized to 4 bits per channel. Evaluators: the
plain full-forward :class:`~deap_quant.Evaluator` and the incremental one (cached
activations, memoisation, early rejection), when :mod:`deap_quant.evaluation.incremental`
exists.

Each configuration runs the same seeded ``(mu+lambda)`` search through ``deap_quant.evolve``
and reports its evaluations per second over the search (worker start-up excluded and shown
separately), the per-call overhead and per-evaluation time the map measured, its batch size,
and whether the hall of fame, logbook and population equal the serial run's (they must). The
driver and every worker use one torch thread, so ``workers=2`` can at best double ``workers=1``
on a machine with two free cores.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import time
from typing import Any, Callable, Optional

import torch

import deap_quant as dq

try:
    from deap_quant.evaluation.incremental import IncrementalEvaluator
except ImportError:  # the incremental evaluator is optional here
    IncrementalEvaluator = None

BACKENDS = (("serial", None), ("processes", 1), ("processes", 2), ("ray", 1), ("ray", 2))

#: (mu, lambda, ngen) per model; ``quick`` variants for a smoke run.
BUDGETS = {"digits-cnn": {"full": (20, 40, 10), "quick": (8, 16, 2)},
           "resnet18": {"full": (4, 8, 3), "quick": (2, 4, 1)}}


def digits_problem() -> tuple[dq.QuantizedModel, Any]:
    from deap_quant.zoo import load_model

    zoo = load_model("digits-cnn", verbose=False)
    return dq.quantize(zoo.model, bits=4), zoo.data.val


def resnet18_problem(n_images: int = 512) -> tuple[dq.QuantizedModel, Any]:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    inputs = torch.randn(n_images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        targets = model(inputs).argmax(dim=1)
    return dq.quantize(model, bits=4), (inputs, targets)


PROBLEMS: dict[str, Callable[[], tuple[dq.QuantizedModel, Any]]] = {"digits-cnn": digits_problem,
                                                                      "resnet18": resnet18_problem}


def evaluators() -> dict[str, Callable[..., Any]]:
    found: dict[str, Callable[..., Any]] = {"plain": dq.Evaluator}
    if IncrementalEvaluator is not None:
        found["incremental"] = IncrementalEvaluator
    return found


def fingerprint(result: dq.EvolutionResult) -> tuple:
    def members(individuals: list) -> list:
        return [([tuple(g) for g in ind], ind.fitness.values) for ind in individuals]
    log = [{k: v for k, v in record.items() if k != "seconds"} for record in result.logbook]
    return members(result.hall_of_fame), members(result.population), log


def run_one(qmodel: dq.QuantizedModel, val: Any, make_evaluator: Callable[..., Any], backend: str,
            workers: Optional[int], budget: tuple[int, int, int]) -> tuple[dict[str, Any], tuple]:
    mu, lambda_, ngen = budget
    evaluator = make_evaluator(qmodel, val, batch_size=128)
    started = time.perf_counter()
    result = dq.evolve(qmodel, val, evaluator=evaluator, mu=mu, lambda_=lambda_, ngen=ngen, seed=0,
                       progress=False, backend=backend, workers=workers)
    parallel = result.details["parallel"]
    row = {"backend": backend, "workers": workers or 1, "evaluations": result.evaluations,
           "search_seconds": result.details["search_seconds"],
           "evals_per_second": result.details["search_evals_per_second"],
           "startup_seconds": parallel.get("startup_seconds", 0.0),
           "overhead_ms": None if parallel.get("overhead_seconds") is None else 1e3 * parallel["overhead_seconds"],
           "eval_ms": None if parallel.get("eval_seconds") is None else 1e3 * parallel["eval_seconds"],
           "batch_size": parallel.get("batch_size"), "workers_lost": parallel.get("workers_lost", 0),
           "wall_seconds": time.perf_counter() - started}
    return row, fingerprint(result)


def main(quick: bool = False, json_path: Optional[str] = None, models: tuple[str, ...] = tuple(PROBLEMS),
         backends: tuple[tuple[str, Optional[int]], ...] = BACKENDS) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    ray = None
    if any(backend == "ray" for backend, _ in backends):
        from deap_quant.parallel import ray_available
        if ray_available():
            import ray
            ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")  # once, not per configuration
        else:
            print('ray is not installed (pip install -e ".[ray]"): skipping the ray backend')
            backends = tuple(b for b in backends if b[0] != "ray")
    rows: list[dict[str, Any]] = []
    try:
        for model in models:
            qmodel, val = PROBLEMS[model]()
            budget = BUDGETS[model]["quick" if quick else "full"]
            shipped = len(pickle.dumps(dq.Evaluator(qmodel, val, batch_size=128), protocol=pickle.HIGHEST_PROTOCOL))
            print(f"{model}: the evaluator each worker receives once is {shipped / 2**20:.1f} MiB pickled")
            for name, make_evaluator in evaluators().items():
                serial_rate, serial_print = None, None
                for backend, workers in backends:
                    row, printed = run_one(qmodel, val, make_evaluator, backend, workers, budget)
                    if backend == "serial":
                        serial_rate, serial_print = row["evals_per_second"], printed
                    row.update(model=model, evaluator=name, shipped_mib=shipped / 2 ** 20,
                               speedup=row["evals_per_second"] / serial_rate if serial_rate else None,
                               identical_to_serial=printed == serial_print if serial_print is not None else None)
                    rows.append(row)
                    print(_line(row), flush=True)
    finally:
        if ray is not None:
            ray.shutdown()
    print()
    print(table(rows))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as handle:
            json.dump({"rows": rows, "quick": quick, "torch_threads_per_process": 1,
                       "machine": {"cpus": os.cpu_count(),
                                   "platform": platform.platform(), "python": platform.python_version(),
                                   "torch": torch.__version__}}, handle, indent=2)
        print(f"wrote {json_path}")
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _line(row: dict[str, Any]) -> str:
    return (f"{row['model']:10s} {row['evaluator']:11s} {row['backend']:9s} x{row['workers']}: "
            f"{row['evals_per_second']:8.2f} evals/s ({row['evaluations']} evals in {row['search_seconds']:.1f} s, "
            f"start-up {row['startup_seconds']:.1f} s)")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | evaluator | backend | workers | evals/s | vs serial | per-call overhead ms | eval ms "
             "| batch | start-up s | identical |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['evaluator']} | {row['backend']} | {row['workers']} "
                     f"| {row['evals_per_second']:.2f} | {_fmt(row['speedup'], '.2f')} | {_fmt(row['overhead_ms'], '.2f')} "
                     f"| {_fmt(row['eval_ms'], '.2f')} | {_fmt(row['batch_size'], 'd')} | {row['startup_seconds']:.1f} "
                     f"| {'yes' if row['identical_to_serial'] else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small budgets (a smoke run)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--models", default=",".join(PROBLEMS), help="comma-separated: digits-cnn,resnet18")
    options = parser.parse_args()
    main(quick=options.quick, json_path=options.json, models=tuple(m for m in options.models.split(",") if m))
