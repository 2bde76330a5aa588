"""The issue's prepared GPU check in one script: the batched benchmark and a full default run, on the GPU and the CPU.

    python benchmarks/gpu_check.py --json $OUT/gpu_check.json [--device cuda] [--cpu-ngen 30] [--quick]
        [--weights PATH] [--cifar-root DIR]

On the pretrained CIFAR-10 ResNet-20 (1,000 validation images, 3-bit weights, evolve's defaults):

1. ``benchmarks/eval_throughput.py`` on ``cifar10_resnet20`` with ``--device`` (naive, fast and
   batched K = 1, 8, 32 evaluations per second; results checked identical);
2. a full default run, ``evolve(mu=20, lambda=40, ngen=30)`` with population batching, timed end to end
   on ``--device``;
3. the same run on the CPU (all its cores; ``--cpu-ngen`` generations: 5 by default, so that the whole
   script fits one 10-minute device call; 30 for the full run), for the CPU/device ratio and a check
   that both runs selected the same hall of fame where they ran the same generations.

The ratio (``cpu_over_device_per_evaluation``) compares seconds per evaluation: each run's search
time over all its evaluations, the ``mu`` initial ones included (``search_seconds / ngen`` would
charge those to the generations, more per generation in a short run than in a long one).

It records the device model (``torch.cuda.get_device_name``) beside every figure. Nothing is
downloaded. ``--quick`` (with ``--device cpu``) is a smoke test of the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import runpy
import time
from pathlib import Path
from typing import Any, Optional

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _run(zoo: Any, device: str, ngen: int, quick: bool) -> dict[str, Any]:
    from deap_quant import evolve, quantize

    qmodel = quantize(zoo.model, bits=3, scale_method="mse")
    started = time.perf_counter()
    result = evolve(qmodel, zoo.data.val, zoo.data.test, ngen=ngen, seed=0, progress=False, device=device,
                    population_batch="auto", **({"mu": 4, "lambda_": 8} if quick else {}))
    seconds = time.perf_counter() - started
    return {"device": device, "ngen": ngen, "seconds_end_to_end": seconds,
            "search_seconds": result.details["search_seconds"], "evaluations": result.evaluations,
            "seconds_per_evaluation": result.details["search_seconds"] / max(1, result.evaluations),
            "best_val": result.best["val"], "best_test": result.best["test"],
            "hall_of_fame": [[list(gene) for gene in ind] for ind in result.hall_of_fame],
            "population_batch": result.details.get("population_batch")}


def per_evaluation_ratio(numerator: dict[str, Any], denominator: dict[str, Any]) -> float:
    """How many times longer an evaluation took in the ``numerator`` run than in the ``denominator`` run."""
    return numerator["seconds_per_evaluation"] / denominator["seconds_per_evaluation"]


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="the accelerator (default: cuda)")
    parser.add_argument("--cpu-ngen", type=int, default=5,
                        help="generations of the CPU run (default: 5, to fit a 10-minute device call; 30 for the full run)")
    parser.add_argument("--weights", default=str(SHARED / "models" / "cifar10-resnet20.th"))
    parser.add_argument("--cifar-root", default=str(SHARED / "cifar10"))
    parser.add_argument("--json", required=True, metavar="PATH")
    parser.add_argument("--quick", action="store_true", help="a smoke test of the script; figures mean nothing")
    args = parser.parse_args(argv)
    from deap_quant.zoo import load_model

    cuda = args.device.startswith("cuda")
    figures: dict[str, Any] = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(torch.device(args.device)) if cuda else platform.processor(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "quick": args.quick}

    def save() -> None:  # after every step: a run cut short still reports what it measured
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))

    throughput = runpy.run_path(str(Path(__file__).with_name("eval_throughput.py")), run_name="eval_throughput")
    bench = ["--models", "cifar10_resnet20", "--layer-choice", "uniform", "--sampler", "residual", "--device",
             args.device, "--weights", args.weights, "--data-root", args.cifar_root, "--quiet",
             "--json", str(Path(args.json).with_suffix(".throughput.json"))]
    bench += ["--quick"] if args.quick else ["--ngen", "3"]
    started = time.perf_counter()
    figures["eval_throughput"] = throughput["main"](bench)
    figures["eval_throughput_seconds"] = time.perf_counter() - started
    save()
    options = {"val_size": 64, "calibration_size": 64} if args.quick else None
    zoo = load_model("cifar10-resnet20", weights=args.weights, data_root=args.cifar_root, options=options,
                     verbose=False)
    ngen = 1 if args.quick else 30
    figures["run_device"] = _run(zoo, args.device, ngen, args.quick)
    save()
    torch.set_num_threads(os.cpu_count() or 1)
    cpu_ngen = 1 if args.quick else args.cpu_ngen
    figures["run_cpu"] = _run(zoo, "cpu", cpu_ngen, args.quick)
    figures["cpu_over_device_per_evaluation"] = per_evaluation_ratio(figures["run_cpu"], figures["run_device"])
    figures["same_hall_of_fame"] = (figures["run_cpu"]["hall_of_fame"] == figures["run_device"]["hall_of_fame"]
                                    if cpu_ngen == ngen else None)
    save()
    print(json.dumps({k: v for k, v in figures.items() if k != "eval_throughput"}, indent=2, default=str))
    return figures


if __name__ == "__main__":
    main()
