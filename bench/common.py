"""What every benchmark script shares: command-line flags, the machine description written into each JSON,
timing, the matmul rate, analytic model FLOPs, tables, and the comparison with a saved baseline.

FLOP counting (docs/performance.md states the same): a matmul of (m x k) @ (k x n) costs 2*m*n*k FLOPs.
Per token, a Linear(in, out) costs 2*in*out; attention over L keys costs 2*L*E for the scores plus 2*L*E
for the weighted sum (all heads together). Causal attention at position i sees i+1 keys, (N+1)/2 on
average. Training (forward + backward) counts 3x the forward FLOPs of every matmul except the observation
embedding, whose input gradient is never computed (2x). LayerNorm, GELU, softmax, losses and Adam are not
counted: they are not matmuls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seqmarl.runinfo import cpu_model, keep_freed_memory

REPO = Path(__file__).resolve().parents[1]
SLOWDOWN_LIMIT = 1.10  # a row more than 10% slower than its baseline is flagged
MATMUL_SECONDS = 0.5  # how long each matmul-rate measurement runs (--quick: 0.05)


# ------------------------------------------------------------------------------------------ set-up
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", metavar="OUT", help="write the results (and the machine description) here")
    p.add_argument("--baseline", metavar="FILE", help="compare with a saved JSON; exit 1 on a >10%% slowdown")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p


MALLOC = "not set"  # what runinfo.keep_freed_memory did (the trainer does the same); in every JSON


def setup(args: argparse.Namespace) -> torch.device:
    global MATMUL_SECONDS, MALLOC
    MALLOC = keep_freed_memory()  # as in training; SEQMARL_MALLOC=system for glibc's defaults
    if args.quick:
        MATMUL_SECONDS = 0.05
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _git(*argv: str) -> str:
    try:
        return subprocess.run(
            ["git", *argv], cwd=REPO, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine(device: torch.device) -> dict[str, Any]:
    """Commit, machine, versions, threads and load: what produced the numbers."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return {
        "commit": commit,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "malloc": MALLOC,
        "python": sys.version.split()[0],
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


# ------------------------------------------------------------------------------------------ timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` in milliseconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_alternating_ms(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median wall time in ms of each function, the functions called in turn (one call of each per
    round), so that a change in the machine's load hits all of them alike. The first `warmup` rounds
    are not timed."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_ >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


MATMUL_SAMPLES = 3  # the rate is the best of this many medians: a sample taken while the machine is
# busy elsewhere reads low (one did at half the day's rate, docs/performance.md), and the rate is the
# limit the update is compared with, so the highest reading is the one to compare against.


def matmul_gflops(
    m: int,
    k: int,
    n: int,
    device: torch.device,
    seconds: float | None = None,
    samples: int = MATMUL_SAMPLES,
    repeats: int | None = None,
) -> float:
    """Achieved GFLOP/s of (m x k) @ (k x n) in float32, timed for about `seconds` in all: the best of
    `samples` median rates (`repeats` calls each; default: as many as `seconds` allows)."""
    a = torch.randn(m, k, device=device)
    b = torch.randn(k, n, device=device)
    out = torch.empty(m, n, device=device)
    flops = 2.0 * m * n * k
    if repeats is None:
        once = time_ms(lambda: torch.mm(a, b, out=out), device, repeats=3) / 1e3
        repeats = max(3, int((seconds or MATMUL_SECONDS) / samples / max(once, 1e-6)))
    best_ms = min(time_ms(lambda: torch.mm(a, b, out=out), device, repeats) for _ in range(samples))
    return flops / (best_ms / 1e3) / 1e9


def model_shape_gflops(
    tokens: int,
    width: int,
    device: torch.device,
    seconds: float | None = None,
    samples: int = MATMUL_SAMPLES,
    repeats: int | None = None,
) -> float:
    """The rate of the model's own matmuls: a (tokens x E) @ (E x E) forward, its input gradient (same
    shape) and its weight gradient (E x tokens) @ (tokens x E), one of each; total FLOPs / total time."""
    forward = matmul_gflops(tokens, width, width, device, seconds, samples, repeats)
    weight_grad = matmul_gflops(width, tokens, width, device, seconds, samples, repeats)
    return 3.0 / (2.0 / forward + 1.0 / weight_grad)


def interleaved_fraction(
    fn: Callable[[], Any], flops: float, tokens: int, width: int, device: torch.device, rounds: int
) -> tuple[float, float]:
    """`fn` (doing `flops` FLOPs) and the model-shape matmuls of `model_shape_gflops` timed in turn, round
    by round: each round times one call of `fn`, then each matmul shape three times (the median). Per
    round the fraction is fn's achieved rate over that round's model-shape rate, so both sides see the
    same phase of the machine, whose speed drifts by 15-35% within minutes (docs/performance.md).
    Returns the median fraction and the median model-shape rate. One round first, not counted."""
    fractions, rates = [], []
    for round_ in range(rounds + 1):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds = time.perf_counter() - start
        rate = model_shape_gflops(tokens, width, device, samples=1, repeats=3)
        if round_ > 0:
            fractions.append(flops / seconds / 1e9 / rate)
            rates.append(rate)
    return statistics.median(fractions), statistics.median(rates)


def square_gflops(device: torch.device, size: int = 2048, seconds: float | None = None) -> float:
    return matmul_gflops(size, size, size, device, seconds)


# ------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class ModelShape:
    n_agents: int  # N
    obs_dim: int  # O
    action_width: int  # A
    discrete: bool
    n_embd: int = 64  # E
    n_block: int = 1


def forward_flops_per_token(s: ModelShape) -> dict[str, float]:
    """Forward matmul FLOPs per agent token of the MAT in nn/mat.py, by part (see the module docstring)."""
    E, N = s.n_embd, s.n_agents
    linear = lambda fan_in, fan_out: 2.0 * fan_in * fan_out  # noqa: E731
    full_attention = 4.0 * N * E  # scores + weighted sum over N keys
    causal_attention = 4.0 * (N + 1) / 2 * E
    return {
        "obs_embed": linear(s.obs_dim, E),
        "encoder": s.n_block * (4 * linear(E, E) + full_attention + 2 * linear(E, E)),
        "value_head": linear(E, E) + linear(E, 1),
        "action_embed": 0.0 if s.discrete else linear(s.action_width, E),
        "decoder": s.n_block * (8 * linear(E, E) + 2 * causal_attention + 2 * linear(E, E)),
        "policy_head": linear(E, E) + linear(E, s.action_width),
    }


def train_flops_per_token(s: ModelShape) -> float:
    """Forward + backward: 3x forward, except the observation embedding (no input gradient): 2x."""
    parts = forward_flops_per_token(s)
    return 3.0 * sum(parts.values()) - parts["obs_embed"]


def token_table_flops_per_token(s: ModelShape) -> float:
    """Training FLOPs per token that the C++ pass does not execute since the token table (89a2792): with
    discrete actions the first decoder block's query/key/value Linear (E -> 3E) runs once per token value,
    not per row, forward and both backward matmuls (csrc/decode.cpp `token_forward`, `token_grads`)."""
    return 3.0 * 2.0 * s.n_embd * 3 * s.n_embd if s.discrete and s.n_block > 0 else 0.0


def act_flops_per_token(s: ModelShape) -> float:
    """Acting with the cache: every token goes once through the encoder and the decoder."""
    return sum(forward_flops_per_token(s).values())


# ------------------------------------------------------------------------------------------ output
def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec). Markdown, so it can be pasted into docs/performance.md."""
    headers = [header for _, header, _ in columns]
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, spec))
        print("| " + " | ".join(cells) + " |")


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")


def compare_with_baseline(
    rows: list[dict[str, Any]], baseline_path: str | None, metric: str, higher_is_better: bool
) -> bool:
    """Print each row's speed relative to the same row of a saved JSON; True if none is >10% slower.

    Rows are matched by their "name". The ratio printed is new speed / baseline speed (> 1: faster).
    """
    if not baseline_path:
        return True
    baseline = json.loads(Path(baseline_path).read_text())
    old_rows = {row["name"]: row for row in baseline["rows"]}
    print(
        f"\nagainst {baseline_path} (commit {baseline['machine']['commit']}, "
        f"load {baseline['machine']['load_average']}); metric {metric}, speed ratio new/baseline:"
    )
    ok = True
    for row in rows:
        old = old_rows.get(row["name"])
        if old is None or old.get(metric) is None or row.get(metric) is None:
            print(f"  {row['name']}: no baseline row")
            continue
        speed = row[metric] / old[metric] if higher_is_better else old[metric] / row[metric]
        slow = speed < 1.0 / SLOWDOWN_LIMIT
        ok &= not slow
        print(f"  {row['name']}: {speed:.2f}x" + ("  <-- SLOWER by more than 10%" if slow else ""))
    print("baseline check: " + ("ok" if ok else "FAILED (a row is more than 10% slower)"))
    return ok
