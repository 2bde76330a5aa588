"""Deployable models: weights and activations quantized (W4A8, W3A8), checked in onnxruntime.

    python benchmarks/deploy_table.py [--models digits-cnn,cifar10-resnet20] [--bits 4,3] [--act-bits 8]
        [--seeds 3] [--adaround-steps N] [--ngen N] [--json PATH] [--out DIR] [--quick] [--threads 1]
        [--weights PATH] [--cifar-root DIR]

For each model, weight bit-width and seed it quantizes the model (per-channel weights on the
library's default grid, MSE-searched with the "auto" range; activations: the input of every
quantized layer, per tensor, min-max ranges fitted on the calibration images only, then frozen) and
reports validation and held-out **test** accuracy of three rows:

* ``nearest``: nearest rounding of the weights;
* ``adaround``: AdaRound, reconstructing each layer from its quantized inputs (``--adaround-steps``
  steps per layer; the library default is 5,000);
* ``es-from-adaround``: evolve's default search (mu=20, lambda=40, ``--ngen`` generations) started
  from the AdaRound rounding, fitness on validation; its test figure is the hall-of-fame member
  re-scored on test as evolve reports it.

Each row is exported to ONNX (QDQ: integer weights with DequantizeLinear, activations with
QuantizeLinear/DequantizeLinear at the calibrated ranges) and run in onnxruntime on the test split
at two graph optimization levels: ``onnx_test`` with optimizations disabled (the level of the
export's reproduction check: the graph as written) and ``onnx_default_test`` at onnxruntime's
default level (what a deployment sees unless it sets one; it rewrites some QDQ patterns, see
deap_quant/onnx_export.py). The table gives both beside deap_quant's test accuracy, with their
differences in samples.
The seed drives AdaRound's sampling and the search; the data splits are the recipes' own (fixed).
``--quick`` runs a cut-down version for a smoke test; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import bit_list, model_list  # noqa: E402  (benchmarks/arguments.py)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULTS = {"weights": SHARED / "models" / "cifar10-resnet20.th", "cifar_root": SHARED / "cifar10"}
MODELS = ("digits-cnn", "cifar10-resnet20")
ROWS = ("nearest", "adaround", "es-from-adaround")


def _zoo(name: str, args: argparse.Namespace) -> Any:
    from deap_quant.zoo import load_model
    if name == "digits-cnn":
        return load_model(name, verbose=False)
    options = {"val_size": 200, "calibration_size": 256} if args.quick else None
    zoo = load_model(name, weights=str(args.weights), data_root=str(args.cifar_root), options=options,
                     verbose=False)
    if args.quick:  # a few hundred test images are enough for a smoke run
        zoo.data.test = (zoo.data.test[0][:300], zoo.data.test[1][:300])
    return zoo


def _onnx_test(qmodel: Any, genes: list, test: Any, batch_size: int) -> dict[str, Any]:
    from deap_quant.onnx_export import CHECK_OPTIMIZATION, DEFAULT_OPTIMIZATION, onnx_scores, to_onnx
    with tempfile.TemporaryDirectory() as folder:
        path = to_onnx(qmodel, genes, Path(folder) / "model.onnx", test[0][:1])
        scores = {level: onnx_scores(path, test, "accuracy", batch_size, optimization=level)
                  for level in (CHECK_OPTIMIZATION, DEFAULT_OPTIMIZATION)}
    return {"onnx_test": scores[CHECK_OPTIMIZATION].score, "onnx_default_test": scores[DEFAULT_OPTIMIZATION].score}


def _row(name: str, qmodel: Any, genes: list, val: Any, test: Any, seconds: float, batch_size: int,
         onnx: bool, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    from deap_quant import Evaluator
    row = {"config": name, "val": Evaluator(qmodel, val, batch_size=batch_size).scores(genes)["accuracy"],
           "test": Evaluator(qmodel, test, batch_size=batch_size).scores(genes)["accuracy"],
           "seconds": seconds, **(extra or {})}
    if onnx:
        row.update(_onnx_test(qmodel, genes, test, batch_size))
        for key in ("", "_default"):
            row[f"onnx{key}_minus_deap_quant_samples"] = round((row[f"onnx{key}_test"] - row["test"]) * len(test[1]))
    return row


def run_one(zoo: Any, bits: int, act_bits: int, seed: int, args: argparse.Namespace, log) -> list[dict[str, Any]]:
    from deap_quant import evolve, quantize
    from deap_quant.baselines import adaround

    data = zoo.data
    started = time.perf_counter()
    qmodel = quantize(zoo.model, bits=bits, scale_method="mse", act_bits=act_bits, act_calibration=data.train)
    quantize_seconds = time.perf_counter() - started
    rows = [_row("nearest", qmodel, [], data.val, data.test, quantize_seconds, args.batch_size, args.onnx)]
    started = time.perf_counter()
    rounding = adaround(qmodel, data.train, float_model=zoo.model, steps=args.adaround_steps, seed=seed)
    rounded = copy.deepcopy(qmodel)
    rounded.rebase_(rounding.states)
    rows.append(_row("adaround", rounded, [], data.val, data.test, time.perf_counter() - started, args.batch_size,
                     args.onnx, {"undecided": rounding.details["undecided"]}))
    result = evolve(rounded, data.val, data.test, seed=seed, ngen=args.ngen, progress=False,
                    batch_size=args.batch_size)
    best = result.best
    rows.append(_row("es-from-adaround", rounded, list(map(tuple, best["genes"])), data.val, data.test,
                     result.details["search_seconds"], args.batch_size, args.onnx,
                     {"evaluations": result.evaluations, "changed_weights": best.get("changed_weights"),
                      "genes": [list(gene) for gene in best["genes"]]}))
    for row in rows:
        onnx = (f"  onnxruntime test {row['onnx_test']:.4f} ({row['onnx_minus_deap_quant_samples']:+d} samples), "
                f"default level {row['onnx_default_test']:.4f} ({row['onnx_default_minus_deap_quant_samples']:+d})"
                if "onnx_test" in row else "")
        log(f"  W{bits}A{act_bits} seed {seed} {row['config']:<17} val {row['val']:.4f}  test {row['test']:.4f}"
            f"{onnx}  {row['seconds']:.0f} s")
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds, per configuration."""
    out = []
    for config in ROWS:
        chosen = [row for row in rows if row["config"] == config]
        if not chosen:
            continue
        entry = {"config": config, "seeds": len(chosen)}
        for key in ("val", "test", "onnx_test", "onnx_default_test", "seconds"):
            values = [row[key] for row in chosen if key in row]
            if values:
                entry[f"{key}_mean"] = statistics.fmean(values)
                entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        for key in ("", "_default"):
            diffs = [abs(row[f"onnx{key}_minus_deap_quant_samples"]) for row in chosen
                     if f"onnx{key}_minus_deap_quant_samples" in row]
            if diffs:
                entry[f"onnx{key}_max_abs_diff_samples"] = max(diffs)
        out.append(entry)
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--bits", default="4,3", help="weight bit-widths (default: 4,3)")
    parser.add_argument("--act-bits", type=int, default=8, help="activation bit-width (default: 8)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: 3)")
    parser.add_argument("--adaround-steps", type=int, default=5000, help="AdaRound steps per layer (default: 5000)")
    parser.add_argument("--ngen", type=int, default=30, help="generations of the search (default: 30)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the onnxruntime check")
    parser.add_argument("--weights", default=DEFAULTS["weights"], help="CIFAR-10 ResNet-20 checkpoint")
    parser.add_argument("--cifar-root", default=DEFAULTS["cifar_root"], help="CIFAR-10 folder")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every figure to PATH")
    parser.add_argument("--quick", action="store_true", help="a smoke run whose figures mean nothing")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    models = model_list(parser, args.models, MODELS)
    bits_list = bit_list(parser, args.bits)
    if args.quick:
        args.seeds, args.adaround_steps, args.ngen = min(args.seeds, 1), min(args.adaround_steps, 20), min(args.ngen, 1)
    torch.set_num_threads(args.threads)

    def log(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    command = "python benchmarks/deploy_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict[str, Any] = {"command": command.strip(), "act_bits": args.act_bits, "adaround_steps": args.adaround_steps,
                               "ngen": args.ngen, "seeds": args.seeds, "threads": args.threads, "quick": args.quick}
    for name in models:
        zoo = _zoo(name, args)
        key = name.replace("-", "_")
        from deap_quant.evaluation import evaluate_module
        results[key] = {"float": {split: evaluate_module(zoo.model, getattr(zoo.data, split), "accuracy",
                                                         args.batch_size)["accuracy"] for split in ("val", "test")},
                        "sizes": {split: len(getattr(zoo.data, split)[1]) for split in ("train", "val", "test")},
                        "by_bits": {}}
        log(f"== {name}: float val {results[key]['float']['val']:.4f} test {results[key]['float']['test']:.4f}")
        for bits in bits_list:
            rows = []
            for seed in range(args.seeds):
                rows.extend(run_one(zoo, bits, args.act_bits, seed, args, log))
            results[key]["by_bits"][f"W{bits}A{args.act_bits}"] = {"rows": rows, "summary": summarise(rows)}
            if args.json:  # written after every bit-width: nothing is lost if a long run stops
                _write(args.json, results)
    if args.json:
        _write(args.json, results)
    return results


def _write(path: str, results: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
