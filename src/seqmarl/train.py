"""The one trainer: seed -> envs -> algorithm -> loop(collect, advantages, update, evaluate, log, save).

Read top to bottom like cleanrl: every algorithm and env goes through this loop; algorithms differ only
in their networks and their learn() (seqmarl/algos/base.py has the interface).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from seqmarl.algos import make_algorithm
from seqmarl.buffer import RolloutBuffer
from seqmarl.checkpoint import atomic_save, save_checkpoint
from seqmarl.config import TrainConfig
from seqmarl.envs.registry import make_vector_env
from seqmarl.errors import TrainingFault, UserError
from seqmarl.evaluate import evaluate
from seqmarl.logger import Logger
from seqmarl.rollout import collect

EVAL_SEED_OFFSET = 1_000_003  # evaluation envs never share episode seeds with training envs


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but torch sees no CUDA GPU")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> dict[str, Any]:
    """What produced a number: commit, machine, library versions (written into every run directory)."""
    try:
        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        commit = commit + ("-dirty" if dirty else "") if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "commit": commit,
        "host": platform.node(),
        "machine": f"{_cpu_model()}, {os.cpu_count()} cpus",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def make_run_dir(config: TrainConfig) -> Path:
    run = config.run
    env_part = config.env.name.replace(":", "_").replace("|", "_")
    name = run.run_name or f"{env_part}_{config.algo}_s{run.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(run.out_dir) / name
    if (run_dir / "metrics.csv").exists():
        raise UserError(f"run directory {run_dir} already holds a run; choose another --run-name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def learning_rate(ppo_lr: float, schedule: str, iteration: int, num_iterations: int) -> float:
    if schedule == "linear":
        return ppo_lr * (1.0 - iteration / num_iterations)
    return ppo_lr


def _due(step: int, previous_step: int, every: int) -> bool:
    return every > 0 and step // every > previous_step // every


def check_finite(values: dict[str, Any], step: int, checkpoint_dir: Path) -> None:
    """Stop with a diagnosis at the first NaN/inf (one sync per iteration). Nothing is saved after it, so
    the newest checkpoint on disk is the last good state."""
    for name, value in values.items():
        finite = bool(torch.isfinite(value).all()) if torch.is_tensor(value) else math.isfinite(value)
        if not finite:
            newest = sorted(checkpoint_dir.glob("step_*.pt"))
            last = f"last good checkpoint: {newest[-1]}" if newest else "no checkpoint was written yet"
            raise TrainingFault(f"non-finite {name} in the iteration starting at env step {step:,}; {last}")


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    seconds: float
    final_eval: dict[str, float]
    best_eval: dict[str, float]  # the evaluation with the highest win rate (or return), with its step


def train(config: TrainConfig) -> TrainResult:
    run = config.run
    if run.threads > 0:
        torch.set_num_threads(run.threads)
    device = select_device(run.device)
    seed_everything(run.seed)
    envs = make_vector_env(config.env.name, config.env.num_envs, seed=run.seed)
    eval_envs = make_vector_env(config.env.name, config.env.eval_envs, seed=run.seed + EVAL_SEED_OFFSET)
    spec = envs.spec
    algorithm = make_algorithm(config.algo, spec, config, device)

    run_dir = make_run_dir(config)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    meta = {**machine_description(), "env": spec.name, "algo": config.algo, "seed": run.seed}
    (run_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    logger = Logger(run_dir, run.tensorboard)

    T, E = config.ppo.rollout_length, config.env.num_envs
    steps_per_iteration = T * E
    num_iterations = math.ceil(run.total_steps / steps_per_iteration)
    buffer = RolloutBuffer(spec, T, E, device)
    generator = torch.Generator().manual_seed(run.seed)  # minibatch and agent-order draws
    checkpoint_dir = run_dir / "checkpoints"

    episode_results: list[dict[str, Any]] = []  # per-episode evaluation results (marl-eval wants lists)

    def run_evaluation(step: int) -> dict[str, float]:
        stats = evaluate(eval_envs, algorithm, run.eval_episodes, run.seed + EVAL_SEED_OFFSET + step, device)
        episode_results.append({"step": step, "episode_return": stats.returns, "win": stats.wins})
        return stats.summary("eval", spec.has_win)

    def save(step: int, iteration: int, best: bool = False) -> None:
        payload = {
            "algorithm": algorithm.state_dict(),
            "config": config.to_dict(),
            "env": spec.name,
            "step": step,
            "iteration": iteration,
            "generator": generator.get_state(),
        }
        if best:
            atomic_save(payload, run_dir / "best.pt")
        else:
            save_checkpoint(checkpoint_dir, step, payload, run.keep_checkpoints)

    # The best evaluation so far is kept as best.pt for the final "absolute" evaluation (issue 5);
    # ties keep the earlier step, like best_eval in result.json.
    best_key = "eval/win_rate" if spec.has_win else "eval/episodic_return"

    def save_if_best(step: int, iteration: int) -> None:
        # .get: an evaluation with no finished episode (or bench/train.py's no-op) has no score.
        previous = [summary.get(best_key, -math.inf) for _, summary in evaluations[:-1]]
        if not previous or evaluations[-1][1].get(best_key, -math.inf) > max(previous):
            save(step, iteration, best=True)

    evaluations: list[tuple[int, dict[str, float]]] = [(0, run_evaluation(0))]
    logger.log(0, evaluations[-1][1])
    save_if_best(0, 0)
    progress = tqdm(
        total=num_iterations * steps_per_iteration,
        unit="step",
        unit_scale=True,
        dynamic_ncols=True,
        disable=not run.progress,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
        desc=f"{config.algo} {spec.name} s{run.seed}",
    )
    start = time.perf_counter()
    record = envs.reset(seed=run.seed)
    hidden = algorithm.initial_hidden(E)  # recurrent policies' state per env (None if feed-forward)
    step = 0
    try:
        for iteration in range(num_iterations):
            # 1. collect
            lr = learning_rate(config.ppo.lr, config.ppo.lr_schedule, iteration, num_iterations)
            algorithm.begin_iteration(generator, step)
            record, hidden, episodes = collect(envs, algorithm, buffer, record, hidden, device)
            check_finite({"observations": buffer.obs, "rewards": buffer.rewards}, step, checkpoint_dir)
            # 2. learn: advantages + PPO update (on-policy), or store + replayed updates (off-policy)
            metrics = algorithm.learn(buffer, record, lr, generator)
            check_finite(metrics, step, checkpoint_dir)  # losses and gradient norms
            previous_step, step = step, step + steps_per_iteration
            # 4. log, evaluate, save
            elapsed = time.perf_counter() - start
            metrics.update(episodes.summary("charts", spec.has_win))
            # An algorithm with its own constant rate (QMIX) reports the rate it used.
            metrics.setdefault("charts/learning_rate", lr)
            metrics["charts/SPS"] = step / elapsed
            last = iteration == num_iterations - 1
            if last or _due(step, previous_step, run.eval_every):
                evaluations.append((step, run_evaluation(step)))
                metrics.update(evaluations[-1][1])
                save_if_best(step, iteration + 1)
                if not run.progress:  # without a progress bar, say something at every evaluation
                    shown = ", ".join(f"{k}={v}" for k, v in _postfix(metrics, evaluations[-1][1]).items())
                    total = num_iterations * steps_per_iteration
                    print(
                        f"[{config.algo} {spec.name} s{run.seed}] step {step:,}/{total:,}: {shown}",
                        flush=True,
                    )
            logger.log(step, metrics)
            if last or _due(step, previous_step, run.checkpoint_every):
                save(step, iteration + 1)
            progress.update(steps_per_iteration)
            progress.set_postfix(_postfix(metrics, evaluations[-1][1]), refresh=False)
    except KeyboardInterrupt:
        # Ctrl-C (the CLI turns SIGTERM into the same) keeps the work done so far: the current state is
        # written as a normal checkpoint before the process exits (labelled with the last finished step;
        # an interrupt inside an update leaves that update partly applied).
        progress.close()
        logger.close()
        save(step, step // steps_per_iteration)
        print(f"interrupted: checkpoint for step {step:,} written to {checkpoint_dir}", file=sys.stderr)
        raise
    progress.close()
    logger.close()
    envs.close()
    eval_envs.close()
    seconds = time.perf_counter() - start

    key = "eval/win_rate" if spec.has_win else "eval/episodic_return"
    best_step, best = max(evaluations, key=lambda item: (item[1].get(key, -math.inf), -item[0]))
    result = TrainResult(run_dir, step, seconds, evaluations[-1][1], {**best, "step": best_step})
    (run_dir / "result.json").write_text(
        json.dumps(
            {
                **meta,
                "steps": step,
                "seconds": round(seconds, 1),
                "final_eval": result.final_eval,
                "best_eval": result.best_eval,
                "evaluations": [
                    {"step": s, **m, "episodes": e}
                    for (s, m), e in zip(evaluations, episode_results, strict=True)
                ],
            },
            indent=2,
        )
    )
    return result


def _postfix(metrics: dict[str, float], last_eval: dict[str, float]) -> dict[str, str]:
    shown = {"sps": f"{metrics['charts/SPS']:.0f}"}
    if "charts/episodic_return" in metrics:
        shown["ret"] = f"{metrics['charts/episodic_return']:.2f}"
    if "charts/win_rate" in metrics:
        shown["win"] = f"{metrics['charts/win_rate']:.2f}"
    if "eval/win_rate" in last_eval:
        shown["eval_win"] = f"{last_eval['eval/win_rate']:.2f}"
    elif "eval/episodic_return" in last_eval:
        shown["eval_ret"] = f"{last_eval['eval/episodic_return']:.1f}"
    return shown


def describe_result(config: TrainConfig, result: TrainResult) -> str:
    """The human-readable table printed at the end of `seqmarl train`."""
    lines = [
        f"{config.algo} on {config.env.name}, seed {config.run.seed}: {result.steps:,} env steps in "
        f"{result.seconds:.0f} s ({result.steps / max(result.seconds, 1e-9):,.0f} steps/s)",
        "",
        f"| metric | final (step {result.steps:,}) | best (step {int(result.best_eval['step']):,}) |",
        "|---|---|---|",
    ]
    for name, value in result.final_eval.items():
        lines.append(f"| {name} | {value:.3f} | {result.best_eval.get(name, float('nan')):.3f} |")
    lines.append("")
    lines.append(f"run directory: {result.run_dir}")
    return "\n".join(lines)
