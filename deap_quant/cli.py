"""``deap-quant``: the command-line front end.

Every failure the user can cause ends in one line on stderr and a non-zero exit, never a traceback.
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
                       help="a zoo recipe name, or a path to a saved float model (torch.save of a module, "
                            "or TorchScript) used with --dataset (default: digits-cnn)")
    group.add_argument("--dataset", default=None, help="dataset for a model given as a path (default: digits)")
    group.add_argument("--data-root", default=None, help="folder holding a local dataset")
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
    group.add_argument("--scheme", default="uniform", help="uniform or kmeans (default: uniform)")
    group.add_argument("--asymmetric", action="store_true", help="affine grid with a zero point")
    group.add_argument("--layers", default=None, help="comma-separated glob patterns of layers to quantize")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deap-quant", description="Evolve the rounding of quantized PyTorch networks with DEAP.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"deap_quant {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = commands.add_parser("run", help="quantize a model, evolve its rounding, re-score on test")
    _add_model_arguments(run)
    _add_quant_arguments(run)
    search = run.add_argument_group("evolution")
    search.add_argument("--algorithm", default="mu+lambda", help="mu+lambda, mu,lambda or simple")
    search.add_argument("--mu", type=_positive, default=20)
    search.add_argument("--lambda", dest="lambda_", type=_positive, default=40)
    search.add_argument("--ngen", type=_non_negative, default=30)
    search.add_argument("--cxpb", type=_probability, default=0.2)
    search.add_argument("--mutpb", type=_probability, default=0.8)
    search.add_argument("--hof-size", type=_positive, default=5)
    search.add_argument("--init-genes", type=_non_negative, default=8)
    search.add_argument("--layer-choice", default="size", help="uniform or size (default: size)")
    search.add_argument("--sampler", default="uniform", help="uniform or residual (default: uniform)")
    search.add_argument("--crossover", default="uniform", help="uniform, one_point, layer_swap or none")
    search.add_argument("--metric", default=None, help="accuracy, top5 or loss (default: the recipe's)")
    search.add_argument("--batch-size", type=_positive, default=512)
    search.add_argument("--seed", type=_non_negative, default=0)
    output = run.add_argument_group("output")
    output.add_argument("--out", default=None, help="output folder (default: runs/MODEL-BITSbit-seedSEED)")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _load_float_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(float model, data splits, display name) for ``--model`` / ``--dataset``."""
    import torch

    from .data import load_dataset
    from .zoo import RECIPES, load_model

    if args.model in RECIPES:
        if args.dataset is not None:
            raise CLIError(f"--dataset {args.dataset} cannot be combined with zoo model {args.model}, "
                           "which brings its own data")
        zoo = load_model(args.model, seed=args.data_seed, cache=args.cache_dir, verbose=True)
        return zoo.model, zoo.data, args.model
    path = Path(args.model)
    if not path.exists():
        raise CLIError(f"--model {args.model!r} is neither a zoo recipe ({', '.join(sorted(RECIPES))}) "
                       "nor an existing file")
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except Exception:
        try:
            model = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as error:
            raise CLIError(f"--model {args.model!r} could not be loaded as a saved module or TorchScript "
                           f"({type(error).__name__})") from None
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"--model {args.model!r} holds a {type(model).__name__}, not a torch.nn.Module; "
                       "save the whole module with torch.save(model, path)")
    splits = load_dataset(args.dataset or "digits", args.data_root, args.data_seed)
    return model.eval(), splits, path.stem


def _command_run(args: argparse.Namespace) -> int:
    from . import EvolutionConfig, QuantConfig, evolve, quantize
    from .report import check_writable, format_table, write_results

    crossover = None if args.crossover == "none" else args.crossover
    config = EvolutionConfig(mu=args.mu, lambda_=args.lambda_, ngen=args.ngen,
                             cxpb=args.cxpb if crossover else 0.0, mutpb=args.mutpb, algorithm=args.algorithm,
                             hof_size=args.hof_size, seed=args.seed, init_genes=args.init_genes,
                             layer_choice=args.layer_choice, sampler=args.sampler, crossover=crossover)
    quant = QuantConfig(bits=args.bits, per_channel=args.per_channel, symmetric=not args.asymmetric,
                        scale_method=args.scale_method, scheme=args.scheme)
    out = args.out or os.path.join("runs", f"{Path(args.model).stem}-{args.bits}bit-seed{args.seed}")
    out_dir = check_writable(out)  # fail before the run, not after it
    layers = [p.strip() for p in args.layers.split(",") if p.strip()] if args.layers else None
    model, splits, name = _load_float_model(args)
    qmodel = quantize(model, layers=layers, config=quant)
    print(f"quantized {name}: {len(qmodel.layers)} layers, {qmodel.n_weights} weights, {args.bits} bits "
          f"({args.scheme}, {'per-channel' if args.per_channel else 'per-tensor'}, {args.scale_method})", flush=True)
    result = evolve(qmodel, splits.val, splits.test, config=config, metric=args.metric or "accuracy",
                    batch_size=args.batch_size, float_model=model, progress=not args.no_progress)
    result.config["model"] = name
    paths = write_results(result, out_dir)
    print(format_table(result.to_dict()))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


COMMANDS = {"run": _command_run}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return COMMANDS[args.command](args)
    except CLIError as error:
        print(f"deap-quant: error: {error}", file=sys.stderr)
    except (ValueError, TypeError, KeyError, OSError) as error:
        message = error.args[0] if error.args else str(error)
        print(f"deap-quant: error: {message}", file=sys.stderr)
    except KeyboardInterrupt:
        print("deap-quant: interrupted", file=sys.stderr)
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
