"""MAT trained with PPO: the network acts agent by agent; the update is one teacher-forced pass per
minibatch with the clipped surrogate per agent token (paper section 5).

Shape legend: B samples (env-steps), N agents, O obs, A action-mask width.
"""

from __future__ import annotations

from typing import Any

import torch

from seqmarl.algos import ppo_losses
from seqmarl.buffer import RolloutBatch
from seqmarl.config import PPOConfig
from seqmarl.nn.mat import ActOutput, MATConfig, MultiAgentTransformer
from seqmarl.normalize import IdentityNormalizer, RunningMeanStd
from seqmarl.types import EnvSpec


class MATAlgorithm:
    """Owns the network, optimiser and value normaliser; the trainer calls act/values/update."""

    name = "mat"
    supports_discrete = True
    supports_continuous = True

    def __init__(self, spec: EnvSpec, model_config: MATConfig, ppo: PPOConfig, device: torch.device):
        self.spec = spec
        self.ppo = ppo
        self.device = device
        self.model = MultiAgentTransformer(model_config, spec).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=ppo.lr, eps=ppo.adam_eps)
        self.value_norm = RunningMeanStd(device) if ppo.value_norm else IdentityNormalizer(device)
        # The decision order of this iteration's rollout and update: position k of the sequence is
        # agent order[k]. Identity unless ppo.shuffle_agent_order (paper section 5, HAPPO's Theorem 3).
        self.order = torch.arange(spec.n_agents, device=device)

    # ------------------------------------------------------------------------------------------ acting
    def begin_iteration(self, generator: torch.Generator) -> None:
        if self.ppo.shuffle_agent_order:
            self.order = torch.randperm(self.spec.n_agents, generator=generator).to(self.device)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, action_mask: torch.Tensor, deterministic: bool = False) -> ActOutput:
        """obs (B, N, O), mask (B, N, A) in env order -> actions, log-probs, values in env order."""
        order = self.order
        out = self.model.act(obs[:, order], action_mask[:, order], deterministic)
        inverse = torch.argsort(order)
        return ActOutput(
            actions=out.actions[:, inverse], log_prob=out.log_prob[:, inverse], value=out.value[:, inverse]
        )

    @torch.no_grad()
    def values(self, obs: torch.Tensor) -> torch.Tensor:
        """Per-agent values (normalised scale). The encoder is permutation-equivariant (no positional
        embedding), so the decision order does not matter here. (B, N, O) -> (B, N)."""
        return self.model.values(obs)

    # ------------------------------------------------------------------------------------------ update
    def update(self, batch: RolloutBatch, lr: float, generator: torch.Generator) -> dict[str, float]:
        ppo = self.ppo
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.value_norm.update(batch.returns)
        # Everything below is in decision order (sequence position k = agent order[k]), rearranged once
        # here rather than in every minibatch.
        batch = batch.agents_in_order(self.order)
        alive = batch.alive  # (B, N)
        N = alive.shape[1]
        # One joint advantage per env-step, shared by every agent token (REFERENCE.md 1).
        advantages = ppo_losses.normalize_advantages(batch.advantages[:, None].expand(-1, N), alive)
        targets = self.value_norm.normalize(batch.returns)[:, None].expand(-1, N)  # (B, N)

        totals: dict[str, torch.Tensor] = {}
        updates = 0
        B = len(batch)
        minibatch_size = max(1, B // ppo.num_minibatches)
        for _ in range(ppo.epochs):
            permutation = torch.randperm(B, generator=generator).to(self.device)
            for start in range(0, B - minibatch_size + 1, minibatch_size):
                idx = permutation[start : start + minibatch_size]
                mb = batch.index(idx)
                out = self.model.evaluate(mb.obs, mb.action_mask, mb.actions)
                mask = mb.alive
                policy_loss, diagnostics = ppo_losses.clipped_surrogate(
                    out.log_prob, mb.log_prob, advantages[idx], ppo.clip, mask
                )
                value_loss = ppo_losses.clipped_value_loss(
                    out.value,
                    mb.values,
                    targets[idx],
                    ppo.value_clip,
                    ppo.huber_delta or None,
                    mask,
                )
                entropy = ppo_losses.masked_mean(out.entropy, mask)
                loss = policy_loss + ppo.value_coef * value_loss - ppo.entropy_coef * entropy

                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), ppo.max_grad_norm)
                self.optimizer.step()

                stats = {
                    "losses/policy_loss": policy_loss,
                    "losses/value_loss": value_loss,
                    "losses/entropy": entropy,
                    "losses/approx_kl": diagnostics["approx_kl"],
                    "losses/clip_fraction": diagnostics["clip_fraction"],
                    "losses/grad_norm": grad_norm,
                }
                for key, value in stats.items():
                    # Summed as tensors: one device sync per update, not one per minibatch.
                    totals[key] = totals.get(key, 0.0) + value.detach()
                updates += 1
        return {key: float(value) / updates for key, value in totals.items()}

    # ------------------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "value_norm": self.value_norm.state_dict(),
            "order": self.order,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.value_norm.load_state_dict(state["value_norm"])
        self.order = state["order"].to(self.device)
