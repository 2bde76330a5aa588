"""Statistics of a comparison: per-configuration summaries, paired and pairwise tests, Holm's correction.

scipy is imported on first use (``import deap_quant`` does not load it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["summarize", "paired_tests", "pairwise_tests", "holm"]


def _t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    from scipy import stats

    if len(values) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration (in first-seen order): n, mean/std of val and test, 95% CI of test, cost."""
    order = list(dict.fromkeys(row["config"] for row in rows))
    out = []
    for name in order:
        mine = [row for row in rows if row["config"] == name]
        test = np.array([row["test"] for row in mine], dtype=np.float64)
        val = np.array([row["val"] for row in mine], dtype=np.float64)
        low, high = _t_interval(test)
        out.append({"config": name, "n": len(mine),
                    "val_mean": float(val.mean()), "val_std": float(val.std(ddof=1)) if len(val) > 1 else 0.0,
                    "test_mean": float(test.mean()), "test_std": float(test.std(ddof=1)) if len(test) > 1 else 0.0,
                    "test_ci_low": low, "test_ci_high": high,
                    "evaluations_mean": float(np.mean([row["evaluations"] for row in mine])),
                    "seconds_mean": float(np.mean([row["seconds"] for row in mine]))})
    return out


#: Decimals that paired differences (and compared values) are rounded to before ranking: accuracies
#: such as 338/360 - 331/360 and 345/360 - 343/360 (both 2 images) differ in the last bits of a float,
#: which would otherwise split a rank tie and change the p-value.
ROUND_DECIMALS = 12


def _differences(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a - b`` with float round-off removed, so that equal differences tie (and tiny ones are 0)."""
    return np.round(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), ROUND_DECIMALS)


def _mann_whitney(a: Sequence[float], b: Sequence[float], alternative: str = "two-sided") -> float:
    from scipy import stats

    if len(a) < 1 or len(b) < 1:
        return float("nan")
    a, b = (np.round(np.asarray(x, dtype=np.float64), ROUND_DECIMALS) for x in (a, b))  # equal values tie
    if np.ptp(np.concatenate([a, b])) == 0:
        return 1.0  # all equal: no evidence of any difference
    return float(stats.mannwhitneyu(a, b, alternative=alternative).pvalue)


def _wilcoxon(differences: Sequence[float], alternative: str = "greater") -> float:
    from scipy import stats

    differences = np.asarray(differences, dtype=np.float64)
    if len(differences) < 1 or np.all(differences == 0):
        return 1.0 if len(differences) else float("nan")
    return float(stats.wilcoxon(differences, alternative=alternative).pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given (family-wise error rate control).

    The i-th smallest of the m p-values is multiplied by ``m - i + 1`` (i from 1), the results
    are made non-decreasing in that order and capped at 1. NaN p-values (no test) stay NaN and
    do not count towards m. Rejecting where the adjusted p-value is below alpha controls the
    probability of any false rejection among the m tests at alpha.
    """
    values = [float(p) for p in p_values]
    present = sorted((p, i) for i, p in enumerate(values) if not math.isnan(p))
    adjusted = [float("nan")] * len(values)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[i] = running
    return adjusted


def pairwise_tests(rows: Sequence[Mapping[str, Any]], key: str = "test") -> list[dict[str, Any]]:
    """Two-sided Mann-Whitney U p-value of ``key`` for every pair of configurations."""
    by_config: dict[str, list[float]] = {}
    for row in rows:
        by_config.setdefault(row["config"], []).append(float(row[key]))
    names = list(by_config)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out.append({"a": a, "b": b, "mean_a": float(np.mean(by_config[a])), "mean_b": float(np.mean(by_config[b])),
                        "p_mannwhitney": _mann_whitney(by_config[a], by_config[b])})
    return out


def paired_tests(rows: Sequence[Mapping[str, Any]], pairs: Iterable[tuple[str, str]],
                 key: str = "test") -> list[dict[str, Any]]:
    """For each ``(config, reference)``: mean difference over common seeds, the one-sided paired
    Wilcoxon signed-rank p-value (config > reference) and the two-sided Mann-Whitney U p-value,
    each also Holm-corrected (``*_holm``) across the configurations compared with the same reference."""
    table: dict[tuple[str, Any], float] = {(row["config"], row["seed"]): float(row[key]) for row in rows}
    out = []
    for name, reference in pairs:
        seeds = sorted({s for (c, s) in table if c == name} & {s for (c, s) in table if c == reference})
        if not seeds:
            continue
        a = np.array([table[(name, s)] for s in seeds])
        b = np.array([table[(reference, s)] for s in seeds])
        differences = _differences(a, b)
        out.append({"config": name, "reference": reference, "n": len(seeds), "mean": float(a.mean()),
                    "reference_mean": float(b.mean()), "difference": float((a - b).mean()),
                    "wins": int((differences > 0).sum()), "losses": int((differences < 0).sum()),
                    "p_wilcoxon_greater": _wilcoxon(differences, "greater"), "p_mannwhitney": _mann_whitney(a, b)})
    for reference in dict.fromkeys(row["reference"] for row in out):
        family = [row for row in out if row["reference"] == reference]
        for test in ("p_wilcoxon_greater", "p_mannwhitney"):
            for row, adjusted in zip(family, holm([row[test] for row in family])):
                row[f"{test}_holm"] = adjusted
    return out
