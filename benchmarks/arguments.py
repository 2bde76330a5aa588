"""Comma-separated ``--models`` and ``--bits`` lists, checked the same way by every table benchmark."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def model_list(parser: argparse.ArgumentParser, text: str, known: Sequence[str]) -> list[str]:
    """The models named in ``text``; any other name is a one-line usage error naming the valid ones."""
    models = [m.strip() for m in text.split(",") if m.strip()]
    if not models or any(m not in known for m in models):
        parser.error(f"--models {text!r} is not valid; use a comma-separated subset of {', '.join(known)}")
    return models


def bit_list(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """The bit-widths in ``text``, each from 2 to 8."""
    try:
        bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        bits = []
    if not bits or any(not 2 <= b <= 8 for b in bits):
        parser.error(f"--bits {text!r} is not valid; use comma-separated integers from 2 to 8, such as 4,3")
    return bits
