"""MAT trained with PPO (paper section 5): the network acts agent by agent with a key/value cache; the
update is one teacher-forced pass per minibatch with the clipped surrogate per agent token and one joint
advantage (GAE on the mean of the alive agents' values) shared by every token.

Shape legend: B samples (env-steps), N agents, O obs, S state, A action-mask width.
"""

from __future__ import annotations

import torch

from seqmarl.algos.base import PPOAlgorithm
from seqmarl.buffer import RolloutBatch
from seqmarl.config import PPOConfig
from seqmarl.nn import cpp_decode
from seqmarl.nn.mat import MATConfig, MultiAgentTransformer
from seqmarl.types import ActOutput, EnvSpec, EvalOutput


class MATAlgorithm(PPOAlgorithm):
    name = "mat"
    permutable = True  # no positional or agent-id embedding: any decision order is valid

    def __init__(self, spec: EnvSpec, model_config: MATConfig, ppo: PPOConfig, device: torch.device):
        super().__init__(spec, ppo, device, MultiAgentTransformer(model_config, spec))

    def provenance(self) -> dict[str, str]:
        """Written into meta.json: which cached decode loop acts, which kernel attends in the update and
        which GELU / LayerNorm kernels run, and whether the update's forward and backward run as one C++ pass
        (they round differently)."""
        mode = self.model.config.decode
        whole_pass = (
            "cpp" if self.model._pass_module(torch.empty(1, device=self.device)) is not None else "per-layer"
        )
        return {
            "decode_loop": cpp_decode.loop_name(mode, self.device),
            "train_attention": cpp_decode.attention_name(mode, self.device),
            "train_fused": cpp_decode.fused_name(mode, self.device),
            "train_pass": whole_pass,
            "act_cuda_graphs": str(self.device.type == "cuda" and self.model.config.cuda_graphs).lower(),
        }

    def _act(self, obs, state, mask, deterministic) -> ActOutput:  # the global state is not used
        return self.model.act(obs, mask, deterministic)

    def _values(self, obs, state) -> torch.Tensor:
        return self.model.values(obs)

    def _evaluate(self, mb: RolloutBatch) -> EvalOutput:
        return self.model.evaluate(mb.obs, mb.action_mask, mb.actions)
