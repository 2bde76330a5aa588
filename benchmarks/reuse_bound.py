"""How much can caching give? The reuse bound of evolve's genome stream, per model and operator set.

    python benchmarks/reuse_bound.py [--models cifar10_resnet20,digits_cnn] [--operators uniform:residual,size:uniform]
        [--val-images 200] [--ngen 30] [--bits 4] [--threads 1] [--json PATH] [--quick]

An exact evaluator can skip work only where an offspring's activations equal ones computed before:
it resumes from the stages its genes leave unchanged. For each model and operator set (layer choice :
weight sampler) this records the genomes of a default ``evolve`` run (mu=20, lambda=40, ``--ngen``
generations, seed 0; fitness on the first ``--val-images`` validation images, so the stream costs
minutes rather than hours), and replays them through
:meth:`deap_quant.IncrementalEvaluator.reuse_bound` on the whole validation split: an unlimited
cache, stages weighted by their measured time (least of 5 runs) and, load-independently, by their
FLOPs (convolutions and matrix products), a patched first stage for free. The result is the
most that *any* such evaluator (the fast one, the batched one, any cache budget) can reach on that
stream, as a multiple of one forward pass per genome. The plain evaluator and the naive DEAP loop
run at about one forward pass per genome (``benchmarks/eval_throughput.py`` measures both), so the
bound is also, to within a few percent, the most an exact cache can gain over them. Row reuse and
early rejection, which skip samples rather than stages, are not counted (``eval_throughput.py``
measures them: under 1% of samples on ResNet-20). ``--quick`` is a smoke run; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import model_list  # noqa: E402  (benchmarks/arguments.py)
from eval_throughput import MODELS, REAL_DATA, SETUPS, RecordingEvaluator  # noqa: E402

from deap_quant import IncrementalEvaluator, evolve, quantize  # noqa: E402

LAYER_CHOICES = ("uniform", "size")
SAMPLERS = ("residual", "uniform")


def stream_bound(name: str, layer_choice: str, sampler: str, val_images: int, ngen: int, bits: int,
                 quick: bool) -> dict[str, Any]:
    model, val = SETUPS[name](quick)
    qmodel = quantize(model, bits=bits)
    recorder = RecordingEvaluator(qmodel, (val[0][:val_images], val[1][:val_images]), batch_size=128)
    options = {"mu": 4, "lambda_": 8} if quick else {}
    evolve(qmodel, evaluator=recorder, ngen=ngen, seed=0, layer_choice=layer_choice, sampler=sampler,
           progress=False, **options)
    fast = IncrementalEvaluator(qmodel, val, batch_size=128)
    genomes = [genes for genes, _ in recorder.record]
    seconds, flops = fast.stage_costs(repeats=5), fast.stage_flops()
    by_time, by_flops = fast.reuse_bound(genomes, costs=seconds), fast.reuse_bound(genomes, costs=flops)
    return {"model": name, "layer_choice": layer_choice, "sampler": sampler, "stages": len(seconds),
            "stage_seconds": seconds, "stage_flops": flops, "n_val": len(val[1]),
            "stream_val_images": min(val_images, len(val[1])), "ngen": ngen, "bits": bits,
            "genomes": by_time["genomes"], "memo_hits": by_time["memo_hits"],
            "work_fraction": by_time["work_fraction"], "speedup_bound": by_time["speedup_bound"],
            "work_fraction_flops": by_flops["work_fraction"], "speedup_bound_flops": by_flops["speedup_bound"]}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="cifar10_resnet20,digits_cnn", help=f"subset of {', '.join(MODELS)}")
    parser.add_argument("--operators", default="uniform:residual,size:uniform",
                        help="comma-separated LAYER_CHOICE:SAMPLER pairs (default: evolve's, then the paper-style "
                             "size:uniform)")
    parser.add_argument("--val-images", type=int, default=200, help="validation images the recorded run's fitness uses")
    parser.add_argument("--ngen", type=int, default=30, help="generations of the recorded run (default 30)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", default=REAL_DATA["weights"], help="the CIFAR-10 ResNet-20 checkpoint")
    parser.add_argument("--data-root", default=REAL_DATA["data_root"], help="CIFAR-10 folder")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    models = model_list(parser, args.models, MODELS)
    pairs = [tuple(part.strip().split(":")) for part in args.operators.split(",") if part.strip()]
    if not pairs or any(len(p) != 2 or p[0] not in LAYER_CHOICES or p[1] not in SAMPLERS for p in pairs):
        parser.error(f"--operators {args.operators!r} is not valid; use LAYER_CHOICE:SAMPLER pairs with layer choice "
                     f"in {', '.join(LAYER_CHOICES)} and sampler in {', '.join(SAMPLERS)}")
    for flag, value in (("--val-images", args.val_images), ("--threads", args.threads), ("--bits", args.bits)):
        if value < (2 if flag == "--bits" else 1):
            parser.error(f"{flag} {value} is not valid")
    REAL_DATA.update(weights=args.weights, data_root=args.data_root)
    ngen = 1 if args.quick else args.ngen
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    rows = []
    try:
        for name in models:
            for layer_choice, sampler in pairs:
                row = stream_bound(name, layer_choice, sampler, args.val_images, ngen, args.bits, args.quick)
                rows.append(row)
                print(f"{name:<17} {layer_choice}:{sampler:<9} {row['genomes']} genomes ({row['memo_hits']} repeats): "
                      f"an unlimited cache still runs {row['work_fraction']:.1%} of the forward time "
                      f"({row['work_fraction_flops']:.1%} of its FLOPs): at most {row['speedup_bound']:.2f}x "
                      f"({row['speedup_bound_flops']:.2f}x) one forward pass per genome", flush=True)
    finally:
        torch.set_num_threads(previous)
    figures = {"command": " ".join(["python benchmarks/reuse_bound.py", *(argv if argv is not None else sys.argv[1:])]),
               "threads": args.threads, "torch": torch.__version__, "quick": args.quick, "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
