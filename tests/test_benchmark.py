"""`seqmarl benchmark`: spec validation, run planning and run states, and a tiny benchmark end to end
(2 algorithms x 1 task x 2 seeds in 2 workers) that is killed mid-way, re-run to completion, and re-run
once more as a no-op."""

import fcntl
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import seqmarl
from seqmarl.benchmark import _stages, plan_runs
from seqmarl.benchmark_spec import build_spec, parse_seeds
from seqmarl.checkpoint import load_checkpoint
from seqmarl.cli import main

SPECS = Path(__file__).resolve().parents[1] / "bench" / "specs"
TINY_SET = {
    "env.num_envs": 2,
    "env.eval_envs": 2,
    "ppo.rollout_length": 20,
    "ppo.epochs": 1,
    "run.checkpoint_every": 40,
}


def _tiny_spec(out: Path, **changes) -> dict:
    spec = {
        "out": str(out),
        "workers": 2,
        "algos": ["mat", "mappo"],
        "envs": ["smax:3m"],
        "seeds": "0-1",
        "steps": 120,
        "set": TINY_SET,
        "eval": {"every": 40, "episodes": 2, "absolute_factor": 2},
    }
    spec.update(changes)
    return spec


def _write(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


@functools.cache
def test_seeds_strings():
    assert parse_seeds("0-4") == (0, 1, 2, 3, 4)
    assert parse_seeds("0-2,7") == (0, 1, 2, 7)
    assert parse_seeds([3, 1]) == (3, 1)
    assert parse_seeds(5) == (5,)


BAD_SPECS = [
    ({"frobnicate": 1}, "unknown benchmark spec key 'frobnicate'"),
    ({"algos": ["mat", "dqn"]}, "unknown algorithm 'dqn'"),
    ({"envs": ["nosuchsim:3m"]}, "unknown env 'nosuchsim:3m'"),
    ({"seeds": "0-x"}, "seeds: expected e.g. 0-4"),
    ({"seeds": "4-1"}, "seeds: expected e.g. 0-4"),
    ({"seeds": [0, 0]}, "seeds: repeated seed"),
    ({"steps": "lots"}, "steps: expected a positive integer"),
    ({"steps": {"smax:8m": 100}}, "steps: per-task budgets must name exactly the envs"),
    ({"eval": {"every": 10, "often": 2}}, "eval: expected a mapping with keys"),
    (
        {"eval": {"absolute_checkpoint": "first"}},
        "eval.absolute_checkpoint: expected best, last or average:K",
    ),
    (
        {"eval": {"absolute_checkpoint": "average:1"}},
        "eval.absolute_checkpoint: expected best, last or average",
    ),
    ({"eval": {"absolute_checkpoint": "average:5"}}, "averages 5 checkpoints but smax:3m mat seed0 keeps 3"),
    ({"eval": {"absolute_checkpoint": "average:5"}, "set": {**TINY_SET, "run.keep_checkpoints": 5}}, None),
    # keys and values are checked against each run's resolved config before anything starts
    ({"set": {"ppo.lrr": 1}}, "smax:3m mat seed0: unknown config key ppo.lrr"),
    ({"set": {"ppo.lr": "fast"}}, "smax:3m mat seed0: ppo.lr: expected float, got 'fast'"),
    ({"thresholds": {"smax:8m": 0.9}}, "thresholds: expected a mapping ENV: VALUE"),
    ({"exclude": ["smax:3m qmix"]}, "exclude: expected 'ENV ALGO'"),
]


@pytest.mark.parametrize("changes, fragment", BAD_SPECS)
def test_bad_spec_is_one_line_exit_2(changes, fragment, tmp_path, capsys):
    spec = _write(tmp_path / "spec.yaml", _tiny_spec(tmp_path / "out", **changes))
    code = main(["benchmark", str(spec), "--dry-run"])
    err = capsys.readouterr().err.strip()
    if fragment is None:
        assert code == 0, err
        return
    assert code == 2
    assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_average_k_is_checked_against_what_a_started_run_saved(tmp_path, capsys):
    """A started run continues with the config it saved, so that is what average:K is checked against."""
    data = _tiny_spec(tmp_path / "out", eval={"absolute_checkpoint": "average:3"}, algos=["mappo"], seeds=[0])
    (run,) = plan_runs(build_spec(data))
    (run.run_dir / "checkpoints").mkdir(parents=True)
    (run.run_dir / "checkpoints" / "step_40.pt").write_bytes(b"")  # state "resume"
    (run.run_dir / "config.yaml").write_text("run: {keep_checkpoints: 2, eval_episodes: 2}\n")
    spec = _write(tmp_path / "spec.yaml", data)
    assert main(["benchmark", str(spec), "--dry-run"]) == 2
    assert "average:3 averages 3 checkpoints but smax:3m mappo seed0 keeps 2" in capsys.readouterr().err
    (run.run_dir / "config.yaml").write_text("run: {keep_checkpoints: 3, eval_episodes: 2}\n")
    assert main(["benchmark", str(spec), "--dry-run"]) == 0


def test_bad_spec_file_and_flags(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("algos: [mat\n")
    assert main(["benchmark", str(tmp_path / "broken.yaml")]) == 2
    assert main(["benchmark", str(tmp_path / "missing.yaml")]) == 2
    assert main(["benchmark", "--algos", "mat", "--envs", "smax:3m", "--steps", "1e3"]) == 2  # no seeds
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[1].strip() for line in err] == ["error"] * 3
    assert "not valid YAML" in err[0] and "cannot read benchmark spec" in err[1] and "needs 'seeds'" in err[2]


def test_flags_alone_plan_deterministic_run_directories(tmp_path, capsys):
    argv = ["benchmark", "--algos", "mat,mappo", "--envs", "smax:3m,smax:2s3z", "--seeds", "0-2"]
    argv += ["--steps", "2e6", "--out", str(tmp_path), "--workers", "2", "--set", "ppo.lr=1e-4", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "12 runs (2 algos x 2 envs x 3 seeds)" in out and "12 to start" in out
    assert f"--out-dir {tmp_path}/smax/2s3z/mappo --run-name seed2" in out and "--set ppo.lr=1e-4" in out
    assert "--steps 2000000" in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.parametrize("commit", ["abc1234", "abc1234-dirty"])
def test_a_benchmark_from_uncommitted_code_says_so(commit, tmp_path, capsys, monkeypatch):
    """Workers import the source tree as it is when each run starts, so runs started from a tree with
    uncommitted changes get a warning that says what meta.json will record and how to avoid it."""
    from seqmarl import runinfo

    monkeypatch.setattr(runinfo, "source_commit", lambda: commit)
    argv = ["benchmark", "--algos", "mat", "--envs", "smax:3m", "--seeds", "0", "--steps", "1000"]
    assert main([*argv, "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    if commit.endswith("-dirty"):
        assert "uncommitted changes (abc1234-dirty)" in out and "git worktree add" in out
    else:
        assert "uncommitted" not in out


def test_run_states_from_the_run_directory(tmp_path):
    spec = build_spec(_tiny_spec(tmp_path))
    runs = plan_runs(spec)
    assert [r.run_dir.relative_to(tmp_path).as_posix() for r in runs] == [
        "smax/3m/mat/seed0",
        "smax/3m/mappo/seed0",
        "smax/3m/mat/seed1",
        "smax/3m/mappo/seed1",
    ]
    run = runs[0]
    assert run.state() == "fresh"
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "metrics.csv").write_text("step\n")
    assert run.state() == "fresh"  # started, but nothing to continue from
    (run.run_dir / "checkpoints").mkdir()
    (run.run_dir / "checkpoints" / "step_000000000040.pt").write_bytes(b"")
    assert run.state() == "resume"
    (run.run_dir / "result.json").write_text('{"env": ')  # a writer killed half-way
    assert run.state() == "resume"
    (run.run_dir / "result.json").write_text("{}")
    assert run.state() == "evaluate"
    (run.run_dir / "absolute.json").write_text("{}")
    assert run.state() == "finished"


@pytest.mark.parametrize("which", ["best", "last", "average:3"])
def test_absolute_evaluation_of_the_chosen_checkpoint(which, tmp_path):
    spec = build_spec(_tiny_spec(tmp_path, eval={"episodes": 2, "absolute_checkpoint": which}))
    run = plan_runs(spec)[0]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.yaml").write_text("run: {eval_episodes: 2}\n")
    (run.run_dir / "result.json").write_text("{}")
    (run.run_dir / "best.pt").write_bytes(b"")
    *average, absolute = _stages(run, spec)  # trained: only the absolute evaluation (and any average) is left
    argv = absolute()
    target = argv[argv.index("eval") + 1]
    expected = {"best": run.run_dir / "best.pt", "last": run.run_dir, "average:3": run.run_dir / "average.pt"}
    assert target == str(expected[which])  # a directory means its newest checkpoint
    assert argv[argv.index("--episodes") + 1] == "20"  # absolute_factor 10 (default) x 2
    if which.startswith("average"):  # first the average of the 3 newest checkpoints, written there
        (first,) = average
        assert first()[3:] == ["average", str(run.run_dir), "--last", "3", "--out", target]
    else:
        assert average == []


def test_a_benchmark_evaluates_the_averaged_weights(tmp_path):
    out_dir = tmp_path / "bench"
    data = _tiny_spec(out_dir, workers=1, algos=["mappo"], seeds=[0])
    data["eval"] = {**data["eval"], "absolute_checkpoint": "average:2"}
    out = _finish(
        _benchmark(_write(tmp_path / "spec.yaml", data), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    )
    (run,) = plan_runs(build_spec(data))
    assert run.state() == "finished", out
    averaged = load_checkpoint(run.run_dir / "average.pt")
    assert averaged["averaged_steps"] == [80, 120]  # checkpoints every 40 of 120 steps; the newest 2
    log = (run.run_dir / "stdout.log").read_text()
    assert "averaged the weights of 2 checkpoints" in log and f"eval {run.run_dir / 'average.pt'}" in log
    assert len(json.loads((run.run_dir / "absolute.json").read_text())["episodes"]["win"]) == 4


def test_a_run_directory_from_another_spec_is_refused(tmp_path, capsys):
    spec = build_spec(_tiny_spec(tmp_path))
    run = plan_runs(spec)[0]
    run.run_dir.mkdir(parents=True)
    for name in ("result.json", "absolute.json"):
        (run.run_dir / name).write_text("{}")
    (run.run_dir / "benchmark_run.json").write_text(json.dumps({"train_args": ["--steps", "999"]}))
    assert main(["benchmark", str(_write(tmp_path / "spec.yaml", _tiny_spec(tmp_path)))]) == 2
    assert "was made with other settings" in capsys.readouterr().err


def test_a_slice_of_a_spec_file_drops_what_does_not_apply(tmp_path, capsys):
    """--envs/--algos on a spec file: its excludes, thresholds and per-env budgets naming other envs or
    algos are dropped (they were errors before); a typo in the file itself is still an error."""
    spec = _tiny_spec(
        tmp_path,
        envs=["smax:3m", "smax:2s3z"],
        algos=["mat", "mappo", "qmix"],
        exclude=["smax:2s3z qmix"],
        thresholds={"smax:3m": 0.9, "smax:2s3z": 0.9},
        steps={"smax:3m": 120, "smax:2s3z": 240},
    )
    path = _write(tmp_path / "spec.yaml", spec)
    assert main(["benchmark", str(path), "--envs", "smax:2s3z", "--algos", "mat,mappo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 runs (2 algos x 1 envs x 2 seeds)" in out and "--steps 240" in out
    assert main(["benchmark", str(path), "--algos", "qmix", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "smax:3m qmix seed0" in out and "smax:2s3z qmix" not in out  # the exclude still applies
    spec["exclude"] = ["smax:8m qmix"]
    assert main(["benchmark", str(_write(tmp_path / "typo.yaml", spec)), "--dry-run"]) == 2


def test_shipped_specs_plan(capsys):
    assert main(["benchmark", str(SPECS / "smax_suite.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "50 runs (2 algos x 5 envs x 5 seeds)" in out
    assert main(["benchmark", str(SPECS / "algorithms.yaml"), "--dry-run"]) == 0


def _benchmark(spec: Path, **kwargs) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(Path(seqmarl.__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "seqmarl.cli", "benchmark", str(spec)]
    return subprocess.Popen(command, env=environment, text=True, **kwargs)


def _finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=1200)
    assert process.returncode == 0, out
    return out


@pytest.mark.slow
def test_killed_benchmark_reruns_only_the_remaining_work(tmp_path):
    out_dir = tmp_path / "bench"
    spec = _write(tmp_path / "spec.yaml", _tiny_spec(out_dir))
    runs = plan_runs(build_spec(_tiny_spec(out_dir)))

    # 1. start, and kill -9 the benchmark as soon as the first run is finished
    log = open(tmp_path / "first.log", "w")
    process = _benchmark(spec, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 900
    while time.time() < deadline and not any((r.run_dir / "absolute.json").exists() for r in runs):
        assert process.poll() is None, (tmp_path / "first.log").read_text()
        time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    log.close()
    finished = [r for r in runs if (r.run_dir / "absolute.json").exists()]
    assert finished and len(finished) < len(runs), (tmp_path / "first.log").read_text()
    mtimes = {r.run_dir: (r.run_dir / "result.json").stat().st_mtime_ns for r in finished}

    # 2. the same command again: waits for the killed benchmark's workers (they write checkpoints on
    # SIGTERM from the kernel), skips the finished runs, continues or restarts the others
    with open(out_dir / ".benchmark.lock") as lock:  # the orphaned workers hold it until they exit
        fcntl.flock(lock, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_UN)
    partial = {r.run_dir: r for r in runs if r.state() == "resume"}
    resumed_from = {d: load_checkpoint(d)["step"] for d in partial}
    out = _finish(_benchmark(spec, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for r in finished:
        assert f"skip {r.label} (finished)" in out
        assert (r.run_dir / "result.json").stat().st_mtime_ns == mtimes[r.run_dir]
    for r in runs:
        assert r.state() == "finished", out
        for name in (
            "config.yaml",
            "meta.json",
            "metrics.csv",
            "best.pt",
            "stdout.log",
            "benchmark_run.json",
        ):
            assert (r.run_dir / name).is_file(), (r.run_dir, name)
        absolute = json.loads((r.run_dir / "absolute.json").read_text())
        assert len(absolute["episodes"]["win"]) == 4  # absolute_factor 2 x 2 episodes
        assert json.loads((r.run_dir / "meta.json").read_text())["seed"] == r.seed
    assert out.count(" done ") == len(runs) - len(finished)
    report = json.loads((out_dir / "report" / "marl_eval.json").read_text())
    assert sorted(report["smax"]["3m"]) == ["mappo", "mat"]
    assert sorted(report["smax"]["3m"]["mat"]["seed_1"]) == [
        "absolute_metrics",
        "step_0",
        "step_1",
        "step_2",
        "step_3",
    ]
    assert (out_dir / "report" / "curves_smax_3m.png").is_file()

    # 3. and again: nothing left to do, nothing rewritten
    before = {r.run_dir: (r.run_dir / "result.json").stat().st_mtime_ns for r in runs}
    out = _finish(_benchmark(spec, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    assert out.count("(finished)") == len(runs) and " start " not in out
    assert before == {r.run_dir: (r.run_dir / "result.json").stat().st_mtime_ns for r in runs}
    for run_dir, step in resumed_from.items():  # continued where the killed worker left it
        log = (run_dir / "stdout.log").read_text()
        assert "train --resume" in log and f"from its checkpoint at step {step:,}" in log, log
        steps = [int(line.split(",")[0]) for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
        assert steps == sorted(set(steps))  # every logged step once: nothing redone twice, nothing lost


@pytest.mark.slow
def test_sigterm_is_forwarded_and_the_same_command_resumes(tmp_path):
    out_dir = tmp_path / "bench"
    spec_data = _tiny_spec(out_dir, workers=1, algos=["mappo"], seeds=[0], steps=400)
    spec = _write(tmp_path / "spec.yaml", spec_data)
    (run,) = plan_runs(build_spec(spec_data))

    process = _benchmark(spec, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and not list((run.run_dir / "checkpoints").glob("step_*.pt")):
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert "to resume, run the same command again" in err and "Traceback" not in err
    assert "interrupted: checkpoint for step" in (run.run_dir / "stdout.log").read_text()
    assert run.state() == "resume"

    # The same command finishes the run, continuing from its checkpoint.
    out = _finish(_benchmark(spec, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    assert f"start {run.label} (resume)" in out, out
    assert run.state() == "finished"
    assert json.loads((run.run_dir / "result.json").read_text())["steps"] == 400
