"""MAPPO (Yu et al. 2022) and IPPO: one actor shared by all agents (one-hot agent id in its input), PPO
with value normalisation, Huber value loss and dead-agent masking (the tuned recipe), and per-agent
advantages from per-agent critics.

MAPPO's critic is centralised: it reads the env's global state (plus the agent id, so each agent's value
can differ; `mlp.critic_own_obs` adds the agent's own observation, the paper's agent-specific state).
IPPO's critic is decentralised: each agent's value reads only its own observation (plus id).
The actors here are feed-forward; the paper's recurrent variant (rMAPPO) is not built.

Shape legend: B samples (env-steps), N agents, O obs, S state, A action-mask width.
"""

from __future__ import annotations

import torch
from torch import nn

from seqmarl.algos.base import PPOAlgorithm
from seqmarl.buffer import RolloutBatch
from seqmarl.config import PPOConfig
from seqmarl.nn.mlp import Actor, Critic, MLPConfig, with_agent_id
from seqmarl.types import ActOutput, EnvSpec, EvalOutput


class SharedActorCritic(nn.Module):
    def __init__(self, spec: EnvSpec, config: MLPConfig, centralised: bool):
        super().__init__()
        self.agent_id = config.agent_id
        self.centralised = centralised
        self.own_obs = centralised and config.critic_own_obs
        ids = spec.n_agents if config.agent_id else 0
        self.actor = Actor(spec.obs_dim + ids, spec, config)
        seat = spec.state_dim + (spec.obs_dim if self.own_obs else 0)  # what critic_input gives each agent
        self.critic = Critic((seat if centralised else spec.obs_dim) + ids, config)

    def _ids(self, x: torch.Tensor) -> torch.Tensor:
        return with_agent_id(x) if self.agent_id else x

    def actor_input(self, obs: torch.Tensor) -> torch.Tensor:  # (B, N, O) -> (B, N, O [+ N])
        return self._ids(obs)

    def critic_input(self, obs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        if self.centralised:  # the global state seen from every agent's seat: (B, N, S [+ O] [+ N])
            seat = state[:, None].expand(-1, obs.shape[1], -1)
            return self._ids(torch.cat([seat, obs], dim=-1) if self.own_obs else seat)
        return self._ids(obs)  # (B, N, O [+ N])

    def values(self, obs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return self.critic(self.critic_input(obs, state))  # (B, N)


class MAPPOAlgorithm(PPOAlgorithm):
    name = "mappo"
    uses_state = True
    per_agent_advantages = True
    centralised = True

    def __init__(self, spec: EnvSpec, mlp: MLPConfig, ppo: PPOConfig, device: torch.device):
        super().__init__(spec, ppo, device, SharedActorCritic(spec, mlp, centralised=self.centralised))

    def _act(self, obs, state, mask, deterministic) -> ActOutput:
        actions, log_prob = self.model.actor.sample(self.model.actor_input(obs), mask, deterministic)
        return ActOutput(actions, log_prob, self.model.values(obs, state))

    def _values(self, obs, state) -> torch.Tensor:
        return self.model.values(obs, state)

    def _evaluate(self, mb: RolloutBatch) -> EvalOutput:
        log_prob, entropy = self.model.actor.log_prob_entropy(
            self.model.actor_input(mb.obs), mb.action_mask, mb.actions
        )
        return EvalOutput(log_prob, entropy, self.model.values(mb.obs, mb.state))


class IPPOAlgorithm(MAPPOAlgorithm):
    name = "ippo"
    uses_state = False
    centralised = False
