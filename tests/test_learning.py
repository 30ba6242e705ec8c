"""MAT learns: a fixed-seed run on a small real task must rise well above its untrained level."""

import json

import pytest

from seqmarl.config import build_config, merge, preset_for
from seqmarl.train import train


@pytest.mark.slow
def test_mat_learns_smax_3m(tmp_path):
    # 32 iterations of 32 envs x 100 steps with the paper's SMAC settings. Untrained, the greedy policy
    # wins 0 of 32 evaluation battles (return ~0.1); seed 0 reaches a 59% eval win rate here
    # (docs/results/README.md), so the thresholds leave room for platform-level float differences.
    overrides = merge(
        preset_for("smax:3m"),
        {
            "env": {"name": "smax:3m"},
            "run": {
                "total_steps": 102_400,
                "seed": 0,
                "eval_every": 0,
                "out_dir": str(tmp_path),
                "run_name": "learn",
                "progress": False,
                "tensorboard": False,
            },
        },
    )
    result = train(build_config(overrides))
    evaluations = json.loads((result.run_dir / "result.json").read_text())["evaluations"]
    first, last = evaluations[0], evaluations[-1]
    assert first["eval/win_rate"] <= 0.1
    assert last["eval/win_rate"] >= 0.3, evaluations
    assert last["eval/episodic_return"] >= first["eval/episodic_return"] + 0.8, evaluations
