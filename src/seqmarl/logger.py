"""Metric logging: one CSV per run (fixed columns) and optional TensorBoard, with the names in
docs/metrics.md. Every metric the trainer writes is listed here, so the CSV header never changes."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

METRICS: tuple[str, ...] = (
    "charts/episodic_return",
    "charts/episodic_length",
    "charts/win_rate",
    "charts/learning_rate",
    "charts/SPS",
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


class Logger:
    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = run_dir / "metrics.csv"
        self.start = time.time()
        new_file = not self.path.exists()
        self._file = open(self.path, "a", newline="")
        self._csv = csv.writer(self._file)
        if new_file:
            self._csv.writerow(["step", "wall_time", *METRICS])
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))

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
