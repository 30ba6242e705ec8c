"""SMAX (JaxMARL's JAX reimplementation of SMAC) as a VectorEnv (shape legend in seqmarl/types.py).

The StarCraft II binary cannot be had from any package registry, so SMAX stands in for SMAC. Allies are
our agents; enemies follow SMAX's built-in heuristic ("HeuristicEnemySMAX").

All E environments step in one jitted, vmapped call that also resets finished episodes, so Python
touches the simulator once per step. We call `step_env` (no auto-reset) rather than `step`, because
JaxMARL's auto-reset throws away the last observation of a finished episode, which we need to bootstrap
the value when an episode is cut by the time limit. Outputs reach torch through DLPack without a copy.

Episode ends: SMAX ends an episode when one side is wiped out or after `max_steps` + 1 (101) steps.
The first is a real terminal state (`terminated`); the second is a time-limit cut (`truncated`) unless
the battle was decided on that same step. A win is "all enemies dead and at least one ally alive"
(SMAX's won-battle bonus rule; both sides dying on the same step is a draw).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from seqmarl.errors import MissingExtraError, UserError
from seqmarl.types import DiscreteActions, EnvSpec, StepRecord

EXAMPLE_MAPS = "3m, 2s3z, 8m, 5m_vs_6m, 3s5z_vs_3s6z, 27m_vs_30m"


def _import_jaxmarl() -> tuple[Any, Any, Any, Any]:
    try:
        import jax
        import jax.numpy as jnp
        from jaxmarl import make
        from jaxmarl.environments.smax import map_name_to_scenario
    except ImportError as error:
        raise MissingExtraError("SMAX (jaxmarl)", "smax", error) from error
    return jax, jnp, make, map_name_to_scenario


def make_vector_env(task: str, num_envs: int, seed: int) -> SmaxVectorEnv:
    return SmaxVectorEnv(task, num_envs, seed)


def _to_torch(x: Any) -> torch.Tensor:
    return torch.from_dlpack(x)  # zero-copy view of the jax CPU buffer


class SmaxVectorEnv:
    def __init__(self, task: str, num_envs: int, seed: int, max_steps: int | None = None):
        jax, jnp, make, map_name_to_scenario = _import_jaxmarl()
        try:
            scenario = map_name_to_scenario(task)
        except KeyError:
            raise UserError(f"unknown SMAX map {task!r}; e.g. {EXAMPLE_MAPS}") from None
        # max_steps overrides SMAX's episode limit (100); the tests use it to reach time limits quickly.
        env = make("HeuristicEnemySMAX", scenario=scenario, **({"max_steps": max_steps} if max_steps else {}))
        self._jax, self._jnp = jax, jnp
        self.num_envs = num_envs
        agents = list(env.agents)
        N = len(agents)
        obs, _ = env.reset(jax.random.PRNGKey(0))
        self.spec = EnvSpec(
            name=f"smax:{task}",
            n_agents=N,
            obs_dim=int(obs[agents[0]].shape[0]),
            state_dim=int(obs["world_state"].shape[0]),
            action_space=DiscreteActions(int(env.action_space(agents[0]).n)),
            # SMAX checks its limit before counting the step, so an undecided battle lasts max_steps + 1.
            max_episode_steps=int(env.max_steps) + 1,
            has_win=True,
        )

        def view(obs: dict, state: Any) -> dict[str, Any]:
            """What an agent sees of one env: stacked observations, state, masks, alive flags."""
            avail = env.get_avail_actions(state)
            return {
                "obs": jnp.stack([obs[a] for a in agents]).astype(jnp.float32),  # (N, O)
                "state": obs["world_state"].astype(jnp.float32),  # (S,)
                "action_mask": jnp.stack([avail[a] for a in agents]).astype(bool),  # (N, A)
                "alive": state.state.unit_alive[:N].astype(bool),  # (N,)
            }

        def strong(tree: Any) -> Any:
            # The recompile trap: reset returns some leaves with a weak dtype and step_env the same
            # leaves with a strong one, so a jitted step fed by reset compiles twice (5-9 s each).
            return jax.tree.map(lambda x: jnp.asarray(x, dtype=x.dtype), tree)  # explicit dtype: strong

        def reset_one(key: Any) -> tuple[Any, dict[str, Any]]:
            obs, state = env.reset(key)
            return strong(state), view(obs, state)

        def step_one(key, state, episode_return, episode_length, actions):
            step_key, reset_key = jax.random.split(key)
            obs, next_state, rewards, dones, _ = env.step_env(
                step_key, state, {a: actions[i] for i, a in enumerate(agents)}
            )
            next_state = strong(next_state)
            done = dones["__all__"]
            alive = next_state.state.unit_alive
            allies_left, enemies_left = alive[:N].any(), alive[N:].any()
            battle_over = ~allies_left | ~enemies_left
            episode_return = episode_return + rewards[agents[0]]  # the team reward: same for all allies
            episode_length = episode_length + 1
            final = view(obs, next_state)
            fresh_state, fresh = reset_one(reset_key)
            pick = lambda new, old: jnp.where(done, new, old)  # noqa: E731
            record = {
                **jax.tree.map(pick, fresh, final),
                "reward": rewards[agents[0]].astype(jnp.float32),
                "terminated": done & battle_over,
                "truncated": done & ~battle_over,
                "final_obs": final["obs"],
                "final_state": final["state"],
                "final_alive": final["alive"],
                "episode_return": jnp.where(done, episode_return, 0.0).astype(jnp.float32),
                "episode_length": jnp.where(done, episode_length, 0).astype(jnp.int32),
                "won": done & ~enemies_left & allies_left,
            }
            carry = (
                jax.tree.map(pick, fresh_state, next_state),
                jnp.where(done, 0.0, episode_return).astype(jnp.float32),
                jnp.where(done, 0, episode_length).astype(jnp.int32),
            )
            return carry, record

        self._reset = jax.jit(jax.vmap(reset_one))
        self._step = jax.jit(jax.vmap(step_one))
        self._key = jax.random.PRNGKey(seed)
        self._carry: tuple[Any, Any, Any] | None = None

    def _next_keys(self) -> Any:
        self._key, sub = self._jax.random.split(self._key)
        return self._jax.random.split(sub, self.num_envs)

    def reset(self, seed: int) -> StepRecord:
        jnp = self._jnp
        self._key = self._jax.random.PRNGKey(seed)
        state, view = self._reset(self._next_keys())
        E = self.num_envs
        self._carry = (state, jnp.zeros(E, jnp.float32), jnp.zeros(E, jnp.int32))
        zeros, false = torch.zeros(E), torch.zeros(E, dtype=torch.bool)
        tensors = {k: _to_torch(v) for k, v in view.items()}
        return StepRecord(
            **tensors,
            reward=zeros,
            terminated=false,
            truncated=false,
            final_obs=tensors["obs"],
            final_state=tensors["state"],
            final_alive=tensors["alive"],
            episode_return=zeros,
            episode_length=torch.zeros(E, dtype=torch.long),
            won=false,
        )

    def step(self, actions: torch.Tensor) -> StepRecord:
        if self._carry is None:
            raise RuntimeError("call reset() before step()")
        expected = (self.num_envs, self.spec.n_agents)
        if tuple(actions.shape) != expected:
            raise ValueError(f"SMAX actions must have shape {expected} (E, N), got {tuple(actions.shape)}")
        # A (E, N) int32 array is a few hundred bytes: one numpy hop is cheaper than a DLPack exchange.
        jax_actions = self._jnp.asarray(actions.detach().cpu().numpy().astype(np.int32))
        self._carry, record = self._step(self._next_keys(), *self._carry, jax_actions)
        tensors = {k: _to_torch(v) for k, v in record.items()}
        tensors["episode_length"] = tensors["episode_length"].long()
        return StepRecord(**tensors)

    def close(self) -> None:
        self._carry = None
