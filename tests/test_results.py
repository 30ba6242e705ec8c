"""Aggregation over seeds: IQM, bootstrap interval, marl-eval layout."""

import json

import numpy as np

from seqmarl.results import bootstrap_ci, iqm, summarize


def test_iqm_drops_the_outer_quartiles():
    assert iqm(np.array([0.0, 1.0, 2.0, 100.0])) == 1.5
    low, high = bootstrap_ci(np.array([0.9, 1.0, 1.0, 0.95]))
    assert 0.9 <= low <= high <= 1.0


def _fake_run(root, seed, finals):
    run_dir = root / f"s{seed}"
    run_dir.mkdir()
    evaluations = [
        {
            "step": i * 100,
            "eval/episodic_return": f,
            "eval/win_rate": f / 2,
            "episodes": {"episode_return": [f, f], "win": [False, True]},
        }
        for i, f in enumerate(finals)
    ]
    result = {
        "env": "smax:3m",
        "algo": "mat",
        "seed": seed,
        "steps": 200,
        "seconds": 1.0,
        "commit": "abc",
        "machine": "test",
        "final_eval": {k: v for k, v in evaluations[-1].items() if k.startswith("eval/")},
        "best_eval": {k: v for k, v in evaluations[-1].items() if k.startswith("eval/")},
        "evaluations": evaluations,
    }
    (run_dir / "result.json").write_text(json.dumps(result))
    return run_dir


def test_summarize_writes_table_json_and_marl_eval(tmp_path):
    runs = [_fake_run(tmp_path, s, [0.0, 0.5 + s * 0.1, 1.0 + s * 0.2]) for s in range(3)]
    rows = summarize(runs, tmp_path / "out", {"smax:3m": 0.3})
    row = rows[0]
    assert row["final"] == [0.5, 0.6, 0.7] and abs(row["final_iqm"] - 0.6) < 1e-9
    assert row["first_step_reaching"] == [200, 100, 100]  # win rate = return / 2 here
    data = json.loads((tmp_path / "out" / "marl_eval.json").read_text())
    step = data["smax"]["3m"]["mat"]["seed_2"]["step_2"]
    assert step["step_count"] == 200 and step["win_rate"] == [0.0, 1.0] and step["return"] == [1.4, 1.4]
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
    assert "smax:3m" in (tmp_path / "out" / "table.md").read_text()
