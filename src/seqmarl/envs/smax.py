"""SMAX (JaxMARL's JAX reimplementation of SMAC) as a VectorEnv (shape legend in seqmarl/types.py).

The StarCraft II binary cannot be had from any package registry, so SMAX stands in for SMAC. Allies are
our agents; enemies follow SMAX's built-in heuristic ("HeuristicEnemySMAX").

All E environments step in one jitted, vmapped call that also splits the PRNG key, keeps the episode
bookkeeping and resets finished episodes, so Python touches the simulator once per step. We call
`step_env` (no auto-reset) rather than `step`, because JaxMARL's auto-reset throws away the last
observation of a finished episode, which we need to bootstrap the value when an episode is cut by the
time limit. Outputs reach torch through DLPack without a copy (with `sim_device="gpu"`, SMAX on jax's
GPU, they are copied to host memory in one `jax.device_get` per step).

Episode ends: SMAX ends an episode when one side is wiped out or when its step counter reaches
`max_steps` (100) *before* counting the current step, so an undecided battle lasts max_steps + 1 (101)
steps. The first is a real terminal state (`terminated`); the second is a time-limit cut (`truncated`)
unless the battle was decided on that same step. A win is "all enemies dead and at least one ally alive"
(SMAX's won-battle bonus rule in `compute_reward`; both sides dying on the same step is a draw).
"""

from __future__ import annotations

import functools
import io
import os
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from seqmarl.errors import MissingExtraError, UserError
from seqmarl.types import DiscreteActions, EnvSpec, StepRecord

EXAMPLE_MAPS = "3m, 2s3z, 8m, 5m_vs_6m, 3s5z_vs_3s6z, 27m_vs_30m"


class Carry(NamedTuple):
    """What the jitted step threads from one call to the next. A pytree of jax arrays."""

    key: Any  # (2,) uint32 PRNG key, split inside the jitted step
    state: Any  # HeuristicEnemySMAX State, every leaf with a leading E axis
    episode_return: Any  # (E,) float32 return of the running episodes so far
    episode_length: Any  # (E,) int32 steps of the running episodes so far


def _make_smax(task: str, max_steps: int | None) -> Any:
    # jaxmarl prints two lines about optional environments on import; keep our CLI's output our own. One of
    # its modules (mabrax) also silences sys.stdout/sys.stderr and then resets both to sys.__stdout__ and
    # sys.__stderr__, which would undo any redirection (pytest's capture, a caller's redirect_stdout) and
    # let the chatter through. So during the import the "originals" are a sink and the current stderr.
    saved = sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__
    sink = io.StringIO()
    # On a GPU machine jax would take 75% of the GPU's memory at its first op, beside torch's model on the
    # same GPU; allocate as needed instead (read when jax starts its backend; a user's setting stands).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        sys.stdout = sys.__stdout__ = sink
        sys.__stderr__ = saved[1]
        from jaxmarl import make
        from jaxmarl.environments.smax import map_name_to_scenario
    except ImportError as error:
        raise MissingExtraError("SMAX (jaxmarl)", "smax", error) from error
    finally:
        sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__ = saved
    try:
        scenario = map_name_to_scenario(task)
    except KeyError:  # map_name_to_scenario is a plain dict lookup
        raise UserError(f"unknown SMAX map {task!r}; valid maps include {EXAMPLE_MAPS}") from None
    limit = {} if max_steps is None else {"max_steps": max_steps}
    return make("HeuristicEnemySMAX", scenario=scenario, **limit)


def build_functions(env: Any, num_envs: int) -> tuple[Callable, Callable]:
    """Pure, unjitted `reset(key) -> (carry, record)` and `step(carry, actions) -> (carry, record)`.

    `actions` is (E, N) int32; a record is a dict of jax arrays named like the StepRecord fields.
    """
    import jax
    import jax.numpy as jnp

    agents = list(env.agents)
    N, E = len(agents), num_envs

    def strong(tree: Any) -> Any:
        # The recompile trap: reset gives the enemy policy state's `last_attacked_enemy` a weak int32 and
        # step_env a strong one, so a jitted step fed by reset would compile twice (5-9 s each).
        # convert_element_type without `weak_type=True` always yields a strong type (a no-op otherwise).
        return jax.tree.map(lambda x: jax.lax.convert_element_type(x, x.dtype), tree)

    def view(obs: dict[str, Any], state: Any) -> dict[str, Any]:
        """What the learner sees of one env: stacked observations, state, masks, alive flags."""
        available = env.get_avail_actions(state)
        return {
            "obs": jnp.stack([obs[agent] for agent in agents]).astype(jnp.float32),  # (N, O)
            "state": obs["world_state"].astype(jnp.float32),  # (S,)
            "action_mask": jnp.stack([available[agent] for agent in agents]).astype(jnp.bool_),  # (N, A)
            "alive": state.state.unit_alive[:N],  # (N,) allies come first in SMAX's unit arrays
        }

    def reset_one(key: Any) -> tuple[Any, dict[str, Any]]:
        obs, state = env.reset(key)
        state = strong(state)
        return state, view(obs, state)

    def step_one(
        step_key: Any, reset_key: Any, state: Any, episode_return: Any, episode_length: Any, actions: Any
    ) -> tuple[tuple[Any, Any, Any], dict[str, Any]]:
        obs, state, rewards, dones, _ = env.step_env(
            step_key, state, {agent: actions[i] for i, agent in enumerate(agents)}
        )
        state = strong(state)
        final = view(obs, state)
        reward = rewards[agents[0]]  # the team reward: SMAX gives every ally the same one
        episode_return = episode_return + reward
        episode_length = episode_length + 1
        done = dones["__all__"]
        allies_left, enemies_left = state.state.unit_alive[:N].any(), state.state.unit_alive[N:].any()
        decided = ~(allies_left & enemies_left)  # a side is wiped out: terminal even at the time limit

        # vmap turns a per-env `cond` into both branches anyway, so reset every env and keep what is needed.
        fresh_state, fresh = reset_one(reset_key)
        where_done = lambda new, old: jnp.where(done, new, old)  # noqa: E731
        record = {
            **jax.tree.map(where_done, fresh, final),
            "reward": reward,
            "terminated": done & decided,
            "truncated": done & ~decided,
            "final_obs": final["obs"],
            "final_state": final["state"],
            "final_alive": final["alive"],
            "final_action_mask": final["action_mask"],
            "episode_return": jnp.where(done, episode_return, 0.0),
            "episode_length": jnp.where(done, episode_length, 0),
            "won": done & allies_left & ~enemies_left,
        }
        carry = (
            jax.tree.map(where_done, fresh_state, state),
            jnp.where(done, 0.0, episode_return),
            jnp.where(done, 0, episode_length),
        )
        return carry, record

    def reset(key: Any) -> tuple[Carry, dict[str, Any]]:
        key, reset_key = jax.random.split(key)
        state, first = jax.vmap(reset_one)(jax.random.split(reset_key, E))
        zeros, false = jnp.zeros(E, jnp.float32), jnp.zeros(E, jnp.bool_)
        record = {
            **first,
            "reward": zeros,
            "terminated": false,
            "truncated": false,
            "final_obs": first["obs"],
            "final_state": first["state"],
            "final_alive": first["alive"],
            "final_action_mask": first["action_mask"],
            "episode_return": zeros,
            "episode_length": jnp.zeros(E, jnp.int32),
            "won": false,
        }
        return Carry(key, state, zeros, jnp.zeros(E, jnp.int32)), record

    def step(carry: Carry, actions: Any) -> tuple[Carry, dict[str, Any]]:
        key, step_key, reset_key = jax.random.split(carry.key, 3)
        (state, episode_return, episode_length), record = jax.vmap(step_one)(
            jax.random.split(step_key, E),
            jax.random.split(reset_key, E),
            carry.state,
            carry.episode_return,
            carry.episode_length,
            actions,
        )
        return Carry(key, state, episode_return, episode_length), record

    return reset, step


def _to_record(arrays: dict[str, Any], on_host: bool = True) -> StepRecord:
    if on_host:
        tensors = {name: torch.from_dlpack(array) for name, array in arrays.items()}  # zero-copy views
    else:  # a GPU simulator: one transfer of every field to host memory (np.array: writable copies)
        import jax

        tensors = {name: torch.from_numpy(np.array(a)) for name, a in jax.device_get(arrays).items()}
    # jax keeps 32-bit integers unless x64 is switched on globally; StepRecord promises int64 (E values).
    tensors["episode_length"] = tensors["episode_length"].long()
    # The adapter never discards an episode; only the guard does, when it restarts the simulator.
    tensors["discarded"] = torch.zeros_like(tensors["won"])
    return StepRecord(**tensors)


@functools.lru_cache(maxsize=16)
def _compiled_functions(task: str, num_envs: int, max_steps: int | None) -> tuple[Callable, Callable]:
    """The jitted reset and step for one (map, E, limit), made once per process: compiling costs 5-15 s,
    and a run builds its vector again on resume or after a simulator restart (seqmarl/envs/guard.py)."""
    import jax

    reset, step = build_functions(_make_smax(task, max_steps), num_envs)
    return jax.jit(reset), jax.jit(step)


class SmaxVectorEnv:
    """E copies of one SMAX map. The constructor already resets with `seed`, so `step` works at once.

    The whole vector's randomness comes from one PRNG key made from the reset seed, so the same seed and
    the same actions give the same trajectory (on one device: jax's GPU rounds differently). Returned
    tensors are views of jax buffers (host copies for a GPU simulator): read them or copy them, but do not
    write into them.
    """

    def __init__(
        self, task: str, num_envs: int, seed: int, max_steps: int | None = None, sim_device: str = "cpu"
    ):
        # max_steps overrides SMAX's step limit (100); the tests use it to reach time limits quickly.
        env = _make_smax(task, max_steps)
        import jax

        self._jax = jax
        self.num_envs = num_envs
        agents = list(env.agents)
        # eval_shape traces reset without compiling it: the spec costs no XLA time.
        obs, _ = jax.eval_shape(env.reset, jax.random.PRNGKey(0))
        self.spec = EnvSpec(
            name=f"smax:{task}",
            n_agents=len(agents),
            obs_dim=int(obs[agents[0]].shape[0]),
            state_dim=int(obs["world_state"].shape[0]),
            action_space=DiscreteActions(int(env.action_space(agents[0]).n)),
            max_episode_steps=int(env.max_steps) + 1,  # see the module docstring
            has_win=True,
        )
        self._reset, self._step = _compiled_functions(task, num_envs, max_steps)
        # The simulator runs on jax's CPU device, even where jax sees a GPU, unless sim_device="gpu" asks for
        # jax's GPU (large maps; EnvConfig.sim_device). Records are CPU tensors either way (the VectorEnv
        # contract, seqmarl/types.py): the rollout copies them to the model's device once.
        if sim_device == "gpu":
            if jax.default_backend() != "gpu":
                raise UserError(
                    f"env.sim_device=gpu, but jax sees no GPU (its backend: {jax.default_backend()!r}); "
                    "install a CUDA build of jax, or use env.sim_device=cpu"
                )
            self._device = jax.devices("gpu")[0]
        elif sim_device == "cpu":
            self._device = jax.devices("cpu")[0]
        else:
            raise UserError(f"SMAX's sim_device must be 'cpu' or 'gpu', got {sim_device!r}")
        self._carry: Carry | None = None
        self.reset(seed)

    def reset(self, seed: int) -> StepRecord:
        with self._jax.default_device(self._device):
            self._carry, arrays = self._reset(self._jax.random.PRNGKey(seed))
        return _to_record(arrays, self._device.platform == "cpu")

    def step(self, actions: torch.Tensor) -> StepRecord:
        if self._carry is None:
            raise RuntimeError("step() after close(); call reset() first")
        expected = (self.num_envs, self.spec.n_agents)
        if tuple(actions.shape) != expected:
            raise ValueError(f"SMAX actions must have shape {expected} (E, N), got {tuple(actions.shape)}")
        # A (E, N) int32 array is a few hundred bytes: handing jit a numpy array (~25 us) beats a DLPack
        # exchange (~40 us, it needs a torch int32 copy first anyway).
        numpy_actions = actions.detach().cpu().numpy().astype(np.int32)
        with self._jax.default_device(self._device):
            self._carry, arrays = self._step(self._carry, numpy_actions)
        return _to_record(arrays, self._device.platform == "cpu")

    def get_state(self) -> dict[str, Any]:
        """Everything the vector needs to continue exactly: the carry's leaves (PRNG key, every env's
        battle state, the running episodes' return and length), as raw bytes with dtype and shape so
        that a checkpoint holds plain tensors only (jax's uint32 keys have no portable torch dtype)."""
        if self._carry is None:
            raise RuntimeError("get_state() after close()")
        leaves = []
        for leaf in self._jax.tree.leaves(self._carry):
            array = np.ascontiguousarray(np.asarray(leaf))
            raw = torch.from_numpy(array.reshape(-1).view(np.uint8).copy())
            leaves.append({"dtype": array.dtype.str, "shape": list(array.shape), "bytes": raw})
        return {"simulator": "smax", "task": self.spec.name, "num_envs": self.num_envs, "leaves": leaves}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from `get_state()`'s output (of a vector with the same map and number of envs)."""
        if self._carry is None:
            raise RuntimeError("set_state() after close(); call reset() first")
        template = self._jax.tree.leaves(self._carry)
        fits = (
            state.get("task") == self.spec.name
            and state.get("num_envs") == self.num_envs
            and len(state.get("leaves", [])) == len(template)
        )
        if not fits:
            raise UserError(
                f"saved simulator state does not fit {self.spec.name} with {self.num_envs} envs "
                f"(it is for {state.get('task')} with {state.get('num_envs')} envs)"
            )
        leaves = []
        for saved, current in zip(state["leaves"], template):
            array = np.frombuffer(saved["bytes"].numpy().tobytes(), dtype=np.dtype(saved["dtype"]))
            array = array.reshape(saved["shape"])
            if array.shape != current.shape or array.dtype != current.dtype:
                raise UserError(
                    f"saved SMAX state leaf {array.dtype}{array.shape} != {current.dtype}{current.shape}"
                )
            # jnp.asarray of a numpy array has a strong dtype, like the carry the jitted step was compiled
            # for, and lands uncommitted on the default device set below, as reset's outputs do (device_put
            # to a device would commit it: another jit cache key), so restoring never recompiles (the
            # adapter's tests, after the resume tests in one process).
            with self._jax.default_device(self._device):
                leaves.append(self._jax.numpy.asarray(array))
        self._carry = self._jax.tree.unflatten(self._jax.tree.structure(self._carry), leaves)

    def close(self) -> None:
        self._carry = None


SIM_DEVICES = ("cpu", "gpu")  # envs/registry.py: where this simulator can run (EnvConfig.sim_device)


def make_vector_env(task: str, num_envs: int, seed: int, sim_device: str = "cpu") -> SmaxVectorEnv:
    return SmaxVectorEnv(task, num_envs, seed, sim_device=sim_device)
