"""Multi-Agent MuJoCo (gymnasium-robotics `mamujoco_v1`) as a VectorEnv (shape legend in seqmarl/types.py).

Task names are "Scenario-AGENTCONF" as gymnasium-robotics spells them: "HalfCheetah-6x1", "Ant-4x2",
"Walker2d-2x3", "Humanoid-9|8". The E simulators are stepped one after the other in this process: on a
few CPU cores a MuJoCo step costs ~0.1 ms, so subprocess round trips would cost more than they save.

Padding, so that every env of every task gives fixed (E, N, ...) shapes:
- Observations: agents see different numbers of joints, so their observations differ in size (in
  HalfCheetah-6x1 agents 2 and 5 (the feet) see 8 values, the others 9; in Humanoid-9|8 agent 1 sees 170
  of 242). Each agent's observation is written at the start of its row and the rest stays zero.
- Actions: agents may drive different numbers of joints (Humanoid-9|8: 9 and 8). The action tensor is
  (E, N, A) with A the largest; agent i is sent only its first dim_i values and the rest are ignored.

Episodes end by termination (the body became unhealthy, e.g. Ant or Walker2d falling; HalfCheetah never
does) or by the simulator's time limit (truncation, 1000 steps); the two are kept apart as reported.

Speed: MaMuJoCo builds each agent's observation in Python, value by value (`obsk.build_obs`), and
maps the agents' actions onto the simulator's in a Python loop; for HalfCheetah-6x1 that is ~3x the
MuJoCo step itself. Both are fixed selections of simulator arrays, so `_Gather` works them out once
per task from MaMuJoCo's own functions (fed with arrays holding their own indices) and then does each
as one numpy indexing. It is used only after it reproduced MaMuJoCo's functions exactly on random
probe values across six orders of magnitude; a task whose observations are not such a selection
(Hopper clips some velocities to +-10) keeps MaMuJoCo's own path. Both paths give the same records,
bit for bit (tests/test_env_mamujoco.py).
"""

from __future__ import annotations

import contextlib
import io
import types
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from seqmarl.errors import MissingExtraError, UserError
from seqmarl.types import ContinuousActions, EnvSpec, StepRecord

TASK_EXAMPLES = "HalfCheetah-6x1, Ant-4x2, Walker2d-2x3, Humanoid-9|8"


def _import_mamujoco() -> Any:
    """The `mamujoco_v1` module, or a one-line MissingExtraError."""
    try:
        # gymnasium imports mujoco only when an env is built, and then raises its own error type; import
        # it here so that a missing mujoco is reported like a missing gymnasium-robotics.
        import mujoco  # noqa: F401

        # gymnasium_robotics prints a notice about its Adroit tasks' rewards to stderr on import; it does
        # not concern MaMuJoCo and would break our one-line error messages, so it is swallowed here.
        with contextlib.redirect_stderr(io.StringIO()):
            from gymnasium_robotics import mamujoco_v1
    except ImportError as error:
        raise MissingExtraError(
            "Multi-Agent MuJoCo (gymnasium-robotics + mujoco)", "mujoco", error
        ) from error
    return mamujoco_v1


def parse_task(task: str) -> tuple[str, str]:
    """ "Humanoid-9|8" -> ("Humanoid", "9|8"). Split on the last '-': agent confs never contain one."""
    scenario, sep, agent_conf = task.rpartition("-")
    if not sep or not scenario or not agent_conf:
        raise UserError(
            f"bad Multi-Agent MuJoCo task {task!r}; expected Scenario-AGENTCONF, e.g. {TASK_EXAMPLES}"
        )
    return scenario, agent_conf


def shared_action_bounds(
    lows: Sequence[np.ndarray], highs: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """One (A,) low/high pair valid for every agent, A the largest action dim.

    Dimension j takes the bounds of the agents that have a j-th action dim; they must all agree, because
    the spec (and the policy's squashing) has one bound per dimension, not per agent.
    """
    action_dim = max(len(low) for low in lows)
    low = np.full(action_dim, np.nan, dtype=np.float32)
    high = np.full(action_dim, np.nan, dtype=np.float32)
    for agent_low, agent_high in zip(lows, highs):
        dim = len(agent_low)
        seen = ~np.isnan(low[:dim])
        if np.any(low[:dim][seen] != agent_low[seen]) or np.any(high[:dim][seen] != agent_high[seen]):
            raise UserError("agents with different action bounds are not supported yet")
        low[:dim] = agent_low
        high[:dim] = agent_high
    return low, high


_OBS_SOURCES = ("qpos", "qvel", "cinert", "cvel", "qfrc_actuator", "cfrc_ext")  # build_obs's categories
_PROBE_SCALES = (1.0, 10.0, 1e3, 1e6)  # random probe values of these magnitudes must give equal outputs


class _Gather:
    """Observations and the global action of one MaMuJoCo task as index gathers (see the module
    docstring). `build(env)` returns None when MaMuJoCo's functions are not such gathers."""

    def __init__(self, obs_index, clip_mask, action_agent, action_local, action_global, num_actions):
        self.obs_index = obs_index  # (N, O) int64 into the source vector; its last entry is a 0 (padding)
        self.clip_mask = clip_mask  # (N, O) bool: values MaMuJoCo clips to [-1, 1] (Ant's contact forces)
        self.action_agent = action_agent  # (G,) agent of each simulator action
        self.action_local = action_local  # (G,) that agent's action index
        self.action_global = action_global  # (G,) the simulator's action index
        self.num_actions = num_actions  # G

    @staticmethod
    def _probe(data: Any, fill: Any) -> Any:
        """A stand-in for MjData whose build_obs categories hold `fill(size, offset)` values."""
        probe, offset = types.SimpleNamespace(), 0
        for name in _OBS_SOURCES:
            array = getattr(data, name)
            setattr(probe, name, np.asarray(fill(array.size, offset), dtype=np.float64).reshape(array.shape))
            offset += array.size
        return probe

    @staticmethod
    def source(data: Any) -> np.ndarray:
        """MjData (or a probe) -> the (S + 1,) vector the observation indices point into."""
        return np.concatenate([np.ravel(getattr(data, name)) for name in _OBS_SOURCES] + [np.zeros(1)])

    @classmethod
    def build(cls, env: Any, obs_dim: int) -> _Gather | None:
        from gymnasium_robotics.envs.multiagent_mujoco.obsk import build_obs

        if getattr(env, "agent_obsk", None) is None:  # a single-agent configuration: nothing to gather
            return None
        data = env.single_agent_env.unwrapped.data
        agents = list(env.possible_agents)

        def observe(probe: Any, raw: bool) -> list[np.ndarray]:
            categories = (env.local_categories, env.mujoco_globals, env.global_categories)
            return [
                np.asarray(build_obs(probe, env.k_dicts[i], *categories, raw), dtype=np.float64)
                for i in range(len(agents))
            ]

        total = sum(getattr(data, name).size for name in _OBS_SOURCES)
        try:
            indices = observe(cls._probe(data, lambda size, offset: offset + np.arange(size)), True)
            big = cls._probe(data, lambda size, offset: np.full(size, 1e9))
            clipped = [raw != out for raw, out in zip(observe(big, True), observe(big, False))]
        except Exception:  # a category or an extra observation that cannot take a stand-in
            return None
        obs_index = np.full((len(agents), obs_dim), total, dtype=np.int64)  # total -> the padding 0
        clip_mask = np.zeros((len(agents), obs_dim), dtype=bool)
        for i, (index, clip) in enumerate(zip(indices, clipped)):
            whole = np.all(index == np.round(index)) and np.all((index >= 0) & (index < total))
            if len(index) > obs_dim or not whole:
                return None
            obs_index[i, : len(index)] = index.astype(np.int64)
            clip_mask[i, : len(clip)] = clip
        agent, local, glob = [], [], []
        for i, partition in enumerate(env.agent_action_partitions):
            for j, part in enumerate(partition):
                agent.append(i)
                local.append(j)
                glob.append(part.act_ids)
        if not all(isinstance(g, (int, np.integer)) for g in glob):
            return None
        num_actions = env.single_agent_env.action_space.shape[0]
        gather = cls(obs_index, clip_mask, np.array(agent), np.array(local), np.array(glob), num_actions)
        try:
            return gather if gather._reproduces(env, observe, data) else None
        except Exception:  # e.g. MaMuJoCo's own assertion that an action is defined twice
            return None

    def _reproduces(self, env: Any, observe: Any, data: Any) -> bool:
        """Whether the gathers equal MaMuJoCo's functions on random probes of every scale."""
        rng = np.random.default_rng(0)
        agents = list(env.possible_agents)
        for scale in _PROBE_SCALES:
            probe = self._probe(data, lambda size, offset, scale=scale: rng.uniform(-scale, scale, size))
            expected = observe(probe, False)
            got = self.observations(self.source(probe))
            for i, values in enumerate(expected):
                if not (np.array_equal(got[i, : len(values)], values) and not got[i, len(values) :].any()):
                    return False
            local = rng.uniform(-1, 1, (len(agents), int(self.action_local.max()) + 1))
            actions = {
                agent: local[i, : len(env.agent_action_partitions[i])] for i, agent in enumerate(agents)
            }
            if not np.array_equal(
                self.global_actions(local[None])[0], env.map_local_actions_to_global_action(actions)
            ):
                return False
        return True

    def observations(self, source: np.ndarray) -> np.ndarray:
        """source: (S + 1,) simulator values (`source`) -> (N, O) float64 observations, zero-padded."""
        obs = source[self.obs_index]
        if self.clip_mask.any():
            obs[self.clip_mask] = np.clip(obs[self.clip_mask], -1.0, 1.0)
        return obs

    def global_actions(self, actions: np.ndarray) -> np.ndarray:
        """actions: (E, N, A) per-agent actions -> (E, G) float64 simulator actions."""
        out = np.empty((actions.shape[0], self.num_actions), dtype=np.float64)
        out[:, self.action_global] = actions[:, self.action_agent, self.action_local]
        return out


class MaMujocoVectorEnv:
    """E Multi-Agent MuJoCo simulators of one task, reset automatically when an episode ends.

    Episode k of env e is reset with a seed derived from (seed, e, k), so a whole vector is reproducible
    from `seed` alone, whatever order its envs finish in. The constructor already resets with `seed`, so
    `step` works at once; `reset(seed)` starts every env over.
    """

    def __init__(self, task: str, num_envs: int, seed: int):
        if num_envs < 1:
            raise UserError(f"num_envs must be >= 1, got {num_envs}")
        scenario, agent_conf = parse_task(task)
        mamujoco_v1 = _import_mamujoco()
        try:
            self._envs = [mamujoco_v1.parallel_env(scenario, agent_conf) for _ in range(num_envs)]
        except Exception as error:
            # gymnasium-robotics raises a bare Exception ("UNKNOWN partitioning config") for a bad agent
            # conf and NotImplementedError for an unknown scenario.
            raise UserError(
                f"unknown Multi-Agent MuJoCo task {task!r} ({error}); examples: {TASK_EXAMPLES}"
            ) from error
        first = self._envs[0]
        self._agents: list[str] = list(first.possible_agents)
        self._obs_sizes = [first.observation_space(agent).shape[0] for agent in self._agents]
        action_boxes = [first.action_space(agent) for agent in self._agents]
        self._action_dims = [box.shape[0] for box in action_boxes]
        self._low, self._high = shared_action_bounds(
            [box.low for box in action_boxes], [box.high for box in action_boxes]
        )
        time_limit = getattr(first.single_agent_env.spec, "max_episode_steps", None)
        if time_limit is None:
            raise UserError(f"Multi-Agent MuJoCo task {task!r} has no time limit; seqmarl needs one")

        self.num_envs = num_envs
        self.spec = EnvSpec(
            name=f"mamujoco:{task}",
            n_agents=len(self._agents),
            obs_dim=max(self._obs_sizes),
            state_dim=first.state().shape[0],
            action_space=ContinuousActions(
                dim=len(self._low), low=tuple(self._low.tolist()), high=tuple(self._high.tolist())
            ),
            max_episode_steps=time_limit,
            has_win=False,
        )
        self._gather = _Gather.build(first, self.spec.obs_dim)  # None: MaMuJoCo's own (slower) path
        self.reset(seed)

    def reset(self, seed: int) -> StepRecord:
        if seed < 0:
            raise UserError(f"seed must be >= 0, got {seed}")
        self._seed = seed
        self._episode_index = [0] * self.num_envs
        self._running_return = np.zeros(self.num_envs, dtype=np.float64)
        self._running_length = np.zeros(self.num_envs, dtype=np.int64)
        obs, state = self._empty_obs(), self._empty_state()
        for env_index in range(self.num_envs):
            self._reset_env(env_index, obs[env_index], state[env_index])
        E = self.num_envs
        return self._record(
            obs=obs,
            state=state,
            reward=np.zeros(E, dtype=np.float32),
            terminated=np.zeros(E, dtype=bool),
            truncated=np.zeros(E, dtype=bool),
            final_obs=obs.copy(),
            final_state=state.copy(),
            episode_return=np.zeros(E, dtype=np.float32),
            episode_length=np.zeros(E, dtype=np.int64),
        )

    def step(self, actions: torch.Tensor) -> StepRecord:
        """actions: (E, N, A) float on any device; clipped to the bounds before the simulator sees them."""
        clipped = self._actions_to_numpy(actions)  # (E, N, A)
        E = self.num_envs
        # Fresh arrays every step: the returned tensors share their memory (torch.from_numpy), and a
        # caller that stores records must never see them overwritten by a later step.
        obs, state = self._empty_obs(), self._empty_state()
        final_obs, final_state = self._empty_obs(), self._empty_state()
        reward = np.zeros(E, dtype=np.float32)
        terminated = np.zeros(E, dtype=bool)
        truncated = np.zeros(E, dtype=bool)
        episode_return = np.zeros(E, dtype=np.float32)
        episode_length = np.zeros(E, dtype=np.int64)
        first_agent = self._agents[0]
        gather = self._gather
        global_actions = gather.global_actions(clipped) if gather is not None else None
        for env_index, env in enumerate(self._envs):
            if gather is not None:  # what env.step does, with the two gathers (module docstring)
                simulator = env.single_agent_env
                single_obs, team_reward, ended, cut, _ = simulator.step(global_actions[env_index])
                final_obs[env_index] = gather.observations(gather.source(simulator.unwrapped.data))
                final_state[env_index] = single_obs  # = env.state(): the single-agent observation
                if ended or cut:
                    env.agents = []
            else:
                agent_actions = {
                    agent: clipped[env_index, agent_index, :dim]
                    for agent_index, (agent, dim) in enumerate(zip(self._agents, self._action_dims))
                }
                observations, rewards, terminations, truncations, _ = env.step(agent_actions)
                # MaMuJoCo gives every agent the same team reward and the same end flags.
                team_reward, ended, cut = (
                    rewards[first_agent],
                    terminations[first_agent],
                    truncations[first_agent],
                )
                self._write_obs(final_obs[env_index], observations)
                final_state[env_index] = env.state()
            team_reward = float(team_reward)
            reward[env_index] = team_reward
            terminated[env_index] = ended
            truncated[env_index] = cut
            self._running_return[env_index] += team_reward
            self._running_length[env_index] += 1
            if terminated[env_index] or truncated[env_index]:
                episode_return[env_index] = self._running_return[env_index]
                episode_length[env_index] = self._running_length[env_index]
                self._running_return[env_index] = 0.0
                self._running_length[env_index] = 0
                self._reset_env(env_index, obs[env_index], state[env_index])
            else:
                obs[env_index] = final_obs[env_index]
                state[env_index] = final_state[env_index]
        return self._record(
            obs=obs,
            state=state,
            reward=reward,
            terminated=terminated,
            truncated=truncated,
            final_obs=final_obs,
            final_state=final_state,
            episode_return=episode_return,
            episode_length=episode_length,
        )

    def get_state(self) -> dict[str, Any]:
        """Everything the vector needs to continue exactly (for checkpoints): the episode bookkeeping
        and, per simulator, its step counter and a copy of every array of its `MjData`.

        Copying all of MjData rather than only the integration state (`mj_getState`) matters: the
        gymnasium tasks read derived quantities (body positions, contact forces) computed by the
        previous `mj_step` *before* the next one, and those lag the integration state by a substep,
        so recomputing them with `mj_forward` would change the first reward after a restore.
        """
        simulators = []
        for env in self._envs:
            limit = env.single_agent_env  # gymnasium's TimeLimit wrapper: it counts the episode's steps
            data = limit.unwrapped.data
            arrays = {name: torch.from_numpy(getattr(data, name).copy()) for name in _mjdata_arrays(data)}
            simulators.append({"elapsed_steps": int(limit._elapsed_steps), "data": arrays})
        return {
            "simulator": "mamujoco",
            "task": self.spec.name,
            "num_envs": self.num_envs,
            "seed": self._seed,
            "episode_index": list(self._episode_index),
            "running_return": torch.from_numpy(self._running_return.copy()),
            "running_length": torch.from_numpy(self._running_length.copy()),
            "simulators": simulators,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from `get_state()`'s output (of a vector with the same task and number of envs)."""
        if state.get("task") != self.spec.name or state.get("num_envs") != self.num_envs:
            raise UserError(
                f"saved simulator state does not fit {self.spec.name} with {self.num_envs} envs "
                f"(it is for {state.get('task')} with {state.get('num_envs')} envs)"
            )
        self._seed = int(state["seed"])
        self._episode_index = [int(k) for k in state["episode_index"]]
        self._running_return = state["running_return"].numpy().copy()
        self._running_length = state["running_length"].numpy().copy()
        for env, saved in zip(self._envs, state["simulators"]):
            limit = env.single_agent_env
            data = limit.unwrapped.data
            for name, value in saved["data"].items():
                target = getattr(data, name)
                # A shape that differs marks one of the per-step arrays sized by the last step's active
                # constraints or islands (efc_*, iefc_*, iacc, ...), rebuilt at the start of every step.
                if target.shape == tuple(value.shape):
                    target[...] = value.numpy()
            limit._elapsed_steps = int(saved["elapsed_steps"])

    def close(self) -> None:
        for env in self._envs:
            env.close()

    def _actions_to_numpy(self, actions: torch.Tensor) -> np.ndarray:
        expected = (self.num_envs, self.spec.n_agents, self.spec.action_space.dim)
        if tuple(actions.shape) != expected:
            raise ValueError(f"actions must have shape (E, N, A) = {expected}, got {tuple(actions.shape)}")
        array = actions.detach().to(device="cpu", dtype=torch.float32).numpy()
        # A NaN survives clipping and then fails deep in gymnasium-robotics with a misleading
        # "action is undefined" assertion.
        if np.isnan(array).any():
            raise ValueError("actions contain NaN")
        return np.clip(array, self._low, self._high)  # a new array: the caller's tensor is never modified

    def _reset_env(self, env_index: int, obs_row: np.ndarray, state_row: np.ndarray) -> None:
        """Start env `env_index`'s next episode and write its first observation into the given rows."""
        episode_seed = np.random.SeedSequence((self._seed, env_index, self._episode_index[env_index]))
        self._episode_index[env_index] += 1
        env = self._envs[env_index]
        observations, _ = env.reset(seed=int(episode_seed.generate_state(1)[0]))
        self._write_obs(obs_row, observations)
        state_row[:] = env.state()

    def _write_obs(self, obs_row: np.ndarray, observations: dict[str, np.ndarray]) -> None:
        """obs_row: (N, O), zero-initialised; agent i fills its first obs_size_i entries, the rest stays 0."""
        for agent_index, (agent, size) in enumerate(zip(self._agents, self._obs_sizes)):
            obs_row[agent_index, :size] = observations[agent]

    def _empty_obs(self) -> np.ndarray:
        return np.zeros((self.num_envs, self.spec.n_agents, self.spec.obs_dim), dtype=np.float32)

    def _empty_state(self) -> np.ndarray:
        return np.empty((self.num_envs, self.spec.state_dim), dtype=np.float32)

    def _record(self, **arrays: np.ndarray) -> StepRecord:
        E, N, A = self.num_envs, self.spec.n_agents, self.spec.action_space.dim
        tensors = {name: torch.from_numpy(array) for name, array in arrays.items()}
        # No agent ever dies in MuJoCo, and every action dimension is always available.
        alive = torch.ones(E, N, dtype=torch.bool)
        available = torch.ones(E, N, A, dtype=torch.bool)
        return StepRecord(
            **tensors,
            action_mask=available,
            alive=alive,
            final_alive=alive.clone(),
            final_action_mask=available.clone(),
            won=torch.zeros(E, dtype=torch.bool),
            discarded=torch.zeros(E, dtype=torch.bool),  # only the guard discards (envs/guard.py)
        )


def _mjdata_arrays(data: Any) -> list[str]:
    """Names of MjData's numpy array fields (positions, velocities, warm start, derived quantities)."""
    names = []
    for name in dir(data):
        if name.startswith("_"):
            continue
        try:
            value = getattr(data, name)
        except Exception:  # some fields raise when the model lacks the feature
            continue
        if isinstance(value, np.ndarray):
            names.append(name)
    return names


def make_vector_env(task: str, num_envs: int, seed: int) -> MaMujocoVectorEnv:
    """The registry's entry point: `task` is "Scenario-AGENTCONF", e.g. "HalfCheetah-6x1"."""
    return MaMujocoVectorEnv(task, num_envs=num_envs, seed=seed)
