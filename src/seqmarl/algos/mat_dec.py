"""MAT-Dec (paper section 6): MAT's encoder gives centralised per-agent values from all observations;
the decoder is replaced by a decentralised actor that maps each agent's own observation to its action
(one actor shared by all agents, so the weights stay independent of N). Advantages are local: each
agent's GAE trace uses its own value from the encoder. The critic loss is on the mean value: the mean of
the alive agents' values is fitted to the mean of their returns (PPOAlgorithm.value_loss_on_mean).

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
from seqmarl.nn.mlp import Actor, MLPConfig
from seqmarl.types import ActOutput, EnvSpec, EvalOutput


class MATDecNetwork(EncoderMixin, nn.Module):
    def __init__(self, spec: EnvSpec, model: MATConfig, mlp: MLPConfig):
        super().__init__()
        self._build_encoder(model, spec)
        self.actor = Actor(spec.obs_dim, spec, mlp)  # own observation only: no agent id, N-free


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
        actions, log_prob = self.model.actor.sample(obs, mask, deterministic)
        return ActOutput(actions, log_prob, self.model.values(obs))

    def _values(self, obs, state) -> torch.Tensor:
        return self.model.values(obs)

    def _evaluate(self, mb: RolloutBatch) -> EvalOutput:
        log_prob, entropy = self.model.actor.log_prob_entropy(mb.obs, mb.action_mask, mb.actions)
        return EvalOutput(log_prob, entropy, self.model.values(mb.obs))
