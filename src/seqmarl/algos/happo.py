"""HAPPO (Kuba et al. 2022, "Trust region policy optimisation in multi-agent RL"): one actor per agent
(no parameter sharing) and a centralised critic V(state). Every iteration draws a random permutation of
the agents and updates them one after another; agent i's clipped objective is weighted, sample by
sample, by the product of the probability ratios of the agents updated before it in this iteration
(ppo_losses.happo_correction), which is what makes the sequential updates monotonic in theory.

Each actor and the critic have their own Adam optimiser (an agent's update must not move another
agent's weights, which one shared Adam would do through its momentum).

Shape legend: B samples (env-steps), N agents, O obs, S state, A action-mask width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from seqmarl.algos import ppo_losses
from seqmarl.algos.base import PPOAlgorithm, accumulate
from seqmarl.algos.optim import FlatAdam
from seqmarl.buffer import RolloutBatch
from seqmarl.config import PPOConfig
from seqmarl.nn.mlp import Actor, Critic, MLPConfig
from seqmarl.types import ActOutput, EnvSpec, EvalOutput


class HAPPONetwork(nn.Module):
    def __init__(self, spec: EnvSpec, config: MLPConfig):
        super().__init__()
        self.actors = nn.ModuleList(Actor(spec.obs_dim, spec, config) for _ in range(spec.n_agents))
        self.critic = Critic(spec.state_dim, config)

    def values(self, state: torch.Tensor, n_agents: int) -> torch.Tensor:
        """V(state) seen by every agent: (B, S) -> (B, N)."""
        return self.critic(state[:, None]).expand(-1, n_agents)


class HAPPOAlgorithm(PPOAlgorithm):
    name = "happo"
    uses_state = True

    def __init__(self, spec: EnvSpec, mlp: MLPConfig, ppo: PPOConfig, device: torch.device):
        super().__init__(spec, ppo, device, HAPPONetwork(spec, mlp))

    def _make_optimizers(self) -> None:
        ppo = self.ppo
        self.actor_optimizers = [FlatAdam(a.parameters(), ppo.lr, ppo.adam_eps) for a in self.model.actors]
        self.optimizer = FlatAdam(self.model.critic.parameters(), ppo.lr, ppo.adam_eps)  # the critic's

    def _act(self, obs, state, mask, deterministic) -> ActOutput:
        actions, log_probs = zip(
            *(
                actor.sample(obs[:, i : i + 1], mask[:, i : i + 1], deterministic)
                for i, actor in enumerate(self.model.actors)
            )
        )
        return ActOutput(torch.cat(actions, 1), torch.cat(log_probs, 1), self._values(obs, state))

    def _values(self, obs, state) -> torch.Tensor:
        return self.model.values(state, self.spec.n_agents)

    def _evaluate(self, mb: RolloutBatch) -> EvalOutput:  # all agents at once (tests, diagnostics)
        pairs = [
            actor.log_prob_entropy(
                mb.obs[:, i : i + 1], mb.action_mask[:, i : i + 1], mb.actions[:, i : i + 1]
            )
            for i, actor in enumerate(self.model.actors)
        ]
        log_prob, entropy = (torch.cat(parts, 1) for parts in zip(*pairs))
        return EvalOutput(log_prob, entropy, self._values(mb.obs, mb.state))

    def update(self, batch: RolloutBatch, lr: float, generator: torch.Generator) -> dict[str, float]:
        ppo = self.ppo
        for optimizer in [*self.actor_optimizers, self.optimizer]:
            for group in optimizer.param_groups:
                group["lr"] = lr
        advantages, targets = self._targets(batch)  # (B, N); the joint advantage, same for every agent
        B, N = batch.alive.shape
        minibatch_size = max(1, B // ppo.num_minibatches)
        totals: dict[str, torch.Tensor] = {}
        counts = {"actor": 0, "critic": 0}

        def minibatches():
            for _ in range(ppo.epochs):
                permutation = torch.randperm(B, generator=generator).to(self.device)
                for start in range(0, B - minibatch_size + 1, minibatch_size):
                    yield permutation[start : start + minibatch_size]

        # 1. actors, one after another in a random order, each weighted by the factor of those before it.
        factor = torch.ones(B, device=self.device)
        update_order = torch.randperm(N, generator=generator).tolist()
        for i in update_order:
            actor, optimizer = self.model.actors[i], self.actor_optimizers[i]
            obs, mask, actions = (
                batch.obs[:, i : i + 1],
                batch.action_mask[:, i : i + 1],
                batch.actions[:, i : i + 1],
            )
            old_log_prob, alive, adv = batch.log_prob[:, i], batch.alive[:, i], advantages[:, i]
            for idx in minibatches():
                obs_b, mask_b, actions_b, old_b, adv_b, alive_b, factor_b = (
                    x.index_select(0, idx) for x in (obs, mask, actions, old_log_prob, adv, alive, factor)
                )
                log_prob, entropy = actor.log_prob_entropy(obs_b, mask_b, actions_b)  # (b, 1)
                policy_loss, diagnostics = ppo_losses.clipped_surrogate(
                    log_prob[:, 0], old_b, adv_b, ppo.clip, alive_b, weight=factor_b
                )
                entropy = ppo_losses.masked_mean(entropy[:, 0], alive_b)
                loss = policy_loss - ppo.entropy_coef * entropy
                optimizer.zero_grad()
                loss.backward()
                grad_norm = optimizer.clip_grad_norm_(ppo.max_grad_norm)
                optimizer.step()
                accumulate(
                    totals,
                    {
                        "losses/policy_loss": policy_loss,
                        "losses/entropy": entropy,
                        "losses/approx_kl": diagnostics["approx_kl"],
                        "losses/clip_fraction": diagnostics["clip_fraction"],
                        "losses/grad_norm": grad_norm,
                    },
                )
                counts["actor"] += 1
            with torch.no_grad():
                new_log_prob, _ = actor.log_prob_entropy(obs, mask, actions)
            factor = ppo_losses.happo_correction(factor, new_log_prob[:, 0], old_log_prob, alive)

        # 2. the centralised critic V(state), on the joint value targets.
        everyone = torch.ones(B, dtype=torch.bool, device=self.device)
        for idx in minibatches():
            value = self.model.critic(batch.state.index_select(0, idx)[:, None])[:, 0]  # (b,)
            value_loss = ppo_losses.clipped_value_loss(
                value,
                batch.values[:, 0].index_select(0, idx),
                targets[:, 0].index_select(0, idx),
                ppo.value_clip,
                ppo.huber_delta or None,
                everyone.index_select(0, idx),
            )
            self.optimizer.zero_grad()
            (ppo.value_coef * value_loss).backward()
            self.optimizer.clip_grad_norm_(ppo.max_grad_norm)
            self.optimizer.step()
            accumulate(totals, {"losses/value_loss": value_loss})
            counts["critic"] += 1
        return {
            key: float(value) / counts["critic" if key == "losses/value_loss" else "actor"]
            for key, value in totals.items()
        }

    def state_dict(self, training: bool = True) -> dict[str, Any]:
        state = super().state_dict()
        state["actor_optimizers"] = [o.state_dict() for o in self.actor_optimizers]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for optimizer, saved in zip(self.actor_optimizers, state["actor_optimizers"], strict=True):
            optimizer.load_state_dict(saved)
