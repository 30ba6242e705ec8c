"""`seqmarl benchmark`: algorithms x tasks x seeds, in N worker processes, resumable (issue 5).

A benchmark is a spec (YAML file and/or flags) expanded into runs. Each run lives in
OUT/<family>/<task>/<algo>/seed<k>/ and is finished when it holds result.json (training, from
`seqmarl train`) and absolute.json (the final evaluation of best.pt, or of the last checkpoint with
`eval: {absolute_checkpoint: last}`, or of the last K checkpoints' weights averaged with `average:K`
(`seqmarl average`), with `absolute_factor` x the periodic evaluation's episodes, from `seqmarl eval`).
Re-running the same command looks at every run directory and does only what is missing:

    result.json + absolute.json   -> skipped
    result.json only              -> absolute evaluation only
    a checkpoint, no result.json  -> `seqmarl train --resume RUN_DIR`: continues exactly where the
                                     newest intact checkpoint left it
    anything else                 -> the partial directory is deleted and the run starts afresh

Workers are `python -m seqmarl.cli` subprocesses, started in their own session (so a Ctrl-C at the
terminal reaches only this process, which forwards exactly one SIGTERM; the trainer turns it into a
checkpoint) and told by the kernel to stop if this process dies (Linux). They inherit the lock on
OUT/.benchmark.lock, so a re-run after `kill -9` waits until the orphaned workers have written their
checkpoints instead of racing them.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from seqmarl import runinfo
from seqmarl.benchmark_spec import BenchmarkSpec
from seqmarl.errors import UserError
from seqmarl.interrupt import STOP_SIGNALS

ABSOLUTE_EVAL_SEED = 777  # fixed, and distinct from the training and periodic-evaluation seeds


@dataclass
class Run:
    """One (env, algo, seed) of a benchmark and the commands still needed to finish it."""

    env: str
    algo: str
    seed: int
    steps: int
    run_dir: Path
    train_args: list[str]  # `seqmarl train` arguments of a fresh start (also the run's identity)

    @property
    def label(self) -> str:
        return f"{self.env} {self.algo} seed{self.seed}"

    def state(self) -> str:
        """finished | evaluate (trained, no absolute.json) | resume | fresh."""
        if _valid_json(self.run_dir / "result.json"):
            return "finished" if _valid_json(self.run_dir / "absolute.json") else "evaluate"
        if any((self.run_dir / "checkpoints").glob("step_*.pt")):
            return "resume"
        return "fresh"


def _valid_json(path: Path) -> bool:
    """A file a killed writer left half-written does not count as finished."""
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


def plan_runs(spec: BenchmarkSpec) -> list[Run]:
    """Seed-major order, so that a part-finished benchmark already compares every algorithm."""
    runs = []
    for seed in spec.seeds:
        for env in spec.envs:
            family, _, task = env.partition(":")
            for algo in spec.algos:
                if (env, algo) in spec.exclude:
                    continue
                parent = spec.out / family / task / algo
                args = ["--algo", algo, "--env", env, "--seed", str(seed), "--steps", str(spec.steps[env])]
                args += ["--out-dir", str(parent), "--run-name", f"seed{seed}", "--no-progress"]
                args += ["--set", f"run.threads={spec.threads_per_worker}"]
                if spec.eval.every is not None:
                    args += ["--set", f"run.eval_every={spec.eval.every}"]
                if spec.eval.episodes is not None:
                    args += ["--set", f"run.eval_episodes={spec.eval.episodes}"]
                for assignment in spec.overrides:
                    args += ["--set", assignment]
                runs.append(Run(env, algo, seed, spec.steps[env], parent / f"seed{seed}", args))
    return runs


def check_run_configs(spec: BenchmarkSpec, runs: list[Run], states: dict[int, str]) -> None:
    """Before anything starts: resolve the config each unfinished run trains with, as `seqmarl train`
    will (its preset, then the spec's settings), or read the one a started run saved. A bad `set:` key
    or value, or an `average:K` beyond the checkpoints a run keeps, then fails in one line here rather
    than in every worker."""
    from seqmarl.cli import train_config
    from seqmarl.config import config_from_dict

    average = spec.eval.average_last
    for run in runs:
        state = states[id(run)]
        if state == "finished":
            continue
        saved = run.run_dir / "config.yaml"
        try:
            if state != "fresh" and saved.is_file():  # a started run continues with what it saved
                keep = config_from_dict(yaml.safe_load(saved.read_text()) or {}).run.keep_checkpoints
            else:
                keep = train_config(run.train_args).run.keep_checkpoints
        except UserError as e:
            raise UserError(f"{run.label}: {e}") from None
        if average is not None and average > keep:
            raise UserError(
                f"eval.absolute_checkpoint: average:{average} averages {average} checkpoints but "
                f"{run.label} keeps {keep}; add set: {{run.keep_checkpoints: {average}}} (and a "
                "run.checkpoint_every that writes that many)"
            )


def _check_identity(run: Run) -> None:
    """A run directory made by a different spec (other budget, other overrides) is never reused."""
    path = run.run_dir / "benchmark_run.json"
    if path.is_file() and json.loads(path.read_text()).get("train_args") != run.train_args:
        raise UserError(
            f"{run.run_dir} was made with other settings (see its benchmark_run.json); "
            "use another --out or delete that directory"
        )


def _absolute_episodes(run: Run, factor: int) -> int:
    config = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    return factor * int(config["run"]["eval_episodes"])


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "seqmarl.cli", *args]


def _stages(run: Run, spec: BenchmarkSpec) -> list[Any]:
    """What is left to do for a run: a list of callables, each returning one worker's argv."""
    state = run.state()
    stages: list[Any] = []
    if state == "fresh":
        stages.append(lambda: _command(["train", *run.train_args]))
    elif state == "resume":
        stages.append(lambda: _command(["train", "--resume", str(run.run_dir)]))
    if state != "finished":
        average = run.run_dir / "average.pt"
        if spec.eval.average_last is not None:  # the evaluated weights: the last K checkpoints averaged
            last = ["--last", str(spec.eval.average_last), "--out", str(average)]
            stages.append(lambda: _command(["average", str(run.run_dir), *last]))

        def absolute() -> list[str]:
            best = run.run_dir / "best.pt"
            use_best = spec.eval.absolute_checkpoint == "best" and best.is_file()  # (older runs have none)
            target = best if use_best else run.run_dir  # a run directory means its newest checkpoint
            target = average if spec.eval.average_last is not None else target
            episodes = _absolute_episodes(run, spec.eval.absolute_factor)
            args = ["eval", str(target), "--episodes", str(episodes), "--seed", str(ABSOLUTE_EVAL_SEED)]
            return _command([*args, "--json", str(run.run_dir / "absolute.json")])

        stages.append(absolute)
    return stages


def _worker_environment(threads: int) -> dict[str, str]:
    """Workers import this very seqmarl (not whatever is installed) and use `threads` threads."""
    import seqmarl

    source = str(Path(seqmarl.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the worker between fork and exec: SIGTERM it when the benchmark process dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _outcome(run: Run) -> str:
    final = json.loads((run.run_dir / "result.json").read_text())["final_eval"]
    absolute = json.loads((run.run_dir / "absolute.json").read_text())
    if "eval/win_rate" in final:
        return f"eval win {final['eval/win_rate']:.2f}, absolute win {absolute['eval/win_rate']:.2f}"
    return f"eval return {final['eval/episodic_return']:.1f}, absolute {absolute['eval/episodic_return']:.1f}"


class _Interrupted(Exception):
    pass


def run_benchmark(spec: BenchmarkSpec, command: str, dry_run: bool = False) -> int:
    """Run every unfinished run; returns the number of failed runs. Raises KeyboardInterrupt after
    forwarding a Ctrl-C / SIGTERM to the workers and waiting for their checkpoints."""
    import fcntl

    runs = plan_runs(spec)
    cores = os.cpu_count() or 1
    lock = None
    if not dry_run:  # taken before looking at the run directories: a killed benchmark's workers may
        spec.out.mkdir(parents=True, exist_ok=True)  # still be writing their checkpoints
        lock = open(spec.out / ".benchmark.lock", "w")  # held (locked) for the life of the process
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"waiting for {spec.out}/.benchmark.lock: another benchmark, or the workers of a killed "
                "one, still run there",
                flush=True,
            )
            fcntl.flock(lock, fcntl.LOCK_EX)
    total = len(runs)
    states = {id(run): run.state() for run in runs}
    check_run_configs(spec, runs, states)
    counts = {
        s: sum(1 for r in runs if states[id(r)] == s) for s in ("finished", "evaluate", "resume", "fresh")
    }
    print(
        f"benchmark: {total} runs ({len(spec.algos)} algos x {len(spec.envs)} envs x "
        f"{len(spec.seeds)} seeds{f' - {len(spec.exclude)} excluded pairs' if spec.exclude else ''}) "
        f"in {spec.out}: {counts['finished']} finished, {counts['evaluate']} to evaluate, "
        f"{counts['resume']} to resume, {counts['fresh']} to start; {spec.workers} workers x "
        f"{spec.threads_per_worker} threads on {cores} cores",
        flush=True,
    )
    commit = runinfo.source_commit()
    if commit.endswith("-dirty") and any(states[id(r)] != "finished" for r in runs):
        # Each worker imports the source tree as it is when its run starts: edits made while the
        # benchmark runs end up in later runs, and meta.json can only say "-dirty".
        print(
            f"warning: {runinfo.SOURCE_ROOT} has uncommitted changes ({commit}): runs started now record "
            f"'{commit}' as their code, and each later run imports the tree as it is then. To run a "
            "commit while you keep editing, run from a separate checkout "
            "(git worktree add ../seqmarl-bench HEAD)",
            flush=True,
        )
    if spec.workers * spec.threads_per_worker > cores:
        print(
            f"warning: {spec.workers} workers x {spec.threads_per_worker} threads > {cores} cores", flush=True
        )
    if dry_run:
        for run in runs:
            state = states[id(run)]
            first = _stages(run, spec)[0]()[3:] if state in ("fresh", "resume") else []
            print(f"  {state:8s} {run.label}" + (f": seqmarl {shlex.join(first)}" if first else ""))
        return 0

    done = 0
    failed: list[Run] = []
    queue: deque[tuple[Run, list[Any]]] = deque()
    for run in runs:
        if states[id(run)] == "fresh" and run.run_dir.exists():
            print(f"removing {run.run_dir} (started, but no checkpoint to continue from)", flush=True)
            shutil.rmtree(run.run_dir)
        _check_identity(run)
        if states[id(run)] == "finished":
            done += 1
            print(f"[{done}/{total}] skip {run.label} (finished)", flush=True)
        else:
            queue.append((run, _stages(run, spec)))

    running: dict[subprocess.Popen, tuple[Run, list[Any], float, Any]] = {}
    environment = _worker_environment(spec.threads_per_worker)
    parent_pid = os.getpid()

    def start(run: Run, stages: list[Any], started: float) -> None:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "benchmark_run.json").write_text(json.dumps({"train_args": run.train_args}, indent=2))
        argv = stages[0]()
        log = open(run.run_dir / "stdout.log", "a")  # closed when the worker ends
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,
            pass_fds=(lock.fileno(),),  # the lock outlives this process until the workers end
            preexec_fn=lambda: _die_with_parent(parent_pid),
        )
        running[process] = (run, stages[1:], started, log)

    def stop(signum: int, frame: object) -> None:
        raise _Interrupted

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    begin = time.perf_counter()
    try:
        while queue or running:
            while queue and len(running) < spec.workers:
                run, stages = queue.popleft()
                print(f"[{done}/{total}] start {run.label} ({states[id(run)]})", flush=True)
                start(run, stages, time.perf_counter())
            time.sleep(0.2)
            for process in [p for p in running if p.poll() is not None]:
                run, stages, started, log = running.pop(process)
                log.close()
                if process.returncode != 0:
                    failed.append(run)
                    done += 1
                    print(
                        f"[{done}/{total}] FAILED {run.label} (exit {process.returncode}); "
                        f"see {run.run_dir}/stdout.log",
                        flush=True,
                    )
                elif stages:
                    states[id(run)] = "evaluate"
                    start(run, stages, started)
                else:
                    done += 1
                    seconds = time.perf_counter() - started
                    print(
                        f"[{done}/{total}] done {run.label} in {seconds:.0f} s: {_outcome(run)}", flush=True
                    )
    except _Interrupted:
        for s, handler in previous.items():
            signal.signal(s, handler)
        print(f"benchmark: interrupted; stopping {len(running)} workers (they save checkpoints)", flush=True)
        for process in running:
            process.send_signal(signal.SIGTERM)
        for process in running:
            try:
                process.wait(timeout=300)
            except subprocess.TimeoutExpired:
                process.kill()
        print(
            f"benchmark: {done}/{total} runs finished; to resume, run the same command again:\n  {command}",
            file=sys.stderr,
            flush=True,
        )
        raise KeyboardInterrupt from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(
        f"benchmark: {total - len(failed)}/{total} runs finished ({len(failed)} failed) "
        f"in {time.perf_counter() - begin:.0f} s",
        flush=True,
    )
    return len(failed)
