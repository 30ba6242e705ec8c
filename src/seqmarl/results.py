"""Finished runs and their statistics: loading, the marl-eval JSON layout, and rliable's estimates.

The layout is marl-eval's: env -> task -> algorithm -> run -> step_k (per-episode metric lists) plus
absolute_metrics. The statistics come from rliable (Agarwal et al. 2021): the interquartile mean (IQM)
over runs with a 95% stratified-bootstrap percentile interval, and the probability of improvement
(Mann-Whitney per task, averaged over tasks) with its interval. A run's score is the mean over the
episodes of one evaluation (win rate on SMAX, return on MaMuJoCo).
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seqmarl.errors import UserError

BOOTSTRAP_REPS = 5000
BOOTSTRAP_SEED = 0  # the intervals in a report are reproducible


@dataclass
class Run:
    run_dir: Path
    result: dict[str, Any]  # result.json from `seqmarl train`
    absolute: dict[str, Any] | None  # absolute.json from `seqmarl eval --json`, if the run has one

    @property
    def key(self) -> tuple[str, str]:
        return self.result["env"], self.result["algo"]

    @property
    def seed(self) -> int:
        return int(self.result["seed"])

    @property
    def has_win(self) -> bool:
        return "eval/win_rate" in self.result["final_eval"]

    @property
    def metric(self) -> str:
        return "eval/win_rate" if self.has_win else "eval/episodic_return"

    @property
    def final_score(self) -> float:
        return float(self.result["final_eval"][self.metric])

    @property
    def absolute_score(self) -> float | None:
        if self.absolute is None:
            return None
        return float(np.mean(self.absolute["episodes"]["win" if self.has_win else "episode_return"]))

    def curve(self) -> tuple[list[int], list[float]]:
        evaluations = self.result["evaluations"]
        return [int(e["step"]) for e in evaluations], [float(e[self.metric]) for e in evaluations]

    def first_step_reaching(self, threshold: float) -> int | None:
        for step, value in zip(*self.curve()):
            if value >= threshold:
                return step
        return None


def find_run_dirs(roots: list[Path]) -> list[Path]:
    """Each root is a run directory, or a folder searched recursively for run directories."""
    found: list[Path] = []
    for root in roots:
        if not root.is_dir():
            raise UserError(f"{root} is not a directory")
        if (root / "result.json").is_file():
            found.append(root)
        else:
            found.extend(sorted(path.parent for path in root.rglob("result.json")))
    if not found:
        raise UserError(f"no finished runs (result.json) under {', '.join(map(str, roots))}")
    return found


def load_runs(roots: list[Path]) -> list[Run]:
    runs: list[Run] = []
    seen: dict[tuple[str, str, int], Path] = {}
    for run_dir in find_run_dirs(roots):
        try:
            result = json.loads((run_dir / "result.json").read_text())
            absolute_path = run_dir / "absolute.json"
            absolute = json.loads(absolute_path.read_text()) if absolute_path.is_file() else None
        except ValueError as e:
            raise UserError(f"{run_dir}: unreadable result.json or absolute.json ({e})") from None
        run = Run(run_dir, result, absolute)
        identity = (*run.key, run.seed)
        if identity in seen:
            raise UserError(
                f"two runs of {run.key[0]} {run.key[1]} seed {run.seed}: {seen[identity]} and {run_dir}"
            )
        seen[identity] = run_dir
        runs.append(run)
    return runs


def group_runs(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """(env, algo) -> runs sorted by seed, in sorted key order."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.key].append(run)
    return {key: sorted(groups[key], key=lambda r: r.seed) for key in sorted(groups)}


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
    data: dict[str, Any] = {}
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
            absolute = {"return": [float(x) for x in run.absolute["episodes"]["episode_return"]]}
            if run.has_win:
                absolute["win_rate"] = [float(w) for w in run.absolute["episodes"]["win"]]
            entry["absolute_metrics"] = absolute
        data.setdefault(family, {}).setdefault(task, {}).setdefault(algo, {})[f"seed_{run.seed}"] = entry
    return data


# --- statistics (rliable) -------------------------------------------------------------------------


def _interval_estimates(score_dict: dict[str, Any], func: Any, reps: int) -> tuple[dict, dict]:
    """rliable's stratified bootstrap, made reproducible (it draws from numpy's global generator)."""
    from rliable import library as rly

    state = np.random.get_state()
    np.random.seed(BOOTSTRAP_SEED)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # arch's deprecation notes about its own random_state
            return rly.get_interval_estimates(score_dict, func, reps=reps)
    finally:
        np.random.set_state(state)


def iqm_with_ci(scores: np.ndarray, reps: int = BOOTSTRAP_REPS) -> tuple[float, float, float]:
    """IQM of scores (runs,) or (runs, tasks), and its 95% stratified-bootstrap interval."""
    from rliable import metrics

    scores = np.asarray(scores, dtype=float).reshape(len(scores), -1)
    point, interval = _interval_estimates({"x": scores}, lambda s: np.array([metrics.aggregate_iqm(s)]), reps)
    return float(point["x"][0]), float(interval["x"][0, 0]), float(interval["x"][1, 0])


def iqm_curve_with_ci(scores: np.ndarray, reps: int = 2000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IQM over runs at every evaluation step of scores (runs, steps), with a 95% bootstrap band."""
    from scipy.stats import trim_mean

    scores = np.asarray(scores, dtype=float)[:, None, :]  # (runs, 1 task, steps): rliable's layout

    def iqm_per_step(resampled: np.ndarray) -> np.ndarray:
        # rliable's aggregate_iqm (a 25% trimmed mean over runs x tasks) at every step at once
        return trim_mean(resampled.reshape(-1, resampled.shape[-1]), 0.25, axis=0)

    point, interval = _interval_estimates({"x": scores}, iqm_per_step, reps)
    return point["x"], interval["x"][0], interval["x"][1]


def improvement_probability(scores_x: np.ndarray, scores_y: np.ndarray) -> float:
    """rliable.metrics.probability_of_improvement without its per-task scipy call: the Mann-Whitney U
    statistic over runs_x x runs_y pairs (ties count half) / pairs, averaged over tasks. Same value
    (a test checks it), ~100x faster, which matters inside a bootstrap of thousands of resamples."""
    greater = (scores_x[:, None, :] > scores_y[None, :, :]).mean(axis=(0, 1))  # (tasks,)
    ties = (scores_x[:, None, :] == scores_y[None, :, :]).mean(axis=(0, 1))
    return float(np.mean(greater + 0.5 * ties))


def probability_of_improvement(
    scores_x: np.ndarray, scores_y: np.ndarray, reps: int = BOOTSTRAP_REPS
) -> tuple[float, float, float]:
    """P(X > Y) of scores (runs_x, tasks) and (runs_y, tasks), averaged over tasks, with its interval."""
    pair = (np.asarray(scores_x, dtype=float), np.asarray(scores_y, dtype=float))
    point, interval = _interval_estimates({"x,y": pair}, improvement_probability, reps)
    low, high = np.ravel(interval["x,y"])
    return float(point["x,y"]), float(low), float(high)
