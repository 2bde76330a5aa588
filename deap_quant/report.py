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

__all__ = ["format_value", "format_table", "write_results", "write_json", "plot_fitness", "check_writable"]

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


def plot_fitness(result: dict[str, Any], path: Path) -> None:
    """Best and mean validation fitness per generation, with the final best's test score marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = result["logbook"]
    gens = [r["gen"] for r in log]
    figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    axis.plot(gens, [r["max"] for r in log], label="best (val)", color="tab:blue")
    axis.plot(gens, [r["mean"] for r in log], label="mean (val)", color="tab:blue", alpha=0.45, linestyle="--")
    baseline = result["baseline"]
    axis.axhline(baseline["val"], color="grey", linewidth=0.8, label="nearest (val)")
    if result["best"].get("test") is not None:
        axis.scatter([gens[-1]], [result["best"]["test"]], color="tab:red", zorder=3, label="best (test)")
        axis.axhline(baseline.get("test", float("nan")), color="tab:red", linewidth=0.8, alpha=0.5,
                     linestyle=":", label="nearest (test)")
    axis.set_xlabel("generation")
    axis.set_ylabel(f"validation fitness ({result['metric']})")
    axis.legend(loc="lower right", fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(Path(path), buffer.getvalue())


def write_results(result: Any, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.json``, ``logbook.csv``, ``best_genes.json`` and ``fitness.png`` into ``out_dir``."""
    content = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    out = check_writable(out_dir)
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
