"""``import deap_quant`` stays cheap: the comparison (scipy, scikit-learn, matplotlib) loads on first use."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("scipy", "sklearn", "matplotlib", "deap_quant.compare", "deap_quant.data")


def run_python(code: str) -> dict:
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_import_deap_quant_loads_no_comparison_statistics_or_plotting():
    loaded = run_python("import sys, json, deap_quant\n"
                        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    assert loaded == []


def test_the_lazy_names_load_on_first_use_and_every_public_name_resolves():
    found = run_python(
        "import sys, json, deap_quant as dq\n"
        "before = 'deap_quant.compare' in sys.modules\n"
        "config = dq.RunConfig('x')\n"
        "from deap_quant.compare import RunConfig, compare\n"
        "namespace = {}\n"
        "exec('from deap_quant import *', namespace)\n"
        "print(json.dumps({'before': before, 'after': 'deap_quant.compare' in sys.modules,\n"
        "                  'same': type(config) is RunConfig and dq.compare_configs is compare,\n"
        "                  'missing': [n for n in dq.__all__ if n not in namespace],\n"
        "                  'listed': sorted(set(dq.__all__) - set(dir(dq))),\n"
        "                  'module': dq.compare.__name__}))")
    assert found == {"before": False, "after": True, "same": True, "missing": [], "listed": [],
                     "module": "deap_quant.compare"}


def test_an_unknown_attribute_is_still_an_attribute_error():
    import pytest

    import deap_quant

    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        deap_quant.no_such_name  # noqa: B018
