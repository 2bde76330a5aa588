"""Compare rounding baselines and evolutionary configurations across seeds, with statistics and plots.

A *comparison* runs named configurations (:class:`RunConfig`) on one model and bit-width for
several seeds and writes into an output folder:

* ``summary.json`` -- one row per configuration and seed (rewritten after every run, so an
  interrupted comparison keeps what it finished; runs go seed by seed):
  ``{"config", "seed", "data_seed", "val", "test", "evaluations", "seconds"}`` (held-out test of
  the selected individual; baselines appear as configurations ``nearest-minmax``,
  ``nearest-mse``, ``stochastic`` and ``adaround``);
* ``runs.json`` / ``runs.csv`` -- the same rows with details (hall of fame re-scored on test,
  start rounding, Pareto fronts, convergence curves);
* ``summary.csv`` and ``report.md`` -- mean, std and 95% confidence interval (Student t) per
  configuration, each evolutionary configuration against its starting baseline (paired
  one-sided Wilcoxon signed-rank test over seeds and two-sided Mann-Whitney U, each also
  Holm-corrected across the configurations compared with the same baseline), and the matrix
  of pairwise Mann-Whitney U p-values (scipy);
* ``convergence.png`` -- best search fitness against evaluations, median and min-max band
  across seeds; ``pareto.png`` -- NSGA-II fronts (changed weights vs accuracy) on val and test.

The seed varies every random choice of a run (evolution, AdaRound's minibatches and calibration
sample, stochastic draws, the teacher's calibration split); the float model and the training
split stay fixed. By default the val/test split is fixed too, so the spread over seeds is the
search's alone. ``data_seeds=K`` (``--data-seeds K``) re-draws val and test per seed where the
data set allows it (digits, whose splits come from one pool): seed ``s`` runs on data seed
``s mod K`` (0: the split as loaded; ``k``: val and test pooled and split again, stratified,
same sizes), recorded per run as ``data_seed``, and the report adds the test accuracy per data
seed. The test split is scored only after a run's search and never selects anything. The
shipped configuration set is ``deap_quant/configs/default_compare.json``.

The package is split by concern: :mod:`.configs` (configurations, settings, files),
:mod:`.running` (the runs), :mod:`.statistics` (summaries, tests, Holm) and :mod:`.report`
(report, CSV/JSON, plots).
"""

from .configs import (
    BASELINES,
    FITNESSES,
    SCALE_METHODS,
    SELECTIONS,
    STARTS,
    CompareSettings,
    RunConfig,
    default_config_path,
    load_configs,
)
from .report import format_report, plot_convergence, plot_pareto, write_report
from .running import REDRAWABLE, SUMMARY_KEYS, CompareResult, compare, data_seed_of, redraw_split
from .running import _Context as _Context  # noqa: F401  (tests build one directly)
from .statistics import holm, paired_tests, pairwise_tests, summarize

__all__ = ["RunConfig", "CompareSettings", "CompareResult", "compare", "load_configs", "default_config_path",
           "summarize", "paired_tests", "pairwise_tests", "holm", "redraw_split", "data_seed_of", "format_report",
           "write_report", "plot_convergence", "plot_pareto", "BASELINES", "FITNESSES", "SELECTIONS", "STARTS",
           "SCALE_METHODS", "SUMMARY_KEYS", "REDRAWABLE"]
