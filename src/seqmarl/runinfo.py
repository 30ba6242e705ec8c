"""Where a run executes and what produced a number: device choice, seeding, the process's memory
allocator, and the machine description written into every run directory and benchmark JSON (commit, CPU,
library versions)."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seqmarl.errors import UserError


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but torch sees no CUDA GPU")
    return device


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> str:
    """Tell glibc's allocator to keep freed memory for reuse instead of returning it to the kernel.

    A PPO update allocates and frees the same large activation tensors every minibatch. By default
    glibc serves blocks above its mmap threshold (at most 32 MB) with fresh `mmap`s and hands freed
    heap memory back above the trim threshold, so every update touches new pages: at N = 27 agents
    (3200 x 27 tokens x 64 floats: 22 MB per activation, dozens of them) that was 20-60k page faults
    and 0.1-0.3 s of kernel time per update (docs/performance.md, "The allocator"). With blocks up to
    1 GB taken from the heap, no trimming below 2 GB free and a 64 MB top pad, most pages are faulted
    in once. The process keeps
    its peak memory; results are unchanged (the arithmetic is the same).

    Called by the trainer; `SEQMARL_MALLOC=system` leaves the allocator alone. Returns what was done,
    for the run's meta.json: "keep", "system" (asked for), or "n/a" (not glibc: macOS, musl)."""
    choice = os.environ.get("SEQMARL_MALLOC", "keep")
    if choice not in ("keep", "system"):
        raise UserError(f"SEQMARL_MALLOC={choice!r}: use keep (the default) or system")
    if choice == "system":
        return "system"
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "n/a"
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    ok &= libc.mallopt(_M_TOP_PAD, 64 << 20)
    return "keep" if ok else "n/a"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The checkout this seqmarl is imported from (src/seqmarl/runinfo.py -> the repository root).
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def source_commit() -> str:
    """The commit of the checkout this seqmarl is imported from (SOURCE_ROOT), "<sha>-dirty" when tracked
    files differ from it, "unknown" outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=SOURCE_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=SOURCE_ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "") if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_description() -> dict[str, Any]:
    """What produced a number: commit, machine, library versions (written into every run directory)."""
    return {
        "commit": source_commit(),
        "host": platform.node(),
        "machine": f"{cpu_model()}, {os.cpu_count()} cpus",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
