"""Metric logging: one CSV per run (fixed columns) and optional TensorBoard, with the names in
docs/metrics.md. Every metric the trainer writes is listed here, so the CSV header never changes."""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path

METRICS: tuple[str, ...] = (
    "charts/episodic_return",
    "charts/episodic_length",
    "charts/win_rate",
    "charts/learning_rate",
    "charts/SPS",
    "charts/discarded_episodes",
    "eval/episodic_return",
    "eval/episodic_length",
    "eval/win_rate",
    "losses/policy_loss",
    "losses/value_loss",
    "losses/entropy",
    "losses/approx_kl",
    "losses/clip_fraction",
    "losses/grad_norm",
    "charts/epsilon",
    "charts/replay_episodes",
    "losses/td_loss",
    "losses/td_error",
    "losses/q_taken_mean",
    "losses/target_mean",
)


HEADER: tuple[str, ...] = ("step", "wall_time", *METRICS)


class Logger:
    """`resume_step`: continue a run from its checkpoint at that step. Rows logged after it (by the
    process that was stopped) are dropped from the CSV, and TensorBoard purges its events after it, so
    the resumed run rewrites them once: nothing duplicated, nothing lost. `elapsed` is the run's
    training time before the restart, so wall_time carries on from it."""

    def __init__(
        self, run_dir: Path, tensorboard: bool, resume_step: int | None = None, elapsed: float = 0.0
    ):
        self.path = run_dir / "metrics.csv"
        self.start = time.time() - elapsed
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            _keep_rows_up_to(self.path, resume_step)
        new_file = not self.path.exists()
        self._file = open(self.path, "a", newline="")
        self._csv = csv.writer(self._file)
        if new_file:
            self._csv.writerow(HEADER)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        unknown = set(metrics) - set(METRICS)
        if unknown:  # a programming error, not user input: every metric must be documented
            raise KeyError(f"undocumented metrics {sorted(unknown)}; add them to logger.METRICS and docs")
        row = [metrics.get(name, "") for name in METRICS]
        self._csv.writerow([step, round(time.time() - self.start, 3), *row])
        self._file.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                if not math.isnan(value):
                    self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _keep_rows_up_to(path: Path, last_step: int) -> None:
    """Rewrite metrics.csv (atomically) with its complete rows of step <= last_step. A row cut short by a
    killed process has fewer cells or no line end, and is dropped like the later ones."""
    if not path.exists():
        return
    kept = []
    with open(path, newline="") as f:
        lines = f.read().split("\n")
    for line in lines[1:-1]:  # after the header; the last piece follows the final line end
        cells = next(csv.reader([line]))
        if len(cells) == len(HEADER) and int(cells[0]) <= last_step:
            kept.append(cells)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv -> {metric: [(step, value), ...]} with the empty cells left out."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(run_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for name, value in row.items():
                if name in ("step", "wall_time") or value in ("", None):
                    continue
                series.setdefault(name, []).append((step, float(value)))
    return series
