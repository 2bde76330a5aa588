"""Choose evolve's search defaults without the test split.

    python benchmarks/defaults_check.py --threads 1 --json defaults_check.json
    python benchmarks/defaults_check.py --quick            # smoke run (seconds); its figures mean nothing

digits-cnn (the zoo recipe), quantized per channel to 2 and 3 bits on the library's default grid
(``scale_method="mse"``). For each data-split seed ``d`` (``--data-seeds K``: d = 0..K-1; each
one is the digits split ``load_model("digits-cnn", seed=d)`` and the model trained on it) the
**validation** split is cut in two, stratified by class and seeded by ``d``:

* the *search half* is the fitness (``evolve``'s ``val``);
* the *selection half* is never seen by the search; it sits in ``evolve``'s ``test`` slot, so the
  reported best (hall-of-fame member 0, chosen on the search half) is re-scored on it after the
  search, exactly as ``evolve`` re-scores the test split.

The real test split is never passed anywhere and never read (``tests/test_benchmark_defaults.py``
checks that with a data object that records every access); the float scores the zoo cached at
training time are not used either: float accuracy is scored on the two halves.

Candidates: evolve's current defaults (``EvolutionConfig()``), and one factor at a time changed
from them: layer choice (uniform / size), weight sampler (residual / uniform), crossover
(uniform with cxpb 0.2, mutpb 0.8 / none with cxpb 0, mutpb 1) and genes per initial individual
(2 / 8 / 16). Every candidate runs ``(mu+lambda)`` with mu=20, lambda=40, ngen=30 for evolution
seeds 0..N-1 (``--seeds N``) on every data seed and bit-width. The table gives, per candidate,
the mean +- std over (data seed, evolution seed) runs of the selection-half accuracy of the
reported best, the search-half accuracy beside it (the gap shows overfitting), and the paired
difference to the current defaults (paired by bits, data seed and evolution seed; wins/losses;
two-sided Wilcoxon signed-rank p). Per factor, the level with the highest selection-half mean
over both bit-widths wins. One selection-half image is about 0.56 points.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import fields
from typing import Any, Callable, Optional

import numpy as np
import torch

import deap_quant as dq
from deap_quant.zoo import load_model

MODEL = "digits-cnn"
#: factor -> level name -> the EvolutionConfig settings of that level.
FACTORS: dict[str, dict[str, dict[str, Any]]] = {
    "layer_choice": {"uniform": {"layer_choice": "uniform"}, "size": {"layer_choice": "size"}},
    "sampler": {"residual": {"sampler": "residual"}, "uniform": {"sampler": "uniform"}},
    "crossover": {"uniform": {"crossover": "uniform", "cxpb": 0.2, "mutpb": 0.8},
                  "none": {"crossover": None, "cxpb": 0.0, "mutpb": 1.0}},
    "init_genes": {"2": {"init_genes": 2}, "8": {"init_genes": 8}, "16": {"init_genes": 16}},
}
DEFAULT = "default"


def current_defaults() -> dict[str, Any]:
    """EvolutionConfig's defaults, as they are in the library now."""
    return {f.name: f.default for f in fields(dq.EvolutionConfig)}


def default_level(factor: str, defaults: dict[str, Any]) -> str:
    """The level of ``factor`` that the current defaults use."""
    for level, settings in FACTORS[factor].items():
        if all(defaults[key] == value for key, value in settings.items()):
            return level
    keys = sorted({key for settings in FACTORS[factor].values() for key in settings})
    current = ", ".join(f"{key}={defaults[key]!r}" for key in keys)
    raise ValueError(f"the current defaults ({current}) match no level of {factor} "
                     f"({', '.join(FACTORS[factor])}); add one to FACTORS")


def candidates(defaults: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"default": {}, "factor=level": overrides, ...}``: the defaults, then one factor changed at a time."""
    out: dict[str, dict[str, Any]] = {DEFAULT: {}}
    for factor, levels in FACTORS.items():
        chosen = default_level(factor, defaults)
        for level, settings in levels.items():
            if level != chosen:
                out[f"{factor}={level}"] = dict(settings)
    return out


def candidate_of(factor: str, level: str, defaults: dict[str, Any]) -> str:
    return DEFAULT if level == default_level(factor, defaults) else f"{factor}={level}"


def split_halves(val: tuple[torch.Tensor, torch.Tensor], seed: int) -> tuple[tuple, tuple]:
    """The validation pair cut into (search half, selection half), stratified by class, seeded."""
    from sklearn.model_selection import train_test_split

    inputs, targets = val
    search, selection = train_test_split(np.arange(len(targets)), train_size=0.5, stratify=targets.numpy(),
                                         random_state=seed)
    search, selection = torch.from_numpy(np.sort(search)), torch.from_numpy(np.sort(selection))
    return (inputs[search], targets[search]), (inputs[selection], targets[selection])


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float]) -> str:
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.2f} ± {std:.2f}"


def paired(runs: list[dict], reference: list[dict]) -> dict[str, Any]:
    """Selection-half differences to the default, paired by (bits, data seed, evolution seed)."""
    key = lambda run: (run["bits"], run["data_seed"], run["seed"])  # noqa: E731
    base = {key(run): run["selection"] for run in reference}
    # rounded, so that equal differences in images tie (accuracies differ in a float's last bits)
    diffs = [round(run["selection"] - base[key(run)], 12) for run in runs if key(run) in base]
    out: dict[str, Any] = {"n": len(diffs), "mean_diff": statistics.mean(diffs) if diffs else float("nan"),
                           "wins": sum(d > 1e-12 for d in diffs), "losses": sum(d < -1e-12 for d in diffs),
                           "wilcoxon_p": None}
    if any(abs(d) > 1e-12 for d in diffs):
        from scipy.stats import wilcoxon
        out["wilcoxon_p"] = float(wilcoxon(diffs).pvalue)
    elif diffs:
        out["wilcoxon_p"] = 1.0
    return out


def summarize(runs: list[dict], names: list[str], bits_list: list[int], defaults: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for bits in [*bits_list, "all"]:
        for name in names:
            mine = [r for r in runs if r["candidate"] == name and (bits == "all" or r["bits"] == bits)]
            ref = [r for r in runs if r["candidate"] == DEFAULT and (bits == "all" or r["bits"] == bits)]
            if not mine:
                continue
            sel_mean, sel_std = mean_std([r["selection"] for r in mine])
            search_mean, search_std = mean_std([r["search"] for r in mine])
            per_split = {str(d): statistics.mean(r["selection"] for r in mine if r["data_seed"] == d)
                         for d in sorted({r["data_seed"] for r in mine})}
            rows.append({"bits": bits, "candidate": name, "runs": len(mine), "selection_mean": sel_mean,
                         "selection_std": sel_std, "search_mean": search_mean, "search_std": search_std,
                         "selection_by_data_seed": per_split,
                         "genes": statistics.mean(r["genes"] for r in mine),
                         "seconds": statistics.mean(r["seconds"] for r in mine),
                         "vs_default": None if name == DEFAULT else paired(mine, ref)})
    pooled = {row["candidate"]: row for row in rows if row["bits"] == "all"}
    choices = []
    for factor, levels in FACTORS.items():
        current = default_level(factor, defaults)
        scores = {level: pooled[candidate_of(factor, level, defaults)]["selection_mean"]
                  for level in levels if candidate_of(factor, level, defaults) in pooled}
        winner = max(scores, key=lambda level: (scores[level], level == current))  # ties keep the default
        choices.append({"factor": factor, "current": current, "winner": winner, "selection_mean": scores,
                        "changes_default": winner != current,
                        "vs_default": None if winner == current
                        else pooled[candidate_of(factor, winner, defaults)]["vs_default"]})
    return {"rows": rows, "choices": choices}


def print_tables(summary: dict[str, Any], baselines: list[dict], log: Callable[[str], None]) -> None:
    log("\nNearest rounding and float (per data seed: search half / selection half, %):")
    for base in baselines:
        log(f"  {base['bits']} bits, data seed {base['data_seed']}: nearest {100 * base['nearest_search']:.2f} / "
            f"{100 * base['nearest_selection']:.2f}, float {100 * base['float_search']:.2f} / "
            f"{100 * base['float_selection']:.2f} (halves of {base['search_size']} / {base['selection_size']})")
    log("\n| bits | candidate | search half (fitness) | selection half | selection by data seed "
        "| vs default (paired) | Wilcoxon p | genes | s/run |")
    log("|---|---|---|---|---|---|---|---|---|")
    for row in summary["rows"]:
        versus = row["vs_default"]
        diff = "" if versus is None else f"{100 * versus['mean_diff']:+.2f} ({versus['wins']}/{versus['losses']})"
        p = "" if versus is None or versus["wilcoxon_p"] is None else f"{versus['wilcoxon_p']:.2g}"
        by_seed = " / ".join(f"{100 * v:.2f}" for v in row["selection_by_data_seed"].values())
        log(f"| {row['bits']} | {row['candidate']} | {100 * row['search_mean']:.2f} ± {100 * row['search_std']:.2f} | "
            f"{100 * row['selection_mean']:.2f} ± {100 * row['selection_std']:.2f} | {by_seed} | {diff} | {p} | "
            f"{row['genes']:.0f} | {row['seconds']:.1f} |")
    log("\nPer factor (selection-half mean over both bit-widths, %):")
    for choice in summary["choices"]:
        levels = ", ".join(f"{level} {100 * value:.2f}" for level, value in choice["selection_mean"].items())
        verdict = "keeps the current default" if not choice["changes_default"] else (
            f"WINS over the current default {choice['current']!r}: "
            f"{100 * choice['vs_default']['mean_diff']:+.2f} points "
            f"({choice['vs_default']['wins']}/{choice['vs_default']['losses']}, "
            f"Wilcoxon p = {choice['vs_default']['wilcoxon_p']:.2g})")
        log(f"  {choice['factor']}: {levels} -> {choice['winner']!r} {verdict}")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run for smoke tests (seconds)")
    parser.add_argument("--json", metavar="PATH", help="write every run and the summary to PATH")
    parser.add_argument("--seeds", type=int, default=None, help="evolution seeds 0..N-1 (default 3; quick 1)")
    parser.add_argument("--data-seeds", type=int, default=None,
                        help="digits split seeds 0..K-1, one trained model each (default 2; quick 1)")
    parser.add_argument("--bits", default=None, help="comma-separated bit-widths (default 2,3; quick 2)")
    parser.add_argument("--mu", type=int, default=None, help="parents (default 20; quick 4)")
    parser.add_argument("--lambda", dest="lambda_", type=int, default=None, help="offspring (default 40; quick 8)")
    parser.add_argument("--ngen", type=int, default=None, help="generations (default 30; quick 2)")
    parser.add_argument("--only", default=None, help="comma-separated candidates (default: all; 'default' is "
                                                     "always run, the others are compared with it)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    args = parser.parse_args(argv)
    quick = args.quick
    seeds = args.seeds if args.seeds is not None else (1 if quick else 3)
    data_seeds = args.data_seeds if args.data_seeds is not None else (1 if quick else 2)
    mu = args.mu if args.mu is not None else (4 if quick else 20)
    lambda_ = args.lambda_ if args.lambda_ is not None else (8 if quick else 40)
    ngen = args.ngen if args.ngen is not None else (2 if quick else 30)
    for name, value, low in (("--seeds", seeds, 1), ("--data-seeds", data_seeds, 1), ("--mu", mu, 1),
                             ("--lambda", lambda_, 1), ("--ngen", ngen, 0), ("--threads", args.threads, 1)):
        if value < low:
            parser.error(f"{name} {value} is not valid; use an integer >= {low}")
    try:
        bits_list = [int(b) for b in (args.bits or ("2" if quick else "2,3")).split(",") if b.strip()]
    except ValueError:
        parser.error(f"--bits {args.bits!r} is not valid; use comma-separated integers in 2..8")
    if not bits_list or any(not 2 <= b <= 8 for b in bits_list):
        parser.error(f"--bits {args.bits!r} is not valid; use comma-separated integers in 2..8")
    defaults = current_defaults()
    every = candidates(defaults)
    if args.only:
        wanted = [c.strip() for c in args.only.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in every]
        if unknown:
            parser.error(f"--only {args.only!r} is not valid; candidates are {', '.join(every)}")
        every = {name: every[name] for name in [DEFAULT, *[c for c in wanted if c != DEFAULT]]}
    names = list(every)

    def log(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    runs: list[dict] = []
    baselines: list[dict] = []
    models: list[dict] = []
    try:
        log(f"{MODEL}, {', '.join(map(str, bits_list))} bits, per channel, mse grid; {len(names)} candidates x "
            f"{data_seeds} data seed(s) x {seeds} evolution seed(s); mu={mu}, lambda={lambda_}, ngen={ngen}; "
            f"{args.threads} torch thread(s)")
        for data_seed in range(data_seeds):
            loading = time.perf_counter()
            zoo = load_model(MODEL, seed=data_seed, verbose=not args.quiet)
            models.append({"data_seed": data_seed, "from_cache": bool(zoo.from_cache),
                           "load_seconds": time.perf_counter() - loading})
            search_half, selection_half = split_halves(zoo.data.val, seed=data_seed)  # zoo.data.test: never
            for bits in bits_list:
                qmodel = dq.quantize(zoo.model, bits=bits, per_channel=True, scale_method="mse")
                for name in names:
                    for seed in range(seeds):
                        began = time.perf_counter()
                        result = dq.evolve(qmodel, val=search_half, test=selection_half, float_model=zoo.model,
                                           mu=mu, lambda_=lambda_, ngen=ngen, seed=seed, progress=False,
                                           **every[name])
                        runs.append({"candidate": name, "bits": bits, "data_seed": data_seed, "seed": seed,
                                     "search": result.best["val"], "selection": result.best["test"],
                                     "genes": result.best["n_genes"], "evaluations": result.evaluations,
                                     "seconds": time.perf_counter() - began})
                        if name == DEFAULT and seed == 0:
                            baselines.append({"bits": bits, "data_seed": data_seed,
                                              "nearest_search": result.baseline["val"],
                                              "nearest_selection": result.baseline["test"],
                                              "float_search": result.float_scores["val"],
                                              "float_selection": result.float_scores["test"],
                                              "search_size": len(search_half[1]),
                                              "selection_size": len(selection_half[1])})
                        log(f"  data seed {data_seed}, {bits} bits, {name}, seed {seed}: search "
                            f"{100 * runs[-1]['search']:.2f}, selection {100 * runs[-1]['selection']:.2f} "
                            f"({runs[-1]['seconds']:.1f} s)")
        summary = summarize(runs, names, bits_list, defaults)
        print_tables(summary, baselines, log)
        seconds = time.perf_counter() - started
        log(f"\n{len(runs)} runs in {seconds / 60:.1f} minutes")
    finally:
        torch.set_num_threads(previous_threads)
    results = {
        "model": MODEL, "scale_method": "mse", "per_channel": True, "bits": bits_list,
        "protocol": {"fitness": "search half of the validation split",
                     "selection": "selection half of the validation split (never seen by the search)",
                     "test_split": "not used", "halves": "stratified by class, seeded by the data seed"},
        "search": {"algorithm": "mu+lambda", "mu": mu, "lambda_": lambda_, "ngen": ngen, "seeds": seeds,
                   "data_seeds": data_seeds},
        "current_defaults": {key: defaults[key] for key in ("layer_choice", "sampler", "crossover", "cxpb", "mutpb",
                                                             "init_genes")},
        "candidates": every, "baselines": baselines, "models": models, "runs": runs, **summary,
        "seconds": seconds, "quick": quick,
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "load_average_start": load,
                    "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
                    "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform()},
    }
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
