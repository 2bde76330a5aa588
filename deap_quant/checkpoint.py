"""Checkpoints of an evolution: save, verify, refuse the wrong ones, and restore exactly.

A checkpoint is one JSON document (human-readable, loaded without executing any code) behind a
one-line header that carries its length and SHA-256, so a truncated or corrupted file is
recognised as such. It holds everything the generational loop needs to carry on as if it had
never stopped: population and hall of fame (genes and fitness values, bit-exact), logbook,
generation, evaluation count, the search configuration, the states of Python's ``random``,
NumPy's and torch's global generators, a fingerprint of the quantized model it belongs to, and
what the fitness values depend on beyond the model (``search``): the start rounding (its name and
options, and a SHA-256 of the model rebased to it), the metric and a SHA-256 of the validation data.
Resuming with another model, configuration, start, metric or validation data is refused, so that
fitness values of two different problems are never mixed in one population.

Files in a checkpoint folder: ``checkpoint.json`` (the latest) and ``checkpoint.prev.json`` (the
one before). A new checkpoint is written to a temporary file, fsynced, and only then renamed into
place, after the latest one has become the previous one; the folder is fsynced afterwards. At
every moment at least one complete checkpoint exists on disk.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

__all__ = [
    "CheckpointError", "Checkpoint", "CHECKPOINT_FILE", "PREVIOUS_FILE", "FORMAT_VERSION",
    "model_fingerprint", "data_fingerprint", "capture_rng", "restore_rng", "encode_individual", "decode_individual",
    "save_checkpoint", "load_checkpoint", "find_checkpoint", "check_no_checkpoint",
    "CheckpointWriter", "open_checkpoints",
]

CHECKPOINT_FILE = "checkpoint.json"
PREVIOUS_FILE = "checkpoint.prev.json"
FORMAT_VERSION = 1
_MAGIC = b"DEAP-QUANT-CHECKPOINT"

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, or belongs to another model, bit-width or version."""


# ---------------------------------------------------------------------------------------- pieces
def model_fingerprint(qmodel: Any) -> dict[str, Any]:
    """What identifies a quantized model: its layer table, quantization settings and a SHA-256
    over every grid (scales, zero points or codebooks) and every integer base state."""
    digest = hashlib.sha256()
    layers = []
    for number, info in enumerate(qmodel.layer_table()):
        layers.append([info.name, list(info.shape), int(info.n_levels)])
        digest.update(f"{info.name}|{tuple(info.shape)}|{info.n_levels}|".encode())
        grid_state = qmodel.grids[number].to_state()
        for key in sorted(grid_state):
            value = grid_state[key]
            if isinstance(value, torch.Tensor):
                digest.update(key.encode() + value.detach().contiguous().cpu().numpy().tobytes())
            else:
                digest.update(f"{key}={value!r}".encode())
        digest.update(qmodel.base_states(number).contiguous().numpy().tobytes())
    return {"layers": layers, "quantization": dict(getattr(qmodel, "config", {})), "sha256": digest.hexdigest()}


def data_fingerprint(batches: Iterable[Any]) -> str:
    """SHA-256 of data given as a sequence of ``(inputs, targets)`` batches, in order: every tensor by
    its dtype, shape and bytes (:func:`deap_quant.data.npz.fingerprint`), lists, tuples and dicts
    item by item, any other value by its type and ``repr``."""
    from .data.npz import fingerprint

    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            try:
                digest.update(b"T" + fingerprint(value).encode())
            except TypeError:  # a dtype NumPy lacks (bfloat16): its bytes
                raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                digest.update(f"T{value.dtype}{tuple(value.shape)}".encode() + fingerprint(raw).encode())
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)};".encode())
            for item in value:
                feed(item)
        elif isinstance(value, dict):
            digest.update(f"D{len(value)};".encode())
            for key in sorted(value, key=repr):
                digest.update(repr(key).encode())
                feed(value[key])
        else:
            digest.update(f"V{type(value).__name__}:{value!r};".encode())

    for batch in batches:
        feed(batch)
    return digest.hexdigest()


def capture_rng() -> dict[str, Any]:
    """The states of Python's ``random``, NumPy's global and torch's CPU generator, as JSON data."""
    version, internal, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": [name, [int(k) for k in keys], int(position), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` recorded."""
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss_next))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(position), int(has_gauss), float(cached)))
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone())


def _json_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str)) or value is None


def encode_individual(individual: Sequence) -> dict[str, Any]:
    """Genes, the fitness' weighted values (exact: JSON keeps every bit of a float) and any plain
    extra attributes of the fitness (e.g. NSGA-II's ``crowding_dist``)."""
    fitness = individual.fitness
    extra = {key: value for key, value in vars(fitness).items() if key != "wvalues" and _json_scalar(value)}
    return {"genes": [[int(g[0]), int(g[1]), int(g[2])] for g in individual],
            "wvalues": [float(v) for v in fitness.wvalues], "fitness_extra": extra}


def decode_individual(entry: dict[str, Any], individual_class: type) -> Any:
    """Rebuild an individual of ``individual_class`` from :func:`encode_individual`'s output."""
    individual = individual_class(entry["genes"])
    individual.fitness.wvalues = tuple(float(v) for v in entry["wvalues"])
    for key, value in entry.get("fitness_extra", {}).items():
        setattr(individual.fitness, key, value)
    return individual


# ---------------------------------------------------------------------------------------- checkpoint
@dataclass
class Checkpoint:
    """One saved state of the generational loop, at the end of generation ``generation``."""

    generation: int
    config: dict[str, Any]
    population: list[dict[str, Any]]
    hall_of_fame: list[dict[str, Any]]
    logbook: list[dict[str, Any]]
    logbook_header: Optional[list[str]]
    evaluations: int
    elapsed_seconds: float
    rng: dict[str, Any]
    model: dict[str, Any]
    library: dict[str, str]
    finished: bool = False
    torch_threads: int = 0
    every: int = 1
    run_info: dict[str, Any] = field(default_factory=dict)
    archives: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    path: Optional[str] = None

    # ------------------------------------------------------------------ building from a live loop
    @classmethod
    def capture(cls, *, generation: int, config: dict[str, Any], population: Sequence, hall_of_fame: Sequence,
                logbook: Any, evaluations: int, elapsed_seconds: float, model: dict[str, Any],
                finished: bool = False, every: int = 1, run_info: Optional[dict[str, Any]] = None,
                archives: Optional[dict[str, Sequence]] = None, search: Optional[dict[str, Any]] = None
                ) -> Checkpoint:
        """The loop's state now. ``model`` is :func:`model_fingerprint` of the model as given to
        ``evolve`` (before any rebasing start); ``archives`` are further hall-of-fame-like
        collections to keep (e.g. NSGA-II's Pareto front); ``search`` identifies what the fitness
        values depend on beyond the model (see :meth:`check_search`)."""
        from .versions import versions

        return cls(generation=int(generation), config=_plain(config),
                   population=[encode_individual(ind) for ind in population],
                   hall_of_fame=[encode_individual(ind) for ind in hall_of_fame],
                   logbook=[_plain(dict(record)) for record in logbook],
                   logbook_header=list(logbook.header) if getattr(logbook, "header", None) else None,
                   evaluations=int(evaluations), elapsed_seconds=float(elapsed_seconds), rng=capture_rng(),
                   model=model, library=versions(), finished=bool(finished),
                   torch_threads=torch.get_num_threads(), every=int(every), run_info=_plain(run_info or {}),
                   archives={name: [encode_individual(ind) for ind in archive]
                             for name, archive in (archives or {}).items()},
                   search=_plain(search or {}))

    def to_dict(self) -> dict[str, Any]:
        content = {key: getattr(self, key) for key in self.__dataclass_fields__ if key != "path"}
        return {"format": FORMAT_VERSION, **content}

    # ------------------------------------------------------------------ checks
    def check_compatible(self, qmodel: Any) -> None:
        """Refuse (with :class:`CheckpointError`) if this checkpoint was made by another library
        version, for another quantization, or for another model than ``qmodel``."""
        from . import __version__

        where = self.path or "the checkpoint"
        saved_version = self.library.get("deap_quant")
        if saved_version != __version__:
            raise CheckpointError(f"{where} was written by deap_quant {saved_version}; this is deap_quant "
                                  f"{__version__}; resume it with that version or start a new run")
        current = model_fingerprint(qmodel)
        saved_quant, quant = self.model.get("quantization", {}), current["quantization"]
        for key in sorted(set(saved_quant) | set(quant), key=lambda name: (name != "bits", name)):
            if saved_quant.get(key) != quant.get(key):
                raise CheckpointError(f"{where} was made with {key}={saved_quant.get(key)!r}; this model is "
                                      f"quantized with {key}={quant.get(key)!r}; quantize with "
                                      f"{key}={saved_quant.get(key)!r} to resume it")
        saved_layers, layers = self.model.get("layers", []), current["layers"]
        if saved_layers != layers:
            if len(saved_layers) != len(layers):
                detail = f"{len(saved_layers)} quantized layers, this model has {len(layers)}"
            else:
                number = next(i for i, (a, b) in enumerate(zip(saved_layers, layers)) if a != b)
                detail = (f"layer {number} {saved_layers[number][0]} {tuple(saved_layers[number][1])}, this model "
                          f"has {layers[number][0]} {tuple(layers[number][1])}")
            raise CheckpointError(f"{where} belongs to a different model ({detail}); resume with the model "
                                  "it was made for")
        if self.model.get("sha256") != current["sha256"]:
            raise CheckpointError(f"{where} belongs to a different model (same layer shapes, but different "
                                  "weights, grids or base rounding); resume with the model it was made for")

    def check_search(self, current: dict[str, Any], keys: Iterable[str]) -> None:
        """Refuse (with :class:`CheckpointError` naming what differs) to resume where the fitness
        values would mean something else than in this checkpoint. ``current`` holds, like
        :attr:`search`: ``start`` (``{"name", "options"}``), ``metric`` (``{"name", "kind"}``),
        ``val_sha256`` (:func:`data_fingerprint` of the validation batches, None if unknown) and
        ``base_sha256`` (:func:`model_fingerprint` of the model rebased to its start). Only ``keys``
        are checked, and only those this checkpoint records (older ones record none)."""
        where = self.path or "the checkpoint"
        current = _plain(current)
        for key in keys:
            if key not in self.search or key not in current or self.search[key] == current[key]:
                continue
            saved, now = self.search[key], current[key]
            if key == "start":
                raise CheckpointError(f"{where} was made with start={saved.get('name')!r} (options "
                                      f"{saved.get('options')}); this run has start={now.get('name')!r} (options "
                                      f"{now.get('options')}); pass the start and start_options it was made with "
                                      "to resume it")
            if key == "metric":
                raise CheckpointError(f"{where} was made with metric {saved.get('name')!r} ({saved.get('kind')}); "
                                      f"this run scores with {now.get('name')!r} ({now.get('kind')}); resume with "
                                      f"metric={saved.get('name')!r}")
            if key == "val_sha256":
                raise CheckpointError(f"{where} was made on other validation data (SHA-256 {_short(saved)}, this "
                                      f"run's {_short(now)}; the same examples in the same order and batches are "
                                      "needed); resume with the validation data and batch_size it was made with")
            if key == "base_sha256":
                raise CheckpointError(f"{where}: the start rounding differs from the one it was made with (SHA-256 "
                                      f"of the rebased model {_short(saved)}, this run's {_short(now)}); resume "
                                      "with the same start, start_options and calibration data")
            raise CheckpointError(f"{where} was made with {key}={saved!r}, not {now!r}")

    def resolve_config(self, requested: Optional[dict[str, Any]]) -> dict[str, Any]:
        """The configuration to resume with: the saved one, where ``requested`` may only change ``ngen``."""
        if requested is None:
            return dict(self.config)
        where = self.path or "the checkpoint"
        for key in sorted(requested):
            if key == "ngen":
                continue
            if _plain(requested.get(key)) != self.config.get(key):
                raise CheckpointError(f"{where} was made with {key}={self.config.get(key)!r}, not "
                                      f"{requested.get(key)!r}; only ngen may change when resuming")
        if requested.get("ngen", self.generation) < self.generation:
            raise CheckpointError(f"ngen={requested['ngen']} is not valid for {where}, which is already at "
                                  f"generation {self.generation}; use ngen >= {self.generation}")
        return {**self.config, "ngen": requested.get("ngen", self.config.get("ngen"))}

    # ------------------------------------------------------------------ restoring into a live loop
    def restore(self, individual_class: type, hall_of_fame: Any, logbook: Any,
                archives: Optional[dict[str, Any]] = None) -> list:
        """Fill ``hall_of_fame``, ``logbook`` and ``archives`` in place, restore the RNGs, return the population."""
        population = [decode_individual(entry, individual_class) for entry in self.population]
        _fill_hall_of_fame(hall_of_fame, [decode_individual(entry, individual_class) for entry in self.hall_of_fame])
        for name, archive in (archives or {}).items():
            if name not in self.archives:
                raise CheckpointError(f"{self.path or 'the checkpoint'} holds no {name}; it was made by another "
                                      "kind of run")
            _fill_hall_of_fame(archive, [decode_individual(entry, individual_class) for entry in self.archives[name]])
        del logbook[:]
        if self.logbook_header is not None:
            logbook.header = list(self.logbook_header)
        for record in self.logbook:
            logbook.record(**record)
        restore_rng(self.rng)
        return population


def _short(digest: Any) -> str:
    return f"{digest[:12]}..." if isinstance(digest, str) else repr(digest)


def _fill_hall_of_fame(hall_of_fame: Any, items: list) -> None:
    """Put ``items`` (best first) into a DEAP HallOfFame / ParetoFront exactly as DEAP keeps them."""
    hall_of_fame.clear()
    hall_of_fame.items.extend(items)
    hall_of_fame.keys.extend(item.fitness for item in reversed(items))  # keys ascend, items descend


def _plain(value: Any) -> Any:
    """``value`` as JSON data (tuples become lists), so that saved and live values compare equal."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return repr(value)


# ---------------------------------------------------------------------------------------- files
def _encode(checkpoint: Checkpoint) -> bytes:
    payload = json.dumps(checkpoint.to_dict(), separators=(",", ":"), default=_json_default).encode()
    header = f"{_MAGIC.decode()} {FORMAT_VERSION} {len(payload)} {hashlib.sha256(payload).hexdigest()}\n"
    return header.encode() + payload


def _decode(raw: bytes, where: str) -> Checkpoint:
    head, newline, payload = raw.partition(b"\n")
    parts = head.split(b" ")
    if not raw:
        raise CheckpointError(f"{where} is empty (truncated); resume from {PREVIOUS_FILE} if it exists, "
                              "or start a new run")
    if parts[0] != _MAGIC or len(parts) != 4 or not newline:
        raise CheckpointError(f"{where} is not a deap_quant checkpoint (or its header is damaged); "
                              f"expected a file written by evolve(checkpoint=...)")
    try:
        version, length, digest = int(parts[1]), int(parts[2]), parts[3].decode("ascii")
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{where} has a damaged header; it is not a usable checkpoint") from None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{where} has checkpoint format {version}; this deap_quant reads format "
                              f"{FORMAT_VERSION}")
    if len(payload) != length:
        raise CheckpointError(f"{where} is truncated or padded ({len(payload)} of {length} bytes); "
                              f"resume from {PREVIOUS_FILE} if it exists, or start a new run")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{where} is corrupt (SHA-256 mismatch); resume from {PREVIOUS_FILE} if it "
                              "exists, or start a new run")
    try:
        content = json.loads(payload)
        content.pop("format")
        return Checkpoint(**content, path=where)
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{where} has the right checksum but unreadable content ({error})") from None


def _fsync_directory(directory: Path) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def save_checkpoint(directory: PathLike, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` into ``directory`` atomically, keeping the previous one until it is done.

    Order: the new file is written to a temporary name and fsynced; the latest checkpoint is
    renamed to ``checkpoint.prev.json``; the temporary file is renamed to ``checkpoint.json``;
    the folder is fsynced. A crash at any point leaves at least one complete checkpoint.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = _encode(checkpoint)
    latest, previous = directory / CHECKPOINT_FILE, directory / PREVIOUS_FILE
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{CHECKPOINT_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        if latest.exists():
            os.replace(latest, previous)
        os.replace(temporary, latest)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)
    return latest


def find_checkpoint(path: PathLike) -> Optional[Path]:
    """The checkpoint file for ``path``: the file itself, or in a folder ``checkpoint.json``, else
    (after a crash between the two renames of :func:`save_checkpoint`) ``checkpoint.prev.json``."""
    path = Path(path)
    if path.is_file():
        return path
    for name in (CHECKPOINT_FILE, PREVIOUS_FILE):
        if (path / name).is_file():
            return path / name
    return None


def load_checkpoint(path: PathLike) -> Checkpoint:
    """Read and verify the checkpoint at ``path`` (a checkpoint folder or file).

    Raises :class:`CheckpointError` if there is none, or if it is truncated, corrupt, or not a
    checkpoint at all. Compatibility with a model is checked by :meth:`Checkpoint.check_compatible`.
    """
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"resume={path!r} is not valid; give a checkpoint folder or file path")
    for attempt in range(3):  # a writer may rename the file between finding and reading it
        found = find_checkpoint(path)
        if found is None:
            state = "does not exist" if not Path(path).exists() else f"holds no {CHECKPOINT_FILE}"
            raise CheckpointError(f"checkpoint {str(path)!r} {state}; give the folder a run with "
                                  "checkpoint=... (--checkpoint-every) wrote")
        try:
            raw = found.read_bytes()
            break
        except FileNotFoundError:
            if attempt == 2:
                raise CheckpointError(f"checkpoint {str(found)!r} vanished while being read; is another run "
                                      "writing into this folder?") from None
        except OSError as error:
            raise CheckpointError(f"checkpoint {str(found)!r} cannot be read ({error.strerror})") from None
    checkpoint = _decode(raw, str(found))
    if not math.isfinite(checkpoint.elapsed_seconds) or checkpoint.generation < 0:
        raise CheckpointError(f"{found} holds impossible values (generation {checkpoint.generation})")
    return checkpoint


def check_no_checkpoint(directory: PathLike) -> None:
    """Refuse to start a new checkpointed run in a folder that already holds a checkpoint."""
    found = find_checkpoint(directory) if Path(directory).is_dir() else None
    if found is not None:
        raise CheckpointError(f"{str(directory)!r} already holds a checkpoint ({found.name}); resume it "
                              "(resume=... / --resume) or choose another folder, so that it is not overwritten")
    if Path(directory).exists() and not Path(directory).is_dir():
        raise CheckpointError(f"checkpoint folder {str(directory)!r} is a file; give a folder path")


class CheckpointWriter:
    """Saves a checkpoint into ``directory`` every ``every`` generations and at the end."""

    def __init__(self, directory: PathLike, model: dict[str, Any], every: int = 1,
                 run_info: Optional[dict[str, Any]] = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"checkpoint_every={every!r} is not valid; use an integer >= 1")
        self.directory = Path(directory)
        self.model = model
        self.every = every
        self.run_info = run_info or {}

    def due(self, generation: int, finished: bool) -> bool:
        return finished or generation % self.every == 0

    def save(self, **state: Any) -> Path:
        """Capture (see :meth:`Checkpoint.capture`) and save the loop's current state."""
        return save_checkpoint(self.directory, Checkpoint.capture(model=self.model, every=self.every,
                                                                  run_info=self.run_info, **state))


def open_checkpoints(qmodel: Any, *, checkpoint: Optional[PathLike], every: Optional[int],
                     resume: Optional[Union[PathLike, Checkpoint]], run_info: Optional[dict[str, Any]] = None
                     ) -> tuple[Optional[Checkpoint], Optional[CheckpointWriter]]:
    """Check everything about checkpointing before a run starts (and before any start rounding
    rebases ``qmodel``: checkpoints identify the model as it was given); nothing is written here
    but the (empty) checkpoint folder.

    ``resume`` is a checkpoint folder or file, or a :class:`Checkpoint` already loaded and checked. Returns
    the checkpoint to resume from (verified against ``qmodel``) and the writer for new
    checkpoints. Resuming without ``checkpoint`` keeps checkpointing into the resumed folder, as
    often as before. A new run refuses a folder that already holds a checkpoint.
    """
    from .report import check_writable

    resumed = None
    if resume is not None:
        if isinstance(resume, Checkpoint):
            resumed = resume  # loaded and checked by the caller
        else:
            resumed = load_checkpoint(resume)
            resumed.check_compatible(qmodel)
        if checkpoint is None:
            checkpoint = Path(resumed.path).parent
        if every is None:
            every = resumed.every
        if run_info is None:
            run_info = resumed.run_info
    if checkpoint is None:
        if every is not None:
            raise ValueError(f"checkpoint_every={every!r} needs a checkpoint folder (checkpoint=...)")
        return resumed, None
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, (str, os.PathLike)):
        raise ValueError(f"checkpoint={checkpoint!r} is not valid; give a folder path")
    writer = CheckpointWriter(checkpoint, model_fingerprint(qmodel), 1 if every is None else every, run_info)
    same_folder = resumed is not None and Path(resumed.path).parent.resolve() == Path(checkpoint).resolve()
    if not same_folder:
        check_no_checkpoint(checkpoint)
    check_writable(checkpoint)
    return resumed, writer
