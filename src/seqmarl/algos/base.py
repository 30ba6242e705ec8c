"""What the trainer needs from an algorithm, and the one PPO update loop shared by the on-policy ones.

The trainer (seqmarl/train.py) calls, every iteration:
    begin_iteration(generator, step)      per-iteration draws (decision order, exploration rate)
    act(obs, state, mask, hidden, ...)    while collecting; returns actions, log-probs, values, hidden
    values(obs, state)                    per-agent values, for truncation bootstraps
    learn(buffer, record, lr, generator)  after collecting T steps; returns metrics to log
and initial_hidden(E), state_dict(training=True), load_state_dict() around them (state_dict must hold
everything an exact resume needs; training=False may leave out what evaluation never reads, such as
QMIX's replay). Each algorithm also declares what
it supports (`supports_discrete`, `supports_continuous`, `on_policy`, `uses_state`) so an impossible
pairing is refused before anything starts.

`PPOAlgorithm` holds everything the on-policy family (MAT, MAT-Dec, MAPPO, IPPO) has in common: the
optimiser, the value normaliser, advantages (joint or per agent), and the minibatch loop over the PPO
losses of seqmarl/algos/ppo_losses.py. A subclass supplies its network through three methods:
`_act`, `_values`, `_evaluate`. HAPPO overrides `update` (sequential per-agent updates).

Shape legend: B samples (env-steps), N agents, O obs, S state, A action-mask width.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from seqmarl.algos import ppo_losses
from seqmarl.algos.optim import FlatAdam
from seqmarl.buffer import RolloutBatch, RolloutBuffer, joint_value
from seqmarl.config import PPOConfig
from seqmarl.normalize import IdentityNormalizer, RunningMeanStd
from seqmarl.types import ActOutput, EnvSpec, EvalOutput, StepRecord


class PPOAlgorithm:
    """On-policy actor-critic trained with PPO. Subclasses build `self.model` and the three hooks."""

    name: ClassVar[str]
    supports_discrete: ClassVar[bool] = True
    supports_continuous: ClassVar[bool] = True
    on_policy: ClassVar[bool] = True
    uses_state: ClassVar[bool] = False  # reads the env's global state (centralised critic)
    per_agent_advantages: ClassVar[bool] = False  # False: one joint advantage shared by all agents
    permutable: ClassVar[bool] = False  # weights are indifferent to agent order (may shuffle it)
    value_loss_on_mean: ClassVar[bool] = False  # fit the mean of the alive agents' values, not each one
    # The entries of state_dict() that hold network weights (what `seqmarl average` averages).
    network_keys: ClassVar[tuple[str, ...]] = ("model",)

    def __init__(self, spec: EnvSpec, ppo: PPOConfig, device: torch.device, model: nn.Module):
        self.spec = spec
        self.ppo = ppo
        self.device = device
        self.model = model.to(device)
        self._make_optimizers()
        self.value_norm = RunningMeanStd(device) if ppo.value_norm else IdentityNormalizer(device)
        # The decision order of this iteration's rollout and update: position k of the sequence is
        # agent order[k]. Identity unless ppo.shuffle_agent_order (paper section 5, HAPPO's Theorem 3).
        self.order = torch.arange(spec.n_agents, device=device)

    def _make_optimizers(self) -> None:
        """One Adam over every weight (algos/optim.py `FlatAdam`); HAPPO makes one per actor instead."""
        self.optimizer = FlatAdam(self.model.parameters(), self.ppo.lr, self.ppo.adam_eps)

    # ------------------------------------------------------------------ network hooks (model order)
    def _act(
        self, obs: torch.Tensor, state: torch.Tensor, mask: torch.Tensor, deterministic: bool
    ) -> ActOutput:
        raise NotImplementedError

    def _values(self, obs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _evaluate(self, mb: RolloutBatch) -> EvalOutput:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ acting
    def initial_hidden(self, num_envs: int) -> torch.Tensor | None:
        return None

    def begin_iteration(self, generator: torch.Generator, step: int = 0) -> None:
        if self.ppo.shuffle_agent_order:
            self.order = torch.randperm(self.spec.n_agents, generator=generator).to(self.device)

    @torch.no_grad()
    def act(
        self,
        obs: torch.Tensor,
        state: torch.Tensor,
        action_mask: torch.Tensor,
        hidden: torch.Tensor | None = None,
        deterministic: bool = False,
    ) -> ActOutput:
        """obs (B, N, O), state (B, S), mask (B, N, A) in env order -> outputs in env order."""
        if not self.ppo.shuffle_agent_order:
            return self._act(obs, state, action_mask, deterministic)
        order, inverse = self.order, torch.argsort(self.order)
        out = self._act(obs[:, order], state, action_mask[:, order], deterministic)
        return ActOutput(out.actions[:, inverse], out.log_prob[:, inverse], out.value[:, inverse])

    @torch.no_grad()
    def values(self, obs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Per-agent values (normalised scale), (B, N). Order-free: a permutable model's value of an
        agent does not depend on its position (no positional embedding)."""
        return self._values(obs, state)

    # ------------------------------------------------------------------------------------------ update
    def learn(
        self, buffer: RolloutBuffer, record: StepRecord, lr: float, generator: torch.Generator
    ) -> dict[str, float]:
        """Advantages for the collected rollout (bootstrapped from `record`, the step after it), then the
        PPO update."""
        last_values = self.values(record.obs.to(self.device), record.state.to(self.device))
        batch = buffer.finish(
            last_values,
            record.alive.to(self.device),
            self.value_norm,
            self.ppo.gamma,
            self.ppo.gae_lambda,
            per_agent=self.per_agent_advantages,
        )
        return self.update(batch, lr, generator)

    def _targets(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised advantages and value targets, both (B, N). Updates the value normaliser first."""
        alive = batch.alive
        N = alive.shape[1]
        self.value_norm.update(batch.returns if batch.returns.dim() == 1 else batch.returns[alive])
        advantages, returns = batch.advantages, batch.returns
        if advantages.dim() == 1:  # one joint advantage per env-step, shared by every agent token
            advantages, returns = advantages[:, None].expand(-1, N), returns[:, None].expand(-1, N)
        return ppo_losses.normalize_advantages(advantages, alive), self.value_norm.normalize(returns)

    def update(self, batch: RolloutBatch, lr: float, generator: torch.Generator) -> dict[str, float]:
        ppo = self.ppo
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if ppo.shuffle_agent_order:
            # Everything below is in decision order (sequence position k = agent order[k]).
            batch = batch.agents_in_order(self.order)
        advantages, targets = self._targets(batch)  # (B, N) each

        totals: dict[str, torch.Tensor] = {}
        updates = 0
        B = len(batch)
        minibatch_size = max(1, B // ppo.num_minibatches)
        for _ in range(ppo.epochs):
            permutation = torch.randperm(B, generator=generator).to(self.device)
            for start in range(0, B - minibatch_size + 1, minibatch_size):
                if minibatch_size == B:
                    # One minibatch: the whole batch as it is. Shuffling it would only reorder the sums
                    # (the permutation is still drawn, so the generator's stream is the same either way).
                    mb, mb_advantages, mb_targets = batch, advantages, targets
                else:
                    idx = permutation[start : start + minibatch_size]
                    mb = batch.index(idx)
                    mb_advantages, mb_targets = advantages.index_select(0, idx), targets.index_select(0, idx)
                out = self._evaluate(mb)
                mask = mb.alive
                policy_loss, diagnostics = ppo_losses.clipped_surrogate(
                    out.log_prob, mb.log_prob, mb_advantages, ppo.clip, mask
                )
                value_loss = self._value_loss(out.value, mb.values, mb_targets, mask)
                entropy = ppo_losses.masked_mean(out.entropy, mask)
                loss = policy_loss + ppo.value_coef * value_loss - ppo.entropy_coef * entropy

                self.optimizer.zero_grad()
                loss.backward()
                grad_norm = self.optimizer.clip_grad_norm_(ppo.max_grad_norm)
                self.optimizer.step()

                stats = {
                    "losses/policy_loss": policy_loss,
                    "losses/value_loss": value_loss,
                    "losses/entropy": entropy,
                    "losses/approx_kl": diagnostics["approx_kl"],
                    "losses/clip_fraction": diagnostics["clip_fraction"],
                    "losses/grad_norm": grad_norm,
                }
                accumulate(totals, stats)
                updates += 1
        return {key: float(value) / updates for key, value in totals.items()}

    def _value_loss(
        self, value: torch.Tensor, old_value: torch.Tensor, target: torch.Tensor, alive: torch.Tensor
    ) -> torch.Tensor:
        """Clipped Huber loss per alive agent token, or on the team's mean value. All (B, N)."""
        ppo = self.ppo
        if self.value_loss_on_mean:
            value, old_value, target = (joint_value(x, alive) for x in (value, old_value, target))
            alive = alive.any(-1)
        return ppo_losses.clipped_value_loss(
            value, old_value, target, ppo.value_clip, ppo.huber_delta or None, alive
        )

    # ------------------------------------------------------------------------------------- persistence
    def state_dict(self, training: bool = True) -> dict[str, Any]:
        """Weights, optimiser, value normaliser, decision order. `training=False` asks for what an
        evaluation needs (best.pt); for PPO that is the same small state."""
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


def accumulate(totals: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> None:
    """Sum metrics as tensors: one device sync per update when they are read, not one per minibatch."""
    for key, value in stats.items():
        totals[key] = totals.get(key, 0.0) + value.detach()
