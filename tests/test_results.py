"""Aggregation over seeds (rliable: IQM, stratified bootstrap, probability of improvement) and the
files `seqmarl report` writes (table, probability of improvement, curves, marl-eval layout)."""

import json

import numpy as np
import pytest

from seqmarl.cli import main
from seqmarl.report import write_report
from seqmarl.results import (
    improvement_probability,
    iqm_curve_with_ci,
    iqm_with_ci,
    probability_of_improvement,
)


def test_iqm_drops_the_outer_quartiles_and_brackets_it():
    point, low, high = iqm_with_ci(np.array([0.0, 1.0, 2.0, 100.0]))
    assert point == 1.5
    assert 0.0 <= low <= point <= high <= 100.0
    assert iqm_with_ci(np.array([0.9, 1.0, 1.0, 0.95])) == iqm_with_ci(np.array([0.9, 1.0, 1.0, 0.95]))


def test_probability_of_improvement_known_answers():
    x, y = np.array([[1.0], [2.0], [3.0]]), np.array([[1.5], [2.5], [3.5]])
    assert probability_of_improvement(x, y)[0] == pytest.approx(3 / 9)  # 2>1.5, 3>1.5, 3>2.5
    assert probability_of_improvement(y, x)[0] == pytest.approx(6 / 9)
    assert probability_of_improvement(x, x)[0] == pytest.approx(0.5)  # ties count half
    point, low, high = probability_of_improvement(x + 10, y)
    assert point == low == high == 1.0
    # two tasks: the average of the per-task probabilities
    two = probability_of_improvement(np.hstack([x, x + 10]), np.hstack([y, y]))
    assert two[0] == pytest.approx((3 / 9 + 1) / 2)


def test_improvement_probability_equals_rliables():
    from rliable import metrics

    rng = np.random.default_rng(0)
    for runs_x, runs_y, tasks in [(3, 3, 1), (5, 4, 3), (2, 6, 2)]:
        x = rng.integers(0, 4, size=(runs_x, tasks)).astype(float)  # small integers: many ties
        y = rng.integers(0, 4, size=(runs_y, tasks)).astype(float)
        assert improvement_probability(x, y) == pytest.approx(metrics.probability_of_improvement(x, y))


def test_iqm_curve_band_contains_the_point_estimate():
    scores = np.array([[0.0, 0.5, 1.0], [0.0, 0.4, 0.9], [0.1, 0.6, 0.8]])
    point, low, high = iqm_curve_with_ci(scores)
    assert point.shape == low.shape == high.shape == (3,)
    assert np.all(low <= point + 1e-12) and np.all(point <= high + 1e-12)


def _fake_run(root, algo, seed, finals, absolute=True, env="smax:3m"):
    run_dir = root / algo / f"seed{seed}"
    run_dir.mkdir(parents=True)
    evaluations = [
        {
            "step": i * 100,
            "eval/episodic_return": f,
            "eval/win_rate": f / 2,
            "episodes": {"episode_return": [f, f], "win": [False, True]},
        }
        for i, f in enumerate(finals)
    ]
    summary = {k: v for k, v in evaluations[-1].items() if k.startswith("eval/")}
    result = {
        "env": env,
        "algo": algo,
        "seed": seed,
        "steps": 200,
        "seconds": 1.0,
        "commit": "abc",
        "machine": "test",
        "final_eval": summary,
        "best_eval": summary,
        "evaluations": evaluations,
    }
    (run_dir / "result.json").write_text(json.dumps(result))
    if absolute:
        episodes = {"episode_return": [1.0] * 4, "win": [True, True, seed % 2 == 0, False]}
        (run_dir / "absolute.json").write_text(json.dumps({"episodes": episodes}))
    return run_dir


def test_report_writes_table_poi_curves_and_marl_eval(tmp_path):
    for s in range(3):
        _fake_run(tmp_path / "runs", "mat", s, [0.0, 0.5 + s * 0.1, 1.0 + s * 0.2])
        _fake_run(tmp_path / "runs", "mappo", s, [0.0, 0.2, 0.4 + s * 0.1], absolute=s != 2)
    out = tmp_path / "out"
    rows = write_report([tmp_path / "runs"], out, {"smax:3m": 0.3}, baseline="mat")
    mat = rows[0]
    assert mat["algo"] == "mat"  # the baseline comes first
    assert mat["final"] == [0.5, 0.6, 0.7] and mat["final_iqm_ci"][0] == pytest.approx(0.6)
    assert mat["absolute"] == [0.75, 0.5, 0.75]
    assert mat["first_step_reaching"] == [200, 100, 100]  # win rate = return / 2 here
    assert rows[1]["absolute_seeds"] == [0, 1]

    data = json.loads((out / "marl_eval.json").read_text())
    run = data["smax"]["3m"]["mat"]["seed_2"]
    assert run["step_2"] == {"step_count": 200, "return": [1.4, 1.4], "win_rate": [0.0, 1.0]}
    assert run["absolute_metrics"]["win_rate"] == [1.0, 1.0, 1.0, 0.0]
    assert "absolute_metrics" not in data["smax"]["3m"]["mappo"]["seed_2"]

    table = (out / "table.md").read_text()
    assert "| smax:3m | mat | eval/win_rate |" in table and "0.60 [" in table
    poi = (out / "poi.md").read_text()
    assert "## smax:3m (final evaluation)" in poi  # one mappo run lacks absolute.json
    assert "| mat | - | 1.00 [1.00, 1.00] |" in poi  # every mat run beats every mappo run
    assert (out / "curves_smax_3m.png").stat().st_size > 1000


def test_report_over_tasks_and_published_numbers(tmp_path):
    for env in ("smax:5m_vs_6m", "smax:3m"):
        for s in range(2):
            _fake_run(tmp_path / env, "mat", s, [0.0, 1.0 + s], env=env)
            _fake_run(tmp_path / env, "mappo", s, [0.0, 0.5 + s], env=env)
    out = tmp_path / "out"
    assert main(["report", str(tmp_path), "--out", str(out), "--baseline-algo", "mat"]) == 0
    assert "## all 2 tasks (2 seeds each)" in (out / "poi.md").read_text()
    table = (out / "table.md").read_text()
    assert "90.6% (MAT paper Table 1" in table and "88.2% (MAT paper Table 1" in table
    assert "~5% (JaxMARL paper, recurrent, SMAX" in table  # beside MAPPO: SMAX's own map, another number
    assert {p.name for p in out.glob("curves_*.png")} == {"curves_smax_3m.png", "curves_smax_5m_vs_6m.png"}
    assert (out / "curves.png").stat().st_size > 1000


def test_one_figure_has_a_panel_per_task_and_one_colour_per_algorithm(tmp_path):
    from seqmarl.report import _algo_colours, plot_all_tasks
    from seqmarl.results import load_runs

    for env, algos in (
        ("smax:3m", ("qmix", "mat", "mappo")),
        ("smax:2s3z", ("mat", "qmix")),
        ("smax:8m", ("ippo",)),
    ):
        for algo in algos:
            _fake_run(tmp_path / env, algo, 0, [0.0, 1.0], env=env)
    runs = load_runs([tmp_path])
    panels = plot_all_tasks(runs, tmp_path / "curves.png", baseline="mat")
    assert panels == [
        ("smax:2s3z", ["mat", "qmix"]),
        ("smax:3m", ["mat", "mappo", "qmix"]),
        ("smax:8m", ["ippo"]),
    ]
    colours = _algo_colours(runs, "mat")
    assert list(colours) == ["mat", "ippo", "mappo", "qmix"] and len(set(colours.values())) == 4


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["report", "/nonexistent"], "is not a directory"),
        (["report", "."], "no finished runs"),
        (["report", ".", "--threshold", "smax:3m"], "--threshold expects ENV=VALUE"),
    ],
)
def test_report_bad_input(argv, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "--threshold" in argv:
        _fake_run(tmp_path, "mat", 0, [0.0, 1.0])
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_evaluation_outcomes_known_answer():
    from seqmarl.rollout import EpisodeStats

    stats = EpisodeStats(
        returns=[2.0, 0.9, 0.5, 0.0, 2.0],
        lengths=[14, 17, 101, 30, 12],
        wins=[True, False, False, False, True],
        survivors=[2, 0, 1, 0, 3],
        timed_out=[False, False, True, False, False],
    )
    # two wins; a loss with every agent dead; one at the time limit; a draw (both sides dead on the same
    # step: no survivors, not cut) counts as wiped out too
    assert stats.outcomes() == {"won": 2, "wiped_out": 2, "timed_out": 1, "other": 0}
    stats.survivors[3] = 1  # a loss that ended by itself with an agent alive: neither wipe-out nor limit
    assert stats.outcomes() == {"won": 2, "wiped_out": 1, "timed_out": 1, "other": 1}
