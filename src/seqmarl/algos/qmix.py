"""QMIX (Rashid et al. 2018, "QMIX: Monotonic value function factorisation"), with pymarl2's tuned
settings (Hu et al. 2021, "Rethinking the implementation tricks ... of QMIX"): a recurrent Q-network
shared by all agents (own observation + agent id + previous action), epsilon-greedy over the available
actions, a monotonic mixing network on the global state, double-Q TD(lambda) targets from target
networks, Adam, gradient clipping.

Off-policy inside the one trainer: `act` explores while the rollout loop collects T steps of E envs;
`learn` cuts them into episodes (seqmarl/replay.py), stores the finished ones, and makes one update of
`batch_size` replayed episodes per `episodes_per_update` new episodes. The target networks are a hard
copy every `target_update_interval` updates (pymarl2's choice; a copy keeps the target fixed for a known
number of updates, and makes the counter the only state that decides when it moves). The learning rate
is QMIX's own, constant (pymarl2), not the trainer's PPO schedule.

Shape legend: E envs, B episodes, L time steps, N agents, O obs, S state, A actions, H GRU width.
"""

from __future__ import annotations

import copy
import os
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from seqmarl.algos.base import accumulate
from seqmarl.algos.optim import FlatAdam
from seqmarl.buffer import RolloutBuffer
from seqmarl.config import QMIXConfig
from seqmarl.errors import UserError
from seqmarl.nn.qmix import MASKED_Q, QMixer, RecurrentQAgent, agent_inputs
from seqmarl.replay import EpisodeBatch, EpisodeReplay, episode_bytes
from seqmarl.types import ActOutput, EnvSpec, StepRecord

UPDATE_CHUNK = 32  # episodes per forward/backward pass within one update (see QMIXAlgorithm.update)


def td_lambda_targets(
    rewards: torch.Tensor, next_values: torch.Tensor, continues: torch.Tensor, gamma: float, td_lambda: float
) -> torch.Tensor:
    """TD(lambda) returns over (B, L) tensors, computed backwards:

        G_t = r_t + gamma * ((1 - lambda) * V_{t+1} + lambda * G_{t+1})   while step t+1 is in the episode
        G_t = r_t + gamma * V_{t+1}                                       at the episode's last step

    next_values[t] = V_{t+1}, the target value of the state step t led to (0 after a termination, the
    value of the observation it was cut in after a truncation). continues[t] is True when step t+1
    belongs to the same episode; nothing is read from steps past the last one (padding).
    """
    targets = torch.zeros_like(rewards)
    following = torch.zeros_like(rewards[:, 0])  # G_{t+1}
    for t in reversed(range(rewards.shape[1])):
        mixed = (1 - td_lambda) * next_values[:, t] + td_lambda * following
        following = rewards[:, t] + gamma * torch.where(continues[:, t], mixed, next_values[:, t])
        targets[:, t] = following
    return targets


def epsilon_at(step: int, config: QMIXConfig) -> float:
    """Linear anneal from epsilon_start to epsilon_finish over epsilon_anneal_steps env steps."""
    fraction = min(1.0, step / config.epsilon_anneal_steps)
    return config.epsilon_start + fraction * (config.epsilon_finish - config.epsilon_start)


def check_replay_fits(spec: EnvSpec, capacity: int, device: torch.device) -> None:
    """Refuse (one line) a preallocated replay larger than half the machine's memory, before allocating."""
    needed = capacity * episode_bytes(spec)
    try:
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no way to tell on this platform: let it try
        return
    if needed > total / 2:
        raise UserError(
            f"the qmix replay of {capacity} episodes of {spec.name} needs {needed / 1e9:.1f} GB, more than "
            f"half of this machine's {total / 1e9:.1f} GB; lower qmix.buffer_size"
        )


class QMIXAlgorithm:
    name: ClassVar[str] = "qmix"
    supports_discrete: ClassVar[bool] = True
    supports_continuous: ClassVar[bool] = False  # argmax over a finite action set
    on_policy: ClassVar[bool] = False
    # `seqmarl average` averages these; the targets are kept as saved (evaluation never reads them)
    network_keys: ClassVar[tuple[str, ...]] = ("agent", "mixer")
    uses_state: ClassVar[bool] = True  # the mixer reads the global state

    def __init__(self, spec: EnvSpec, config: QMIXConfig, num_envs: int, device: torch.device):
        self.spec, self.config, self.device = spec, config, device
        N, A = spec.n_agents, spec.action_space.mask_width
        self.agent = RecurrentQAgent(spec.obs_dim + N + A, config.rnn_hidden, A).to(device)
        self.mixer = QMixer(N, spec.state_dim, config.mixing_embed, config.hypernet_embed).to(device)
        self.target_agent = copy.deepcopy(self.agent).requires_grad_(False)
        self.target_mixer = copy.deepcopy(self.mixer).requires_grad_(False)
        self.optimizer = FlatAdam([*self.agent.parameters(), *self.mixer.parameters()], config.lr)
        check_replay_fits(spec, config.buffer_size, device)
        self.replay = EpisodeReplay(spec, config.buffer_size, num_envs, device)
        self.epsilon = config.epsilon_start
        self.updates = 0  # gradient steps so far (the target copy follows it)
        self.episodes_owed = 0  # finished episodes not yet paid for with an update

    # ------------------------------------------------------------------------------------------ acting
    def initial_hidden(self, num_envs: int) -> torch.Tensor:
        """Per env: the GRU state and the one-hot previous action of every agent, (E, N, H + A); zeros
        are an episode's start (the rollout loop zeroes finished envs)."""
        N, A = self.spec.n_agents, self.spec.action_space.mask_width
        return torch.zeros(num_envs, N, self.config.rnn_hidden + A, device=self.device)

    def begin_iteration(self, generator: torch.Generator, step: int = 0) -> None:
        self.epsilon = epsilon_at(step, self.config)

    @torch.no_grad()
    def act(
        self,
        obs: torch.Tensor,
        state: torch.Tensor,
        action_mask: torch.Tensor,
        hidden: torch.Tensor | None = None,
        deterministic: bool = False,
    ) -> ActOutput:
        """obs (E, N, O), mask (E, N, A) -> greedy actions among the available ones, or with probability
        epsilon (not when deterministic) a uniformly random available one."""
        E, N, A = action_mask.shape
        H = self.config.rnn_hidden
        if hidden is None:
            hidden = self.initial_hidden(E)
        inputs = agent_inputs(obs[:, None], hidden[:, None, :, H:])  # (E, 1, N, I)
        q, gru_state = self.agent(inputs, hidden[..., :H])  # (E, 1, N, A), (E, N, H)
        actions = q[:, 0].masked_fill(~action_mask, MASKED_Q).argmax(-1)  # (E, N)
        if not deterministic:
            # Uniform over the available actions: the largest of A uniform draws, masked ones below 0.
            random_actions = (
                torch.rand(E, N, A, device=self.device).masked_fill(~action_mask, -1.0).argmax(-1)
            )
            explore = torch.rand(E, N, device=self.device) < self.epsilon
            actions = torch.where(explore, random_actions, actions)
        zeros = torch.zeros(E, N, device=self.device)
        hidden = torch.cat([gru_state, F.one_hot(actions, A).to(gru_state.dtype)], dim=-1)  # (E, N, H + A)
        return ActOutput(actions, zeros, zeros, hidden)

    @torch.no_grad()
    def values(self, obs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """No per-agent state values (ActOutput's convention for value-based algorithms): zeros (B, N).
        QMIX's truncation bootstrap reads the stored final observation in `learn` instead."""
        return torch.zeros(obs.shape[0], self.spec.n_agents, device=self.device)

    # ---------------------------------------------------------------------------------------- learning
    def learn(
        self, buffer: RolloutBuffer, record: StepRecord, lr: float, generator: torch.Generator
    ) -> dict[str, float]:
        """Store the rollout's finished episodes, then one update per `episodes_per_update` of them once
        the replay holds a batch. `lr` (the PPO schedule) is ignored: QMIX uses `qmix.lr`."""
        config = self.config
        stored = self.replay.extend(buffer)
        if self.replay.size >= config.batch_size:  # before that, episodes only fill the replay
            self.episodes_owed += stored
        metrics: dict[str, float] = {
            "charts/epsilon": self.epsilon,
            "charts/learning_rate": config.lr,
            "charts/replay_episodes": float(self.replay.size),
        }
        totals: dict[str, torch.Tensor] = {}
        updates = self.episodes_owed // config.episodes_per_update
        self.episodes_owed -= updates * config.episodes_per_update
        for _ in range(updates):
            accumulate(totals, self.update(self.replay.sample(config.batch_size, generator)))
        metrics.update({key: float(value) / updates for key, value in totals.items()})
        return metrics

    def update(self, batch: EpisodeBatch) -> dict[str, torch.Tensor]:
        """One gradient step on B whole episodes; hard target copy every target_update_interval.

        The episodes go through the networks in chunks of similar length (sorted, each chunk cut to its
        own longest episode): the gradient is that of one pass over the batch, without running the GRU
        over the padding of short episodes up to the batch's longest one (most of the cost otherwise).
        """
        config = self.config
        count = batch.length.sum().float()  # real steps in the batch
        order = torch.argsort(batch.length, stable=True)
        totals: dict[str, torch.Tensor] = {}
        self.optimizer.zero_grad()
        for start in range(0, len(order), UPDATE_CHUNK):
            chunk = batch.index(order[start : start + UPDATE_CHUNK])
            q_taken, targets, filled = self._q_and_targets(chunk)
            td_error = (q_taken - targets) * filled  # (b, Lb)
            (0.5 * td_error.pow(2).sum() / count).backward()
            accumulate(
                totals,
                {
                    "losses/td_loss": 0.5 * td_error.detach().pow(2).sum() / count,
                    "losses/td_error": td_error.detach().abs().sum() / count,
                    "losses/q_taken_mean": (q_taken.detach() * filled).sum() / count,
                    "losses/target_mean": (targets * filled).sum() / count,
                },
            )
        totals["losses/grad_norm"] = self.optimizer.clip_grad_norm_(config.max_grad_norm)
        self.optimizer.step()
        self.updates += 1
        if self.updates % config.target_update_interval == 0:
            self.target_agent.load_state_dict(self.agent.state_dict())
            self.target_mixer.load_state_dict(self.mixer.state_dict())
        return totals

    def _q_and_targets(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q_tot of the taken actions (with gradient), their TD(lambda) targets and the filled mask, each
        (B, Lb), for B episodes cut to their longest (Lb steps)."""
        config = self.config
        B, Lb, N = batch.actions.shape
        A = self.spec.action_space.mask_width
        # The previous action of slot t is the action of step t - 1 (none at t = 0).
        taken = F.one_hot(batch.actions, A).float()  # (B, Lb, N, A)
        previous = torch.cat([torch.zeros_like(taken[:, :1]), taken], dim=1)  # (B, Lb + 1, N, A)
        inputs = agent_inputs(batch.obs, previous)  # (B, Lb + 1, N, I)
        h0 = torch.zeros(B, N, config.rnn_hidden, device=self.device)
        q, _ = self.agent(inputs, h0)  # (B, Lb + 1, N, A): slot `length` is each episode's end state
        chosen = q[:, :Lb].gather(-1, batch.actions[..., None]).squeeze(-1)  # (B, Lb, N)
        q_taken = self.mixer(chosen, batch.state[:, :Lb])  # (B, Lb)

        with torch.no_grad():
            target_q, _ = self.target_agent(inputs, h0)  # (B, Lb + 1, N, A)
            # Double Q: the online network picks the greedy available action, the target one values it.
            greedy = q.detach().masked_fill(~batch.action_mask, MASKED_Q).argmax(-1)  # (B, Lb + 1, N)
            next_q = target_q.gather(-1, greedy[..., None]).squeeze(-1)[:, 1:]  # (B, Lb, N)
            next_values = self.target_mixer(next_q, batch.state[:, 1:])  # (B, Lb): V of slot t + 1
            steps = torch.arange(Lb, device=self.device)[None]  # (1, Lb)
            last = steps == (batch.length - 1)[:, None]  # (B, Lb)
            next_values = next_values.masked_fill(last & batch.terminated[:, None], 0.0)
            continues = steps < (batch.length - 1)[:, None]
            targets = td_lambda_targets(batch.rewards, next_values, continues, config.gamma, config.td_lambda)
        return q_taken, targets, batch.filled.float()

    # ------------------------------------------------------------------------------------- persistence
    def state_dict(self, training: bool = True) -> dict[str, Any]:
        """Everything a run needs to continue exactly: networks, targets, optimiser, the replay (real
        steps only) with its write position, every env's unfinished episode, and the counters.
        training=False leaves the replay out (best.pt: ~0.1 GB less on 3m; evaluation never reads it)."""
        state = {
            "agent": self.agent.state_dict(),
            "mixer": self.mixer.state_dict(),
            "target_agent": self.target_agent.state_dict(),
            "target_mixer": self.target_mixer.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "replay": self.replay.state_dict(),
            "epsilon": self.epsilon,
            "updates": self.updates,
            "episodes_owed": self.episodes_owed,
        }
        if not training:
            del state["replay"]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.agent.load_state_dict(state["agent"])
        self.mixer.load_state_dict(state["mixer"])
        self.target_agent.load_state_dict(state["target_agent"])
        self.target_mixer.load_state_dict(state["target_mixer"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "replay" in state:  # absent from best.pt (state_dict(training=False))
            self.replay.load_state_dict(state["replay"])
        self.epsilon = float(state["epsilon"])
        self.updates = int(state["updates"])
        self.episodes_owed = int(state["episodes_owed"])
