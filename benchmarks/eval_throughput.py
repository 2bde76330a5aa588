"""Fitness-evaluation throughput: plain forward pass, naive DEAP loop, deap_quant's fast and batched evaluators.

    python benchmarks/eval_throughput.py [--quick] [--json PATH] [--ngen N] [--batch-size B] [--threads N]
        [--population-batches 1,8,32] [--stack auto|on|off] [--device cpu|cuda]

For digits-cnn (the zoo recipe on its 359-image validation split; the digits data has no more)
and torchvision's resnet18 (``num_classes=10``, random weights from seed 0, 512 fixed random
3x32x32 inputs labelled by the float model's own argmax, so accuracy is meaningful), both
quantized to 4 bits, it measures:

(a) one plain forward pass over the validation set (the floor of one evaluation);
(b) the naive DEAP loop: per individual, ``copy.deepcopy`` the quantized model, apply the
    genes, run the full forward pass;
(c) :class:`deap_quant.IncrementalEvaluator` inside a real ``evolve`` run (``(mu+lambda)``,
    mu=20, lambda=40, the default mutation and crossover, genes drawn with layers in proportion
    to their size and weights uniformly -- the operators the issue specifies; ``--layer-choice
    uniform --sampler residual`` gives evolve's current defaults), over ``--ngen`` generations
    (default 30, evolve's default run). The speed-up depends on where genes fall: a gene in an
    early layer forces everything after it to be recomputed, for the samples it changes.

(d) :class:`deap_quant.BatchedEvaluator` in the same ``evolve`` run, registered as ``toolbox.map``
    (each generation's offspring in one call), at each population batch ``K`` of
    ``--population-batches`` (default 1, 8 and 32); ``--stack`` says whether a group runs as stacked
    batches (``auto``: on CUDA only, the evaluator's default). Its evaluations per second are
    compared with (c)'s, and its population, hall of fame, logbook and fitness values with the
    plain evaluator's.

The *reuse bound* (:meth:`deap_quant.IncrementalEvaluator.reuse_bound`) replays the run's genomes, in
order, against an unlimited cache with stages weighted by their measured time: the most that any exact
evaluator resuming from cached activations could gain on this run over one forward pass per genome.

``--device cuda`` moves the quantized model there (the evaluators follow it with the data).
(a) and (b) are timed alternately after (c) and (d) (medians), so load changes on a shared machine hit
them alike; wall-clock and CPU-time ratios are both reported. It prints evaluations per second,
the ratios (c)/(b) and (c)/(a), the fraction of validation samples skipped by early rejection,
the cache memory used, and checks that the same run with the plain :class:`deap_quant.Evaluator`
gives the same population, hall of fame and logbook, and that every individual's fitness is
identical (or, for individuals rejected early, a valid upper bound of the plain value). All
runs use the same batches (``--batch-size``, default 128: early rejection works per batch) and
the same torch threads (``--threads``, default 1). Nothing is downloaded. ``--quick`` is a
shortened run for CI smoke tests; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from deap_quant import BatchedEvaluator, Evaluator, EvolutionConfig, IncrementalEvaluator, evolve, quantize
from deap_quant.evaluation import resolve_device

MODELS = ("digits_cnn", "resnet18", "cifar10_resnet20")
#: Where the real data and the pretrained ResNet-20 live for this project's benchmarks (``--weights``,
#: ``--data-root`` point elsewhere); the library itself never assumes this folder.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_DATA = {"weights": str(SHARED_DATA / "models" / "cifar10-resnet20.th"), "data_root": str(SHARED_DATA / "cifar10")}


class RecordingEvaluator(Evaluator):
    """The plain evaluator, remembering every (genes, fitness) it was asked for."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.record: list[tuple[list, tuple]] = []

    def __call__(self, genes=()):
        genes = list(genes)
        fitness = super().__call__(genes)
        self.record.append((genes, fitness))
        return fitness


def digits_cnn_setup(quick: bool) -> tuple[torch.nn.Module, tuple]:
    from deap_quant.zoo import load_model
    zoo = load_model("digits-cnn", verbose=False)
    return zoo.model, zoo.data.val


def resnet18_setup(quick: bool) -> tuple[torch.nn.Module, tuple]:
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    count = 64 if quick else 512
    inputs = torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        targets = model(inputs).argmax(dim=1)
    return model, (inputs, targets)


def cifar10_resnet20_setup(quick: bool) -> tuple[torch.nn.Module, tuple]:
    """The pretrained CIFAR-10 ResNet-20 recipe on its 1,000 validation images (training images)."""
    from deap_quant.zoo import load_model
    options = {"val_size": 64, "calibration_size": 64} if quick else None
    zoo = load_model("cifar10-resnet20", weights=REAL_DATA["weights"], data_root=REAL_DATA["data_root"],
                     options=options, verbose=False)
    return zoo.model, zoo.data.val


SETUPS = {"digits_cnn": digits_cnn_setup, "resnet18": resnet18_setup, "cifar10_resnet20": cifar10_resnet20_setup}


class Clock:
    """Wall-clock and CPU seconds of a block (CPU time is steadier on a shared machine)."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def floor_and_naive(qmodel, val, batch_size: int, genomes: list[list]) -> dict[str, float]:
    """Median seconds (wall and CPU) of (a) one plain forward pass and (b) one naive evaluation.

    The naive evaluation deep-copies the quantized model, applies the genes and runs the full
    forward pass. The two are timed alternately, one genome per round, so that changes in the
    load of a shared machine affect both alike.
    """
    plain = Evaluator(qmodel, val, batch_size=batch_size)
    plain([])  # warm-up, and the batches are materialised outside the timing
    times: dict[str, list[float]] = {"forward": [], "forward_cpu": [], "naive": [], "naive_cpu": []}
    for genes in genomes:
        with Clock() as clock:
            plain([])
        times["forward"].append(clock.wall)
        times["forward_cpu"].append(clock.cpu)
        with Clock() as clock:
            model = copy.deepcopy(qmodel)
            with model.applied(genes):
                plain.run(model.module).fitness()
        times["naive"].append(clock.wall)
        times["naive_cpu"].append(clock.cpu)
    return {name: statistics.median(values) for name, values in times.items()}


def free_cache(evaluator: IncrementalEvaluator) -> None:
    """Drop an evaluator's cached activations once its run is timed (its memo, all the checks need, stays)."""
    cache = getattr(evaluator, "_cache", None)
    if cache is not None:
        cache.clear()


def decisions(result) -> dict[str, Any]:
    return {
        "population": [(list(ind), ind.fitness.values) for ind in result.population],
        "hall_of_fame": [(list(ind), ind.fitness.values) for ind in result.hall_of_fame],
        "logbook": [{k: v for k, v in entry.items() if k != "seconds"} for entry in result.logbook],
        "evaluations": result.evaluations,
    }


def compare_fitness(fast: IncrementalEvaluator, plain: RecordingEvaluator) -> dict[str, Any]:
    """Every fitness the plain run computed against what the fast run stored for the same genome."""
    exact = equal = rejected = valid_bounds = missing = 0
    for genes, value in plain.record:
        stored = fast.stored(genes)
        if stored is None:
            missing += 1
        elif stored.exact:
            exact += 1
            equal += stored.fitness == value
        else:
            rejected += 1
            valid_bounds += value < stored.fitness
    return {"compared": len(plain.record), "exact": exact, "exact_equal": equal, "rejected": rejected,
            "rejected_bounds_valid": valid_bounds, "missing": missing,
            "identical": missing == 0 and equal == exact and valid_bounds == rejected}


def bench_model(name: str, quick: bool, ngen: int, mu: int, lambda_: int, batch_size: int, layer_choice: str,
                sampler: str, log, bits: int = 4, cache_mb: Optional[int] = None,
                population_batches: Sequence[int] = (), stack: Any = "auto",
                device: Optional[str] = None) -> dict[str, Any]:
    model, val = SETUPS[name](quick)
    qmodel = quantize(model, bits=bits)
    if device is not None:
        qmodel.module.to(resolve_device(device))
    n_val = len(val[1])
    log(f"\n== {name}: {sum(layer.numel for layer in qmodel.layers):,} quantized weights, {n_val} validation "
        f"images, batch {batch_size}, {bits} bits")

    options = {"mu": mu, "lambda_": lambda_, "ngen": ngen, "seed": 0, "progress": False, "layer_choice": layer_choice,
               "sampler": sampler}
    fast = IncrementalEvaluator(qmodel, val, batch_size=batch_size,
                                cache_bytes=None if cache_mb is None else cache_mb * 2 ** 20)
    with Clock() as clock:
        fast_result = evolve(qmodel, evaluator=fast, **options)
    fast_rate = fast_result.evaluations / fast_result.details["search_seconds"]
    fast_cpu_rate = fast_result.evaluations / clock.cpu
    stats = fast.stats()
    free_cache(fast)

    batched_runs = []
    for size in population_batches:
        batched = BatchedEvaluator(qmodel, val, batch_size=batch_size, population_batch=size, stack=stack,
                                   cache_bytes=None if cache_mb is None else cache_mb * 2 ** 20)
        with Clock() as batched_clock:
            batched_result = evolve(qmodel, evaluator=batched, **options)
        free_cache(batched)
        batched_runs.append((size, batched, batched_result, batched_clock.cpu))

    genomes = [list(ind) for ind in fast_result.population][: 2 if quick else 10]
    floor = floor_and_naive(qmodel, val, batch_size, genomes)
    forward, forward_cpu = floor["forward"], floor["forward_cpu"]
    naive_rate, naive_cpu_rate = 1 / floor["naive"], 1 / floor["naive_cpu"]
    log(f"(a) one forward pass:         {forward * 1000:8.1f} ms  ({1 / forward:7.2f} evals/s; CPU {forward_cpu * 1000:.1f} ms)")
    log(f"(b) naive DEAP loop:          {1000 / naive_rate:8.1f} ms  ({naive_rate:7.2f} evals/s; CPU "
        f"{1000 / naive_cpu_rate:.1f} ms; median of {len(genomes)} individuals)")
    log(f"(c) fast evaluator in evolve: {1000 / fast_rate:8.1f} ms  ({fast_rate:7.2f} evals/s; CPU "
        f"{1000 / fast_cpu_rate:.1f} ms; {fast_result.evaluations} evaluations, mu={mu} lambda={lambda_} ngen={ngen}, "
        f"layer choice {layer_choice!r}, sampler {sampler!r})")

    plain = RecordingEvaluator(qmodel, val, batch_size=batch_size)
    plain_result = evolve(qmodel, evaluator=plain, **options)
    plain_rate = plain_result.evaluations / plain_result.details["search_seconds"]
    same_run = decisions(fast_result) == decisions(plain_result)
    fitness = compare_fitness(fast, plain)
    identical = same_run and fitness["identical"]
    bound = fast.reuse_bound([genes for genes, _ in plain.record])

    batched_figures: dict[str, Any] = {}
    for size, batched, batched_result, batched_cpu in batched_runs:
        rate = batched_result.evaluations / batched_result.details["search_seconds"]
        check = compare_fitness(batched, plain)
        same = decisions(batched_result) == decisions(plain_result)
        batched_stats = batched.stats()
        batched_figures[str(size)] = {
            "evals_per_second": rate, "cpu_evals_per_second": batched_result.evaluations / batched_cpu,
            "speedup_vs_fast": rate / fast_rate,
            "cpu_speedup_vs_fast": (batched_result.evaluations / batched_cpu) / fast_cpu_rate,
            "identical": same and check["identical"], "same_population_hall_of_fame_logbook": same,
            "fitness_check": check, "stage_fraction": batched_stats["stage_fraction"],
            "mean_start_stage": batched_stats["mean_start_stage"], "memo_hits": batched_stats["memo_hits"],
            "computed": batched_stats["computed"], "rejected": batched_stats["rejected"],
            "cache_mb": (batched_stats["cache"] or {}).get("peak_mb", 0.0),
            **{key: batched_stats[key] for key in ("population_batch", "stacking", "groups", "concat_runs",
                                                   "vmap_runs", "verifications", "not_stored")}}
        log(f"(d) batched evaluator, K={size:<3}  {1000 / rate:8.1f} ms  ({rate:7.2f} evals/s; CPU "
            f"{1000 * batched_cpu / batched_result.evaluations:.1f} ms; {rate / fast_rate:.2f}x (c), CPU time "
            f"{batched_figures[str(size)]['cpu_speedup_vs_fast']:.2f}x; stage-batches run "
            f"{batched_stats['stage_fraction']:.1%} of full, stacked runs {batched_stats['concat_runs']} "
            f"concatenated + {batched_stats['vmap_runs']} vmapped; identical {batched_figures[str(size)]['identical']})")

    cache = stats["cache"] or {}
    figures = {
        "speedup_vs_naive": fast_rate / naive_rate,
        "speedup_vs_forward": fast_rate * forward,
        "cpu_speedup_vs_naive": fast_cpu_rate / naive_cpu_rate,
        "cpu_speedup_vs_forward": fast_cpu_rate * forward_cpu,
        "skipped_fraction": stats["skipped_fraction"],
        "cache_mb": cache.get("peak_mb", 0.0),
        "cache_budget_mb": cache.get("budget_mb", 0.0),
        "forward_ms": forward * 1000,
        "naive_evals_per_second": naive_rate,
        "fast_evals_per_second": fast_rate,
        "plain_evolve_evals_per_second": plain_rate,
        "evaluations": fast_result.evaluations,
        "patched": stats["patched"],
        "unchanged_batches": stats["unchanged_batches"],
        "subset_batches": stats["subset_batches"],
        "memo_hits": stats["memo_hits"],
        "computed": stats["computed"],
        "rejected": stats["rejected"],
        "stage_fraction": stats["stage_fraction"],
        "mean_start_stage": stats["mean_start_stage"],
        "stages": stats["stages"],
        "split": stats["split"],
        "n_val": n_val,
        "batch_size": batch_size,
        "mu": mu, "lambda": lambda_, "ngen": ngen, "layer_choice": layer_choice, "sampler": sampler,
        "best_val": fast_result.best["val"],
        "baseline_val": fast_result.baseline["val"],
        "identical": identical and all(entry["identical"] for entry in batched_figures.values()),
        "fitness_check": fitness,
        "same_population_hall_of_fame_logbook": same_run,
        "batched": batched_figures,
        "reuse_bound": bound,
        "device": str(resolve_device(None, qmodel.module)),
    }
    if batched_figures:
        best = max(batched_figures, key=lambda size: batched_figures[size]["speedup_vs_fast"])
        figures["population_batched"] = {"speedup_vs_fast": batched_figures[best]["speedup_vs_fast"],
                                         "cpu_speedup_vs_fast": batched_figures[best]["cpu_speedup_vs_fast"],
                                         "best_k": int(best), "identical": all(
                                             entry["identical"] for entry in batched_figures.values())}
    log(f"    (c)/(b) = {figures['speedup_vs_naive']:.1f}x   (c)/(a) = {figures['speedup_vs_forward']:.1f}x   "
        f"(CPU time: {figures['cpu_speedup_vs_naive']:.1f}x, {figures['cpu_speedup_vs_forward']:.1f}x)   "
        f"plain Evaluator in evolve: {plain_rate:.2f} evals/s")
    log(f"    memo hits {stats['memo_hits']}/{fast_result.evaluations}, rejected early {stats['rejected']}/"
        f"{stats['computed']}, samples skipped {stats['skipped_fraction']:.1%}, stage-batches run "
        f"{stats['stage_fraction']:.1%} of full, {stats['patched']} conv stages patched, {stats['stages']} stages "
        f"({stats['split']}); batches reused whole {stats['unchanged_batches']}, changed samples only "
        f"{stats['subset_batches']}")
    log(f"    cache peak {figures['cache_mb']:.1f} MB of {figures['cache_budget_mb']:.0f} MB budget; "
        f"best val {fast_result.best['val']:.4f} (nearest {fast_result.baseline['val']:.4f})")
    log(f"    reuse bound: even an unlimited cache must run {bound['work_fraction']:.1%} of the full forward work "
        f"on this run's genomes: at most {bound['speedup_bound']:.2f}x a forward pass (fast: "
        f"{figures['speedup_vs_forward']:.2f}x; best batched: "
        f"{max([e['evals_per_second'] for e in batched_figures.values()] or [math.nan]) * forward:.2f}x)")
    log(f"    identical to the plain run: {identical} (population/hall of fame/logbook {same_run}; "
        f"{fitness['exact_equal']}/{fitness['exact']} fitness values equal, "
        f"{fitness['rejected_bounds_valid']}/{fitness['rejected']} rejection bounds valid)")
    return figures


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shortened run for CI smoke tests")
    parser.add_argument("--json", metavar="PATH", help="write the figures to PATH")
    parser.add_argument("--ngen", type=int, default=None, help="generations of each run (default: evolve's, 30; quick 2)")
    parser.add_argument("--mu", type=int, default=None, help="parents (default 20; quick 4)")
    parser.add_argument("--lambda", dest="lambda_", type=int, default=None, help="offspring (default 40; quick 8)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="validation batch size, the unit of early rejection (default 128; quick 16)")
    parser.add_argument("--layer-choice", choices=("size", "uniform"), default="size",
                        help="how genes pick a layer (default 'size': in proportion to layer size, the setting the "
                             "issue specifies; evolve's own default is now 'uniform')")
    parser.add_argument("--sampler", choices=("uniform", "residual"), default="uniform",
                        help="how genes pick a weight in the layer (default 'uniform', as the issue specifies; "
                             "evolve's own default is now 'residual')")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for every measurement (default 1, see the README)")
    parser.add_argument("--models", default="digits_cnn,resnet18",
                        help=f"comma-separated subset of {', '.join(MODELS)} (default: digits_cnn,resnet18)")
    parser.add_argument("--weights", default=REAL_DATA["weights"],
                        help="the CIFAR-10 ResNet-20 checkpoint for cifar10_resnet20 (default: ../shared/data)")
    parser.add_argument("--data-root", default=REAL_DATA["data_root"],
                        help="CIFAR-10 folder for cifar10_resnet20 (default: ../shared/data/cifar10)")
    parser.add_argument("--cache-mb", type=int, default=None,
                        help="activation cache budget of the fast evaluator in MiB (default: a quarter of free memory)")
    parser.add_argument("--population-batches", default="1,8,32",
                        help="comma-separated population batches K of the batched evaluator (default 1,8,32; "
                             "'none' skips it)")
    parser.add_argument("--stack", choices=("auto", "on", "off"), default="auto",
                        help="the batched evaluator's stacking: auto (on CUDA only, its default), on or off")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N: where the quantized model runs (default: where it was loaded, the CPU)")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    args = parser.parse_args(argv)
    try:
        sizes = [] if args.population_batches.strip() == "none" else [
            int(part) for part in args.population_batches.split(",") if part.strip()]
    except ValueError:
        sizes = [0]
    if any(size < 1 for size in sizes):
        parser.error(f"--population-batches {args.population_batches!r} is not valid; use comma-separated "
                     "integers >= 1 or 'none'")
    if args.device is not None:
        try:
            resolve_device(args.device)
        except ValueError as error:
            parser.error(f"--device: {error}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models {args.models!r} is not valid; use a comma-separated subset of {', '.join(MODELS)}")
    if args.threads < 1:
        parser.error(f"--threads {args.threads} is not valid; use an integer >= 1")
    REAL_DATA.update(weights=args.weights, data_root=args.data_root)
    ngen = args.ngen if args.ngen is not None else (2 if args.quick else EvolutionConfig().ngen)
    mu = args.mu if args.mu is not None else (4 if args.quick else 20)
    lambda_ = args.lambda_ if args.lambda_ is not None else (8 if args.quick else 40)
    batch_size = args.batch_size if args.batch_size is not None else (16 if args.quick else 128)
    for name, value in (("--ngen", ngen), ("--mu", mu), ("--lambda", lambda_), ("--batch-size", batch_size)):
        if value < (0 if name == "--ngen" else 1):
            parser.error(f"{name} {value} is not valid; use a positive integer")

    def log(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        log(f"torch {torch.__version__}, {args.threads} intra-op thread(s), {os.cpu_count()} CPUs, "
            f"load average {load[0]:.2f}" if load else f"torch {torch.__version__}")
        results: dict[str, Any] = {}
        for name in models:
            results[name] = bench_model(name, args.quick, ngen, mu, lambda_, batch_size, args.layer_choice,
                                        args.sampler, log, cache_mb=args.cache_mb, population_batches=sizes,
                                        stack={"on": True, "off": False}.get(args.stack, "auto"),
                                        device=args.device)
        results["identical"] = all(results[name]["identical"] for name in models)
        if sizes:
            results["population_batched"] = {
                **{name: results[name]["population_batched"] for name in models},
                "identical": all(results[name]["population_batched"]["identical"] for name in models),
                "population_batches": sizes, "stack": args.stack}
        results["machine"] = {"cpus": os.cpu_count(), "threads": args.threads, "load_average_start": load,
                              "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
                              "python": sys.version.split()[0], "torch": torch.__version__,
                              "platform": platform.platform()}
        results["quick"] = args.quick
        log(f"\nidentical selection results with and without the accelerations: {results['identical']}")
    finally:
        torch.set_num_threads(previous_threads)
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2, default=_jsonable)
    return results


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return str(value)


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["identical"] else 1)
