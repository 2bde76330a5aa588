"""How closely onnxruntime reproduces deap_quant on a quantized model, per onnxruntime optimization level.

    python benchmarks/onnx_agreement.py [--model cifar10-resnet20] [--fold-bn] [--bits 4] [--act-bits 8]
        [--genes 60] [--images 3000] [--json PATH] [--weights PATH] [--cifar-root DIR]

Quantizes a zoo model (default: the pretrained CIFAR-10 ResNet-20; per-channel MSE weight grid,
BatchNorm folded into the convolutions with ``--fold-bn``; activations min-max on the calibration
images when ``--act-bits`` is given), applies ``--genes`` random genes (seed 0), exports the QDQ
ONNX model and runs it in onnxruntime at every graph optimization level on the first ``--images``
test images. It reports, per level, the predictions that differ from deap_quant's, the largest
logit difference, and the difference in correct samples. ``disabled`` is the level of the export's
reproduction check (the graph as written); ``all`` is onnxruntime's default, what a deployment
sees unless it sets a level (see deap_quant/onnx_export.py for why the two can differ).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Optional

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MODELS = ("cifar10-resnet20", "digits-cnn", "digits-resnet")
#: what each level is for (the export's check runs "disabled"; "all" is onnxruntime's default)
ROLES = {"disabled": "the export's check", "all": "onnxruntime's default"}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default=MODELS[0])
    parser.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the convolutions first")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--act-bits", type=int, default=8, help="activation bits (0: float activations)")
    parser.add_argument("--genes", type=int, default=60, help="random genes applied (seed 0)")
    parser.add_argument("--images", type=int, default=3000, help="official test images used")
    parser.add_argument("--weights", default=str(SHARED / "models" / "cifar10-resnet20.th"))
    parser.add_argument("--cifar-root", default=str(SHARED / "cifar10"))
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    import onnxruntime as ort

    from deap_quant import quantize
    from deap_quant.onnx_export import onnx_bytes
    from deap_quant.zoo import load_model

    torch.set_num_threads(1)
    if args.model == "cifar10-resnet20":
        zoo = load_model(args.model, weights=args.weights, data_root=args.cifar_root, verbose=False)
    else:
        zoo = load_model(args.model, verbose=False)
    act_bits = args.act_bits or None
    qmodel = quantize(zoo.model, bits=args.bits, scale_method="mse", fold_bn=args.fold_bn, act_bits=act_bits,
                      act_calibration=zoo.data.train if act_bits else None)
    rng = random.Random(0)
    genes = [(layer, rng.randrange(qmodel.layers[layer].numel), rng.choice((-1, 1)))
             for layer in (rng.randrange(len(qmodel.layers)) for _ in range(args.genes))]
    inputs, targets = zoo.data.test[0][:args.images], zoo.data.test[1][:args.images]
    with torch.no_grad(), qmodel.applied(genes):
        reference = torch.cat([qmodel(inputs[i:i + 500]) for i in range(0, len(inputs), 500)])
    payload = onnx_bytes(qmodel, genes, inputs[:1])
    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    results: dict[str, Any] = {"model": args.model, "fold_bn": args.fold_bn, "bits": args.bits,
                               "act_bits": act_bits, "genes": args.genes, "images": len(targets),
                               "check_level": "disabled", "default_level": "all", "levels": {}}
    for name, level in levels.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.graph_optimization_level = level
        session = ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0].name
        outputs = torch.cat([torch.from_numpy(session.run(None, {feed: inputs[i:i + 500].numpy()})[0])
                             for i in range(0, len(inputs), 500)])
        entry = {"predictions_differing": int((outputs.argmax(1) != reference.argmax(1)).sum()),
                 "max_logit_difference": float((outputs - reference).abs().max()),
                 "correct_difference": int((outputs.argmax(1) == targets).sum() - (reference.argmax(1) == targets).sum())}
        results["levels"][name] = entry
        role = f" ({ROLES[name]})" if name in ROLES else ""
        print(f"onnxruntime {name}{role}: {entry['predictions_differing']} of {len(targets)} predictions differ, "
              f"max |logit difference| {entry['max_logit_difference']:.3g}, correct samples "
              f"{entry['correct_difference']:+d}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
