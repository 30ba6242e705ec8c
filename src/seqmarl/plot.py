"""Learning curves from run directories (their metrics.csv)."""

from __future__ import annotations

from pathlib import Path

from seqmarl.errors import UserError
from seqmarl.logger import read_metrics


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Evaluation return (and win rate, where the task has one) against env steps, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for run_dir in run_dirs:
        if not (run_dir / "metrics.csv").is_file():
            raise UserError(f"{run_dir} is not a run directory (no metrics.csv)")
        runs.append((run_dir.name, read_metrics(run_dir)))
    panels = ["eval/episodic_return"]
    if any("eval/win_rate" in series for _, series in runs):
        panels.append("eval/win_rate")
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, metric in zip(axes[0], panels):
        for name, series in runs:
            points = series.get(metric, [])
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o", markersize=3, label=name)
        ax.set_xlabel("env steps")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
