"""`seqmarl report`: finished runs -> table.md, poi.md, curves.png, curves_<env>.png, marl_eval.json,
summary.json.

table.md: per task and algorithm, the IQM over seeds of the final periodic evaluation and of the
absolute evaluation (absolute.json: many more episodes on one checkpoint of each run), each with a
95% stratified-bootstrap interval, the published number where there is one, steps to a threshold,
wall time, commits and machine.
poi.md: probability of improvement of every algorithm over every other, per task and over all tasks
both ran, with 95% intervals. curves.png: every task's evaluation curves in one figure (one panel per
task, one colour per algorithm); curves_<env>.png: one task each. Statistics: seqmarl/results.py
(rliable).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from seqmarl.published import PUBLISHED
from seqmarl.results import (
    Run,
    group_runs,
    iqm_curve_with_ci,
    iqm_with_ci,
    load_runs,
    marl_eval_json,
    probability_of_improvement,
)


def _score_kind(runs: list[Run]) -> str:
    """Scores of a task: the absolute evaluation when every run has one, else the final evaluation."""
    return "absolute" if all(run.absolute is not None for run in runs) else "final"


def _scores(runs: list[Run], kind: str) -> np.ndarray:
    return np.array([run.absolute_score if kind == "absolute" else run.final_score for run in runs])


def summary_rows(
    runs: list[Run], thresholds: dict[str, float], baseline: str | None = None
) -> list[dict[str, Any]]:
    rows = []
    groups = group_runs(runs)
    for env_name, algo in sorted(groups, key=lambda key: (key[0], key[1] != baseline, key[1])):
        group = groups[env_name, algo]
        final = _scores(group, "final")
        with_absolute = [run for run in group if run.absolute is not None]
        threshold = thresholds.get(env_name)
        rows.append(
            {
                "env": env_name,
                "algo": algo,
                "metric": group[0].metric,
                "seeds": [run.seed for run in group],
                "steps": sorted({int(run.result["steps"]) for run in group}),
                "final": final.tolist(),
                "final_iqm_ci": iqm_with_ci(final),
                "absolute": _scores(with_absolute, "absolute").tolist(),
                "absolute_seeds": [run.seed for run in with_absolute],
                "absolute_iqm_ci": iqm_with_ci(_scores(with_absolute, "absolute")) if with_absolute else None,
                "published": PUBLISHED.get((env_name, algo), []),
                "threshold": threshold,
                "first_step_reaching": [run.first_step_reaching(threshold) for run in group]
                if threshold is not None
                else [],
                "seconds": [float(run.result["seconds"]) for run in group],
                "commits": sorted({str(run.result["commit"]) for run in group}),
                "machines": sorted({str(run.result["machine"]) for run in group}),
            }
        )
    return rows


def _format(value: float, metric: str) -> str:
    return f"{value:.2f}" if metric == "eval/win_rate" else f"{value:.0f}"


def _with_ci(estimate: tuple[float, float, float] | None, metric: str) -> str:
    if estimate is None:
        return "-"
    point, low, high = (_format(v, metric) for v in estimate)
    return f"{point} [{low}, {high}]"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| task | algo | metric | steps | seeds | final eval per seed | final IQM [95% CI] "
        "| absolute IQM [95% CI] | published | first step reaching threshold | wall time per run (s) "
        "| commit | machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        metric = row["metric"]
        absolute = _with_ci(row["absolute_iqm_ci"], metric)
        if row["absolute_iqm_ci"] is not None and row["absolute_seeds"] != row["seeds"]:
            absolute += f" (seeds {', '.join(map(str, row['absolute_seeds']))})"
        reached = "-"
        if row["threshold"] is not None:
            steps = ", ".join(f"{s:,}" if s is not None else "never" for s in row["first_step_reaching"])
            reached = f">= {row['threshold']:g}: {steps}"
        cells = [
            row["env"],
            row["algo"],
            metric,
            ", ".join(f"{s:,}" for s in row["steps"]),
            ", ".join(map(str, row["seeds"])),
            ", ".join(_format(v, metric) for v in row["final"]),
            _with_ci(row["final_iqm_ci"], metric),
            absolute,
            "; ".join(row["published"]) or "-",
            reached,
            ", ".join(f"{s:.0f}" for s in row["seconds"]),
            ", ".join(row["commits"]),
            "; ".join(row["machines"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ordered_algos(algos: set[str], baseline: str | None) -> list[str]:
    return sorted(algos, key=lambda a: (a != baseline, a))


def poi_markdown(runs: list[Run], baseline: str | None = None) -> str:
    """Per task and over all tasks: P(row algorithm > column algorithm) [95% CI]."""
    groups = group_runs(runs)
    tasks = sorted({env for env, _ in groups})
    lines = [
        "# Probability of improvement",
        "",
        "P(X > Y): the probability that a run of the row algorithm X scores higher than a run of the",
        "column algorithm Y on the same task (ties count half), averaged over tasks, with a 95%",
        "stratified-bootstrap interval (rliable). Scores: the absolute evaluation (absolute.json) where",
        "every run of a task has one, otherwise the final periodic evaluation; the section titles say which.",
    ]

    def matrix(title: str, algos: list[str], scores_of: Any) -> None:
        lines.extend(["", f"## {title}", "", "| X \\ Y | " + " | ".join(algos) + " |"])
        lines.append("|---" * (len(algos) + 1) + "|")
        for x in algos:
            cells = []
            for y in algos:
                if x == y:
                    cells.append("-")
                    continue
                point, low, high = probability_of_improvement(scores_of(x), scores_of(y))
                cells.append(f"{point:.2f} [{low:.2f}, {high:.2f}]")
            lines.append(f"| {x} | " + " | ".join(cells) + " |")

    for task in tasks:
        algos = _ordered_algos({algo for env, algo in groups if env == task}, baseline)
        if len(algos) < 2:
            continue
        kind = _score_kind([run for (env, _), group in groups.items() if env == task for run in group])
        matrix(
            f"{task} ({kind} evaluation)", algos, lambda a, t=task, k=kind: _scores(groups[t, a], k)[:, None]
        )

    # Over all tasks: only algorithms that ran every task, with the same number of seeds per task
    # (rliable's matrices are runs x tasks), so the smallest seed count is used for every task.
    algos = _ordered_algos({a for _, a in groups if all((t, a) in groups for t in tasks)}, baseline)
    if len(tasks) > 1 and len(algos) > 1:
        n = min(len(groups[t, a]) for t in tasks for a in algos)
        kinds = {
            t: _score_kind([run for (env, _), g in groups.items() if env == t for run in g]) for t in tasks
        }

        def all_tasks(algo: str) -> np.ndarray:
            return np.stack([_scores(groups[t, algo][:n], kinds[t]) for t in tasks], axis=1)  # (runs, tasks)

        matrix(f"all {len(tasks)} tasks ({n} seeds each)", algos, all_tasks)
    if len(lines) == 6:
        lines.extend(["", "(no task has two algorithms to compare)"])
    return "\n".join(lines) + "\n"


def _algo_colours(runs: list[Run], baseline: str | None) -> dict[str, Any]:
    """One colour per algorithm, the same in every figure of a report."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    algos = _ordered_algos({run.key[1] for run in runs}, baseline)
    return {algo: palette[i % len(palette)] for i, algo in enumerate(algos)}


Band = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, str]  # steps, IQM, low, high, seeds, metric


def iqm_bands(runs: list[Run], env_name: str, baseline: str | None = None) -> dict[str, Band]:
    """Per algorithm on one task (in report order): the IQM over seeds of its evaluation curve with a
    95% bootstrap band. The bootstrap is the report's slow part, so write_report computes it once per
    task for both figures."""
    groups = {algo: group for (env, algo), group in group_runs(runs).items() if env == env_name}
    bands = {}
    for algo in _ordered_algos(set(groups), baseline):
        curves = [run.curve() for run in groups[algo]]
        # evaluations at the same steps in every seed (a run cut short contributes its common prefix)
        length = min(len(steps) for steps, _ in curves)
        while length and any(steps[:length] != curves[0][0][:length] for steps, _ in curves):
            length -= 1
        steps = np.array(curves[0][0][:length])
        values = np.array([v[:length] for _, v in curves])  # (seeds, steps)
        bands[algo] = (steps, *iqm_curve_with_ci(values), len(curves), groups[algo][0].metric)
    return bands


def _draw_task(ax: Any, bands: dict[str, Band], colours: dict[str, Any]) -> list[str]:
    """One task's bands on one axis; returns the algorithms drawn."""
    for algo, (steps, point, low, high, seeds, _) in bands.items():
        colour = colours[algo]
        ax.plot(steps, point, linewidth=2, color=colour, label=f"{algo} ({seeds} seeds)")
        ax.fill_between(steps, low, high, color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("env steps")
    ax.set_ylabel(next(iter(bands.values()))[5] if bands else "")  # the task's metric
    ax.grid(alpha=0.3)
    return list(bands)


def plot_curves(
    runs: list[Run],
    env_name: str,
    out: Path,
    baseline: str | None = None,
    bands: dict[str, Band] | None = None,
) -> Path:
    """IQM over seeds of every algorithm's evaluation curve on one task, with a 95% bootstrap band
    (`bands`: iqm_bands' result for this task, computed here when not given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bands = iqm_bands(runs, env_name, baseline) if bands is None else bands
    _draw_task(ax, bands, _algo_colours(runs, baseline))
    ax.set_title(f"{env_name}: IQM over seeds, 95% bootstrap CI")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_all_tasks(
    runs: list[Run], out: Path, baseline: str | None = None, bands: dict[str, dict[str, Band]] | None = None
) -> list[tuple[str, list[str]]]:
    """Every task in one figure, one panel each (at most 3 per row), one colour per algorithm throughout
    and one legend. Returns (task, algorithms drawn) per panel, in panel order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({run.key[0] for run in runs})
    columns = min(3, len(tasks))
    rows = -(-len(tasks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows + 0.6), squeeze=False)
    colours = _algo_colours(runs, baseline)
    panels = []
    for ax, task in zip(axes.flat, tasks):
        task_bands = iqm_bands(runs, task, baseline) if bands is None else bands[task]
        panels.append((task, _draw_task(ax, task_bands, colours)))
        ax.set_title(task, fontsize=10)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color=colour, linewidth=2) for colour in colours.values()]
    fig.legend(handles, list(colours), loc="lower center", ncol=len(colours), fontsize=9, frameon=False)
    fig.suptitle("IQM over seeds of the periodic evaluation, 95% stratified-bootstrap band", fontsize=11)
    fig.tight_layout(rect=(0, 0.6 / (3.6 * rows + 0.6), 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return panels


def curve_file_name(env_name: str) -> str:
    return "curves_" + env_name.replace(":", "_").replace("|", "_") + ".png"


def write_report(
    roots: list[Path], out_dir: Path, thresholds: dict[str, float], baseline: str | None = None
) -> list[dict[str, Any]]:
    runs = load_runs(roots)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(runs, thresholds, baseline)
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    (out_dir / "marl_eval.json").write_text(json.dumps(marl_eval_json(runs)))
    (out_dir / "table.md").write_text(markdown_table(rows) + "\n")
    (out_dir / "poi.md").write_text(poi_markdown(runs, baseline))
    bands = {
        env_name: iqm_bands(runs, env_name, baseline) for env_name in sorted({run.key[0] for run in runs})
    }
    for env_name, task_bands in bands.items():
        plot_curves(runs, env_name, out_dir / curve_file_name(env_name), baseline, task_bands)
    plot_all_tasks(runs, out_dir / "curves.png", baseline, bands)
    return rows
