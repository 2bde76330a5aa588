"""Writing a run's results: a console table, ``results.json``, ``logbook.csv``, ``best_genes.json``, ``fitness.png``."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from .zoo.cache import atomic_write_bytes

__all__ = ["format_value", "format_table", "write_results", "write_json", "plot_fitness", "fitness_series",
           "higher_is_better", "check_writable"]

PERCENT_METRICS = ("accuracy", "top5", "map", "map_50")


def format_value(metric: str, value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if metric in PERCENT_METRICS:
        return f"{100 * value:.2f}%"
    return f"{value:.4f}"


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of float / nearest / evolved scores on val and test, plus run figures.

    ``genes`` is how many genes the evolved rounding has, ``changed`` how many weights they move
    off the nearest (or start) rounding."""
    metric = result["metric"]
    rows = [("float", result.get("float") or {}), ("nearest", result["baseline"]), ("evolved", result["best"])]
    lines = [f"{metric:<10}{'val':>12}{'test':>12}{'genes':>8}{'changed':>9}"]
    for name, scores in rows:
        genes = str(len(scores["genes"])) if "genes" in scores else "-" if name == "float" else "0"
        changed = (str(scores["changed_weights"]) if "changed_weights" in scores
                   else "-" if name == "float" or "genes" in scores else "0")
        lines.append(f"{name:<10}{format_value(metric, scores.get('val')):>12}"
                     f"{format_value(metric, scores.get('test')):>12}{genes:>8}{changed:>9}")
    lines.append(f"evaluations {result['evaluations']}, {result['seconds']:.1f} s, "
                 f"{result['evals_per_second']:.1f} evals/s")
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def write_json(path: Path, content: Any) -> None:
    atomic_write_bytes(Path(path), json.dumps(content, indent=2, default=_json_default).encode() + b"\n")


def check_writable(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` if needed and make sure files can be written there (fail early, not after the run)."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output folder {str(path)!r} is a file; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".deap_quant_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"output folder {str(path)!r} is not writable ({error.strerror}); "
                         "choose a folder you can write to") from None
    return path


def higher_is_better(result: Any) -> bool:
    """Whether the run's headline metric is higher-is-better (accuracy) or lower-is-better (loss, MSE).

    The logbook's ``max``/``mean``/``min`` are fitness values, which evolution maximises: for a
    lower-is-better metric they are the negated metric. Read from ``result["higher_is_better"]``
    (``results.json`` written by :func:`write_results` holds it), else from which sign of the
    logbook's values comes nearest to the best individual's validation score (``result`` is a
    ``results.json`` dict or an :class:`~deap_quant.EvolutionResult`)."""
    content = result if isinstance(result, dict) else result.to_dict()
    if isinstance(content.get("higher_is_better"), bool):
        return content["higher_is_better"]
    best = (content.get("best") or {}).get("val")
    values = [float(entry[key]) for entry in content.get("logbook") or [] for key in ("max", "min")
              if isinstance(entry.get(key), (int, float)) and math.isfinite(entry[key])]
    if best is None or not values or not math.isfinite(best):
        return True
    return min(abs(v - best) for v in values) <= min(abs(v + best) for v in values)


def fitness_series(result: dict[str, Any]) -> dict[str, Any]:
    """What :func:`plot_fitness` draws, all in the metric's own units: per generation the best and mean
    validation score of the population (the logbook's fitness values times the metric's sign: for a
    lower-is-better metric the best is the population's *minimum*), the nearest (or start) rounding's
    validation and test scores, and the final best's test score."""
    higher = higher_is_better(result)
    sign = 1.0 if higher else -1.0
    log = result["logbook"]
    baseline = result["baseline"]
    return {"higher_is_better": higher, "best_label": f"best (val): {'max' if higher else 'min'}",
            "gens": [r["gen"] for r in log], "best": [sign * r["max"] for r in log],
            "mean": [sign * r["mean"] for r in log], "nearest_val": baseline["val"],
            "nearest_test": baseline.get("test", float("nan")), "best_test": result["best"].get("test")}


def plot_fitness(result: dict[str, Any], path: Path) -> dict[str, Any]:
    """Best and mean validation score per generation, with the final best's test score marked; returns
    what it drew (:func:`fitness_series`). Everything is in the metric's units: for a lower-is-better
    metric (loss, MSE) the best of a generation is its minimum."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = fitness_series(result)
    gens = series["gens"]
    figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    axis.plot(gens, series["best"], label=series["best_label"], color="tab:blue")
    axis.plot(gens, series["mean"], label="mean (val)", color="tab:blue", alpha=0.45, linestyle="--")
    axis.axhline(series["nearest_val"], color="grey", linewidth=0.8, label="nearest (val)")
    if series["best_test"] is not None:
        axis.scatter([gens[-1]], [series["best_test"]], color="tab:red", zorder=3, label="best (test)")
        axis.axhline(series["nearest_test"], color="tab:red", linewidth=0.8, alpha=0.5,
                     linestyle=":", label="nearest (test)")
    axis.set_xlabel("generation")
    better = "higher" if series["higher_is_better"] else "lower"
    axis.set_ylabel(f"validation {result['metric']} ({better} is better)")
    axis.legend(loc="lower right" if series["higher_is_better"] else "upper right", fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return series


def write_results(result: Any, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.json``, ``logbook.csv``, ``best_genes.json`` and ``fitness.png`` into ``out_dir``.

    ``results.json`` is the result's ``to_dict()`` plus ``higher_is_better`` (:func:`higher_is_better`):
    the logbook's ``max``/``mean``/``min`` are fitness values, the metric times +1 or -1."""
    content = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    out = check_writable(out_dir)
    content.setdefault("higher_is_better", higher_is_better(result))  # the logbook's fitness = sign * metric
    paths = {name: out / name for name in ("results.json", "logbook.csv", "best_genes.json", "fitness.png")}
    write_json(paths["results.json"], content)
    buffer = io.StringIO()
    log = content["logbook"]
    if log:
        writer = csv.DictWriter(buffer, fieldnames=list(log[0]))
        writer.writeheader()
        writer.writerows(log)
    atomic_write_bytes(paths["logbook.csv"], buffer.getvalue().encode())
    write_json(paths["best_genes.json"], {"genes": content["best"]["genes"], "format": "[layer, index, offset]",
                                          "layers": content.get("details", {}).get("layers")})
    plot_fitness(content, paths["fitness.png"])
    return paths
