"""The one environment loop, shared by every env and algorithm: collect T steps into the buffer.

Shape legend: T rollout length, E envs, N agents, O obs, A action-mask width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from seqmarl.buffer import RolloutBuffer
from seqmarl.envs.base import VectorEnv
from seqmarl.types import StepRecord


@dataclass
class EpisodeStats:
    """Episodes finished during a rollout (or an evaluation). Episodes cut by a simulator restart
    (StepRecord.discarded) are only counted, never averaged in: they did not end by themselves."""

    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    wins: list[bool] = field(default_factory=list)
    discarded: int = 0  # episodes thrown away by simulator restarts
    # Filled by `evaluate` only (not on the training hot path): agents alive at the end of each episode,
    # and whether it ended at the time limit. They tell how battles were lost (see `outcomes`).
    survivors: list[int] = field(default_factory=list)
    timed_out: list[bool] = field(default_factory=list)

    def add(self, record: StepRecord) -> None:
        if not bool(record.done.any()):  # one check on the common path
            return
        finished = record.finished
        self.discarded += int(record.discarded.sum())
        self.returns += record.episode_return[finished].tolist()
        self.lengths += record.episode_length[finished].tolist()
        self.wins += record.won[finished].tolist()

    def summary(self, prefix: str, has_win: bool) -> dict[str, float]:
        out = {f"{prefix}/discarded_episodes": float(self.discarded)} if self.discarded else {}
        if not self.returns:
            return out
        n = len(self.returns)
        out[f"{prefix}/episodic_return"] = sum(self.returns) / n
        out[f"{prefix}/episodic_length"] = sum(self.lengths) / n
        if has_win:
            out[f"{prefix}/win_rate"] = sum(self.wins) / n
        return out

    def outcomes(self) -> dict[str, int]:
        """How the episodes of an evaluation ended (battle tasks): won; lost with every agent dead
        (`wiped_out`, which includes both sides dying on the same step); lost at the time limit
        (`timed_out`); and `other`, a loss that ended by itself with an agent alive (SMAX has none; kept
        so the counts always add up). Needs `survivors` / `timed_out`, which `evaluate` fills."""
        lost = [(alive, cut) for alive, cut, won in zip(self.survivors, self.timed_out, self.wins) if not won]
        wiped = sum(1 for alive, cut in lost if alive == 0 and not cut)
        timed = sum(1 for _, cut in lost if cut)
        return {
            "won": len(self.wins) - len(lost),
            "wiped_out": wiped,
            "timed_out": timed,
            "other": len(lost) - wiped - timed,
        }


def reset_finished(hidden: torch.Tensor | None, done: torch.Tensor) -> torch.Tensor | None:
    """Zero the recurrent state (E, ...) of envs whose episode just ended; None stays None."""
    if hidden is None:
        return None
    keep = (~done).to(hidden.device, hidden.dtype).view(-1, *([1] * (hidden.dim() - 1)))
    return hidden * keep


def collect(
    envs: VectorEnv,
    algorithm,
    buffer: RolloutBuffer,
    record: StepRecord,
    hidden: torch.Tensor | None,
    device: torch.device,
) -> tuple[StepRecord, torch.Tensor | None, EpisodeStats]:
    """Fill `buffer` with T steps starting from `record` (the current observation of every env) and
    `hidden` (the algorithm's recurrent state per env, None for feed-forward policies).

    Returns the record and recurrent state after the last step (the next rollout starts there) and the
    finished episodes.
    """
    stats = EpisodeStats()
    for t in range(buffer.T):
        obs = record.obs.to(device, non_blocking=True)  # (E, N, O)
        state = record.state.to(device, non_blocking=True)  # (E, S)
        mask = record.action_mask.to(device, non_blocking=True)  # (E, N, A)
        out = algorithm.act(obs, state, mask, hidden)
        buffer.obs[t] = obs
        buffer.state[t] = state
        buffer.action_mask[t] = mask
        buffer.alive[t] = record.alive.to(device, non_blocking=True)
        buffer.actions[t] = out.actions
        buffer.log_prob[t] = out.log_prob
        buffer.values[t] = out.value

        record = envs.step(out.actions)
        buffer.rewards[t] = record.reward.to(device, non_blocking=True)
        buffer.terminated[t] = record.terminated.to(device, non_blocking=True)
        buffer.truncated[t] = record.truncated.to(device, non_blocking=True)
        if bool(record.truncated.any()):
            # Time-limit cut: keep the last observation and its value to bootstrap from (not a death).
            final_obs = record.final_obs.to(device)
            final_state = record.final_state.to(device)
            buffer.final_obs[t] = final_obs
            buffer.final_state[t] = final_state
            buffer.final_values[t] = algorithm.values(final_obs, final_state)
            buffer.final_alive[t] = record.final_alive.to(device)
            buffer.final_action_mask[t] = record.final_action_mask.to(device)
        hidden = reset_finished(out.hidden, record.done)
        stats.add(record)
    return record, hidden, stats
