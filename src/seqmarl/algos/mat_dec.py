"""MAT-Dec (paper section 6): MAT's encoder gives centralised per-agent values from all observations;
the decoder is replaced by a decentralised actor that maps each agent's own observation to its action
(one actor shared by all agents, so the weights stay independent of N; `mlp.mat_dec_agent_id` appends a
one-hot agent id to its input, which ties the weights to N and fixes the agent order). Advantages are
local: each agent's GAE trace uses its own value from the encoder. The critic loss is on the mean value:
the mean of the alive agents' values is fitted to the mean of their returns
(PPOAlgorithm.value_loss_on_mean).

Shape legend: B samples (env-steps), N agents, O obs, S state, A action-mask width.
"""

from __future__ import annotations

import torch
from torch import nn

from seqmarl.algos.base import PPOAlgorithm
from seqmarl.buffer import RolloutBatch
from seqmarl.config import PPOConfig
from seqmarl.nn import cpp_decode
from seqmarl.nn.mat import EncoderMixin, MATConfig
from seqmarl.nn.mlp import Actor, MLPConfig, with_agent_id
from seqmarl.types import ActOutput, EnvSpec, EvalOutput


class MATDecNetwork(EncoderMixin, nn.Module):
    def __init__(self, spec: EnvSpec, model: MATConfig, mlp: MLPConfig):
        super().__init__()
        self._build_encoder(model, spec)
        self.agent_id = mlp.mat_dec_agent_id
        ids = spec.n_agents if self.agent_id else 0
        self.actor = Actor(spec.obs_dim + ids, spec, mlp)  # own observation (+ id when asked)

    def actor_input(self, obs: torch.Tensor) -> torch.Tensor:
        """(B, N, O) -> (B, N, O) or, with the agent id, (B, N, O + N)."""
        return with_agent_id(obs) if self.agent_id else obs


class MATDecAlgorithm(PPOAlgorithm):
    name = "mat_dec"
    per_agent_advantages = True
    permutable = True
    value_loss_on_mean = True

    def __init__(self, spec: EnvSpec, model: MATConfig, mlp: MLPConfig, ppo: PPOConfig, device: torch.device):
        super().__init__(spec, ppo, device, MATDecNetwork(spec, model, mlp))
        self.decode_mode = model.decode

    def provenance(self) -> dict[str, str]:
        """Written into meta.json: which kernels attend and run GELU / LayerNorm in the encoder (they
        round differently)."""
        return {
            "train_attention": cpp_decode.attention_name(self.decode_mode, self.device),
            "train_fused": cpp_decode.fused_name(self.decode_mode, self.device),
        }

    def _act(self, obs, state, mask, deterministic) -> ActOutput:
        actions, log_prob = self.model.actor.sample(self.model.actor_input(obs), mask, deterministic)
        return ActOutput(actions, log_prob, self.model.values(obs))

    def _values(self, obs, state) -> torch.Tensor:
        return self.model.values(obs)

    def _evaluate(self, mb: RolloutBatch) -> EvalOutput:
        x = self.model.actor_input(mb.obs)
        log_prob, entropy = self.model.actor.log_prob_entropy(x, mb.action_mask, mb.actions)
        return EvalOutput(log_prob, entropy, self.model.values(mb.obs))
