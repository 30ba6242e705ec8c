"""Deterministic evaluation: every env plays whole episodes with the greedy/mean action.

Shape legend: E envs, N agents.
"""

from __future__ import annotations

import math

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
