"""Aggregate finished runs over seeds: IQM with bootstrap confidence intervals, a markdown table, a
figure, and the marl-eval JSON layout (env -> task -> algorithm -> run -> step_k / absolute_metrics).

The statistics are small enough to write out: the interquartile mean (scipy's 25% trimmed mean) and a
percentile bootstrap over seeds. With 3 seeds the interval is coarse; it is reported, not hidden.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import trim_mean

from seqmarl.errors import UserError


def iqm(values: np.ndarray) -> float:
    return float(trim_mean(values, 0.25))


def bootstrap_ci(values: np.ndarray, reps: int = 5000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the IQM, resampling seeds."""
    rng = np.random.default_rng(seed)
    samples = rng.choice(values, size=(reps, len(values)), replace=True)
    stats = trim_mean(samples, 0.25, axis=1)
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)


@dataclass
class Run:
    run_dir: Path
    result: dict[str, Any]
    absolute: dict[str, Any] | None  # `seqmarl eval --json` output saved as absolute.json, if any

    @property
    def key(self) -> tuple[str, str]:
        return self.result["env"], self.result["algo"]

    @property
    def has_win(self) -> bool:
        return "eval/win_rate" in self.result["final_eval"]

    @property
    def metric(self) -> str:
        return "eval/win_rate" if self.has_win else "eval/episodic_return"

    def first_step_reaching(self, threshold: float) -> int | None:
        for evaluation in self.result["evaluations"]:
            if evaluation.get(self.metric, -np.inf) >= threshold:
                return int(evaluation["step"])
        return None


def load_runs(run_dirs: list[Path]) -> list[Run]:
    runs = []
    for run_dir in run_dirs:
        path = run_dir / "result.json"
        if not path.is_file():
            raise UserError(f"{run_dir} has no result.json (not a finished run)")
        absolute = run_dir / "absolute.json"
        runs.append(
            Run(
                run_dir,
                json.loads(path.read_text()),
                json.loads(absolute.read_text()) if absolute.is_file() else None,
            )
        )
    return runs


def _episode_lists(evaluation: dict[str, Any], has_win: bool) -> dict[str, list[float]]:
    """Per-episode lists when the run kept them; otherwise the evaluation mean as a one-element list."""
    episodes = evaluation.get("episodes")
    if episodes:
        out = {"return": [float(x) for x in episodes["episode_return"]]}
        if has_win:
            out["win_rate"] = [float(x) for x in episodes["win"]]
        return out
    out = {"return": [evaluation["eval/episodic_return"]]}
    if has_win:
        out["win_rate"] = [evaluation["eval/win_rate"]]
    return out


def marl_eval_json(runs: list[Run]) -> dict[str, Any]:
    data: dict[str, Any] = defaultdict(lambda: defaultdict(dict))
    for run in runs:
        env_name, algo = run.key
        family, _, task = env_name.partition(":")
        entry: dict[str, Any] = {}
        for i, evaluation in enumerate(run.result["evaluations"]):
            entry[f"step_{i}"] = {
                "step_count": int(evaluation["step"]),
                **_episode_lists(evaluation, run.has_win),
            }
        if run.absolute is not None:
            absolute = {"return": run.absolute["episodes"]["episode_return"]}
            if run.has_win:
                absolute["win_rate"] = [float(w) for w in run.absolute["episodes"]["win"]]
            entry["absolute_metrics"] = absolute
        data[family].setdefault(task, {}).setdefault(algo, {})[f"seed_{run.result['seed']}"] = entry
    return json.loads(json.dumps(data))


def summary_rows(runs: list[Run], thresholds: dict[str, float]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.key].append(run)
    rows = []
    for (env_name, algo), group in sorted(groups.items()):
        group.sort(key=lambda r: r.result["seed"])
        metric = group[0].metric
        finals = np.array([r.result["final_eval"][metric] for r in group])
        bests = np.array([r.result["best_eval"][metric] for r in group])
        threshold = thresholds.get(env_name)
        reached = [r.first_step_reaching(threshold) for r in group] if threshold is not None else []
        absolutes = [
            float(np.mean(r.absolute["episodes"]["win" if r.has_win else "episode_return"]))
            for r in group
            if r.absolute
        ]
        rows.append(
            {
                "env": env_name,
                "algo": algo,
                "metric": metric,
                "seeds": [r.result["seed"] for r in group],
                "steps": [r.result["steps"] for r in group],
                "final": finals.tolist(),
                "final_iqm": iqm(finals),
                "final_ci": bootstrap_ci(finals),
                "best": bests.tolist(),
                "absolute": absolutes,
                "absolute_iqm": iqm(np.array(absolutes)) if absolutes else None,
                "absolute_ci": bootstrap_ci(np.array(absolutes)) if absolutes else None,
                "threshold": threshold,
                "first_step_reaching": reached,
                "seconds": [r.result["seconds"] for r in group],
                "commits": sorted({r.result["commit"] for r in group}),
                "machine": group[0].result["machine"],
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| task | algo | metric | seeds | final eval per seed | final IQM [95% CI] "
        "| absolute eval IQM [95% CI] | first step reaching threshold | wall time per run (s) | commit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        fmt = "{:.2f}" if row["metric"] == "eval/win_rate" else "{:.0f}"
        finals = ", ".join(fmt.format(v) for v in row["final"])
        ci = row["final_ci"]
        absolute = "-"
        if row["absolute_iqm"] is not None:
            a_ci = row["absolute_ci"]
            absolute = f"{fmt.format(row['absolute_iqm'])} [{fmt.format(a_ci[0])}, {fmt.format(a_ci[1])}]"
        reached = "-"
        if row["threshold"] is not None:
            steps = ", ".join(f"{s:,}" if s is not None else "never" for s in row["first_step_reaching"])
            reached = f">= {row['threshold']:g}: {steps}"
        seeds = ", ".join(map(str, row["seeds"]))
        final = f"{fmt.format(row['final_iqm'])} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"
        seconds = ", ".join(f"{s:.0f}" for s in row["seconds"])
        lines.append(
            f"| {row['env']} | {row['algo']} | {row['metric']} | {seeds} | {finals} | {final} | {absolute} "
            f"| {reached} | {seconds} | {', '.join(row['commits'])} |"
        )
    return "\n".join(lines)


def plot_groups(runs: list[Run], out: Path) -> Path:
    """One panel per task: every seed's evaluation curve, and their IQM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.key].append(run)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, ((env_name, algo), group) in zip(axes[0], sorted(groups.items())):
        metric = group[0].metric
        curves = []
        for run in sorted(group, key=lambda r: r.result["seed"]):
            steps = [e["step"] for e in run.result["evaluations"]]
            values = [e[metric] for e in run.result["evaluations"]]
            ax.plot(steps, values, alpha=0.35, linewidth=1, label=f"seed {run.result['seed']}")
            curves.append((steps, values))
        length = min(len(s) for s, _ in curves)
        if all(s[:length] == curves[0][0][:length] for s, _ in curves):
            stacked = np.array([v[:length] for _, v in curves])
            ax.plot(
                curves[0][0][:length],
                trim_mean(stacked, 0.25, axis=0),
                color="black",
                linewidth=2,
                label="IQM",
            )
        ax.set_title(f"{algo} on {env_name}")
        ax.set_xlabel("env steps")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def summarize(run_dirs: list[Path], out_dir: Path, thresholds: dict[str, float]) -> list[dict[str, Any]]:
    runs = load_runs(run_dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(runs, thresholds)
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    (out_dir / "marl_eval.json").write_text(json.dumps(marl_eval_json(runs)))
    (out_dir / "table.md").write_text(markdown_table(rows) + "\n")
    plot_groups(runs, out_dir / "curves.png")
    return rows
