"""Deterministic evaluation: every env plays whole episodes with the greedy/mean action.

Shape legend: E envs, N agents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seqmarl.envs.base import VectorEnv
from seqmarl.rollout import EpisodeStats, reset_finished


@torch.no_grad()
def evaluate(
    envs: VectorEnv, algorithm, episodes: int, seed: int, device: torch.device, deterministic: bool = True
) -> EpisodeStats:
    """Play `episodes` episodes from a fresh reset and return their results.

    Each env contributes the same number of episodes (ceil(episodes / E) rounds), taken in round-major
    order, so short episodes do not crowd out long ones (which would bias win rates upward).
    """
    E = envs.num_envs
    rounds = math.ceil(episodes / E)
    per_env: list[list[tuple[float, int, bool, int, bool]]] = [[] for _ in range(E)]
    record = envs.reset(seed)
    hidden = algorithm.initial_hidden(E)
    while min(len(results) for results in per_env) < rounds:
        out = algorithm.act(
            record.obs.to(device),
            record.state.to(device),
            record.action_mask.to(device),
            hidden,
            deterministic=deterministic,
        )
        record = envs.step(out.actions)
        hidden = reset_finished(out.hidden, record.done)
        # An episode cut by a simulator restart (record.discarded) is not a result: that env simply
        # plays one more, so the evaluation still returns `episodes` real episodes.
        for e in record.finished.nonzero().flatten().tolist():
            if len(per_env[e]) < rounds:
                per_env[e].append(
                    (
                        float(record.episode_return[e]),
                        int(record.episode_length[e]),
                        bool(record.won[e]),
                        int(record.final_alive[e].sum()),
                        bool(record.truncated[e]),
                    )
                )
    stats = EpisodeStats()
    ordered = [per_env[e][k] for k in range(rounds) for e in range(E)][:episodes]
    for episode_return, length, won, survivors, timed_out in ordered:
        stats.returns.append(episode_return)
        stats.lengths.append(length)
        stats.wins.append(won)
        stats.survivors.append(survivors)
        stats.timed_out.append(timed_out)
    return stats


@dataclass
class CheckpointEval:
    """One checkpoint's evaluation: what was evaluated, and every episode's result."""

    checkpoint: str
    env: str
    algo: str
    seed: int  # the training run's seed
    step: int  # env steps the checkpoint was trained for
    eval_seed: int
    deterministic: bool
    has_win: bool
    stats: EpisodeStats

    def summary(self) -> dict[str, float]:
        return self.stats.summary("eval", self.has_win)

    @property
    def metric(self) -> str:
        """Win rate on battle tasks, mean return elsewhere: the number a checkpoint is ranked by."""
        return "eval/win_rate" if self.has_win else "eval/episodic_return"

    @property
    def score(self) -> float:
        return self.summary()[self.metric]

    def record(self) -> dict[str, Any]:
        """The JSON of `seqmarl eval --json`: per-episode results and their summary."""
        stats = self.stats
        return {
            "checkpoint": self.checkpoint,
            "env": self.env,
            "algo": self.algo,
            "seed": self.seed,
            "step": self.step,
            "eval_seed": self.eval_seed,
            "deterministic": self.deterministic,
            "episodes": {
                "episode_return": stats.returns,
                "win": stats.wins,
                "episode_length": stats.lengths,
                "survivors": stats.survivors,
                "timed_out": stats.timed_out,
            },
            **self.summary(),
        }


def evaluate_checkpoint(
    checkpoint: str | Path, episodes: int, seed: int, device: torch.device, deterministic: bool = True
) -> CheckpointEval:
    """Load a checkpoint (file, or the newest of a run directory) and play `episodes` episodes."""
    from seqmarl.algos import make_algorithm
    from seqmarl.checkpoint import load_checkpoint
    from seqmarl.config import config_from_dict
    from seqmarl.envs.registry import make_vector_env

    payload = load_checkpoint(checkpoint)
    config = config_from_dict(payload["config"])
    # A run whose simulator ran on jax's GPU (env.sim_device=gpu) is evaluated with the CPU simulator when
    # the policy is evaluated on the CPU (`--device cpu`, a machine without a GPU): the simulator's device
    # changes its rounding only.
    sim_device = config.env.sim_device if device.type == "cuda" else "cpu"
    envs = make_vector_env(config.env.name, min(config.env.eval_envs, episodes), seed, sim_device)
    try:
        algorithm = make_algorithm(config.algo, envs.spec, config, device)
        algorithm.load_state_dict(payload["algorithm"])
        stats = evaluate(envs, algorithm, episodes, seed, device, deterministic=deterministic)
    finally:
        envs.close()
    return CheckpointEval(
        str(checkpoint),
        config.env.name,
        config.algo,
        config.run.seed,
        int(payload["step"]),
        seed,
        deterministic,
        envs.spec.has_win,
        stats,
    )


def select_checkpoint(
    run_dir: str | Path,
    episodes: int,
    seed: int,
    test_episodes: int,
    test_seed: int,
    device: torch.device,
    report=print,
) -> dict[str, Any]:
    """Model selection with a held-out check: evaluate every kept checkpoint of a run on one set of
    episodes (`seed`), take the best (ties go to the later step), and evaluate that one again on fresh
    episodes (`test_seed`). The second score is the one to report: the first is biased upwards by the
    choice itself (the best of K noisy scores), the second is not."""
    from seqmarl.checkpoint import checkpoint_files
    from seqmarl.errors import UserError

    run_dir = Path(run_dir)
    candidates = checkpoint_files(run_dir) if run_dir.is_dir() else []
    if not candidates:
        raise UserError(f"no checkpoints (checkpoints/step_*.pt) in {run_dir}")
    if seed == test_seed:
        raise UserError(
            "--test-seed must differ from --seed: the check needs episodes the choice did not see"
        )
    scored = []
    for path in candidates:
        result = evaluate_checkpoint(path, episodes, seed, device)
        scored.append(result)
        report(f"  step {result.step:>12,}: {result.score:.4f} ({episodes} episodes, seed {seed})")
    best = max(scored, key=lambda r: (r.score, r.step))
    test = evaluate_checkpoint(best.checkpoint, test_episodes, test_seed, device)
    report(
        f"  chosen step {best.step:,}: {best.score:.4f} on the selection episodes, "
        f"{test.score:.4f} on {test_episodes} fresh episodes (seed {test_seed})"
    )
    return {
        "run": str(run_dir),
        "metric": best.metric,
        "selection": {
            "episodes": episodes,
            "eval_seed": seed,
            "scores": {str(r.step): r.score for r in scored},
        },
        "chosen_step": best.step,
        "chosen_checkpoint": best.checkpoint,
        "selection_score": best.score,
        "test_score": test.score,
        "test": test.record(),
    }
