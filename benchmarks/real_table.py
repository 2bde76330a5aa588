"""The method on real pretrained networks and real images: CIFAR-10 ResNet-20 and MNIST.

    python benchmarks/real_table.py [--quick] [--json PATH] [--out DIR] [--models cifar10-resnet20,mnist-cnn]
        [--bits 4,3,2] [--seeds 3] [--ngen N] [--adaround-steps N] [--only CONFIGS] [--threads 1]
        [--weights PATH] [--cifar-root DIR] [--mnist-root DIR] [--fast-ngen N] [--val-from train|test]

For each model and bit-width (per-channel weights) it reports, per row, validation accuracy, held-out
**test** accuracy (mean ± std over seeds), wall seconds and evaluations per second:

* ``float``;
* nearest rounding on every grid the library offers: ``minmax`` (max-abs, full range), ``mse-full``
  (MSE-searched clipping, full range), ``mse-narrow`` (narrow range), ``mse-auto`` (per channel the
  range of least weight error: the library's default, "the best grid"), and ``kmeans`` (a per-channel
  codebook; not expressible as integer kernels);
* ``adaround``, ``es-from-nearest`` (the paper-style ES), ``es-from-adaround`` and
  ``teacher-kl-holdout-from-adaround`` (the label-free teacher search), run by
  :func:`deap_quant.compare` with the shipped settings on the library's default grid.

With ``--fast-ngen N`` > 0 it also times the fast evaluator against the plain one on the
validation images with evolve's default operators (``benchmarks/eval_throughput.py``'s
``cifar10_resnet20``), and checks that both give identical results.

Validation (1,000 images, the fitness) and calibration (2,048, for AdaRound and the teacher) are
disjoint subsets of the CIFAR-10 training images; the official 10,000 test images are only ever
scored. With ``--val-from test`` validation is 1,000 of the official test images instead (images the
network never saw) and test the other 9,000; calibration stays the same. Paths default to this project's ``../shared/data``; the library itself never assumes it.
``--quick`` is a smoke run on a few hundred images whose figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import bit_list, model_list  # noqa: E402  (benchmarks/arguments.py)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULTS = {"weights": SHARED / "models" / "cifar10-resnet20.th", "cifar_root": SHARED / "cifar10",
            "mnist_root": SHARED / "mnist"}
MODELS = ("cifar10-resnet20", "mnist-cnn")
#: Nearest rounding on each grid: (row name, quantize options).
GRIDS = (("nearest-minmax", {"scale_method": "minmax"}),
         ("nearest-mse-full", {"scale_method": "mse", "range": "full"}),
         ("nearest-mse-narrow", {"scale_method": "mse", "range": "narrow"}),
         ("nearest-mse-auto", {"scale_method": "mse", "range": "auto"}),
         ("nearest-kmeans", {"scheme": "kmeans"}))
#: The searches, as configurations of the shipped comparison (its settings: mu=20, lambda=40, ngen=30).
SEARCHES = ("adaround", "es-from-nearest", "es-from-adaround", "teacher-kl-holdout-from-adaround")


def _nearest_rows(zoo: Any, bits: int, log) -> list[dict[str, Any]]:
    from deap_quant import Evaluator, quantize

    rows = []
    for name, options in GRIDS:
        started = time.perf_counter()
        qmodel = quantize(zoo.model, bits=bits, per_channel=True, **options)
        val = Evaluator(qmodel, zoo.data.val).scores([])["accuracy"]
        test = Evaluator(qmodel, zoo.data.test).scores([])["accuracy"]
        seconds = time.perf_counter() - started
        rows.append({"config": name, "bits": bits, "val_mean": val, "test_mean": test, "test_std": 0.0, "n": 1,
                     "seconds": seconds, "evals_per_second": None, "quantization": dict(qmodel.config)})
        log(f"  {name:<34} val {val:.4f}  test {test:.4f}  ({seconds:.0f} s)")
    return rows


def _search_rows(zoo: Any, bits: int, seeds: int, only: list[str], settings: dict[str, Any], out: Optional[Path],
                 log) -> list[dict[str, Any]]:
    from deap_quant.compare import compare

    result = compare((zoo.model, zoo.data, zoo.name), None, bits=bits, seeds=seeds, only=only, settings=settings,
                     out=out, progress=False)
    rows = []
    for entry in result.summary:
        mine = [row for row in result.rows if row["config"] == entry["config"]]
        evaluations = sum(row["evaluations"] for row in mine)
        # the search's own time: a row's seconds include computing its start rounding (AdaRound)
        seconds = sum(row.get("details", {}).get("search_seconds", row["seconds"]) for row in mine)
        rows.append({"config": entry["config"], "bits": bits, "val_mean": entry["val_mean"],
                     "test_mean": entry["test_mean"], "test_std": entry["test_std"], "n": entry["n"],
                     "seconds": entry["seconds_mean"],
                     "evals_per_second": evaluations / seconds if evaluations and seconds > 0 else None,
                     "search_seconds": seconds / len(mine) if mine else None,
                     "test_by_seed": [row["test"] for row in mine]})
        log(f"  {entry['config']:<34} val {entry['val_mean']:.4f}  test {entry['test_mean']:.4f} ± "
            f"{entry['test_std']:.4f}  ({entry['seconds_mean']:.0f} s per seed)")
    rows.extend({"config": f"{p['config']} vs {p['reference']}", "bits": bits, "paired": p} for p in result.paired)
    return rows


def _fast_vs_plain(ngen: int, quick: bool, bits: int, weights: str, data_root: str, log) -> dict[str, Any]:
    import eval_throughput

    eval_throughput.REAL_DATA.update(weights=weights, data_root=data_root)
    return eval_throughput.bench_model("cifar10_resnet20", quick, ngen=ngen, mu=4 if quick else 20,
                                       lambda_=8 if quick else 40, batch_size=16 if quick else 128,
                                       layer_choice="uniform", sampler="residual", log=log, bits=bits)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run on a few hundred images")
    parser.add_argument("--json", metavar="PATH", help="write every figure to PATH")
    parser.add_argument("--out", metavar="DIR", help="keep each comparison's report files under DIR")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--bits", default="4,3,2", help="comma-separated bit-widths for cifar10-resnet20 "
                                                       "(mnist-cnn always runs at 2)")
    parser.add_argument("--seeds", default="3", help="seeds per search configuration: a count (default 3: seeds "
                                                     "0,1,2) or a comma-separated list, e.g. 0,2 (or 1, for seed 1 alone)")
    parser.add_argument("--ngen", type=int, default=None, help="generations of every search (default: shipped, 30)")
    parser.add_argument("--adaround-steps", type=int, default=None, help="AdaRound steps per layer (default: AdaRoundConfig's, 5,000)")
    parser.add_argument("--only", default=",".join(SEARCHES), help=f"searches to run (default: {','.join(SEARCHES)})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--weights", default=str(DEFAULTS["weights"]), help="the CIFAR-10 ResNet-20 checkpoint")
    parser.add_argument("--cifar-root", default=str(DEFAULTS["cifar_root"]), help="CIFAR-10 folder (npz or torchvision)")
    parser.add_argument("--mnist-root", default=str(DEFAULTS["mnist_root"]), help="MNIST folder (npz or torchvision)")
    parser.add_argument("--val-from", choices=("train", "test"), default="train",
                        help="cifar10-resnet20's validation: training images (default) or official test images, "
                             "test then being the other official test images")
    parser.add_argument("--fast-ngen", type=int, default=10,
                        help="generations of the fast-vs-plain timing on cifar10-resnet20 (0: skip; default 10)")
    args = parser.parse_args(argv)
    models = model_list(parser, args.models, MODELS)
    bits_list = bit_list(parser, args.bits)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    if any(name not in SEARCHES for name in only):
        parser.error(f"--only {args.only!r} is not valid; use a subset of {','.join(SEARCHES)}")
    try:
        args.seeds = ([int(s) for s in args.seeds.split(",") if s.strip()] if "," in args.seeds
                      else int(args.seeds))
    except ValueError:
        parser.error(f"--seeds {args.seeds!r} is not valid; use a count or a comma-separated list of seeds")
    if isinstance(args.seeds, list) and (not args.seeds or min(args.seeds) < 0):
        parser.error(f"--seeds {args.seeds!r} is not valid; use seeds >= 0")
    for flag, value, least in (("--seeds", len(args.seeds) if isinstance(args.seeds, list) else args.seeds, 1),
                               ("--threads", args.threads, 1),
                               ("--fast-ngen", args.fast_ngen, 0)):
        if value < least:
            parser.error(f"{flag} {value} is not valid; use an integer >= {least}")

    def log(line: str) -> None:
        print(line, flush=True)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, argv, models, bits_list, only, log)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace, argv: Optional[list[str]], models: list[str], bits_list: list[int],
         only: list[str], log) -> dict[str, Any]:
    from deap_quant.zoo import load_model

    settings: dict[str, Any] = {}
    if args.ngen is not None or args.quick:
        settings["evolution"] = {"ngen": 2 if args.quick else args.ngen, **({"mu": 4, "lambda_": 8} if args.quick else {})}
    from deap_quant.baselines import AdaRoundConfig
    # AdaRound at the library's own default strength (the shipped comparison pins fewer steps for digits)
    settings["adaround"] = {"steps": 20 if args.quick else args.adaround_steps or AdaRoundConfig().steps}
    seeds = 1 if args.quick else args.seeds
    started = time.perf_counter()
    figures: dict[str, Any] = {"command": " ".join(["python benchmarks/real_table.py", *(argv or sys.argv[1:])]),
                               "threads": args.threads, "cpus": os.cpu_count(), "torch": torch.__version__,
                               "quick": args.quick}
    for model in models:
        key = model.replace("-", "_")
        if model == "cifar10-resnet20":
            options = {"val_size": 200, "calibration_size": 128} if args.quick else {}
            options["val_from"] = args.val_from
            zoo = load_model(model, weights=args.weights, data_root=args.cifar_root, options=options, verbose=False)
            widths = bits_list
        else:
            options = {"val_size": 300} if args.quick else None
            zoo = load_model(model, data_root=args.mnist_root, options=options, verbose=False)
            widths = [2]
        if args.quick:  # a few hundred test images: a smoke run
            zoo.data = type(zoo.data)(zoo.data.train, zoo.data.val, (zoo.data.test[0][:300], zoo.data.test[1][:300]),
                                      zoo.data.num_classes, zoo.data.name)
        entry: dict[str, Any] = {"float": dict(zoo.float_scores), "sizes": zoo.data.sizes(), "rows": []}
        log(f"\n== {model}: float val {zoo.float_scores['val']:.4f}, test {zoo.float_scores['test']:.4f}; "
            f"splits {zoo.data.sizes()}")
        for bits in widths:
            log(f"-- {bits} bits")
            entry["rows"].extend(_nearest_rows(zoo, bits, log))
            if only:
                out = Path(args.out) / f"{model}-{bits}bit" if args.out else None
                # the teacher's calibration split: at most 2,048 training images (mnist-cnn has 55,000)
                teacher = {"teacher_samples": min(2048, zoo.data.sizes()["train"])}
                entry["rows"].extend(_search_rows(zoo, bits, seeds, only, {**settings, **teacher}, out, log))
        if model == "cifar10-resnet20" and args.fast_ngen:
            log("-- fast evaluator vs plain, evolve's default operators")
            entry["fast_vs_plain"] = _fast_vs_plain(args.fast_ngen if not args.quick else 1, args.quick,
                                                    widths[0], args.weights, args.cifar_root, log)
        figures[key] = entry
    figures["seconds"] = time.perf_counter() - started
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    return figures


if __name__ == "__main__":
    main()
