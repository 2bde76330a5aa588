"""Versions of the packages a result depends on, recorded with every result."""

from __future__ import annotations

import platform

__all__ = ["versions"]


def versions() -> dict[str, str]:
    import deap
    import numpy
    import torch

    from . import __version__

    return {"deap_quant": __version__, "torch": str(torch.__version__), "deap": deap.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}
