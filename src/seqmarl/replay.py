"""Whole-episode replay for QMIX: the rollout stream of E envs is cut into episodes, stored padded to the
time limit in a preallocated ring, and sampled as batches of whole episodes (a recurrent Q-network
must be replayed from each episode's first step).

The rollout loop hands over T steps of E envs at a time; episodes cross these boundaries and envs reset
themselves inside them. Each env's running episode is kept in a tail row until it ends, so every step is
stored exactly once, in its own episode.

Shape legend: C ring capacity (episodes), R rows, L time limit (spec.max_episode_steps), T rollout
length, E envs, N agents, O obs, S state, A actions, B sampled episodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from seqmarl.buffer import RolloutBuffer
from seqmarl.types import EnvSpec

# Per-slot fields have L + 1 slots: slot `length` holds what the episode ended in (the bootstrap source of
# a truncated episode). Per-step fields have L slots.
SLOT_FIELDS = ("obs", "state", "action_mask")
STEP_FIELDS = ("actions", "rewards")
EPISODE_FIELDS = ("length", "terminated")


@dataclass
class EpisodeBatch:
    """B episodes cut to the longest of them (Lb steps); padding is zeros."""

    obs: torch.Tensor  # (B, Lb + 1, N, O)
    state: torch.Tensor  # (B, Lb + 1, S)
    action_mask: torch.Tensor  # (B, Lb + 1, N, A) bool
    actions: torch.Tensor  # (B, Lb, N) int64
    rewards: torch.Tensor  # (B, Lb)
    length: torch.Tensor  # (B,) int64, steps of each episode
    terminated: torch.Tensor  # (B,) bool; False: cut by the time limit (bootstrap from slot `length`)

    def index(self, idx: torch.Tensor) -> EpisodeBatch:
        """The episodes `idx`, cut to the longest of them."""
        length = self.length[idx]
        Lb = int(length.max())
        return EpisodeBatch(
            obs=self.obs[idx, : Lb + 1],
            state=self.state[idx, : Lb + 1],
            action_mask=self.action_mask[idx, : Lb + 1],
            actions=self.actions[idx, :Lb],
            rewards=self.rewards[idx, :Lb],
            length=length,
            terminated=self.terminated[idx],
        )

    @property
    def filled(self) -> torch.Tensor:  # (B, Lb) bool: step t belongs to the episode
        steps = torch.arange(self.rewards.shape[1], device=self.rewards.device)
        return steps[None] < self.length[:, None]


def episode_dims(spec: EnvSpec) -> tuple[int, int, int, int, int]:
    """L time limit, N agents, O obs, S state, A action-mask width: the sizes of a padded episode."""
    return (
        spec.max_episode_steps,
        spec.n_agents,
        spec.obs_dim,
        spec.state_dim,
        spec.action_space.mask_width,
    )


class EpisodeRows:
    """R padded episodes, one row each (zeros beyond each episode's length)."""

    def __init__(self, rows: int, spec: EnvSpec, device: torch.device):
        L, N, O, S, A = episode_dims(spec)
        z = dict(device=device)
        self.obs = torch.zeros(rows, L + 1, N, O, **z)
        self.state = torch.zeros(rows, L + 1, S, **z)
        self.action_mask = torch.zeros(rows, L + 1, N, A, dtype=torch.bool, **z)
        self.actions = torch.zeros(rows, L, N, dtype=torch.long, **z)
        self.rewards = torch.zeros(rows, L, **z)
        self.length = torch.zeros(rows, dtype=torch.long, **z)
        self.terminated = torch.zeros(rows, dtype=torch.bool, **z)

    def fields(self) -> tuple[str, ...]:
        return SLOT_FIELDS + STEP_FIELDS + EPISODE_FIELDS

    def clear(self, rows: torch.Tensor) -> None:
        for name in self.fields():
            getattr(self, name)[rows] = 0

    def packed(self, count: int) -> dict[str, torch.Tensor]:
        """The first `count` rows without their padding (a checkpoint holds only real steps)."""
        slots, steps = self._filled(count)
        out = {name: getattr(self, name)[:count][slots] for name in SLOT_FIELDS}
        out.update({name: getattr(self, name)[:count][steps] for name in STEP_FIELDS})
        out.update({name: getattr(self, name)[:count].clone() for name in EPISODE_FIELDS})
        return out

    def unpack(self, packed: dict[str, torch.Tensor]) -> None:
        """Inverse of `packed`: every row is zeroed first, so no earlier content survives."""
        self.clear(torch.arange(self.length.shape[0], device=self.length.device))
        count = packed["length"].shape[0]
        for name in EPISODE_FIELDS:
            getattr(self, name)[:count] = packed[name]
        slots, steps = self._filled(count)
        for name in SLOT_FIELDS:
            getattr(self, name)[:count][slots] = packed[name]
        for name in STEP_FIELDS:
            getattr(self, name)[:count][steps] = packed[name]

    def _filled(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.length[:count, None]  # (R, 1)
        slot = torch.arange(self.obs.shape[1], device=length.device)[None]  # (1, L + 1)
        return slot <= length, slot[:, :-1] < length  # (R, L + 1), (R, L)


def episode_bytes(spec: EnvSpec) -> int:
    """Memory of one padded episode in the ring (float32 obs/state/rewards, bool masks, int64 actions)."""
    L, N, O, S, A = episode_dims(spec)
    return (L + 1) * (4 * (N * O + S) + N * A) + L * (8 * N + 4) + 9


class EpisodeReplay:
    """A ring of `capacity` finished episodes, fed rollout by rollout, sampled as whole episodes."""

    def __init__(self, spec: EnvSpec, capacity: int, num_envs: int, device: torch.device):
        self.spec = spec
        self.capacity = capacity
        self.ring = EpisodeRows(capacity, spec, device)
        self.tails = EpisodeRows(num_envs, spec, device)  # each env's running episode; length = steps so far
        self.position = 0  # ring row the next finished episode goes to
        self.size = 0  # filled ring rows

    def extend(self, buffer: RolloutBuffer) -> int:
        """Append the T steps of `buffer` to the envs' running episodes; store those that end.
        Returns the number of episodes stored."""
        tails, L = self.tails, self.spec.max_episode_steps
        envs = torch.arange(buffer.E, device=tails.length.device)
        stored = 0
        for t in range(buffer.T):
            k = tails.length  # (E,) slot of step t in each env's episode
            if bool((k >= L).any()):
                raise RuntimeError(f"an episode ran past the time limit of {L} steps without ending")
            tails.obs[envs, k] = buffer.obs[t]
            tails.state[envs, k] = buffer.state[t]
            tails.action_mask[envs, k] = buffer.action_mask[t]
            tails.actions[envs, k] = buffer.actions[t]
            tails.rewards[envs, k] = buffer.rewards[t]
            tails.length += 1
            done = (buffer.terminated[t] | buffer.truncated[t]).nonzero().flatten()  # (D,)
            if len(done) == 0:
                continue
            # The slot after the last step: a truncated episode bootstraps from the observation it was cut
            # in; a terminated one never reads it, so it stays zero.
            end, cut = tails.length[done], buffer.truncated[t, done]
            tails.obs[done, end] = buffer.final_obs[t, done] * cut[:, None, None]
            tails.state[done, end] = buffer.final_state[t, done] * cut[:, None]
            tails.action_mask[done, end] = buffer.final_action_mask[t, done] & cut[:, None, None]
            tails.terminated[done] = buffer.terminated[t, done]
            self._store(done)
            tails.clear(done)
            stored += len(done)
        return stored

    def _store(self, rows: torch.Tensor) -> None:
        """Copy tail rows into the ring, oldest episodes overwritten first. Episodes that end on the same
        step go in env order."""
        D = min(len(rows), self.capacity)  # with more than C at once, only the last C can be kept
        rows = rows[len(rows) - D :]
        slots = (self.position + torch.arange(D, device=rows.device)) % self.capacity
        for name in self.ring.fields():
            getattr(self.ring, name)[slots] = getattr(self.tails, name)[rows]
        self.position = (self.position + D) % self.capacity
        self.size = min(self.size + D, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> EpisodeBatch:
        """`batch_size` distinct stored episodes, drawn uniformly, cut to the longest of them."""
        idx = torch.randperm(self.size, generator=generator)[:batch_size].to(self.ring.length.device)
        ring = self.ring
        fields = SLOT_FIELDS + STEP_FIELDS + EPISODE_FIELDS
        return EpisodeBatch(**{name: getattr(ring, name)[idx] for name in fields}).index(
            torch.arange(len(idx), device=idx.device)
        )

    def state_dict(self) -> dict[str, Any]:
        # Only real steps are saved: the ring rows in use and each env's running episode.
        return {
            "ring": self.ring.packed(self.size),
            "tails": self.tails.packed(self.tails.length.shape[0]),
            "position": self.position,
            "size": self.size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ring.unpack(state["ring"])
        self.tails.unpack(state["tails"])
        self.position, self.size = int(state["position"]), int(state["size"])
