"""``deap-quant``: the command-line front end.

Every failure ends in one line on stderr and a non-zero exit, never a traceback:

* **bad input** (exit 2): ``deap-quant: error: MESSAGE``. These are the errors the library raises
  on purpose for values, files or an environment the user can fix: :class:`CLIError` (argument
  problems, found by the parser or the commands), every ``ValueError`` (the library's rule for a
  bad value; it includes ``GeneError``, ``CheckpointError``, ``ExportError`` and the
  configuration checks), every ``OSError`` (missing or unreadable files and folders, including
  ``DatasetNotFound``; the message names the path), ``ImportError`` (a missing optional
  package, with what to install) and ``WorkersLostError`` (parallel workers that died). The
  whole message is printed, not only its first argument.
* **internal error** (exit 1): anything else (``TypeError``, ``KeyError``, ``RuntimeError``,
  ``AssertionError``, ...) is a bug in deap_quant or in a library it calls, and prints
  ``deap-quant: internal error: TYPE: MESSAGE (run again with --debug for the traceback)``.

``--debug`` (before or after the command) re-raises every error but a :class:`CLIError`, so Python
prints its traceback. Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

__all__ = ["main", "build_parser", "CLIError"]

EXIT_USAGE = 2
EXIT_INTERNAL = 1


class CLIError(Exception):
    """An error to report to the user as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise CLIError(message)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not valid; use an integer >= 1")
    return value


def _population_batch(text: str) -> Any:
    return text if text in ("auto", "off") else _positive(text)


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not valid; use an integer >= 0")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not valid; use a probability in [0, 1]")
    return value


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", default="digits-cnn",
                       help="a zoo recipe name (digits-cnn, digits-vgg, digits-resnet, digits-autoencoder, "
                            "digits-detector; mnist-cnn with --data-root; cifar10-resnet20/32/44/56 with --weights "
                            "and --data-root), torchvision:NAME with --weights (e.g. torchvision:resnet18), or a "
                            "path to a saved float model (torch.save of a module, or TorchScript); the last two "
                            "with --dataset (default: digits-cnn)")
    group.add_argument("--weights", default=None, metavar="PATH",
                       help="local state_dict or checkpoint: required by the pretrained recipes cifar10-resnetN and "
                            "torchvision:NAME, optional for other recipes (never downloaded)")
    group.add_argument("--dataset", default=None,
                       help="dataset for a model given as a path or torchvision:NAME: digits, digit-canvases, "
                            "mnist, cifar10, npz, imagefolder, voc, coco (the last six from --data-root; "
                            "default: digits)")
    group.add_argument("--data-root", default=None, metavar="PATH",
                       help="a local dataset: its folder (cifar-10-batches-py/ or MNIST/raw/ inside, or .npz files "
                            "such as train*.npz + test.npz), or one .npz file (x, y or x_train, y_train, x_test, "
                            "y_test); recipes mnist-cnn and cifar10-resnetN read theirs from here")
    group.add_argument("--val-size", type=_positive, default=None, metavar="N",
                       help="validation (fitness) images drawn from the training images, for recipes mnist-cnn "
                            "(default: 5000) and cifar10-resnetN (default: 1000)")
    group.add_argument("--calibration-size", type=_positive, default=None, metavar="N",
                       help="calibration images (AdaRound, teacher) drawn from the training images apart from "
                            "validation, for the pretrained recipes cifar10-resnetN (default: 2048)")
    group.add_argument("--val-from", choices=("train", "test"), default=None,
                       help="where the pretrained recipes cifar10-resnetN draw validation from: 'train' (default; "
                            "images the network was trained on) or 'test' (--val-size official test images, which "
                            "the network never saw; test is then the rest of them)")
    group.add_argument("--cache-dir", default=None, help="model cache (default: $XDG_CACHE_HOME/deap_quant)")
    group.add_argument("--data-seed", type=_non_negative, default=0, help="seed of the train/val/test split")


def _add_quant_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quantization")
    group.add_argument("--bits", type=int, default=2, help="weight bit-width, 2..8 (default: 2)")
    channel = group.add_mutually_exclusive_group()
    channel.add_argument("--per-channel", dest="per_channel", action="store_true", default=True,
                         help="one grid per output channel (default)")
    channel.add_argument("--per-tensor", dest="per_channel", action="store_false", help="one grid per layer")
    group.add_argument("--scale-method", default="mse", help="minmax or mse (default: mse, the strong baseline)")
    group.add_argument("--range", dest="grid_range", default=None, choices=("full", "narrow", "auto"),
                       help="levels of a symmetric grid: full (-2^(b-1)..2^(b-1)-1), narrow (one fewer, symmetric) or "
                            "auto (per channel the full range's extra level on the side of least weight error); "
                            "default: auto for mse grids, full otherwise")
    group.add_argument("--scheme", default="uniform", help="uniform or kmeans (default: uniform)")
    group.add_argument("--asymmetric", action="store_true", help="affine grid with a zero point")
    group.add_argument("--layers", default=None, help="comma-separated glob patterns of layers to quantize")
    group.add_argument("--fold-bn", action="store_true",
                       help="fold BatchNorm into the preceding conv before quantizing, as deployment does")
    _add_act_arguments(group)


def _add_act_arguments(group: Any) -> None:
    group.add_argument("--act-bits", type=int, default=None, metavar="B",
                       help="also quantize the input of every quantized layer to B bits (2..8; per tensor, affine, "
                            "ranges fitted on the calibration images; default: float activations)")
    group.add_argument("--act-observer", default="minmax", choices=("minmax", "percentile", "mse"),
                       help="how the activation ranges are fitted (default: minmax)")


def build_parser(*, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The ``deap-quant`` parser. ``suppress_defaults=True``: options of ``run`` that are not typed are left
    out of the parsed namespace (what ``--resume`` uses to tell typed options from defaults)."""
    parser = _Parser(prog="deap-quant", description="Evolve the rounding of quantized PyTorch networks with DEAP.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"deap_quant {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = commands.add_parser("run", help="quantize a model, evolve its rounding, re-score on test")
    _add_model_arguments(run)
    _add_quant_arguments(run)
    search = run.add_argument_group("evolution")
    search.add_argument("--algorithm", default="mu+lambda", help="mu+lambda, mu,lambda, simple or nsga2")
    search.add_argument("--mu", type=_positive, default=20)
    search.add_argument("--lambda", dest="lambda_", type=_positive, default=40)
    search.add_argument("--ngen", type=_non_negative, default=30)
    search.add_argument("--cxpb", type=_probability, default=None,
                        help="crossover probability (default: 0.2 with crossover; with --crossover none only 0 is "
                             "valid)")
    search.add_argument("--mutpb", type=_probability, default=None,
                        help="mutation probability (default: 0.8 with crossover, 1.0 with --crossover none, so that "
                             "no offspring is a plain copy)")
    search.add_argument("--hof-size", type=_positive, default=5)
    search.add_argument("--init-genes", type=_non_negative, default=8)
    search.add_argument("--layer-choice", default="uniform", help="uniform or size (default: uniform)")
    search.add_argument("--sampler", default="residual", help="residual or uniform (default: residual)")
    search.add_argument("--crossover", default="uniform", help="uniform, one_point, layer_swap or none")
    search.add_argument("--metric", default=None,
                        help="accuracy, top5, loss, mse, map_50 or map (default: the recipe's; for other models "
                             "map_50 on detection data, else accuracy)")
    search.add_argument("--batch-size", type=_positive, default=512)
    search.add_argument("--seed", type=_non_negative, default=0)
    output = run.add_argument_group("output")
    output.add_argument("--out", default=None, help="output folder (default: runs/MODEL-BITSbit-seedSEED)")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    output.add_argument("--checkpoint-every", type=_positive, default=None, metavar="K",
                        help="save a checkpoint into the output folder every K generations (and at the end)")
    output.add_argument("--resume", default=None, metavar="DIR",
                        help="carry on the checkpointed run in DIR (its settings are reused; --ngen may be raised)")
    output.add_argument("--threads", type=_positive, default=None,
                        help="torch threads (default: torch's; recorded, and restored on --resume)")
    parallel = run.add_argument_group("parallel evaluation (same results on every backend)")
    parallel.add_argument("--backend", default="serial", choices=("serial", "processes", "ray"),
                          help="serial (default), processes (a local pool) or ray (Ray actors)")
    parallel.add_argument("--workers", type=_positive, default=None,
                          help="worker processes or Ray actors (default: one per CPU; the cluster's for Ray)")
    parallel.add_argument("--ray-address", default=None, metavar="ADDRESS",
                          help="join this Ray cluster (e.g. auto or ray://HOST:10001); default: a local Ray instance")
    run.add_argument("--device", default=None, metavar="DEVICE",
                     help="cpu, cuda or cuda:N: where the model, validation data and caches live during the search "
                          "(default: the model's own, the CPU for zoo models); may change on --resume")
    parallel.add_argument("--population-batch", default=None, type=_population_batch, metavar="K|auto|off",
                          help="evaluate each generation's offspring together, K at a time (auto: from free memory), "
                               "scheduled by cached ancestor and stacked on CUDA; off: one at a time; the same "
                               "results either way (default: auto)")

    export = commands.add_parser("export", help="write the evolved quantized model of a run folder to one file")
    export.add_argument("dir", metavar="DIR", help="the --out folder of a finished deap-quant run")
    export.add_argument("--format", default="pt", choices=("pt", "onnx"),
                        help="pt (deap_quant's own file, any grid) or onnx (QDQ graph, checked in onnxruntime; "
                             "needs the onnx extra) (default: pt)")
    export.add_argument("--output", default=None, metavar="PATH",
                        help="file to write (default: DIR/model.pt, or DIR/model.onnx)")
    export.add_argument("--cache-dir", default=None, help="model cache (default: $XDG_CACHE_HOME/deap_quant)")
    export.add_argument("--max-difference", type=_non_negative, default=1, metavar="N",
                        help="onnx: write only if the onnxruntime test score is within N samples of the run's "
                             "(default: 1)")
    _add_compare_parser(commands)
    for command in commands.choices.values():  # --debug after the command too; SUPPRESS keeps an earlier one
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    if suppress_defaults:  # (set_defaults would put SUPPRESS into the namespace as a value)
        for action in run._actions:
            action.default = argparse.SUPPRESS
    return parser


def _typed_options(argv: Sequence[str]) -> set[str]:
    """The ``run`` options given on the command line ``argv`` (whatever their values), by destination."""
    return set(vars(build_parser(suppress_defaults=True).parse_args(list(argv))))


_DEBUG_HELP = "on an error, show Python's traceback instead of one line"


def _load_float_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(float model, data splits, display name) for ``--model`` / ``--dataset`` (see :mod:`deap_quant.zoo.loading`)."""
    from .zoo.loading import ModelSpecError, float_model_from_settings

    try:
        return float_model_from_settings(vars(args))
    except ModelSpecError as error:
        raise CLIError(str(error)) from None


def _default_metric(args: argparse.Namespace, splits: Any) -> Any:
    """The recipe's metric for a zoo model; otherwise ``map_50`` for detection targets, else ``accuracy``."""
    from .zoo import RECIPES

    if args.model in RECIPES:
        return RECIPES[args.model].new_metric()
    targets = splits.val[1]
    return "map_50" if isinstance(targets, list) and targets and isinstance(targets[0], dict) else "accuracy"


#: ``run`` options that may differ from the checkpointed run's when resuming it.
_RESUME_MAY_CHANGE = ("ngen", "no_progress", "cache_dir", "data_root", "threads", "checkpoint_every", "out",
                      "backend", "workers", "ray_address", "debug", "device", "population_batch")


def _resumed_args(args: argparse.Namespace, typed: Optional[set[str]] = None) -> tuple[argparse.Namespace, int]:
    """The checkpointed run's arguments, with the few that may change taken from ``args``.

    ``typed`` names the options given on the command line (:func:`_typed_options`): those are taken
    (or, if they may not change, checked) even where their value is the parser's default, e.g.
    ``--ngen 30`` or ``--backend serial``. ``None``: options equal to their default count as not given.
    """
    from .checkpoint import load_checkpoint

    checkpoint = load_checkpoint(args.resume)
    saved = dict(checkpoint.run_info)
    if saved.pop("command", None) != "run":
        raise CLIError(f"{checkpoint.path} was not written by deap-quant run; resume it from Python with "
                       "evolve(..., resume=...)")
    defaults = vars(build_parser().parse_args(["run"]))

    def given(key: str) -> bool:
        return key in typed if typed is not None else getattr(args, key) != defaults.get(key)

    for key, value in vars(args).items():
        if key in ("command", "resume") or key in _RESUME_MAY_CHANGE or not given(key):
            continue
        recorded = saved.get(key, defaults.get(key))
        if value != recorded:
            option = "--" + key.rstrip("_").replace("_", "-")
            raise CLIError(f"{option} {value} differs from the checkpointed run's {recorded}; drop it when "
                           "resuming (only --ngen may be raised)")
    if args.out is not None and Path(args.out).resolve() != Path(checkpoint.path).parent.resolve():
        raise CLIError(f"--out {args.out} differs from the resumed folder {Path(checkpoint.path).parent}; "
                       "drop --out when resuming")
    merged = {**defaults, **saved, "resume": args.resume, "out": str(Path(checkpoint.path).parent)}
    for key in _RESUME_MAY_CHANGE:
        if key != "out" and given(key):
            merged[key] = getattr(args, key)
    return argparse.Namespace(**merged), checkpoint.torch_threads


def _evolution_probabilities(args: argparse.Namespace, crossover: Optional[str]) -> tuple[float, float]:
    """``(cxpb, mutpb)`` from ``--cxpb``/``--mutpb`` and their defaults, refusing what cannot run, naming
    any default that took part."""
    if crossover is None and args.cxpb:
        raise CLIError(f"--cxpb {args.cxpb:g} needs a crossover, but --crossover is none (offspring are made by "
                       "mutation alone); drop --cxpb or choose --crossover uniform, one_point or layer_swap")
    cxpb = args.cxpb if args.cxpb is not None else 0.2 if crossover else 0.0
    mutpb = args.mutpb if args.mutpb is not None else 0.8 if crossover else 1.0
    if args.algorithm != "simple" and cxpb + mutpb > 1.0 + 1e-12 and (args.cxpb is None or args.mutpb is None):
        shown = [f"--cxpb {cxpb:g}" + ("" if args.cxpb is not None else " (cxpb's default with a crossover)"),
                 f"--mutpb {mutpb:g}" + ("" if args.mutpb is not None else " (mutpb's default with a crossover)")]
        fix = f"give --mutpb {1 - cxpb:g} or less" if args.mutpb is None else f"give --cxpb {1 - mutpb:g} or less"
        raise CLIError(f"{shown[0]} + {shown[1]} = {cxpb + mutpb:g} is more than 1, which --algorithm "
                       f"{args.algorithm} does not allow (an offspring is made by crossover or by mutation); {fix}")
    return cxpb, mutpb


def _command_run(args: argparse.Namespace, typed: Optional[set[str]] = None) -> int:
    from . import EvolutionConfig, QuantConfig, evolve, quantize
    from .report import check_writable, format_table, write_results

    checkpoint_threads = None
    resuming = args.resume is not None
    if resuming:
        args, checkpoint_threads = _resumed_args(args, typed)

    if args.device is not None:  # before any work: a device this machine lacks is a one-line error
        from .evaluation.batched import resolve_device
        resolve_device(args.device)
    if args.ray_address is not None and args.backend != "ray":
        raise CLIError(f"--ray-address {args.ray_address} needs --backend ray (got --backend {args.backend})")
    if args.backend == "ray":  # before any work: say how to install Ray if it is missing
        from .parallel import import_ray
        try:
            import_ray()
        except ImportError as error:
            raise CLIError(str(error)) from None

    crossover = None if args.crossover == "none" else args.crossover
    if resuming:  # as the checkpointed run computed them (it recorded --cxpb 0.2 with --crossover none as 0)
        cxpb = args.cxpb if crossover and args.cxpb is not None else 0.2 if crossover else 0.0
        mutpb = args.mutpb if args.mutpb is not None else 0.8 if crossover else 1.0
    else:
        cxpb, mutpb = _evolution_probabilities(args, crossover)
    config = EvolutionConfig(mu=args.mu, lambda_=args.lambda_, ngen=args.ngen, cxpb=cxpb, mutpb=mutpb,
                             algorithm=args.algorithm,
                             hof_size=args.hof_size, seed=args.seed, init_genes=args.init_genes,
                             layer_choice=args.layer_choice, sampler=args.sampler, crossover=crossover)
    quant = QuantConfig(bits=args.bits, per_channel=args.per_channel, symmetric=not args.asymmetric,
                        scale_method=args.scale_method, scheme=args.scheme, fold_bn=getattr(args, "fold_bn", False),
                        range=getattr(args, "grid_range", None), act_bits=args.act_bits,
                        act_observer=args.act_observer)
    out = args.out or os.path.join("runs", f"{Path(args.model).stem}-{args.bits}bit-seed{args.seed}")
    if args.data_root is not None and not (Path(args.data_root).is_dir() or Path(args.data_root).is_file()):
        raise CLIError(f"--data-root {args.data_root!r} does not exist or is not a folder (or .npz file); give the "
                       "folder or file that holds the dataset")
    out_dir = check_writable(out)  # fail before the run, not after it
    if args.checkpoint_every is not None and args.resume is None:
        from .checkpoint import check_no_checkpoint
        check_no_checkpoint(out_dir)
    threads = args.threads or checkpoint_threads
    if threads:
        import torch
        torch.set_num_threads(threads)
    run_info = {"command": "run", **{k: v for k, v in vars(args).items() if k not in ("command", "resume", "debug")},
                "out": str(out_dir)}
    layers = [p.strip() for p in args.layers.split(",") if p.strip()] if args.layers else None
    model, splits, name = _load_float_model(args)
    qmodel = quantize(model, layers=layers, config=quant, act_calibration=splits.train if quant.act_bits else None)
    print(f"quantized {name}: {len(qmodel.layers)} layers, {qmodel.n_weights} weights, {args.bits} bits "
          f"({args.scheme}, {'per-channel' if args.per_channel else 'per-tensor'}, {args.scale_method})", flush=True)
    checkpointing = args.checkpoint_every is not None or args.resume is not None
    result = evolve(qmodel, splits.val, splits.test, config=config, metric=args.metric or _default_metric(args, splits),
                    batch_size=args.batch_size, float_model=model, progress=not args.no_progress,
                    checkpoint=out_dir if checkpointing else None, checkpoint_every=args.checkpoint_every,
                    resume=args.resume, run_info=run_info, backend=args.backend, workers=args.workers,
                    ray_address=args.ray_address, device=args.device,
                    **({} if args.population_batch is None else
                       {"population_batch": None if args.population_batch == "off" else args.population_batch}))
    result.config["model"] = name
    paths = write_results(result, out_dir)
    print(format_table(result.to_dict()))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _command_export(args: argparse.Namespace) -> int:
    from .export import export, read_export
    from .report import format_value

    path = export(args.dir, args.output, format=args.format, cache_dir=args.cache_dir,
                  max_difference=args.max_difference)
    if args.format == "onnx":
        return _print_onnx_export(path)
    content = read_export(path)
    scores = content["scores"]
    metric = scores["metric"]
    print(f"wrote {path}: {len(content['layers'])} quantized layers, {len(content['genes'])} genes applied")
    checked = "checked exactly" if scores.get("test_checked", True) else "not checked: see the warning above"
    print(f"exported model: {metric} test {format_value(metric, scores['test'])} (the run reported "
          f"{format_value(metric, scores['test'])}; {checked})")
    if scores.get("int8_test") is not None:
        print(f"int8 module (torch.ao.nn.quantized, {content['int8']['engine']}): {metric} test "
              f"{format_value(metric, scores['int8_test'])}")
    return 0


def _print_onnx_export(path: Path) -> int:
    from .onnx_export import read_onnx_metadata
    from .report import format_value

    info = read_onnx_metadata(path)
    layers, check = info.get("layers", []), info.get("check", {})
    act = sorted({layer["act_bits"] for layer in layers if layer.get("act_bits")})
    print(f"wrote {path}: {len(layers)} quantized layers as QDQ (weights "
          f"{'/'.join(sorted({layer['weight'] for layer in layers}))}, activations "
          f"{'/'.join(f'{bits}-bit' for bits in act) + ' QDQ' if act else 'float'}), {info.get('genes', 0)} genes applied")
    metric = check.get("metric", "accuracy")
    if check.get("checked"):
        print(f"onnxruntime: {metric} test {format_value(metric, check['onnxruntime_test'])} (the run reported "
              f"{format_value(metric, check['reported_test'])}; difference {check['difference_samples']:+d} samples "
              f"of {check['test_samples']})")
        level = check.get("default_level")
        if level:
            print(f"onnxruntime at its default level ({level['optimization']}; reported, never refused): {metric} "
                  f"test {format_value(metric, level['onnxruntime_test'])}, difference "
                  f"{level['difference_samples']:+d} samples; {level['predictions_differing']} predictions differ "
                  f"from deap_quant, logits by up to {level['max_logit_difference']:.3g}")
    else:
        print("onnxruntime: not checked (the run reported no test score)")
    return 0


def _add_compare_parser(commands: Any) -> None:
    compare = commands.add_parser("compare", help="compare baselines and evolutionary configurations over seeds")
    _add_model_arguments(compare)
    compare.add_argument("--bits", type=int, default=2, help="weight bit-width, 2..8 (default: 2)")
    compare.add_argument("--per-tensor", dest="per_channel", action="store_false", default=True,
                         help="one grid per layer (default: per output channel)")
    _add_act_arguments(compare)
    compare.add_argument("--seeds", type=_positive, default=5, help="number of seeds, 0..N-1 (default: 5)")
    compare.add_argument("--data-seeds", type=_positive, default=1, metavar="K",
                         help="re-draw the val/test split per seed: seed s runs on data seed s mod K (0: the split "
                              "of --data-seed; k: val and test pooled and split again, train untouched), so the "
                              "spread covers the data too; digits only (default: 1, one split for every seed)")
    compare.add_argument("--config", default=None, metavar="FILE",
                         help="configuration file (JSON; default: the shipped set)")
    compare.add_argument("--only", default=None, metavar="A,B,C", help="run only these configurations")
    compare.add_argument("--list", action="store_true", help="list the configurations and exit")
    compare.add_argument("--ngen", type=_non_negative, default=None,
                         help="override every configuration's ngen (also one a configuration sets itself)")
    compare.add_argument("--adaround-steps", type=_positive, default=None, help="override AdaRound's steps per layer")
    compare.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's)")
    compare.add_argument("--out", default=None, help="output folder (default: runs/compare-MODEL-BITSbit)")
    compare.add_argument("--no-progress", action="store_true", help="no progress bar")


def _command_compare(args: argparse.Namespace) -> int:
    from .compare import compare, load_configs

    configs, _ = load_configs(args.config)
    if args.list:
        for config in configs:
            print(f"{config.name:<36} {config.description}")
        return 0
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    unknown = sorted(set(only or ()) - {config.name for config in configs})
    if unknown or only == []:
        raise CLIError(f"--only {args.only!r} names unknown configuration(s) {unknown}; see deap-quant compare --list")
    out = args.out or os.path.join("runs", f"compare-{Path(args.model).stem}-{args.bits}bit")
    settings: dict[str, Any] = {"per_channel": args.per_channel}
    if args.act_bits is not None:
        settings.update(act_bits=args.act_bits, act_observer=args.act_observer)
    if args.ngen is not None:
        settings["evolution"] = {"ngen": args.ngen}
    if args.adaround_steps is not None:
        settings["adaround"] = {"steps": args.adaround_steps}
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    command = " ".join(["deap-quant compare", f"--model {args.model}", f"--bits {args.bits}", f"--seeds {args.seeds}",
                        f"--out {out}"] + [f"--{flag.replace('_', '-')} {getattr(args, flag)}" for flag in
                                           ("weights", "dataset", "data_root", "val_size", "calibration_size", "val_from",
                                            "config", "only", "ngen", "adaround_steps", "threads", "act_bits")
                                           if getattr(args, flag, None) is not None]
                       + [f"--{flag.replace('_', '-')} {getattr(args, flag)}" for flag, plain in
                          (("data_seed", 0), ("data_seeds", 1)) if getattr(args, flag) != plain]
                       + ([] if args.per_channel else ["--per-tensor"]))
    from .report import check_writable
    check_writable(out)  # fail before the runs, not after them
    model, splits, name = _load_float_model(args)
    result = compare((model, splits, name), args.config, bits=args.bits, seeds=args.seeds, out=out, only=only,
                     settings=settings, data_seed=args.data_seed, data_seeds=args.data_seeds,
                     progress=not args.no_progress, command=command)
    print(result.paths["report.md"].read_text())
    print(f"wrote {', '.join(str(p) for p in result.paths.values())}")
    return 0


COMMANDS = {"run": _command_run, "export": _command_export, "compare": _command_compare}


def _one_line(message: Any) -> str:
    return " ".join(str(message).split())


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types reported as bad input (see the module docstring)."""
    from .parallel import WorkersLostError

    return (ValueError, OSError, ImportError, WorkersLostError)


def _describe(error: BaseException) -> str:
    message = _one_line(error)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    debug = False
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        debug = bool(getattr(args, "debug", False))
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        for option in ("weights", "data_root"):  # recorded in run folders: absolute, so export works from anywhere
            if getattr(args, option, None):
                setattr(args, option, os.path.abspath(os.path.expanduser(getattr(args, option))))
        if args.command == "run" and args.resume is not None:
            return _command_run(args, _typed_options(argv))
        return COMMANDS[args.command](args)
    except CLIError as error:
        print(f"deap-quant: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("deap-quant: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        if isinstance(error, _user_errors()):
            print(f"deap-quant: error: {_one_line(error) or type(error).__name__}", file=sys.stderr)
            return EXIT_USAGE
        print(f"deap-quant: internal error: {_describe(error)} (run again with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
