"""The benchmark scripts in bench/ run (--quick), write their JSON, and flag a slowdown against a baseline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import common  # noqa: E402


def run_script(name: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / name), "--quick", "--threads", "1", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "script, flags, required",
    [
        ("decode.py", [], ["cached_ms", "uncached_ms", "speedup", "outputs_match"]),
        ("update.py", [], ["update_ms", "gflops", "matmul_model_shape_gflops"]),
        (
            "update.py",
            ["--compare-attention", "--compare-fused", "--compare-adam", "--ops", "--compare-pass"],
            [
                "update_ms",
                "pass_gain",
                "attention_gain",
                "fused_gain",
                "adam_gain",
                "matmul_share_of_update",
                "ceiling_of_model_shape_rate",
            ],
        ),
        ("train.py", [], ["steps_per_s", "steps_per_cpu_s", "bound_steps_per_s", "fraction_of_bound"]),
        ("train.py", ["--algo", "mappo"], ["steps_per_s", "env_fraction", "update_fraction"]),
        ("env_step.py", ["--envs", "4"], ["env_steps_per_s", "speedup", "identical_records"]),
        ("smax_step.py", ["--envs", "4", "--tasks", "3m"], ["env_steps_per_s", "same_as_cpu"]),
    ],
)
def test_script_runs_and_compares_with_its_own_baseline(script, flags, required, tmp_path):
    out = tmp_path / "result.json"
    result = run_script(script, "--json", str(out), *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    payload = json.loads(out.read_text())
    for key in ("commit", "cpu", "torch", "threads", "malloc", "load_average"):
        assert key in payload["machine"]
    assert all(required[0] in row for row in payload["rows"])
    for key in required:
        assert any(row.get(key) is not None for row in payload["rows"]), key
    assert "| " in result.stdout  # the table
    if script == "decode.py":
        assert all(row["outputs_match"] for row in payload["rows"] if "outputs_match" in row)
    if "--algo" in flags:  # another algorithm: its own rows, no (MAT) compute bound
        assert [row["name"] for row in payload["rows"]] == ["mamujoco:HalfCheetah-6x1/mappo"]
        assert payload["rows"][0]["bound_steps_per_s"] is None
    if script == "env_step.py":
        assert all(row["identical_records"] for row in payload["rows"])
    if script == "smax_step.py":  # jax's CPU device is always timed; a GPU too where jax sees one
        assert payload["rows"][0]["name"] == "3m/envs=4/cpu"
        assert all(row["same_as_cpu"] for row in payload["rows"])


def test_baseline_comparison_flags_a_slowdown_over_10_percent(tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    machine = {"commit": "abc", "load_average": [0.1, 0.1, 0.1]}
    rows = [{"name": "a", "ms": 10.0}, {"name": "b", "ms": 10.0}]
    baseline.write_text(json.dumps({"machine": machine, "rows": rows}))
    assert common.compare_with_baseline(
        [{"name": "a", "ms": 10.5}, {"name": "b", "ms": 9.0}], str(baseline), "ms", False
    )
    assert not common.compare_with_baseline([{"name": "a", "ms": 11.5}], str(baseline), "ms", False)
    assert "SLOWER" in capsys.readouterr().out
    # throughput metrics: higher is better
    rows = [{"name": "t", "steps": 100.0}]
    baseline.write_text(json.dumps({"machine": machine, "rows": rows}))
    assert not common.compare_with_baseline([{"name": "t", "steps": 85.0}], str(baseline), "steps", True)
    assert common.compare_with_baseline([{"name": "t", "steps": 95.0}], str(baseline), "steps", True)


def test_flop_count_of_the_reference_model():
    """Known answer for N=3, obs 100, 10 actions, E=64: forward 163,456 FLOPs per token."""
    shape = common.ModelShape(n_agents=3, obs_dim=100, action_width=10, discrete=True)
    parts = common.forward_flops_per_token(shape)
    assert parts["obs_embed"] == 2 * 100 * 64
    assert parts["encoder"] == 6 * 2 * 64 * 64 + 4 * 3 * 64
    assert parts["decoder"] == 10 * 2 * 64 * 64 + 2 * 4 * 2 * 64
    assert sum(parts.values()) == 163_456
    assert common.train_flops_per_token(shape) == 3 * 163_456 - 2 * 100 * 64
    # the C++ pass's token table: the first decoder block's q/k/v Linear, forward and backward
    assert common.token_table_flops_per_token(shape) == 3 * 2 * 64 * 192 == 73_728


def test_before_after_script_runs_against_head(tmp_path):
    out = tmp_path / "ab.json"
    result = run_script("ab_act.py", "--before", "HEAD", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(row["max_log_prob_diff"] < 1e-5 for row in rows)


def test_update_refuses_a_reference_dir_that_is_not_the_reference_checkout(tmp_path):
    # The side-by-side with the reference MAT needs a checkout of PKU-MARL/Multi-Agent-Transformer, which
    # CI cannot fetch; a wrong directory must say so in one line, before any timing starts.
    result = run_script("update.py", "--reference-src", str(tmp_path))
    assert result.returncode != 0
    assert "not a checkout of PKU-MARL/Multi-Agent-Transformer" in result.stderr
    assert "Traceback" not in result.stderr


# A stand-in for a JaxMARL checkout: the layout bench/vs_jaxmarl.py imports from, with a make_train that
# logs through `wandb.log` from inside jit (as JaxMARL's baseline does, via io_callback) a known win rate
# per update: 0, 0.5, 1, 1. The harness must turn these into rows, times and thresholds.
FAKE_JAXMARL_MAPPO = """
import jax
import jax.numpy as jnp
import wandb


def make_train(config):
    batch = config["NUM_ENVS"] * config["NUM_STEPS"]
    updates = int(config["TOTAL_TIMESTEPS"]) // batch

    def log(update):
        wandb.log({"env_step": update * batch, "win_rate": min(float(update) / 2, 1.0), "returns": 0.0})

    def train(rng):
        def update_step(update, _):
            jax.experimental.io_callback(log, None, update)
            return update + 1, None

        return jax.lax.scan(update_step, jnp.int32(0), None, updates)

    return train
"""


def test_peer_comparison_reads_both_libraries_logs(tmp_path):
    mappo = tmp_path / "jaxmarl" / "baselines" / "MAPPO"
    (mappo / "config").mkdir(parents=True)
    (mappo / "mappo_rnn_smax.py").write_text(FAKE_JAXMARL_MAPPO)
    (mappo / "config" / "mappo_homogenous_rnn_smax.yaml").write_text(
        '"NUM_ENVS": 128\n"NUM_STEPS": 128\n"TOTAL_TIMESTEPS": 1e7\n"MAP_NAME": "2s3z"\n"SEED": 0\n'
    )
    out = tmp_path / "result.json"
    result = run_script(
        "vs_jaxmarl.py", "--jaxmarl-src", str(tmp_path / "jaxmarl"), "--json", str(out), timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ours, peer = json.loads(out.read_text())["rows"]
    assert ours["library"] == "seqmarl" and ours["steps"] == 6400
    assert ours["eval_win_final"] is not None and ours["curve"][0][0] == 0  # the evaluation before training
    # --quick: 8 envs x 16 steps = 128 env steps per update, 512 in all: four updates logged
    assert peer["library"] == "jaxmarl" and [row[0] for row in peer["curve"]] == [128, 256, 384, 512]
    assert [row[2] for row in peer["curve"]] == [0.0, 0.5, 1.0, 1.0]
    assert peer["final_train_win"] == 1.0  # the last 10% of the steps: the last row
    # averaged over the last 1e5 env steps (all rows here): 0, 0.25, 0.5, 0.625; the curve's times are rounded
    assert peer["seconds_to_train_0.5"] == pytest.approx(peer["curve"][2][1], abs=0.01)
    assert peer["seconds_to_train_0.8"] is None
    assert 0 < peer["curve"][0][1] <= peer["curve"][-1][1] <= peer["wall_s"]
    assert "| smax:3m/jaxmarl-mappo/seed0 |" in result.stdout


def test_peer_comparison_refuses_a_dir_that_is_not_a_jaxmarl_checkout(tmp_path):
    result = run_script("vs_jaxmarl.py", "--jaxmarl-src", str(tmp_path))
    assert result.returncode == 2
    assert "baselines/MAPPO/mappo_rnn_smax.py not found" in result.stderr
