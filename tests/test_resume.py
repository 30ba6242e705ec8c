"""Exact resume (issue 6): a run continued from a checkpoint is bitwise the run that never stopped.

In process: a run is trained to the end with a checkpoint after every iteration; a copy of its directory
is cut back to an early checkpoint (as if the process had died there) and resumed; metrics, evaluations
and final weights must be identical. Out of process: the CLI run is killed with SIGKILL at random points
five times and resumed each time. Plus the CLI's refusals around --resume.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seqmarl.checkpoint import load_checkpoint
from seqmarl.cli import main
from seqmarl.config import build_config, merge, preset_for
from seqmarl.train import resume, train

TIMING = {"wall_time", "charts/SPS"}  # the only columns allowed to differ


def tiny_overrides(algo: str, env: str, out_dir: Path, run_name: str) -> dict:
    return merge(
        preset_for(env, algo),
        {
            "algo": algo,
            "env": {"name": env, "num_envs": 3, "eval_envs": 2},
            "ppo": {"rollout_length": 20, "epochs": 2, "lr_schedule": "linear"},
            "run": {
                "total_steps": 300,  # 5 iterations of 60 steps
                "seed": 3,
                # MaMuJoCo's evaluation episodes last 1000 steps: evaluate only at the start and the end.
                "eval_every": 120 if env.startswith("smax") else 0,
                "eval_episodes": 2,
                "checkpoint_every": 60,
                "keep_checkpoints": 10,
                "out_dir": str(out_dir),
                "run_name": run_name,
                "progress": False,
                "tensorboard": True,
                "threads": 1,
            },
        },
    )


def learning_record(run_dir: Path) -> tuple[list[dict], list[dict]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]
    evaluations = json.loads((run_dir / "result.json").read_text())["evaluations"]
    return rows, evaluations


def assert_same_run(a: Path, b: Path) -> None:
    rows_a, evals_a = learning_record(a)
    rows_b, evals_b = learning_record(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]  # no row lost or duplicated
    assert rows_a == rows_b
    assert evals_a == evals_b
    assert_equal_states(load_checkpoint(a)["algorithm"], load_checkpoint(b)["algorithm"])


def assert_equal_states(a, b, where: str = "algorithm") -> None:
    """Nested state dicts (weights, optimiser, replay, counters) equal bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_states(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_states(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def cut_back(run_dir: Path, keep_step: int) -> None:
    """Make `run_dir` look like a process that died after writing its checkpoint at `keep_step`."""
    for checkpoint in (run_dir / "checkpoints").glob("step_*.pt"):
        if int(checkpoint.stem.split("_")[1]) > keep_step:
            checkpoint.unlink()
            checkpoint.with_name(checkpoint.name + ".sha256").unlink()
    (run_dir / "result.json").unlink()


@pytest.mark.parametrize(
    "algo, env",
    [
        ("mat", "smax:3m"),
        ("mat", "mamujoco:HalfCheetah-6x1"),
        ("mappo", "smax:3m"),
        ("happo", "mamujoco:HalfCheetah-6x1"),
        ("qmix", "smax:3m"),  # replay, unfinished episodes, recurrent state mid-episode
    ],
)
def test_resumed_run_is_bitwise_the_uninterrupted_one(algo, env, tmp_path):
    overrides = tiny_overrides(algo, env, tmp_path, "whole")
    if algo == "qmix":  # updates from the second iteration on, target copies in between
        overrides["qmix"] = {"batch_size": 2, "episodes_per_update": 1, "target_update_interval": 2}
    whole = train(build_config(overrides)).run_dir
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    cut_back(cut, keep_step=120)  # an evaluation step; 3 iterations still to run
    resume(cut)
    assert_same_run(whole, cut)
    meta = json.loads((cut / "meta.json").read_text())
    assert [r["from_step"] for r in meta["resumes"]] == [120]


def test_metrics_rows_after_the_checkpoint_and_a_torn_row_are_dropped(tmp_path):
    from seqmarl.logger import HEADER, Logger

    path = tmp_path / "metrics.csv"
    logger = Logger(tmp_path, tensorboard=False)
    for step in (0, 10, 20, 30):
        logger.log(step, {"charts/SPS": float(step)})
    logger.close()
    with open(path, "a") as f:
        f.write("40,1.0,")  # a row torn by SIGKILL
    Logger(tmp_path, tensorboard=False, resume_step=20).close()
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(HEADER)
    assert [row[0] for row in rows[1:]] == ["0", "10", "20"]


def cli_train(out_dir: Path, run_name: str, steps: int = 1600) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "seqmarl.cli",
        "train",
        "--env",
        "smax:3m",
        "--steps",
        str(steps),
        "--seed",
        "1",
    ]
    argv += ["--num-envs", "4", "--out-dir", str(out_dir), "--run-name", run_name, "--no-progress"]
    for assignment in [
        "ppo.rollout_length=20",  # 80 steps per iteration: 20 iterations at 1,600 steps
        "ppo.epochs=2",
        "ppo.lr_schedule=linear",
        "run.eval_every=400",
        "env.eval_envs=2",
        "run.eval_episodes=2",
        "run.checkpoint_every=80",
        "run.threads=1",
    ]:
        argv += ["--set", assignment]
    return argv


def rows_written(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


KILLED_STEPS = 3200


@pytest.mark.slow
def test_sigkill_at_random_points_five_times_then_resume_is_bitwise_equal(tmp_path):
    """The issue's kill -9 test: >= 5 kills at random points (during start-up, rollouts, updates,
    evaluations and checkpoint writes), each followed by `seqmarl train --resume`."""
    # 40 iterations: room for five kills of 0-2 iterations each plus start-ups on a fast machine
    whole = cli_train(tmp_path, "whole", KILLED_STEPS)
    reference = subprocess.run(whole, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr

    run_dir = tmp_path / "killed"
    chooser = random.Random(6)  # the kill schedule is seeded; the moments still vary with the machine
    # A fast machine can finish the short run before the fifth kill (a kill late in a process's run, or one
    # that lands after result.json is written, ends it): then the whole sequence starts again in a fresh
    # directory, so that the run compared has really been killed five times.
    for _ in range(3):
        shutil.rmtree(run_dir, ignore_errors=True)
        if kill_five_times_and_finish(tmp_path, run_dir, chooser):
            break
    else:
        pytest.fail("the run finished before its fifth kill three times in a row")
    assert_same_run(tmp_path / "whole", run_dir)


def kill_five_times_and_finish(tmp_path: Path, run_dir: Path, chooser: random.Random) -> bool:
    """Train into `run_dir`, SIGKILL it five times at random points, resume after each, and let the
    last resume finish (exit 0). False if the run finished before the fifth kill."""
    command = cli_train(tmp_path, run_dir.name, KILLED_STEPS)
    kills = 0
    while kills < 5:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # wait for 0-2 new metric rows, then a random part of an iteration more, then SIGKILL
        wanted = rows_written(run_dir / "metrics.csv") + chooser.randint(0, 2)
        deadline = time.time() + 300
        while process.poll() is None and rows_written(run_dir / "metrics.csv") < wanted:
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(chooser.uniform(0.0, 0.6))
        if process.poll() is not None:  # it ended on its own: finished early (or failed: say why)
            _, err = process.communicate()
            assert process.returncode == 0, err
            return False
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        if (run_dir / "result.json").exists():  # the kill came after the run had finished
            return False
        if (run_dir / "config.yaml").exists():  # killed before that: the first command again
            command = [sys.executable, "-m", "seqmarl.cli", "train", "--resume", str(run_dir)]
    process = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr
    return (run_dir / "result.json").exists()


def test_sigterm_checkpoints_the_iteration_boundary_and_resume_finishes(tmp_path):
    command = cli_train(tmp_path, "term")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while rows_written(tmp_path / "term" / "metrics.csv") < 3:
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted: checkpoint for step" in err and "Traceback" not in err
    assert f"seqmarl train --resume {tmp_path / 'term'}" in err
    assert list((tmp_path / "term" / "checkpoints").glob("step_*.pt"))
    assert main(["train", "--resume", str(tmp_path / "term"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "term" / "result.json").read_text())["steps"] == 1600


def test_hangup_with_the_terminal_gone_checkpoints_and_resume_finishes(tmp_path):
    """SIGHUP (the terminal or SSH session closed) stops like SIGTERM, with a checkpoint, although
    the process's stdout and stderr have no reader any more (the handler's own message hits EPIPE)."""
    command = cli_train(tmp_path, "hup")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while rows_written(tmp_path / "hup" / "metrics.csv") < 3:
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.stdout.close()
    process.stderr.close()
    process.send_signal(signal.SIGHUP)
    assert process.wait(timeout=120) == 130
    assert list((tmp_path / "hup" / "checkpoints").glob("step_*.pt"))
    assert not (tmp_path / "hup" / "result.json").exists()
    assert main(["train", "--resume", str(tmp_path / "hup"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "hup" / "result.json").read_text())["steps"] == 1600


def test_a_closed_stdout_does_not_stop_training(tmp_path):
    """`seqmarl train ... | head -1`: the reader leaves, every later print meets a broken pipe, and
    the run still trains to the end (its output is not worth the run)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # no reader from the start: the first print raises EPIPE unless handled
    try:
        finished = subprocess.run(
            cli_train(tmp_path, "pipe"), stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=600
        )
    finally:
        os.close(write_end)
    assert finished.returncode == 0 and "Traceback" not in finished.stderr, finished.stderr
    assert json.loads((tmp_path / "pipe" / "result.json").read_text())["steps"] == 1600


def test_resume_refusals_are_one_line_exit_2(tmp_path, capsys):
    run_dir = train(build_config(tiny_overrides("mappo", "smax:3m", tmp_path, "done"))).run_dir

    def refused(argv: list[str], fragment: str) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, err

    refused(["train", "--resume", str(run_dir), "--set", "ppo.lr=1"], "--set cannot be combined")
    refused(["train", "--resume", str(run_dir), "--env", "smax:8m"], "--env cannot be combined")
    refused(["train", "--resume", str(tmp_path / "nowhere")], "is not a run directory")
    refused(["train", "--resume", str(run_dir)], "already finished (300 steps)")
    # A longer budget continues the finished run.
    assert main(["train", "--resume", str(run_dir), "--steps", "360", "--no-progress"]) == 0
    assert json.loads((run_dir / "result.json").read_text())["steps"] == 360
    capsys.readouterr()
    # Checkpoints from before exact resume (no simulator state) can be evaluated but not continued.
    for checkpoint in (run_dir / "checkpoints").glob("step_*.pt"):
        payload = torch.load(checkpoint, weights_only=True)
        del payload["envs"]
        from seqmarl.checkpoint import atomic_save

        atomic_save(payload, checkpoint)
    (run_dir / "result.json").unlink()
    refused(["train", "--resume", str(run_dir)], "predate exact resume")
