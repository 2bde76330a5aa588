"""A small on-disk cache for trained models: atomic writes, verified reads, retrain on damage."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["cache_dir", "atomic_write_bytes", "save_checkpoint", "load_checkpoint"]


def cache_dir(override: Optional[str | os.PathLike] = None) -> Path:
    """``override``, else ``$DEAP_QUANT_CACHE``, else ``$XDG_CACHE_HOME/deap_quant``, else ``~/.cache/deap_quant``."""
    if override is not None:
        return Path(override)
    if os.environ.get("DEAP_QUANT_CACHE"):
        return Path(os.environ["DEAP_QUANT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deap_quant"


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def save_checkpoint(path: Path, content: dict[str, Any]) -> None:
    """Save ``content`` with ``torch.save`` plus a SHA-256 of the payload, atomically."""
    buffer = io.BytesIO()
    torch.save(content, buffer)
    payload = buffer.getvalue()
    atomic_write_bytes(path, hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def load_checkpoint(path: Path) -> Optional[dict[str, Any]]:
    """Load what :func:`save_checkpoint` wrote; ``None`` (with a warning) if missing or damaged."""
    if not path.exists():
        return None
    try:
        raw = path.read_bytes()
        digest, payload = raw.split(b"\n", 1)
        if hashlib.sha256(payload).hexdigest().encode() != digest:
            raise ValueError("checksum mismatch")
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as error:  # any damage means: rebuild
        warnings.warn(f"cached file {path} is unreadable ({error}); it will be rebuilt", stacklevel=2)
        return None
