"""Writing a comparison: ``report.md``, the JSON and CSV files, and the plots (matplotlib, imported on use)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from ..report import check_writable, write_json
from ..zoo.cache import atomic_write_bytes
from .configs import RunConfig
from .running import SUMMARY_KEYS

if TYPE_CHECKING:
    from .running import CompareResult

__all__ = ["format_report", "write_report", "plot_convergence", "plot_pareto"]


def _percent(value: Optional[float]) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _p(value: Optional[float]) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3g}"


def _by_data_seed(result: CompareResult) -> list[str]:
    """Mean test accuracy per configuration and data seed (only when the comparison re-drew the split)."""
    used = [entry["data_seed"] for entry in result.settings.get("float_by_data_seed", [])]
    if len(used) < 2:
        return []
    lines = ["", "## Test accuracy by data seed (mean over the seeds on each split)", "",
             "| config | " + " | ".join(f"data seed {d}" for d in used) + " |", "|---" * (len(used) + 1) + "|",
             "| float | " + " | ".join(_percent(entry["test"]) for entry in result.settings["float_by_data_seed"]) + " |"]
    for row in result.summary:
        cells = []
        for d in used:
            values = [r["test"] for r in result.rows if r["config"] == row["config"] and r.get("data_seed") == d]
            cells.append(_percent(float(np.mean(values))) if values else "-")
        lines.append(f"| {row['config']} | " + " | ".join(cells) + " |")
    return lines


def format_report(result: CompareResult, command: Optional[str] = None) -> str:
    """The markdown report: settings, summary table, comparisons with their start, pairwise p-values."""
    s = result.settings
    data_seeds = int(s.get("data_seeds", 1))
    over = f" over {data_seeds} data splits" if data_seeds > 1 else ""
    lines = [f"# deap-quant compare: {s['model']}, {s['bits']} bits, "
             f"{'per-channel' if s['per_channel'] else 'per-tensor'}, {len(s['seeds'])} seeds{over}", ""]
    if command:
        lines += ["```", command, "```", ""]
    if data_seeds > 1:
        data = (f"Seed s runs on data seed s mod {data_seeds}: data seed 0 is the split as loaded, the others "
                "pool val and test and split them again (stratified, same sizes; train, which the float model "
                "learned from, is untouched). Std and CI therefore cover both the search and the data split; "
                "float scores are means over the data splits.")
    else:
        data = "Every seed uses the same train/val/test split, so std and CI cover the search only."
    lines += [f"Float model: val {_percent(s['float']['val'])}%, test {_percent(s['float']['test'])}%. "
              "Accuracy in %. `test` is the held-out test split, scored after each search; the 95% CI is "
              f"Student's t over seeds. {data}", "",
              "| config | n | val mean | test mean | test std | test 95% CI | evaluations | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    for row in result.summary:
        lines.append(f"| {row['config']} | {row['n']} | {_percent(row['val_mean'])} | {_percent(row['test_mean'])} | "
                     f"{_percent(row['test_std'])} | [{_percent(row['test_ci_low'])}, {_percent(row['test_ci_high'])}] | "
                     f"{row['evaluations_mean']:.0f} | {row['seconds_mean']:.1f} |")
    if result.summary:
        winner = max(result.summary, key=lambda r: r["test_mean"])
        lines += ["", f"Highest mean test accuracy: **{winner['config']}** ({_percent(winner['test_mean'])}%)."]
    lines += _by_data_seed(result)
    if result.paired:
        lines += ["", "## Evolution against its starting rounding (test, paired by seed)", "",
                  "p-values are given raw and Holm-corrected across the configurations compared with the same "
                  "start (family-wise error rate).", "",
                  "| config | start | mean | start mean | difference | wins/losses | p (Wilcoxon, greater) | "
                  "p Holm (Wilcoxon) | p (Mann-Whitney, two-sided) | p Holm (Mann-Whitney) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in result.paired:
            lines.append(f"| {row['config']} | {row['reference']} | {_percent(row['mean'])} | "
                         f"{_percent(row['reference_mean'])} | {100 * row['difference']:+.2f} | "
                         f"{row['wins']}/{row['losses']} | {_p(row['p_wilcoxon_greater'])} | "
                         f"{_p(row.get('p_wilcoxon_greater_holm'))} | {_p(row['p_mannwhitney'])} | "
                         f"{_p(row.get('p_mannwhitney_holm'))} |")
    names = [row["config"] for row in result.summary]
    if len(names) > 1:
        lookup = {(r["a"], r["b"]): r["p_mannwhitney"] for r in result.pairwise}
        lines += ["", "## Pairwise Mann-Whitney U p-values (test, two-sided, uncorrected)", "",
                  "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for a in names:
            cells = ["" if a == b else _p(lookup.get((a, b), lookup.get((b, a), float("nan")))) for b in names]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", "Figures: `convergence.png` (best search fitness vs evaluations, median and min-max over "
              "seeds)" + (", `pareto.png` (NSGA-II fronts)" if any("pareto_front" in r.get("details", {})
                                                                    for r in result.records) else "") + "."]
    return "\n".join(lines) + "\n"


def _csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _png(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def plot_convergence(records: Sequence[Mapping[str, Any]], configs: Sequence[RunConfig], path: Path) -> bool:
    """Best search fitness vs evaluations per evolutionary configuration: median line, min-max band.

    One panel per fitness kind (their scales differ). Returns False if there is nothing to plot.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {c.name: c for c in configs}
    curves: dict[str, list[list[dict]]] = {}
    for record in records:
        if record.get("kind") == "evolve" and record["details"].get("curve"):
            curves.setdefault(record["config"], []).append(record["details"]["curve"])
    if not curves:
        return False
    kinds = list(dict.fromkeys(by_name[name].fitness for name in curves))
    figure, axes = plt.subplots(1, len(kinds), figsize=(6.4 * len(kinds), 4.4), dpi=110, squeeze=False)
    colors = plt.get_cmap("tab20")
    for panel, kind in zip(axes[0], kinds):
        for number, (name, runs) in enumerate((n, r) for n, r in curves.items() if by_name[n].fitness == kind):
            length = min(len(run) for run in runs)
            evals = np.median([[p["evals"] for p in run[:length]] for run in runs], axis=0)
            values = np.array([[p["max"] for p in run[:length]] for run in runs], dtype=np.float64)
            color = colors((2 * number) % 20 + (number // 10) % 2)  # distinct hues first
            panel.plot(evals, np.median(values, axis=0), color=color, label=name, linewidth=1.2)
            panel.fill_between(evals, values.min(axis=0), values.max(axis=0), color=color, alpha=0.15, linewidth=0)
        panel.set_xlabel("fitness evaluations")
        label = {"val": "validation accuracy"}.get(kind, kind)
        panel.set_ylabel(f"best search fitness ({label})")
        panel.grid(alpha=0.3)
        panel.legend(fontsize=6, loc="lower right")
    figure.tight_layout()
    _png(figure, path)
    return True


def plot_pareto(records: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """NSGA-II fronts: changed weights vs accuracy, validation (o) and test (x), one colour per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fronts: dict[str, list[tuple[int, list[dict]]]] = {}
    for record in records:
        if "pareto_front" in record.get("details", {}):
            fronts.setdefault(record["config"], []).append((record["seed"], record["details"]["pareto_front"]))
    if not fronts:
        return False
    figure, axes = plt.subplots(1, len(fronts), figsize=(6.0 * len(fronts), 4.2), dpi=110, squeeze=False)
    colors = plt.get_cmap("tab10")
    for panel, (name, runs) in zip(axes[0], fronts.items()):
        for number, (seed, front) in enumerate(runs):
            front = sorted(front, key=lambda p: p["n_genes"])
            genes = [p["n_genes"] for p in front]
            color = colors(number % 10)
            panel.step(genes, [p["val"] for p in front], where="post", color=color, marker="o", markersize=3,
                       linewidth=1, label=f"seed {seed} val")
            if all(p.get("test") is not None for p in front):
                panel.plot(genes, [p["test"] for p in front], color=color, marker="x", linestyle=":", linewidth=1,
                           label=f"seed {seed} test")
        panel.set_title(name, fontsize=9)
        panel.set_xlabel("changed weights (genes)")
        panel.set_ylabel("accuracy")
        panel.grid(alpha=0.3)
        panel.legend(fontsize=6, loc="lower right")
    figure.tight_layout()
    _png(figure, path)
    return True


def write_report(result: CompareResult, configs: Sequence[RunConfig], out_dir: Union[str, Path],
                 command: Optional[str] = None) -> dict[str, Path]:
    """Write summary.json, runs.json, runs.csv, summary.csv, report.md and the plots into ``out_dir``."""
    out = check_writable(out_dir)
    paths = {name: out / name for name in ("summary.json", "runs.json", "runs.csv", "summary.csv", "report.md")}
    write_json(paths["summary.json"], result.rows)
    write_json(paths["runs.json"], {"settings": result.settings, "runs": result.records, "summary": result.summary,
                                    "paired": result.paired, "pairwise": result.pairwise})
    atomic_write_bytes(paths["runs.csv"], _csv(result.rows, SUMMARY_KEYS))
    atomic_write_bytes(paths["summary.csv"], _csv(result.summary, list(result.summary[0]) if result.summary else []))
    if plot_convergence(result.records, configs, out / "convergence.png"):
        paths["convergence.png"] = out / "convergence.png"
    if plot_pareto(result.records, out / "pareto.png"):
        paths["pareto.png"] = out / "pareto.png"
    atomic_write_bytes(paths["report.md"], format_report(result, command).encode())
    return paths
