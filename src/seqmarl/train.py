"""The one trainer: seed -> envs -> algorithm -> loop(collect, advantages, update, evaluate, log, save).

Checkpoints are taken at iteration boundaries and hold everything the next iteration reads (weights,
optimiser, normalisers, every random state, the simulators' state, the step record the next rollout
starts from, the evaluations so far), so `resume` continues a run bitwise as if it had never stopped
(on the CPU with a fixed seed; tests/test_resume.py kills a run with SIGKILL and checks).

Read top to bottom like cleanrl: every algorithm and env goes through this loop; algorithms differ only
in their networks and their learn() (seqmarl/algos/base.py has the interface).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from seqmarl.algos import make_algorithm
from seqmarl.buffer import RolloutBuffer
from seqmarl.checkpoint import (
    atomic_save,
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    write_text_atomically,
)
from seqmarl.config import TrainConfig, config_from_dict
from seqmarl.envs.registry import make_vector_env
from seqmarl.errors import TrainingFault, UserError
from seqmarl.evaluate import evaluate
from seqmarl.interrupt import StopRequests
from seqmarl.logger import Logger
from seqmarl.rollout import collect
from seqmarl.runinfo import keep_freed_memory, machine_description, seed_everything, select_device
from seqmarl.types import StepRecord

EVAL_SEED_OFFSET = 1_000_003  # evaluation envs never share episode seeds with training envs


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


def last_good(checkpoint_dir: Path) -> str:
    newest = latest_checkpoint(checkpoint_dir)
    return f"last good checkpoint: {newest}" if newest else "no checkpoint was written yet"


def check_finite(values: dict[str, Any], step: int, checkpoint_dir: Path) -> None:
    """Stop with a diagnosis at the first NaN/inf in the learning numbers (losses, gradient norms; one
    sync per iteration). Nothing is saved after it, so the newest checkpoint on disk is the last good
    state. What the simulators return is checked at every step by the env guard (envs/guard.py)."""
    for name, value in values.items():
        finite = bool(torch.isfinite(value).all()) if torch.is_tensor(value) else math.isfinite(value)
        if not finite:
            where = f"in the iteration starting at env step {step:,}"
            raise TrainingFault(f"non-finite {name} {where}; {last_good(checkpoint_dir)}")


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    seconds: float
    final_eval: dict[str, float]
    best_eval: dict[str, float]  # the evaluation with the highest win rate (or return), with its step


def train(config: TrainConfig) -> TrainResult:
    """Train from scratch into a new run directory."""
    return _run(config, make_run_dir(config), checkpoint=None)


def resume(
    run_dir: str | Path,
    total_steps: int | None = None,
    device: str | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Continue the run in `run_dir` from its newest intact checkpoint, exactly as if it had never
    stopped (same config and seed; on the CPU the metrics are bitwise those of an uninterrupted run).
    `total_steps` extends the budget (a linear learning-rate schedule then follows the new length).
    A run stopped before its first checkpoint starts over from step 0 with its saved config."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    has_checkpoint = any((run_dir / "checkpoints").glob("step_*.pt"))
    payload = load_checkpoint(run_dir) if has_checkpoint else None
    if payload is not None and "envs" not in payload:
        raise UserError(
            f"the checkpoints in {run_dir} predate exact resume (no simulator state); "
            "they can be evaluated (seqmarl eval) but not continued"
        )
    saved = (
        payload["config"] if payload is not None else yaml.safe_load((run_dir / "config.yaml").read_text())
    )
    config = config_from_dict(saved)
    changes: dict[str, Any] = {}
    if total_steps is not None:
        changes["total_steps"] = int(total_steps)
    if device is not None:
        changes["device"] = device
    if progress is not None:
        changes["progress"] = progress
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, **changes))
    if payload is not None:
        done = payload["step"] >= config.run.total_steps and (run_dir / "result.json").exists()
        if done:
            raise UserError(
                f"{run_dir} already finished ({payload['step']:,} steps); pass --steps to train it longer"
            )
        print(f"seqmarl: resuming {run_dir} from its checkpoint at step {payload['step']:,}", file=sys.stderr)
    else:
        print(f"seqmarl: {run_dir} has no checkpoint yet: starting it over from step 0", file=sys.stderr)
    (run_dir / "result.json").unlink(missing_ok=True)
    return _run(config, run_dir, checkpoint=payload)


def _run(config: TrainConfig, run_dir: Path, checkpoint: dict[str, Any] | None) -> TrainResult:
    run = config.run
    if run.threads > 0:
        torch.set_num_threads(run.threads)
    malloc = keep_freed_memory()
    device = select_device(run.device)
    seed_everything(run.seed)
    where = config.env.sim_device
    envs = make_vector_env(config.env.name, config.env.num_envs, run.seed, where)
    eval_envs = make_vector_env(config.env.name, config.env.eval_envs, run.seed + EVAL_SEED_OFFSET, where)
    spec = envs.spec
    algorithm = make_algorithm(config.algo, spec, config, device)

    write_text_atomically(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    meta = {**machine_description(), "env": spec.name, "algo": config.algo, "seed": run.seed}
    meta["malloc"] = malloc  # runinfo.keep_freed_memory: speed only, the numbers are the same
    if hasattr(algorithm, "provenance"):  # e.g. MAT: which decode loop acted
        meta.update(algorithm.provenance())
    if checkpoint is not None:  # provenance of every segment of a resumed run
        previous = json.loads((run_dir / "meta.json").read_text())
        resumes = previous.get("resumes", []) + [{**meta, "from_step": checkpoint["step"]}]
        meta = {**{k: v for k, v in previous.items() if k != "resumes"}, "resumes": resumes}
    write_text_atomically(run_dir / "meta.json", json.dumps(meta, indent=2))

    T, E = config.ppo.rollout_length, config.env.num_envs
    steps_per_iteration = T * E
    num_iterations = math.ceil(run.total_steps / steps_per_iteration)
    buffer = RolloutBuffer(spec, T, E, device)
    generator = torch.Generator().manual_seed(run.seed)  # minibatch and agent-order draws
    checkpoint_dir = run_dir / "checkpoints"

    # Evaluations so far: (step, summary, per-episode results); marl-eval wants the per-episode lists.
    evaluations: list[tuple[int, dict[str, float], dict[str, list]]] = []

    def run_evaluation(step: int) -> None:
        stats = evaluate(eval_envs, algorithm, run.eval_episodes, run.seed + EVAL_SEED_OFFSET + step, device)
        episodes = {"episode_return": stats.returns, "win": stats.wins}
        evaluations.append((step, stats.summary("eval", spec.has_win), episodes))

    def save(step: int, iteration: int, elapsed: float) -> None:
        """A checkpoint of an iteration boundary: everything the next iteration reads (exact resume)."""
        payload = {
            "algorithm": algorithm.state_dict(),
            "config": config.to_dict(),
            "env": spec.name,
            "step": step,
            "iteration": iteration,
            "generator": generator.get_state(),
            "rng": capture_rng(),
            "envs": envs.get_state(),
            "record": record.to_dict(),
            "hidden": None if hidden is None else hidden.cpu(),
            "elapsed": elapsed,
            "evaluations": [{"step": s, "summary": m, "episodes": e} for s, m, e in evaluations],
        }
        save_checkpoint(checkpoint_dir, step, payload, run.keep_checkpoints)

    # The best evaluation so far is kept as best.pt for the final "absolute" evaluation (issue 5);
    # ties keep the earlier step, like best_eval in result.json.
    best_key = "eval/win_rate" if spec.has_win else "eval/episodic_return"

    def save_if_best(step: int, iteration: int) -> None:
        # .get: an evaluation with no finished episode (or bench/train.py's no-op) has no score.
        previous = [summary.get(best_key, -math.inf) for _, summary, _ in evaluations[:-1]]
        if not previous or evaluations[-1][1].get(best_key, -math.inf) > max(previous):
            weights = algorithm.state_dict(training=False)  # evaluation only: no replay memory
            payload = {"algorithm": weights, "config": config.to_dict(), "env": spec.name}
            atomic_save({**payload, "step": step, "iteration": iteration}, run_dir / "best.pt")

    if checkpoint is None:
        logger = Logger(run_dir, run.tensorboard)
        for stale in ("best.pt", "best.pt.sha256"):  # a run started over in its old directory
            (run_dir / stale).unlink(missing_ok=True)
        run_evaluation(0)
        logger.log(0, evaluations[-1][1])
        save_if_best(0, 0)
        record = envs.reset(seed=run.seed)
        hidden = algorithm.initial_hidden(E)  # recurrent policies' state per env (None if feed-forward)
        step, first_iteration, elapsed_before = 0, 0, 0.0
    else:
        algorithm.load_state_dict(checkpoint["algorithm"])
        generator.set_state(checkpoint["generator"])
        envs.set_state(checkpoint["envs"])
        record = StepRecord(**checkpoint["record"])
        hidden = None if checkpoint["hidden"] is None else checkpoint["hidden"].to(device)
        evaluations += [(e["step"], e["summary"], e["episodes"]) for e in checkpoint["evaluations"]]
        step, first_iteration = checkpoint["step"], checkpoint["iteration"]
        elapsed_before = checkpoint["elapsed"]
        logger = Logger(run_dir, run.tensorboard, resume_step=step, elapsed=elapsed_before)
        restore_rng(checkpoint["rng"])  # last: building envs and the algorithm above drew from them

    progress = tqdm(
        total=num_iterations * steps_per_iteration,
        initial=step,
        unit="step",
        unit_scale=True,
        dynamic_ncols=True,
        disable=not run.progress,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
        desc=f"{config.algo} {spec.name} s{run.seed}",
    )
    start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start

    with StopRequests() as stop:
        try:
            for iteration in range(first_iteration, num_iterations):
                # 1. collect
                lr = learning_rate(config.ppo.lr, config.ppo.lr_schedule, iteration, num_iterations)
                algorithm.begin_iteration(generator, step)
                try:  # the env guard (envs/guard.py) checks every record: shapes, NaN/inf, masks
                    record, hidden, episodes = collect(envs, algorithm, buffer, record, hidden, device)
                except TrainingFault as fault:
                    raise TrainingFault(f"{fault}; {last_good(checkpoint_dir)}") from None
                # 2. learn: advantages + PPO update (on-policy), or store + replayed updates (off-policy)
                metrics = algorithm.learn(buffer, record, lr, generator)
                check_finite(metrics, step, checkpoint_dir)  # losses and gradient norms
                previous_step, step = step, step + steps_per_iteration
                # 3. log, evaluate, save
                metrics.update(episodes.summary("charts", spec.has_win))
                # An algorithm with its own constant rate (QMIX) reports the rate it used.
                metrics.setdefault("charts/learning_rate", lr)
                metrics["charts/SPS"] = step / elapsed()
                last = iteration == num_iterations - 1
                if last or _due(step, previous_step, run.eval_every):
                    run_evaluation(step)
                    metrics.update(evaluations[-1][1])
                    save_if_best(step, iteration + 1)
                    if not run.progress:  # without a progress bar, say something at every evaluation
                        shown = ", ".join(
                            f"{k}={v}" for k, v in _postfix(metrics, evaluations[-1][1]).items()
                        )
                        total = num_iterations * steps_per_iteration
                        print(
                            f"[{config.algo} {spec.name} s{run.seed}] step {step:,}/{total:,}: {shown}",
                            flush=True,
                        )
                logger.log(step, metrics)
                # Saved last in the iteration: nothing draws randomness between here and the next one.
                if last or stop.requested or _due(step, previous_step, run.checkpoint_every):
                    save(step, iteration + 1, elapsed())
                progress.update(steps_per_iteration)
                progress.set_postfix(_postfix(metrics, evaluations[-1][1]), refresh=False)
                if stop.requested and not last:
                    print(
                        f"interrupted: checkpoint for step {step:,} written to {checkpoint_dir}",
                        file=sys.stderr,
                    )
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            progress.close()
            logger.close()
            newest = latest_checkpoint(checkpoint_dir)
            where = f"from {newest.name}" if newest else "from step 0: no checkpoint yet"
            print(f"to continue: seqmarl train --resume {run_dir}  ({where})", file=sys.stderr)
            raise
    progress.close()
    logger.close()
    envs.close()
    eval_envs.close()
    seconds = elapsed()

    key = "eval/win_rate" if spec.has_win else "eval/episodic_return"
    best_step, best, _ = max(evaluations, key=lambda item: (item[1].get(key, -math.inf), -item[0]))
    result = TrainResult(run_dir, step, seconds, evaluations[-1][1], {**best, "step": best_step})
    write_text_atomically(
        run_dir / "result.json",
        json.dumps(
            {
                **meta,
                "steps": step,
                "seconds": round(seconds, 1),
                "final_eval": result.final_eval,
                "best_eval": result.best_eval,
                "evaluations": [{"step": s, **m, "episodes": e} for s, m, e in evaluations],
            },
            indent=2,
        ),
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
