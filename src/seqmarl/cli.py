"""`seqmarl train | eval | plot`. User errors are printed as one line and exit with code 2."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from seqmarl.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse prints its usage and exits 2; we keep the exit code but print one line only."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"seqmarl: error: {message} (see seqmarl {self.prog.split()[-1]} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="seqmarl", description="Multi-Agent Transformer and friends.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train an algorithm on a task")
    train.add_argument("--algo", default="mat", help="algorithm: mat, mat_dec, mappo, ippo, happo, qmix")
    train.add_argument(
        "--env", default="smax:3m", help="task, FAMILY:TASK (smax:3m, mamujoco:HalfCheetah-6x1)"
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

    plot = commands.add_parser("plot", help="learning curves of run directories")
    plot.add_argument("run_dirs", nargs="+", type=Path)
    plot.add_argument("--out", type=Path, default=Path("curves.png"))
    summarize = commands.add_parser("summarize", help="IQM/CI table, figure and marl-eval JSON over seeds")
    summarize.add_argument("run_dirs", nargs="+", type=Path)
    summarize.add_argument("--out", type=Path, required=True, help="output folder")
    summarize.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="ENV=VALUE",
        help="report the first step reaching it",
    )
    return parser


def _cmd_summarize(args: argparse.Namespace) -> None:
    from seqmarl.results import markdown_table, summarize

    thresholds = {}
    for item in args.threshold:
        env_name, sep, value = item.rpartition("=")
        try:
            thresholds[env_name] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UserError(f"--threshold expects ENV=VALUE (e.g. smax:3m=0.95), got {item!r}")
    rows = summarize(args.run_dirs, args.out, thresholds)
    print(markdown_table(rows))
    print(f"wrote {args.out}/table.md, summary.json, marl_eval.json, curves.png")


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from seqmarl.config import load_yaml, merge, parse_assignment, preset_for
    from seqmarl.envs.registry import split_env_name

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


def _cmd_train(args: argparse.Namespace) -> None:
    from seqmarl.algos import algorithm_names
    from seqmarl.config import build_config
    from seqmarl.plot import plot_runs
    from seqmarl.train import describe_result, train

    if args.algo not in algorithm_names():
        raise UserError(f"unknown algorithm {args.algo!r}; available: {', '.join(algorithm_names())}")
    config = build_config(_train_overrides(args))
    result = train(config)
    curve = plot_runs([result.run_dir], result.run_dir / args.plot)
    print(describe_result(config, result))
    print(f"learning curve: {curve}")


def _cmd_eval(args: argparse.Namespace) -> None:
    import torch

    from seqmarl.algos import make_algorithm
    from seqmarl.checkpoint import load_checkpoint
    from seqmarl.config import config_from_dict
    from seqmarl.envs.registry import make_vector_env
    from seqmarl.evaluate import evaluate
    from seqmarl.train import select_device

    if args.episodes < 1:
        raise UserError("--episodes must be >= 1")
    payload = load_checkpoint(args.checkpoint)
    config = config_from_dict(payload["config"])
    device = select_device(args.device)
    envs = make_vector_env(config.env.name, min(config.env.eval_envs, args.episodes), seed=args.seed)
    algorithm = make_algorithm(config.algo, envs.spec, config, device)
    algorithm.load_state_dict(payload["algorithm"])
    with torch.no_grad():
        stats = evaluate(envs, algorithm, args.episodes, args.seed, device, deterministic=not args.stochastic)
    summary = stats.summary("eval", envs.spec.has_win)
    mode = "stochastic" if args.stochastic else "deterministic"
    print(f"{config.algo} on {config.env.name}, step {payload['step']:,}, {args.episodes} {mode} episodes:")
    for name, value in summary.items():
        print(f"  {name}: {value:.3f}")
    if args.json is not None:
        record = {
            "checkpoint": str(args.checkpoint),
            "env": config.env.name,
            "algo": config.algo,
            "seed": config.run.seed,
            "step": payload["step"],
            "episodes": {"episode_return": stats.returns, "win": stats.wins},
            **summary,
        }
        args.json.write_text(json.dumps(record, indent=2))
    envs.close()


def _cmd_plot(args: argparse.Namespace) -> None:
    from seqmarl.plot import plot_runs

    print(f"wrote {plot_runs(args.run_dirs, args.out)}")


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:  # a killed job saves a checkpoint like Ctrl-C; restored on return (main is reusable)
        previous_handler = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        commands = {"train": _cmd_train, "eval": _cmd_eval, "plot": _cmd_plot, "summarize": _cmd_summarize}
        commands[args.command](args)
    except UserError as e:
        print(f"seqmarl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("seqmarl: interrupted", file=sys.stderr)
        return 130
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
