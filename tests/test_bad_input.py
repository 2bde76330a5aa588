"""Bad input, through the API and the CLI: every case gets an error naming the value and what is valid;
the CLI prints one line and exits 2; nothing already written (results, checkpoints) is damaged.

``docs/bad_inputs.md`` is the table of these cases (``python -m tests.test_bad_input`` prints it).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deap_quant import Evaluator, EvolutionConfig, GeneError, evolve, load, quantize, write_results
from deap_quant.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint
from deap_quant.cli import main
from deap_quant.evaluation.metrics import Accuracy
from deap_quant.export import ExportError, export

from .conftest import make_tiny_model

# ---------------------------------------------------------------------------------------- helpers


def tiny_data(n: int = 24, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=generator), torch.randint(0, classes, (n,), generator=generator)


def with_bad_weight(value: float) -> nn.Module:
    model = make_tiny_model()
    with torch.no_grad():
        model.fc.weight[1, 3] = value
    return model


def channels_3_model() -> nn.Module:
    return nn.Sequential(OrderedDict([("conv", nn.Conv2d(3, 4, 3)), ("flatten", nn.Flatten()),
                                      ("fc", nn.Linear(4 * 6 * 6, 10))])).eval()


def snapshot(folder: Path) -> dict[str, str]:
    """Name -> SHA-256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Context:
    """What the API cases work on: a tiny quantized model, its data, a folder holding a real checkpoint."""

    def __init__(self, root: Path):
        self.root = root
        self.model = make_tiny_model()
        self.qmodel = quantize(self.model, bits=2)
        self.data = tiny_data()
        self.checkpoint = root / "checkpointed"
        evolve(self.qmodel, self.data, self.data, mu=3, lambda_=3, ngen=1, progress=False, checkpoint=self.checkpoint)
        raw = (self.checkpoint / CHECKPOINT_FILE).read_bytes()
        self.corrupt = root / "corrupt"
        self.corrupt.mkdir()
        (self.corrupt / CHECKPOINT_FILE).write_bytes(raw[:-40] + bytes([raw[-40] ^ 1]) + raw[-39:])
        self.truncated = root / "truncated"
        self.truncated.mkdir()
        (self.truncated / CHECKPOINT_FILE).write_bytes(raw[: len(raw) // 2])
        self.foreign = root / "foreign"
        self.foreign.mkdir()
        (self.foreign / CHECKPOINT_FILE).write_text('{"population": []}')
        self.blocker = root / "a-file"
        self.blocker.write_text("a file, not a folder")


def _evolve(ctx: Context, **options: Any) -> Any:
    return evolve(ctx.qmodel, ctx.data, progress=False, **{"mu": 3, "lambda_": 3, "ngen": 1, **options})


# (what, call, error type, message the error must contain)
API_CASES: list[tuple[str, Callable[[Context], Any], type, str]] = [
    ("bits above the range", lambda c: quantize(c.model, bits=9), ValueError,
     "bits=9 is not valid; use an integer from 2 to 8"),
    ("bits below the range", lambda c: quantize(c.model, bits=1), ValueError,
     "bits=1 is not valid; use an integer from 2 to 8"),
    ("bits not an integer", lambda c: quantize(c.model, bits=4.0), ValueError,
     "bits=4.0 is not valid; use an integer from 2 to 8"),
    ("unknown scheme", lambda c: quantize(c.model, scheme="lloyd"), ValueError,
     "scheme='lloyd' is not valid; use one of uniform, kmeans"),
    ("unknown scale method", lambda c: quantize(c.model, scale_method="p99"), ValueError,
     "scale_method='p99' is not valid; use one of minmax, mse"),
    ("layer filter matching nothing", lambda c: quantize(c.model, layers="decoder.*"), ValueError,
     "layers='decoder.*' matches no quantizable layer; available: conv, fc"),
    ("model without Conv/Linear layers", lambda c: quantize(nn.Sequential(nn.ReLU(), nn.Flatten())), ValueError,
     "Sequential has no quantizable layers; deap_quant quantizes Linear, Conv1d"),
    ("not a model at all", lambda c: quantize("resnet18"), TypeError,
     "model must be a torch.nn.Module, got str"),
    ("NaN weights", lambda c: quantize(with_bad_weight(float("nan"))), ValueError,
     "layer 'fc' has NaN or infinite weights"),
    ("infinite weights", lambda c: quantize(with_bad_weight(float("inf"))), ValueError,
     "layer 'fc' has NaN or infinite weights"),
    ("gene with an out-of-range layer", lambda c: c.qmodel.apply_([(2, 0, 1)]), GeneError,
     "layer=2 is out of range; valid layers are 0..1"),
    ("gene with an out-of-range index", lambda c: c.qmodel.apply_([(0, 36, 1)]), GeneError,
     "index=36 is out of range for layer 0; valid indices are 0..35"),
    ("gene with a negative index", lambda c: c.qmodel.apply_([(1, -1, 1)]), GeneError,
     "index=-1 is out of range for layer 1; valid indices are 0..255"),
    ("gene with a non-integer offset", lambda c: c.qmodel.apply_([(0, 0, 0.5)]), GeneError,
     "offset=0.5 must be an integer"),
    ("gene that is not a triple", lambda c: c.qmodel.apply_([(0, 1)]), GeneError,
     "gene #0 (0, 1) is not a (layer, index, offset) triple"),
    ("targets that do not fit the model's outputs", lambda c: Evaluator(c.qmodel, tiny_data(classes=10))(()),
     ValueError, "does not fit the model's 4 outputs; valid targets are 0..3"),
    ("empty dataset", lambda c: Evaluator(c.qmodel, (torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)))(()),
     ValueError, "the dataset is empty"),
    ("inputs of the wrong shape", lambda c: Evaluator(c.qmodel, (torch.randn(4, 3, 8, 8), torch.zeros(4).long()))(()),
     ValueError, "inputs of shape (4, 3, 8, 8) do not fit the model"),
    ("inputs and targets of different lengths", lambda c: Evaluator(c.qmodel, (torch.randn(4, 1, 8, 8),
                                                                               torch.zeros(3).long()))(()),
     ValueError, "inputs (4) and targets (3) differ in length"),
    ("top-k accuracy with k above the number of classes",
     lambda c: Evaluator(c.qmodel, c.data, metric=Accuracy(10))(()), ValueError,
     "top10: k=10 is larger than the model's 4 classes; use k from 1 to 4"),
    ("top-k accuracy with k = 0", lambda c: Accuracy(0), ValueError, "k=0 is not valid; use a positive integer"),
    ("DataLoader yielding (inputs, targets, extra) triples",
     lambda c: Evaluator(c.qmodel, DataLoader(TensorDataset(*c.data, c.data[1]), batch_size=8))(()), ValueError,
     "expected an (inputs, targets) pair per batch; batch 0 of the DataLoader has 3 items"),
    ("Dataset yielding single tensors",
     lambda c: Evaluator(c.qmodel, TensorDataset(c.data[0]))(()), ValueError,
     "expected an (inputs, targets) pair per batch; batch 0 of the Dataset has 1 item"),
    ("unknown metric", lambda c: Evaluator(c.qmodel, c.data, metric="f1"), ValueError,
     "metric='f1' is not valid; use one of accuracy, top5, loss"),
    ("mu > lambda for (mu,lambda)", lambda c: EvolutionConfig(algorithm="mu,lambda", mu=8, lambda_=4), ValueError,
     "mu=8 > lambda_=4 is not valid for (mu,lambda); lambda_ must be at least mu"),
    ("crossover probability above 1", lambda c: EvolutionConfig(cxpb=1.5), ValueError,
     "cxpb=1.5 is not valid; use a probability in [0, 1]"),
    ("mutation probability below 0", lambda c: EvolutionConfig(mutpb=-0.1), ValueError,
     "mutpb=-0.1 is not valid; use a probability in [0, 1]"),
    ("NaN probability", lambda c: EvolutionConfig(cxpb=float("nan")), ValueError,
     "cxpb=nan is not valid; use a probability in [0, 1]"),
    ("cxpb + mutpb above 1", lambda c: EvolutionConfig(cxpb=0.5, mutpb=0.8), ValueError,
     "cxpb + mutpb = 1.3 is not valid for mu+lambda; their sum must be at most 1"),
    ("unknown algorithm", lambda c: EvolutionConfig(algorithm="cma-es"), ValueError,
     "algorithm='cma-es' is not valid; use one of mu+lambda, mu,lambda, simple"),
    ("zero population", lambda c: EvolutionConfig(mu=0), ValueError, "mu=0 is not valid; use an integer >= 1"),
    ("negative generations", lambda c: EvolutionConfig(ngen=-1), ValueError,
     "ngen=-1 is not valid; use an integer >= 0"),
    ("corrupt checkpoint", lambda c: _evolve(c, resume=c.corrupt), CheckpointError,
     "is corrupt (SHA-256 mismatch); resume from checkpoint.prev.json if it exists, or start a new run"),
    ("truncated checkpoint", lambda c: _evolve(c, resume=c.truncated), CheckpointError, "is truncated or padded"),
    ("a file that is not a checkpoint", lambda c: _evolve(c, resume=c.foreign), CheckpointError,
     "is not a deap_quant checkpoint"),
    ("resume from a folder without a checkpoint", lambda c: _evolve(c, resume=c.root), CheckpointError,
     "holds no checkpoint.json"),
    ("checkpoint of another bit-width", lambda c: evolve(quantize(c.model, bits=4), c.data, resume=c.checkpoint),
     CheckpointError, "was made with bits=2; this model is quantized with bits=4"),
    ("checkpoint of another model", lambda c: evolve(quantize(make_tiny_model(seed=9), bits=2), c.data,
                                                     resume=c.checkpoint),
     CheckpointError, "belongs to a different model"),
    ("new run into a folder holding a checkpoint", lambda c: _evolve(c, checkpoint=c.checkpoint), CheckpointError,
     "already holds a checkpoint (checkpoint.json); resume it"),
    ("checkpoint_every of 0", lambda c: _evolve(c, checkpoint=c.root / "new", checkpoint_every=0), ValueError,
     "checkpoint_every=0 is not valid; use an integer >= 1"),
    ("output folder that is a file", lambda c: write_results({}, c.blocker), ValueError,
     "is a file; give a folder path"),
    ("output folder that cannot be created", lambda c: write_results({}, c.blocker / "out"), ValueError,
     "is not writable (Not a directory); choose a folder you can write to"),
    ("export of a folder without results", lambda c: export(c.checkpoint), ExportError,
     "holds no results.json; give the --out folder of a finished deap-quant run"),
    ("loading a file that is not an export", lambda c: load(c.checkpoint / CHECKPOINT_FILE), ExportError,
     "is not a readable deap_quant export"),
]


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> Context:
    return Context(tmp_path_factory.mktemp("bad-input"))


@pytest.mark.parametrize("what, call, error, message", API_CASES, ids=[case[0] for case in API_CASES])
def test_api_rejects_bad_input_clearly_and_damages_nothing(context, what, call, error, message):
    before = snapshot(context.root)
    weights = [context.qmodel.dequantized_weights(i) for i in range(len(context.qmodel.layers))]
    with pytest.raises(error) as caught:
        call(context)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert snapshot(context.root) == before  # checkpoints and everything else untouched
    assert all(torch.equal(w, context.qmodel.dequantized_weights(i)) for i, w in enumerate(weights))


# ---------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits_zoo) -> Path:
    """A finished, checkpointed CLI run: every bad command below is pointed at it and must leave it alone."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", "--mu", "3", "--lambda", "3", "--ngen", "1", "--no-progress", "--out", str(out),
                 "--checkpoint-every", "1"]) == 0
    return out


def saved_model(folder: Path, name: str, model: Any) -> str:
    path = folder / name
    torch.save(model, path)
    return str(path)


# (what, argv with {out} / {tmp} / {corrupt} placeholders, message the one line must contain)
CLI_CASES: list[tuple[str, list[str], str]] = [
    ("bits out of range", ["run", "--bits", "9", "--out", "{out}"], "bits=9 is not valid; use an integer from 2 to 8"),
    ("bits not a number", ["run", "--bits", "two", "--out", "{out}"], "argument --bits: invalid int value: 'two'"),
    ("unknown scheme", ["run", "--scheme", "lloyd", "--out", "{out}"], "scheme='lloyd' is not valid"),
    ("unknown scale method", ["run", "--scale-method", "p99", "--out", "{out}"], "scale_method='p99' is not valid"),
    ("layer filter matching nothing", ["run", "--layers", "decoder*", "--out", "{out}"],
     "layers=['decoder*'] matches no quantizable layer; available: conv1, conv2"),
    ("unknown model", ["run", "--model", "resnet9000", "--out", "{out}"],
     "--model 'resnet9000' is neither a zoo recipe"),
    ("model file that is not a model", ["run", "--model", "{garbage}", "--out", "{out}"],
     "could not be loaded as a saved module or TorchScript"),
    ("saved object that is not a module", ["run", "--model", "{dict}", "--out", "{out}"],
     "holds a dict, not a torch.nn.Module"),
    ("model without Conv/Linear layers", ["run", "--model", "{relu}", "--out", "{out}"],
     "Sequential has no quantizable layers"),
    ("model with NaN weights", ["run", "--model", "{nan}", "--out", "{out}"], "layer 'fc' has NaN or infinite weights"),
    ("targets that do not fit the model's outputs", ["run", "--model", "{four_classes}", "--dataset", "digits",
                                                     "--out", "{out}"],
     "targets range 0..9 does not fit the model's 4 outputs; valid targets are 0..3"),
    ("inputs of the wrong shape", ["run", "--model", "{rgb}", "--dataset", "digits", "--out", "{out}"],
     "inputs of shape (359, 1, 8, 8) do not fit the model"),
    ("unknown dataset", ["run", "--model", "{four_classes}", "--dataset", "imagenet", "--out", "{out}"],
     "dataset='imagenet' is not valid; use one of"),
    ("missing data root", ["run", "--data-root", "{tmp}/no-such-folder", "--out", "{out}"],
     "--data-root '{tmp}/no-such-folder' does not exist or is not a folder"),
    ("mu > lambda for (mu,lambda)", ["run", "--algorithm", "mu,lambda", "--mu", "8", "--lambda", "4", "--out", "{out}"],
     "mu=8 > lambda_=4 is not valid for (mu,lambda)"),
    ("probability outside [0, 1]", ["run", "--cxpb", "1.5", "--out", "{out}"],
     "argument --cxpb: 1.5 is not valid; use a probability in [0, 1]"),
    ("negative probability", ["run", "--mutpb", "-0.2", "--out", "{out}"],
     "argument --mutpb: -0.2 is not valid; use a probability in [0, 1]"),
    ("zero population", ["run", "--mu", "0", "--out", "{out}"], "argument --mu: 0 is not valid; use an integer >= 1"),
    ("unknown algorithm", ["run", "--algorithm", "cma-es", "--out", "{out}"], "algorithm='cma-es' is not valid"),
    ("unknown metric", ["run", "--metric", "f1", "--out", "{out}"], "metric='f1' is not valid"),
    ("checkpoint every 0 generations", ["run", "--checkpoint-every", "0", "--out", "{out}"],
     "argument --checkpoint-every: 0 is not valid; use an integer >= 1"),
    ("new checkpointed run into a folder holding a checkpoint", ["run", "--checkpoint-every", "2", "--out", "{out}"],
     "already holds a checkpoint (checkpoint.json); resume it (resume=... / --resume) or choose another folder"),
    ("resume from a missing folder", ["run", "--resume", "{tmp}/no-such-run"],
     "checkpoint '{tmp}/no-such-run' does not exist"),
    ("resume from a corrupt checkpoint", ["run", "--resume", "{corrupt}"], "is corrupt (SHA-256 mismatch)"),
    ("resume from a truncated checkpoint", ["run", "--resume", "{truncated}"], "is truncated or padded"),
    ("resume with a different bit-width", ["run", "--resume", "{out}", "--bits", "4"],
     "--bits 4 differs from the checkpointed run's 2; drop it when resuming"),
    ("output folder that is a file", ["run", "--out", "{blocker}"], "is a file; give a folder path"),
    ("output folder that cannot be created", ["run", "--out", "{blocker}/run"],
     "is not writable (Not a directory); choose a folder you can write to"),
    ("export of a folder without results", ["export", "{tmp}"], "holds no results.json"),
    ("export in an unknown format", ["export", "{out}", "--format", "tflite"], "argument --format: invalid choice: 'tflite'"),
    ("unknown command", ["frobnicate"], "invalid choice: 'frobnicate'"),
    ("unknown option", ["run", "--turbo", "--out", "{out}"], "unrecognized arguments: --turbo"),
]


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, finished_run) -> dict[str, str]:
    return make_cli_files(tmp_path_factory.mktemp("cli-files"), finished_run)


def make_cli_files(folder: Path, finished_run: Path) -> dict[str, str]:
    """Bad files for the CLI cases, and the placeholders of their command lines."""
    garbage = folder / "garbage.pt"
    garbage.write_bytes(b"\x80\x04 certainly not a pickle")
    raw = (finished_run / CHECKPOINT_FILE).read_bytes()
    corrupt, truncated = folder / "corrupt", folder / "truncated"
    for target, payload in ((corrupt, raw.replace(b'"generation":1', b'"generation":7')), (truncated, raw[:-100])):
        target.mkdir()
        (target / CHECKPOINT_FILE).write_bytes(payload)
    blocker = folder / "a-file"
    blocker.write_text("a file, not a folder")
    return {
        "out": str(finished_run), "tmp": str(folder), "garbage": str(garbage), "blocker": str(blocker),
        "corrupt": str(corrupt), "truncated": str(truncated),
        "dict": saved_model(folder, "dict.pt", {"weight": torch.zeros(3)}),
        "relu": saved_model(folder, "relu.pt", nn.Sequential(nn.ReLU(), nn.Flatten())),
        "nan": saved_model(folder, "nan.pt", with_bad_weight(float("nan"))),
        "four_classes": saved_model(folder, "four.pt", make_tiny_model()),
        "rgb": saved_model(folder, "rgb.pt", channels_3_model()),
    }


@pytest.mark.parametrize("what, argv, message", CLI_CASES, ids=[case[0] for case in CLI_CASES])
def test_cli_prints_one_line_exits_2_and_damages_nothing(finished_run, cli_files, capsys, what, argv, message):
    before = snapshot(finished_run)
    before_files = snapshot(Path(cli_files["tmp"]))
    capsys.readouterr()
    assert main([arg.format(**cli_files) for arg in argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("deap-quant: error: ") and message.format(**cli_files) in lines[0]
    assert snapshot(finished_run) == before  # results, checkpoints, logbook: byte for byte
    assert snapshot(Path(cli_files["tmp"])) == before_files
    assert load_checkpoint(finished_run).generation == 1


@pytest.mark.parametrize("argv, message", [
    (["run", "--resume", "{corrupt}"], "is corrupt (SHA-256 mismatch)"),
    (["run", "--model", "{dict}", "--out", "{out}"], "holds a dict, not a torch.nn.Module"),
])
def test_the_console_script_prints_exactly_one_line_and_no_traceback(cli_files, argv, message):
    completed = subprocess.run([sys.executable, "-m", "deap_quant.cli", *[a.format(**cli_files) for a in argv]],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1 and completed.stderr.startswith("deap-quant: error: ")  # no warnings
    assert message in completed.stderr


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_output_folder_is_refused_before_the_run(tmp_path, capsys):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert main(["run", "--out", str(folder), "--no-progress"]) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        folder.chmod(0o700)


def markdown_table() -> str:
    """The table in docs/bad_inputs.md, from the cases above and the errors they really get."""
    import tempfile

    rows = ["| # | Where | Bad input | Error |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as root:
        context = Context(Path(root))
        for number, (what, call, error, _) in enumerate(API_CASES, 1):
            try:
                call(context)
                text = "(no error)"
            except error as caught:
                text = f"`{type(caught).__name__}`: {caught}"
            rows.append(f"| {number} | API | {what} | {text.replace(root, '/tmp/x').replace('|', '&#124;')} |")
        out = Path(root) / "run"
        main(["run", "--mu", "3", "--lambda", "3", "--ngen", "1", "--no-progress", "--out", str(out),
              "--checkpoint-every", "1"])
        (Path(root) / "cli-files").mkdir()
        files = make_cli_files(Path(root) / "cli-files", out)
        for number, (what, argv, _) in enumerate(CLI_CASES, len(API_CASES) + 1):
            argv = [arg.format(**files) for arg in argv]
            completed = subprocess.run([sys.executable, "-m", "deap_quant.cli", *argv], capture_output=True,
                                       text=True)
            shown = " ".join(argv).replace(root, "/tmp/x")
            line = completed.stderr.strip().replace(root, "/tmp/x")
            rows.append(f"| {number} | CLI | {what}: `deap-quant {shown}` | exit {completed.returncode}: "
                        f"{line.replace('|', '&#124;')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
