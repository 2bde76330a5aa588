"""The README's results table: float / nearest / evolved on digits-cnn, val and held-out test, over seeds.

    python benchmarks/digits_table.py --seeds 3 --json digits_table.json

For each scale method (minmax, mse) and bit-width (2, 3) it runs the default budget
(mu=20, lambda=40, ngen=30) with evolution seeds 0..N-1 on one trained model and one split,
and prints a markdown table of mean +- std. Every gain it reports is on the held-out test split.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import deap_quant as dq
from deap_quant.zoo import load_model


def mean_std(values: list[float]) -> str:
    values = [100 * v for v in values]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def _percent(share: float) -> str:
    """A share as a percentage; "no gap" where nearest rounding already matches float on test."""
    return "no gap" if share != share else f"{100 * share:.0f}%"


def main(seeds: int = 3, bits_list: tuple[int, ...] = (2, 3), methods: tuple[str, ...] = ("minmax", "mse"),
         mu: int = 20, lambda_: int = 40, ngen: int = 30, json_path: str | None = None) -> list[dict]:
    zoo = load_model("digits-cnn")
    rows = []
    for method in methods:
        for bits in bits_list:
            qmodel = dq.quantize(zoo.model, bits=bits, scale_method=method)
            runs = []
            for seed in range(seeds):
                started = time.perf_counter()
                result = dq.evolve(qmodel, zoo.data.val, zoo.data.test, float_model=zoo.model, mu=mu,
                                   lambda_=lambda_, ngen=ngen, seed=seed, progress=False)
                runs.append({"seed": seed, "nearest_val": result.baseline["val"],
                             "nearest_test": result.baseline["test"], "evolved_val": result.best["val"],
                             "evolved_test": result.best["test"], "genes": result.best["n_genes"],
                             "evaluations": result.evaluations, "seconds": time.perf_counter() - started})
            float_scores = zoo.float_scores
            gap = float_scores["test"] - runs[0]["nearest_test"]
            closed = statistics.mean(r["evolved_test"] - r["nearest_test"] for r in runs) / gap if gap > 0 else float("nan")
            rows.append({"scale_method": method, "bits": bits, "float": float_scores, "runs": runs,
                         "gap_closed_on_test": closed})
    print("| scale | bits | float val | float test | nearest val | nearest test | evolved val | evolved test "
          "| test gap closed | genes | s/run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        runs = row["runs"]
        print(f"| {row['scale_method']} | {row['bits']} | {100 * row['float']['val']:.2f} | "
              f"{100 * row['float']['test']:.2f} | {100 * runs[0]['nearest_val']:.2f} | "
              f"{100 * runs[0]['nearest_test']:.2f} | {mean_std([r['evolved_val'] for r in runs])} | "
              f"{mean_std([r['evolved_test'] for r in runs])} | {_percent(row['gap_closed_on_test'])} | "
              f"{statistics.mean(r['genes'] for r in runs):.0f} | "
              f"{statistics.mean(r['seconds'] for r in runs):.1f} |")
    if json_path:
        with open(json_path, "w") as stream:
            json.dump(rows, stream, indent=2)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ngen", type=int, default=30)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    main(seeds=args.seeds, ngen=args.ngen, json_path=args.json_path)
