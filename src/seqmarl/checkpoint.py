"""Checkpoints: everything needed to evaluate or continue a run, written atomically.

A checkpoint is a plain dict of tensors and primitives, so it loads with torch.load(weights_only=True):
no code from a checkpoint file is ever executed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from seqmarl.errors import UserError


def atomic_save(payload: dict[str, Any], path: Path) -> Path:
    """torch.save via a temporary file + fsync + rename: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save_checkpoint(directory: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write step_<step>.pt atomically, then keep only the newest `keep`."""
    path = atomic_save(payload, directory / f"step_{step:012d}.pt")
    for old in sorted(directory.glob("step_*.pt"))[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.glob("step_*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file, or the newest one of a run directory."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if found is None:
            raise UserError(f"no checkpoint found in {path}")
        path = found
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None
