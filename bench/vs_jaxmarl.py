"""Wall-clock time to a win rate on SMAX: seqmarl against JaxMARL's own MAPPO baseline, on one machine, in
one run.

    python bench/vs_jaxmarl.py --jaxmarl-src DIR [--env smax:3m] [--steps 2e6] [--seeds 0] [--algos mappo]
                               [--threads 2] [--json OUT] [--baseline FILE]

REFERENCE.md 4 names the peer: JaxMARL's recurrent MAPPO on SMAX, its whole training loop compiled with
`jax.jit`, ~4,200 env steps/s on this machine kind. Users compare libraries by how soon a run reaches a
given win rate on the hardware they have, so this script runs both, one after the other, as child
processes with the whole machine each, and reads from their logs:

- wall seconds from launching the child to its exit, env steps/s, env steps per CPU second (the child's
  user + system time, all threads: robust to other load on the machine);
- seconds from launch to the first logged row where the training win rate, averaged over the rows of the
  last `--window` env steps, reaches each `--train-thresholds` value (the same rule for both; training
  win rates are what JaxMARL's baseline logs);
- for seqmarl, seconds to the first evaluation (greedy, 32 episodes every 50k steps) at or above
  `--eval-threshold`. JaxMARL's baseline does not evaluate, so it has no such column.

Times include imports, JAX compilation and (for seqmarl) its periodic evaluations.

DIR is a checkout of FLAIROx/JaxMARL. The child imports `baselines/MAPPO/mappo_rnn_smax.py` and its SMAX
config from it and changes only the map, the step budget and the seed (copying nothing). It needs
`distrax`, `hydra-core` and `omegaconf`, and a TensorFlow Probability that works with the installed jax
(`tfp-nightly` for jax 0.10); wandb is not needed: the child puts a recorder in its place, so the
baseline's `wandb.log` calls write the rows this script reads. Both use SMAX's HeuristicEnemySMAX with
the same settings (JaxMARL's config: see_enemy_actions, walls_cause_death, attack_mode "closest", which are
also SMAX's defaults that seqmarl's adapter uses). Without `--jaxmarl-src` only seqmarl's runs are made.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import common

JAXMARL_SCRIPT = Path("baselines") / "MAPPO" / "mappo_rnn_smax.py"
JAXMARL_CONFIG = Path("baselines") / "MAPPO" / "config" / "mappo_homogenous_rnn_smax.yaml"
POLL_SECONDS = 0.5  # how often seqmarl's metrics.csv is read while it trains


def smoothed_first_time(
    rows: list[dict[str, float]], key: str, threshold: float, window: float
) -> float | None:
    """Seconds of the first row whose `key`, averaged over the rows in the last `window` env steps
    (itself included), is >= threshold. rows: dicts with "step", "seconds" and `key` (None: not logged)."""
    logged = [r for r in rows if r.get(key) is not None]
    for i, row in enumerate(logged):
        recent = [r[key] for r in logged[: i + 1] if r["step"] > row["step"] - window]
        if sum(recent) / len(recent) >= threshold:
            return row["seconds"]
    return None


def final_mean(rows: list[dict[str, float]], key: str, fraction: float = 0.1) -> float | None:
    """Mean of `key` over the rows in the last `fraction` of the run's steps."""
    logged = [r for r in rows if r.get(key) is not None]
    if not logged:
        return None
    last = logged[-1]["step"]
    recent = [r[key] for r in logged if r["step"] >= last * (1 - fraction)]
    return sum(recent) / len(recent)


def run_child(command: list[str], env: dict[str, str], poll: Any = None) -> tuple[float, float]:
    """Run `command`; return its wall seconds and CPU seconds (user + system, all threads); exit with its
    output if it fails. `poll(seconds_since_launch)` is called every POLL_SECONDS while it runs."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    with tempfile.TemporaryFile(mode="w+") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
        while child.poll() is None:
            if poll is not None:
                poll(time.time() - start)
            time.sleep(POLL_SECONDS)
        wall = time.time() - start
        if poll is not None:
            poll(wall)
        log.seek(0)
        output = log.read()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if child.returncode != 0:
        raise SystemExit(f"child failed ({child.returncode}): {' '.join(command)}\n{output[-3000:]}")
    return wall, cpu


def run_seqmarl(algo: str, env_name: str, steps: int, seed: int, threads: int, quick: bool) -> dict[str, Any]:
    """`seqmarl train` as a child; its metrics.csv rows get the time they appeared, from launch."""
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as out_dir:
        metrics = Path(out_dir) / "run" / "metrics.csv"
        command = [sys.executable, "-m", "seqmarl.cli", "train", "--algo", algo, "--env", env_name]
        command += ["--seed", str(seed), "--steps", str(steps), "--out-dir", out_dir, "--run-name", "run"]
        settings = [f"run.threads={threads}", "run.tensorboard=false"]
        if quick:
            settings += ["run.eval_every=3200", "run.eval_episodes=2", "env.num_envs=4", "env.eval_envs=2"]
        command += ["--no-progress", *[arg for setting in settings for arg in ("--set", setting)]]

        def poll(seconds: float) -> None:
            if not metrics.exists():
                return
            with open(metrics, newline="") as f:
                table = list(csv.DictReader(f))
            for line in table[len(rows) :]:
                if line.get("step") in (None, "") or line.get("wall_time") in (None, ""):
                    break  # a row still being written: read it next time
                rows.append(
                    {
                        "step": float(line["step"]),
                        "seconds": seconds,
                        "train_win": float(line["charts/win_rate"]) if line["charts/win_rate"] else None,
                        "eval_win": float(line["eval/win_rate"]) if line["eval/win_rate"] else None,
                    }
                )

        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(common.REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        }
        wall, cpu = run_child(command, env, poll)
    return {"library": "seqmarl", "algo": algo, "wall_s": wall, "cpu_s": cpu, "rows": rows}


def run_jaxmarl(src: Path, map_name: str, steps: int, seed: int, quick: bool) -> dict[str, Any]:
    """JaxMARL's MAPPO baseline in a child (this file, --jaxmarl-child); it writes a JSON line per update."""
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "rows.jsonl"
        command = [sys.executable, __file__, "--jaxmarl-child", str(src), "--map", map_name]
        command += ["--child-steps", str(steps), "--child-seed", str(seed), "--record", str(record)]
        if quick:
            command.append("--quick")
        start = time.time()
        wall, cpu = run_child(command, dict(os.environ))
        rows = []
        for line in record.read_text().splitlines():
            entry = json.loads(line)
            rows.append(
                {
                    "step": entry["steps_done"],
                    "seconds": entry["time"] - start,
                    "train_win": entry["win_rate"],
                    "eval_win": None,
                }
            )
    return {"library": "jaxmarl", "algo": "mappo (recurrent)", "wall_s": wall, "cpu_s": cpu, "rows": rows}


def jaxmarl_child(args: argparse.Namespace) -> None:
    """Runs inside the child: JaxMARL's own make_train with its own SMAX config, logging to a file."""
    import yaml

    src = Path(args.jaxmarl_child).resolve()  # main() checked that both files are there
    config = yaml.safe_load((src / JAXMARL_CONFIG).read_text())
    config.update(MAP_NAME=args.map, TOTAL_TIMESTEPS=args.child_steps, SEED=args.child_seed)
    if args.quick:
        config.update(NUM_ENVS=8, NUM_STEPS=16)
    batch = config["NUM_ENVS"] * config["NUM_STEPS"]  # env steps per update

    with open(args.record, "w") as record:

        def log(values: dict, **_: Any) -> None:  # stands in for wandb.log, called once per update
            entry = {"time": time.time(), "steps_done": int(values["env_step"]) + batch}
            entry["win_rate"] = float(values["win_rate"])
            if entry["win_rate"] != entry["win_rate"]:  # NaN: no episode ended in this update
                entry["win_rate"] = None
            record.write(json.dumps(entry) + "\n")
            record.flush()

        sys.modules["wandb"] = types.SimpleNamespace(log=log, init=lambda *a, **k: None)
        sys.path.insert(0, str((src / JAXMARL_SCRIPT).parent))
        import jax
        import mappo_rnn_smax  # JaxMARL's baseline, imported from the checkout

        train = jax.jit(mappo_rnn_smax.make_train(config))
        jax.block_until_ready(train(jax.random.PRNGKey(args.child_seed)))


def jaxmarl_commit(src: Path) -> str:
    try:
        result = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def summarise(
    run: dict[str, Any], env_name: str, seed: int, steps: int, args: argparse.Namespace
) -> dict[str, Any]:
    rows = run["rows"]
    done = rows[-1]["step"] if rows else steps
    row: dict[str, Any] = {
        "name": f"{env_name}/{run['library']}-{run['algo'].split()[0]}/seed{seed}",
        "library": run["library"],
        "algo": run["algo"],
        "seed": seed,
        "steps": int(done),
        "wall_s": run["wall_s"],
        "cpu_s": run["cpu_s"],
        "steps_per_s": done / run["wall_s"],
        "steps_per_cpu_s": done / run["cpu_s"],
        "first_row_s": rows[0]["seconds"] if rows else None,
        "final_train_win": final_mean(rows, "train_win"),
        "eval_win_final": next((r["eval_win"] for r in reversed(rows) if r["eval_win"] is not None), None),
        "seconds_to_eval_threshold": next(
            (
                r["seconds"]
                for r in rows
                if r["eval_win"] is not None and r["eval_win"] >= args.eval_threshold
            ),
            None,
        ),
    }
    for threshold in args.train_thresholds:
        row[f"seconds_to_train_{threshold:g}"] = smoothed_first_time(
            rows, "train_win", threshold, args.window
        )
    row["curve"] = [[r["step"], round(r["seconds"], 2), r["train_win"], r["eval_win"]] for r in rows]
    return row


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--jaxmarl-src", type=Path, help="a checkout of FLAIROx/JaxMARL (without it: seqmarl only)"
    )
    p.add_argument("--jaxmarl-commit", default="unknown", help="its commit, if DIR is not a git checkout")
    p.add_argument("--env", default="smax:3m", help="an SMAX task, e.g. smax:3m")
    p.add_argument("--steps", type=float, default=2e6, help="env steps per run (both libraries)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--algos", nargs="+", default=["mappo"], help="seqmarl algorithms to run")
    p.add_argument("--train-thresholds", type=float, nargs="+", default=[0.5, 0.8])
    p.add_argument("--eval-threshold", type=float, default=0.95)
    p.add_argument(
        "--window", type=float, default=1e5, help="env steps the training win rate is averaged over"
    )
    # the child's own flags (internal)
    p.add_argument("--jaxmarl-child", help=argparse.SUPPRESS)
    p.add_argument("--map", help=argparse.SUPPRESS)
    p.add_argument("--child-steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.jaxmarl_child:
        jaxmarl_child(args)
        return
    if not args.env.startswith("smax:"):
        p.error(f"--env {args.env}: JaxMARL's MAPPO baseline runs SMAX tasks only (smax:MAP)")
    if args.jaxmarl_src is not None:
        for needed in (JAXMARL_SCRIPT, JAXMARL_CONFIG):
            if not (args.jaxmarl_src / needed).exists():
                p.error(f"--jaxmarl-src {args.jaxmarl_src}: {needed} not found (a JaxMARL checkout?)")
    device = common.setup(args)
    threads = args.threads or os.cpu_count() or 1
    steps = 6400 if args.quick else int(args.steps)
    jax_steps = 512 if args.quick else int(args.steps)

    rows = []
    for seed in args.seeds:
        runs = [run_seqmarl(algo, args.env, steps, seed, threads, args.quick) for algo in args.algos]
        if args.jaxmarl_src is None:
            print("--jaxmarl-src not given: seqmarl's runs only", file=sys.stderr)
        else:
            runs.append(run_jaxmarl(args.jaxmarl_src, args.env.split(":", 1)[1], jax_steps, seed, args.quick))
        for run in runs:
            rows.append(summarise(run, args.env, seed, steps, args))
            print(f"done: {rows[-1]['name']} in {rows[-1]['wall_s']:.0f} s", file=sys.stderr, flush=True)

    columns = [
        ("name", "run", ""),
        ("steps", "env steps", ","),
        ("wall_s", "wall s", ".0f"),
        ("steps_per_s", "env steps/s", ",.0f"),
        ("steps_per_cpu_s", "per CPU s", ",.0f"),
        ("first_row_s", "first row s", ".0f"),
        *[(f"seconds_to_train_{t:g}", f"s to train win {t:g}", ".0f") for t in args.train_thresholds],
        ("final_train_win", "train win, last 10%", ".3f"),
        ("seconds_to_eval_threshold", f"s to eval win {args.eval_threshold:g}", ".0f"),
        ("eval_win_final", "final eval win", ".3f"),
    ]
    common.print_table(rows, columns)
    settings = {
        k: v for k, v in vars(args).items() if not k.startswith(("child", "jaxmarl_child", "map", "record"))
    }
    settings["jaxmarl_src"] = str(args.jaxmarl_src) if args.jaxmarl_src else None
    if args.jaxmarl_src is not None:
        settings["jaxmarl_commit"] = jaxmarl_commit(args.jaxmarl_src) or args.jaxmarl_commit
    payload = {"machine": common.machine(device), "settings": settings, "rows": rows}
    common.write_json(args.json, payload)
    if not common.compare_with_baseline(rows, args.baseline, "steps_per_cpu_s", higher_is_better=True):
        sys.exit(1)


if __name__ == "__main__":
    main()
