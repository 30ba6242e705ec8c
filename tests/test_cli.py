"""The command line: bad input gives one line and exit code 2; a short real run works end to end."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from seqmarl.checkpoint import atomic_save, checkpoint_files, load_checkpoint
from seqmarl.cli import main

BAD_INPUTS = [
    (["train", "--env", "nosuchsim:3m"], "unknown env 'nosuchsim:3m'"),
    (["train", "--env", "smax"], "unknown env 'smax'"),
    (["train", "--algo", "dqn"], "unknown algorithm 'dqn'; available: mat"),
    (["train", "--frobnicate"], "unrecognized arguments: --frobnicate (see seqmarl --help)"),
    (["train", "--steps"], "expected one argument (see seqmarl train --help)"),
    (["train", "--steps", "many"], "invalid float value"),
    (["train", "--steps", "0"], "--steps must be >= 1"),
    (["train", "--set", "ppo.lrr=1"], "unknown config key ppo.lrr"),
    (["train", "--set", "ppo.epochs=x"], "ppo.epochs: expected int"),
    (["train", "--set", "lr"], "--set expects SECTION.KEY=VALUE"),
    (["train", "--config", "/nonexistent.yaml"], "cannot read config file"),
    (["train", "--env", "mamujoco:NoSuchBot-2x3", "--steps", "100"], "NoSuchBot"),
    (["train", "--env", "smax:3m", "--device", "cuda:7", "--steps", "100"], "device"),
    (["eval", "/nonexistent/run"], "does not exist"),
    (["plot", "/nonexistent/run"], "not a run directory"),
    (["select", "/nonexistent/run"], "no checkpoints"),
    (["launch"], "invalid choice: 'launch'"),
    (["train", "--algo", "qmix", "--env", "mamujoco:HalfCheetah-6x1"], "qmix supports discrete actions only"),
    (["train", "--algo", "qmix", "--set", "qmix.td_lambda=2"], "qmix.td_lambda must be in [0, 1]"),
    (["train", "--set", "env.sim_device=tpu"], "env.sim_device must be 'cpu' or 'gpu', not 'tpu'"),
    (
        ["train", "--env", "mamujoco:HalfCheetah-6x1", "--set", "env.sim_device=gpu", "--steps", "100"],
        "env.sim_device='gpu': mamujoco runs on cpu only",
    ),
]


@pytest.mark.parametrize("argv, fragment", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2(argv, fragment, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        sys.exit(
            main(
                argv
                + (["--out-dir", str(tmp_path)] if argv[0] == "train" and "--frobnicate" not in argv else [])
            )
        )
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def test_console_script_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "seqmarl.cli", "train", "--env", "foo:bar"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("seqmarl: error: unknown env 'foo:bar'")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("env, steps", [("smax:3m", "640"), ("mamujoco:HalfCheetah-6x1", "400")])
def test_train_eval_plot_smoke(env, steps, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MuJoCo writes MUJOCO_LOG.TXT into the working directory
    argv = [
        "train",
        "--env",
        env,
        "--steps",
        steps,
        "--num-envs",
        "4",
        "--out-dir",
        str(tmp_path),
        "--run-name",
        "smoke",
        "--no-progress",
        "--set",
        "ppo.rollout_length=20",
        "--set",
        "env.eval_envs=2",
        "--set",
        "run.eval_episodes=2",
        "--set",
        "ppo.epochs=2",
        "--set",
        f"run.checkpoint_every={int(steps) // 4}",  # several checkpoints for `seqmarl select`
    ]
    if env.startswith("mamujoco"):
        argv += ["--set", "ppo.num_minibatches=2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| eval/episodic_return |" in out
    run_dir = tmp_path / "smoke"
    for name in ("config.yaml", "meta.json", "metrics.csv", "result.json", "curve.png"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "checkpoints").glob("step_*.pt"))
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert int(rows[-1]["step"]) == int(steps)
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["decode_loop"] in ("python", "cpp-aten", "cpp-fused")  # MAT says which loop acted
    assert meta["malloc"] in ("keep", "system", "n/a")  # runinfo.keep_freed_memory
    assert rows[-1]["losses/value_loss"] != ""

    assert main(["eval", str(run_dir), "--episodes", "2"]) == 0
    assert "eval/episodic_return" in capsys.readouterr().out
    # the best evaluation's checkpoint, for the absolute evaluation of `seqmarl benchmark`
    best = json.loads((run_dir / "result.json").read_text())["best_eval"]["step"]
    assert (
        main(["eval", str(run_dir / "best.pt"), "--episodes", "2", "--json", str(tmp_path / "a.json")]) == 0
    )
    out = capsys.readouterr().out
    assert f"step {int(best):,}," in out
    episodes = json.loads((tmp_path / "a.json").read_text())["episodes"]
    assert len(episodes["episode_return"]) == 2
    assert len(episodes["episode_length"]) == len(episodes["survivors"]) == len(episodes["timed_out"]) == 2
    assert all(1 <= length for length in episodes["episode_length"])
    if env.startswith("smax"):  # battle tasks say how the lost battles ended
        assert "with every agent dead" in out and "at the time limit" in out
        assert all(0 <= alive <= 3 for alive in episodes["survivors"])
        # a run trained with SMAX on jax's GPU is evaluated on the CPU simulator with --device cpu
        payload = load_checkpoint(run_dir / "best.pt")
        payload["config"]["env"]["sim_device"] = "gpu"
        atomic_save(payload, tmp_path / "gpu_sim.pt")
        assert main(["eval", str(tmp_path / "gpu_sim.pt"), "--episodes", "2", "--device", "cpu"]) == 0
        assert "eval/episodic_return" in capsys.readouterr().out
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000

    # select: every kept checkpoint scored on one set of episodes, the best re-scored on fresh ones
    kept = sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.pt"))
    assert len(kept) == 3  # run.keep_checkpoints
    select = [
        "select",
        str(run_dir),
        "--episodes",
        "2",
        "--test-episodes",
        "3",
        "--json",
        str(tmp_path / "s.json"),
    ]
    assert main(select) == 0
    chosen = json.loads((tmp_path / "s.json").read_text())
    scores = {int(step): score for step, score in chosen["selection"]["scores"].items()}
    assert sorted(scores) == kept
    assert chosen["chosen_step"] == max(kept, key=lambda step: (scores[step], step))
    assert chosen["selection_score"] == scores[chosen["chosen_step"]]
    assert len(chosen["test"]["episodes"]["win"]) == 3 and chosen["test"]["eval_seed"] == 2026
    # the check is an ordinary evaluation of the chosen checkpoint on the test seed
    assert (
        main(
            [
                "eval",
                chosen["chosen_checkpoint"],
                "--episodes",
                "3",
                "--seed",
                "2026",
                "--json",
                str(tmp_path / "t.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "t.json").read_text())["episodes"] == chosen["test"]["episodes"]
    capsys.readouterr()
    assert main(select + ["--test-seed", "777"]) == 2
    assert "--test-seed must differ from --seed" in capsys.readouterr().err

    # average: the kept checkpoints' weights, averaged into one checkpoint that `seqmarl eval` reads
    assert main(["average", str(run_dir), "--out", str(tmp_path / "avg.pt")]) == 0
    assert_averaged(tmp_path / "avg.pt", run_dir, "model", kept)
    assert main(["eval", str(tmp_path / "avg.pt"), "--episodes", "2"]) == 0
    capsys.readouterr()
    assert main(["average", str(run_dir), "--last", "4"]) == 2  # only 3 are kept
    assert "--last must be 0 (all) or 2..3" in capsys.readouterr().err

    # the same run directory is refused rather than overwritten
    assert main(argv) == 2


def assert_averaged(path, run_dir, key, steps):
    """Known answer: every float tensor of `key` is the mean of the kept checkpoints' (which differ)."""
    averaged = load_checkpoint(path)
    saved = [load_checkpoint(p) for p in checkpoint_files(run_dir)]
    assert averaged["averaged_steps"] == steps == [s["step"] for s in saved]
    assert averaged["step"] == steps[-1]
    differs = False
    for name, value in averaged["algorithm"][key].items():
        if value.is_floating_point():
            expected = torch.stack([s["algorithm"][key][name].double() for s in saved]).mean(0)
            torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)
            differs |= not torch.equal(saved[0]["algorithm"][key][name], saved[-1]["algorithm"][key][name])
    assert differs  # the checkpoints really hold different weights, so the mean is a real test


def test_qmix_train_checkpoint_eval_smoke(tmp_path, capsys):
    """QMIX through the one trainer: replayed updates happen, and `seqmarl eval` loads its checkpoint
    (replay included) with weights_only=True."""
    argv = ["train", "--algo", "qmix", "--env", "smax:3m", "--steps", "2000", "--num-envs", "4"]
    argv += ["--out-dir", str(tmp_path), "--run-name", "qmix", "--no-progress"]
    for setting in ("ppo.rollout_length=50", "env.eval_envs=2", "run.eval_episodes=2", "qmix.batch_size=8"):
        argv += ["--set", setting]
    argv += ["--set", "qmix.buffer_size=32", "--set", "qmix.episodes_per_update=4"]
    argv += ["--set", "run.checkpoint_every=1000"]
    assert main(argv) == 0
    with open(tmp_path / "qmix" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["losses/td_loss"] != "" and rows[-1]["losses/value_loss"] == ""
    assert float(rows[-1]["charts/learning_rate"]) == 1e-3  # QMIX's own rate, not the PPO schedule
    assert float(rows[-1]["charts/epsilon"]) < 1.0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "qmix"), "--episodes", "2"]) == 0
    assert "eval/win_rate" in capsys.readouterr().out
    # averaging QMIX averages its agent network and mixer (`network_keys`)
    steps = [load_checkpoint(p)["step"] for p in checkpoint_files(tmp_path / "qmix")]
    assert len(steps) >= 2
    assert main(["average", str(tmp_path / "qmix")]) == 0
    for key in ("agent", "mixer"):
        assert_averaged(tmp_path / "qmix" / "average.pt", tmp_path / "qmix", key, steps)
    assert main(["eval", str(tmp_path / "qmix" / "average.pt"), "--episodes", "2"]) == 0
