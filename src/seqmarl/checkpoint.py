"""Checkpoints: everything needed to evaluate or continue a run, written atomically and verified.

A checkpoint is a plain dict of tensors and primitives, so it loads with torch.load(weights_only=True):
no code from a checkpoint file is ever executed. Each file `X.pt` has a sidecar `X.pt.sha256` holding
the SHA-256 of its bytes, written after the file itself; a file whose bytes do not match (truncated,
corrupted, or written by a process killed before its sidecar) is never loaded silently: from a run
directory the newest *verified* checkpoint is used, with a warning naming the ones skipped.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seqmarl.errors import UserError


def _write_atomically(path: Path, data: bytes) -> None:
    """Temporary file + fsync + rename: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"could not write checkpoint {path}: {e.strerror or e} (the previous checkpoints are intact)"
        ) from None


def write_text_atomically(path: Path, text: str) -> None:
    """A run directory's small files (config.yaml, meta.json, result.json): whole or absent after a kill."""
    _write_atomically(path, text.encode())


def atomic_save(payload: dict[str, Any], path: Path) -> Path:
    """Serialise `payload` to `path` atomically, then its checksum to `path`.sha256 (also atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    _write_atomically(path, data)
    _write_atomically(_sidecar(path), hashlib.sha256(data).hexdigest().encode())
    return path


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(directory: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write step_<step>.pt atomically, then keep only the newest `keep`."""
    path = atomic_save(payload, directory / f"step_{step:012d}.pt")
    for old in checkpoint_files(directory)[:-keep]:
        old.unlink()
        _sidecar(old).unlink(missing_ok=True)
    return path


def checkpoint_files(path: Path) -> list[Path]:
    """The step_*.pt files of a run directory (in its checkpoints/ folder) or of a folder, oldest first."""
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    return sorted(folder.glob("step_*.pt"))


def average_checkpoints(run_dir: Path, last: int, out: Path) -> list[int]:
    """Write to `out` an evaluation checkpoint (like best.pt) whose network weights are the uniform
    average of the run's `last` newest kept checkpoints (every kept one if `last` is 0). Weights are
    averaged in float64; the rest (config, normalisers, decision order, optimiser) is the newest
    checkpoint's, and `averaged_steps` lists the steps averaged. Returns those steps."""
    from seqmarl.algos import algorithm_class

    files = checkpoint_files(run_dir) if run_dir.is_dir() else []
    if len(files) < 2:
        raise UserError(f"averaging needs at least 2 kept checkpoints (checkpoints/step_*.pt) in {run_dir}")
    if last == 1 or last < 0 or last > len(files):
        raise UserError(
            f"--last must be 0 (all) or 2..{len(files)}: {run_dir} keeps {len(files)} checkpoints"
        )
    states = [load_checkpoint(f) for f in (files[-last:] if last else files)]  # verified, oldest first
    newest = states[-1]
    # What fixes the networks; the rest of the config may differ (a resumed run with a longer budget).
    networks = [
        {key: s["config"].get(key) for key in ("algo", "env", "model", "mlp", "qmix")} for s in states
    ]
    if any(n != networks[-1] for n in networks):
        raise UserError(f"the checkpoints of {run_dir} hold different networks; not averaging them")
    algorithm = dict(newest["algorithm"])
    for key in algorithm_class(newest["config"]["algo"]).network_keys:
        weights = [s["algorithm"][key] for s in states]
        algorithm[key] = {
            name: torch.stack([w[name].double() for w in weights]).mean(0).to(t.dtype)
            if t.is_floating_point()
            else t
            for name, t in weights[-1].items()
        }
    steps = [int(s["step"]) for s in states]
    payload = {key: newest[key] for key in ("config", "env", "step", "iteration")}
    atomic_save({**payload, "algorithm": algorithm, "averaged_steps": steps}, out)
    return steps


def latest_checkpoint(directory: Path) -> Path | None:
    found = checkpoint_files(directory)
    return found[-1] if found else None


def verify(path: Path) -> str | None:
    """None if `path` matches its recorded checksum, else why not."""
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        return "no checksum file (the writer was interrupted?)"
    expected = sidecar.read_text().strip()
    if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
        return "checksum mismatch (truncated or corrupted)"
    return None


def _load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file (verified), or the newest verified one of a run directory."""
    path = Path(path)
    if path.is_dir():
        candidates = checkpoint_files(path)[::-1]
        if not candidates:
            raise UserError(f"no checkpoint found in {path}")
        for candidate in candidates:
            problem = verify(candidate)
            if problem is None:
                return _load(candidate)
            print(f"seqmarl: warning: skipping checkpoint {candidate}: {problem}", file=sys.stderr)
        raise UserError(f"no intact checkpoint in {path} ({len(candidates)} found, none verified)")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    problem = verify(path)
    if problem is not None:
        raise UserError(f"checkpoint {path} cannot be trusted: {problem}")
    return _load(path)


def capture_rng() -> dict[str, Any]:
    """Every global random state a run draws from (python, numpy, torch CPU and CUDA), as plain values
    and tensors so that it loads with weights_only=True. Part of every checkpoint (exact resume)."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
