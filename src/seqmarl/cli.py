"""`seqmarl train | eval | select | average | plot | report | benchmark`.

User errors are printed as one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seqmarl.errors import TrainingFault, UserError
from seqmarl.interrupt import STOP_SIGNALS, surviving_output

if TYPE_CHECKING:
    from seqmarl.config import TrainConfig


class _Parser(argparse.ArgumentParser):
    """argparse prints its usage and exits 2; we keep the exit code but print one line only."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # self.prog: "seqmarl" for the top-level parser (unknown arguments), "seqmarl train" for a command
        print(f"seqmarl: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="seqmarl", description="Multi-Agent Transformer and friends.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train an algorithm on a task")
    train.add_argument(
        "--algo", help="algorithm: mat (default), mat_dec, mappo, ippo, happo, qmix (discrete actions only)"
    )
    train.add_argument("--env", help="task, FAMILY:TASK (default smax:3m; e.g. mamujoco:HalfCheetah-6x1)")
    train.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue this run from its newest checkpoint, with its own config "
        "(only --steps, --device, --no-progress may be added)",
    )
    train.add_argument("--steps", type=float, help="env steps to train for (overrides the preset)")
    train.add_argument("--seed", type=int, help="random seed")
    train.add_argument("--num-envs", type=int, help="parallel training environments")
    train.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    train.add_argument("--out-dir", help="parent folder of run directories (default runs/)")
    train.add_argument("--run-name", help="run directory name")
    train.add_argument("--config", action="append", default=[], help="YAML file of overrides (repeatable)")
    train.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="one override (repeatable)"
    )
    train.add_argument(
        "--no-preset", action="store_true", help="start from library defaults, not the task preset"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--plot", default="curve.png", help="learning-curve file written in the run directory")

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint (file or run directory)")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--episodes", type=int, default=32)
    evaluate.add_argument("--seed", type=int, default=12345)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--stochastic", action="store_true", help="sample actions instead of greedy/mean")
    evaluate.add_argument("--json", type=Path, help="also write per-episode results to this JSON file")

    select = commands.add_parser(
        "select",
        help="evaluate every kept checkpoint of a run, choose the best, check it on fresh episodes",
    )
    select.add_argument("run_dir", type=Path)
    select.add_argument("--episodes", type=int, default=320, help="episodes per checkpoint for the choice")
    select.add_argument("--seed", type=int, default=777, help="evaluation seed of the choice")
    select.add_argument("--test-episodes", type=int, default=640, help="episodes of the held-out check")
    select.add_argument("--test-seed", type=int, default=2026, help="evaluation seed of the check")
    select.add_argument("--device", default="auto")
    select.add_argument("--json", type=Path, help="write every score and the check's episodes here")

    average = commands.add_parser(
        "average",
        help="average the weights of a run's last kept checkpoints into one checkpoint for `seqmarl eval`",
    )
    average.add_argument("run_dir", type=Path)
    average.add_argument(
        "--last", type=int, default=0, help="how many of the newest checkpoints (0: all kept)"
    )
    average.add_argument("--out", type=Path, help="where to write it (default RUN_DIR/average.pt)")

    plot = commands.add_parser("plot", help="learning curves of run directories")
    plot.add_argument("run_dirs", nargs="+", type=Path)
    plot.add_argument("--out", type=Path, default=Path("curves.png"))

    report = commands.add_parser(
        "report", help="IQM/CI and probability-of-improvement tables, curves, marl-eval JSON"
    )
    report.add_argument("roots", nargs="+", type=Path, help="run directories, or folders holding them")
    report.add_argument("--out", type=Path, required=True, help="output folder")
    report.add_argument("--baseline-algo", help="listed first in tables and figures")
    report.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="ENV=VALUE",
        help="report the first step reaching it (repeatable)",
    )

    benchmark = commands.add_parser("benchmark", help="algorithms x tasks x seeds, resumable, in N workers")
    benchmark.add_argument("spec", nargs="?", type=Path, help="YAML spec (flags below override its keys)")
    benchmark.add_argument("--out", help="root of the run directories (default runs/benchmark)")
    benchmark.add_argument("--workers", type=int, help="parallel worker processes")
    benchmark.add_argument("--threads", type=int, help="torch threads per worker (default cores // workers)")
    benchmark.add_argument("--algos", help="comma-separated, e.g. mat,mappo")
    benchmark.add_argument("--envs", help="comma-separated, e.g. smax:3m,smax:2s3z")
    benchmark.add_argument("--seeds", help="e.g. 0-4 or 0,2,5")
    benchmark.add_argument("--steps", help="env steps per run, e.g. 2e6 (for every env)")
    benchmark.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for every run"
    )
    benchmark.add_argument("--dry-run", action="store_true", help="list the runs and what each still needs")
    benchmark.add_argument("--no-report", action="store_true", help="do not write OUT/report at the end")
    return parser


def _parse_thresholds(items: list[str]) -> dict[str, float]:
    thresholds = {}
    for item in items:
        env_name, sep, value = item.rpartition("=")
        try:
            thresholds[env_name] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UserError(f"--threshold expects ENV=VALUE (e.g. smax:3m=0.95), got {item!r}")
    return thresholds


def _cmd_report(args: argparse.Namespace) -> None:
    from seqmarl.report import markdown_table, write_report

    rows = write_report(args.roots, args.out, _parse_thresholds(args.threshold), args.baseline_algo)
    print(markdown_table(rows))
    print(f"wrote {args.out}/table.md, poi.md, curves.png, curves_*.png, marl_eval.json, summary.json")


def _cmd_benchmark(args: argparse.Namespace) -> None:
    from seqmarl.benchmark import plan_runs, run_benchmark
    from seqmarl.benchmark_spec import build_spec, drop_unselected, load_spec_file
    from seqmarl.config import parse_assignment
    from seqmarl.report import write_report

    data = load_spec_file(args.spec) if args.spec is not None else {}
    for flag in ("out", "workers", "threads", "algos", "envs", "seeds", "steps"):
        if getattr(args, flag) is not None:
            data[flag] = getattr(args, flag)
    for assignment in args.set:
        parse_assignment(assignment)
        key, _, value = assignment.partition("=")
        data["set"] = {**(data.get("set") or {}), key.strip(): value}
    if args.spec is not None and (args.envs is not None or args.algos is not None):
        data = drop_unselected(data)  # a slice of the file's benchmark
    spec = build_spec(data)
    failed = run_benchmark(spec, "seqmarl " + shlex.join(args.argv), args.dry_run)
    if failed:
        raise SystemExit(
            f"seqmarl: {failed} runs failed; see their stdout.log, then run the same command again"
        )
    if not args.dry_run and not args.no_report:  # the spec's runs only, not others under the same root
        finished = [run.run_dir for run in plan_runs(spec) if run.state() == "finished"]
        write_report(finished, spec.out / "report", spec.thresholds, spec.algos[0])
        print(f"report: {spec.out / 'report'}/table.md, poi.md, curves.png, curves_*.png, marl_eval.json")


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from seqmarl.config import load_yaml, merge, parse_assignment, preset_for
    from seqmarl.envs.registry import split_env_name

    args.algo = args.algo or "mat"
    args.env = args.env or "smax:3m"
    split_env_name(args.env)  # fail on a bad env name before anything else happens
    overrides: dict[str, Any] = {} if args.no_preset else preset_for(args.env, args.algo)
    for path in args.config:
        overrides = merge(overrides, load_yaml(path))
    flags: dict[str, Any] = {"algo": args.algo, "env": {"name": args.env}, "run": {}}
    if args.steps is not None:
        if args.steps < 1:
            raise UserError(f"--steps must be >= 1, got {args.steps:g}")
        flags["run"]["total_steps"] = int(args.steps)
    for flag, section, key in [
        ("seed", "run", "seed"),
        ("num_envs", "env", "num_envs"),
        ("device", "run", "device"),
        ("out_dir", "run", "out_dir"),
        ("run_name", "run", "run_name"),
    ]:
        if getattr(args, flag) is not None:
            flags[section][key] = getattr(args, flag)
    if args.no_progress:
        flags["run"]["progress"] = False
    overrides = merge(overrides, flags)
    for assignment in args.set:
        overrides = merge(overrides, parse_assignment(assignment))
    return overrides


def _fresh_train_config(args: argparse.Namespace) -> TrainConfig:
    from seqmarl.algos import algorithm_names
    from seqmarl.config import build_config

    args.algo = args.algo or "mat"
    if args.algo not in algorithm_names():
        raise UserError(f"unknown algorithm {args.algo!r}; available: {', '.join(algorithm_names())}")
    return build_config(_train_overrides(args))


def train_config(train_args: list[str]) -> TrainConfig:
    """The config that `seqmarl train TRAIN_ARGS` (a fresh start) would train with, built the same way
    (task and algorithm preset, --config files, flags, --set), without training."""
    return _fresh_train_config(build_parser().parse_args(["train", *train_args]))


def _cmd_train(args: argparse.Namespace) -> None:
    from seqmarl.config import config_from_dict
    from seqmarl.plot import plot_runs
    from seqmarl.train import describe_result, resume, train

    if args.resume is not None:
        given = [
            flag
            for flag, value in [
                ("--algo", args.algo),
                ("--env", args.env),
                ("--seed", args.seed),
                ("--num-envs", args.num_envs),
                ("--out-dir", args.out_dir),
                ("--run-name", args.run_name),
                ("--config", args.config),
                ("--set", args.set),
                ("--no-preset", args.no_preset or None),
            ]
            if value not in (None, [])
        ]
        if given:
            raise UserError(
                f"--resume continues a run with the config it started with; {', '.join(given)} cannot be "
                "combined with it (allowed: --steps, --device, --no-progress)"
            )
        if args.steps is not None and args.steps < 1:
            raise UserError(f"--steps must be >= 1, got {args.steps:g}")
        result = resume(
            args.resume,
            total_steps=None if args.steps is None else int(args.steps),
            device=args.device,
            progress=False if args.no_progress else None,
        )
        config = config_from_dict(_saved_config(result.run_dir))
    else:
        config = _fresh_train_config(args)
        result = train(config)
    curve = plot_runs([result.run_dir], result.run_dir / args.plot)
    print(describe_result(config, result))
    print(f"learning curve: {curve}")


def _saved_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def _cmd_eval(args: argparse.Namespace) -> None:
    from seqmarl.evaluate import evaluate_checkpoint
    from seqmarl.runinfo import select_device

    if args.episodes < 1:
        raise UserError("--episodes must be >= 1")
    result = evaluate_checkpoint(
        args.checkpoint,
        args.episodes,
        args.seed,
        select_device(args.device),
        deterministic=not args.stochastic,
    )
    mode = "stochastic" if args.stochastic else "deterministic"
    print(f"{result.algo} on {result.env}, step {result.step:,}, {args.episodes} {mode} episodes:")
    for name, value in result.summary().items():
        print(f"  {name}: {value:.3f}")
    if result.has_win:
        counts = result.stats.outcomes()
        print(
            f"  lost {len(result.stats.wins) - counts['won']}: {counts['wiped_out']} with every agent dead, "
            f"{counts['timed_out']} at the time limit, {counts['other']} other"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(result.record(), indent=2))


def _cmd_select(args: argparse.Namespace) -> None:
    from seqmarl.evaluate import select_checkpoint
    from seqmarl.runinfo import select_device

    if min(args.episodes, args.test_episodes) < 1:
        raise UserError("--episodes and --test-episodes must be >= 1")
    print(f"selecting a checkpoint of {args.run_dir} (deterministic evaluation):")
    selection = select_checkpoint(
        args.run_dir, args.episodes, args.seed, args.test_episodes, args.test_seed, select_device(args.device)
    )
    if args.json is not None:
        args.json.write_text(json.dumps(selection, indent=2))


def _cmd_average(args: argparse.Namespace) -> None:
    from seqmarl.checkpoint import average_checkpoints

    out = args.out or args.run_dir / "average.pt"
    steps = average_checkpoints(args.run_dir, args.last, out)
    print(f"averaged the weights of {len(steps)} checkpoints (steps {', '.join(f'{s:,}' for s in steps)})")
    print(f"wrote {out}; evaluate it with: seqmarl eval {out} --episodes 320 --seed 777")


def _cmd_plot(args: argparse.Namespace) -> None:
    from seqmarl.plot import plot_runs

    print(f"wrote {plot_runs(args.run_dirs, args.out)}")


def _signal_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `benchmark` prints how to resume
    # A killed job (SIGTERM) or a closed terminal (SIGHUP) saves a checkpoint like Ctrl-C; the
    # handlers are restored on return (main is reusable). Handlers exist only on the main thread.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, _signal_as_interrupt) for s in STOP_SIGNALS}
    try:
        with surviving_output():  # a closed pipe or terminal does not end a run (interrupt.py)
            return _run_command(args)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _run_command(args: argparse.Namespace) -> int:
    try:
        commands = {"train": _cmd_train, "eval": _cmd_eval, "select": _cmd_select, "plot": _cmd_plot}
        commands.update(average=_cmd_average, report=_cmd_report, benchmark=_cmd_benchmark)
        commands[args.command](args)
    except UserError as e:
        print(f"seqmarl: error: {e}", file=sys.stderr)
        return 2
    except TrainingFault as e:
        print(f"seqmarl: training stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("seqmarl: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
