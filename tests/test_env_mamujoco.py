"""Contract tests of the Multi-Agent MuJoCo adapter against the real simulator (gymnasium-robotics)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium_robotics import mamujoco_v1

from seqmarl.envs.guard import GuardedVectorEnv
from seqmarl.envs.mamujoco import MaMujocoVectorEnv, make_vector_env, shared_action_bounds
from seqmarl.envs.registry import make_vector_env as make_any_vector_env
from seqmarl.errors import MissingExtraError, UserError
from seqmarl.types import ContinuousActions, StepRecord, step_record_layout

CHEETAH = "HalfCheetah-6x1"
CHEETAH_SHORT_OBS_AGENTS = [2, 5]  # the feet see one joint fewer: 8 values instead of 9


@pytest.fixture(autouse=True)
def _mujoco_log_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # MuJoCo appends its warnings (e.g. the deprecated 'settotalmass' in gymnasium's model files) to
    # MUJOCO_LOG.TXT in the working directory; keep test runs from writing it into the checkout.
    monkeypatch.chdir(tmp_path)


def random_actions(env: MaMujocoVectorEnv, generator: torch.Generator) -> torch.Tensor:
    E, N, A = env.num_envs, env.spec.n_agents, env.spec.action_space.dim
    return torch.rand(E, N, A, generator=generator) * 2 - 1


def assert_record_contract(record: StepRecord, env: MaMujocoVectorEnv) -> None:
    expected = step_record_layout(env.spec, env.num_envs)
    for name, (shape, dtype) in expected.items():
        tensor = getattr(record, name)
        assert tuple(tensor.shape) == shape, name
        assert tensor.dtype == dtype, name
        assert tensor.device.type == "cpu", name
    assert record.action_mask.all() and record.alive.all() and record.final_alive.all()
    assert not record.won.any()
    assert torch.isfinite(record.reward).all()
    assert torch.isfinite(record.obs).all() and torch.isfinite(record.state).all()


def assert_records_equal(first: StepRecord, second: StepRecord) -> None:
    for name, tensor in vars(first).items():
        assert torch.equal(tensor, getattr(second, name)), name


def test_halfcheetah_contract_and_padding() -> None:
    env = make_vector_env(CHEETAH, num_envs=3, seed=0)
    assert env.spec.name == f"mamujoco:{CHEETAH}"
    assert (env.spec.n_agents, env.spec.obs_dim, env.spec.state_dim) == (6, 9, 17)
    assert env.spec.action_space == ContinuousActions(dim=1, low=(-1.0,), high=(1.0,))
    assert env.spec.max_episode_steps == 1000 and not env.spec.has_win and not env.spec.discrete

    generator = torch.Generator().manual_seed(0)
    records = [env.reset(seed=0)] + [env.step(random_actions(env, generator)) for _ in range(5)]
    for record in records:
        assert_record_contract(record, env)
        assert not record.done.any()  # HalfCheetah never terminates, and 5 steps are far from the limit
        assert torch.equal(record.final_obs, record.obs) and torch.equal(record.final_state, record.state)
        for agent in range(6):
            padded = agent in CHEETAH_SHORT_OBS_AGENTS
            assert (record.obs[:, agent, 8] == 0).all() == padded
    # Each env of the vector runs its own episode seed.
    assert not torch.equal(records[0].obs[0], records[0].obs[1])
    env.close()


def test_team_reward_is_shared_by_all_agents() -> None:
    env = mamujoco_v1.parallel_env("HalfCheetah", "6x1")
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        _, rewards, _, _, _ = env.step({agent: rng.uniform(-1, 1, 1) for agent in env.agents})
        assert len(set(rewards.values())) == 1
    env.close()


def test_actions_are_clipped_to_the_bounds() -> None:
    # MuJoCo clamps the controls itself, but the control cost in the reward uses the action as sent,
    # so unclipped actions of +-5 would change the reward.
    signs = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0]).reshape(1, 6, 1)
    clipped_twin = make_vector_env(CHEETAH, num_envs=1, seed=3)
    clipped = clipped_twin.step(signs * 1.0)
    env = make_vector_env(CHEETAH, num_envs=1, seed=3)
    outside = env.step(signs * 5.0)
    assert_records_equal(outside, clipped)
    # The comparison can tell actions apart: an action inside the bounds gives another step.
    other = make_vector_env(CHEETAH, num_envs=1, seed=3).step(signs * 0.5)
    assert not torch.equal(other.state, clipped.state)


def test_caller_tensor_is_not_modified() -> None:
    env = make_vector_env(CHEETAH, num_envs=2, seed=0)
    actions = torch.full((2, 6, 1), 5.0)
    env.step(actions)
    assert (actions == 5.0).all()


def test_time_limit_truncates_and_resets() -> None:
    env = make_vector_env(CHEETAH, num_envs=1, seed=1)
    start = env.reset(seed=1)
    zeros = torch.zeros(1, 6, 1)
    rewards = []
    for _ in range(999):
        record = env.step(zeros)
        rewards.append(record.reward.item())
        assert not record.done.any()
    last = env.step(zeros)
    rewards.append(last.reward.item())
    assert last.truncated.item() and not last.terminated.item()
    assert last.episode_length.item() == 1000 == env.spec.max_episode_steps
    assert last.episode_return.item() == pytest.approx(sum(rewards), rel=1e-5)
    # The final observation is the one of step 1000, the current one that of the next episode.
    assert not torch.equal(last.final_obs, last.obs) and not torch.equal(last.final_state, last.state)
    assert not torch.equal(last.obs, start.obs)  # the next episode has a new seed
    assert (last.obs[0, CHEETAH_SHORT_OBS_AGENTS, 8] == 0).all()
    after = env.step(zeros)
    assert not after.done.any()


def test_termination_is_kept_apart_from_truncation() -> None:
    # Walker2d terminates when it falls (unhealthy), which random actions cause within a few dozen steps.
    env = make_vector_env("Walker2d-2x3", num_envs=2, seed=0)
    generator = torch.Generator().manual_seed(0)
    rewards = []
    for _ in range(200):
        record = env.step(random_actions(env, generator))
        rewards.append(record.reward)
        if record.done.any():
            break
    assert record.terminated.any() and not record.truncated.any()
    steps = len(rewards)
    for env_index in range(2):
        if record.terminated[env_index]:
            assert record.episode_length[env_index].item() == steps
            episode_return = sum(reward[env_index].item() for reward in rewards)
            assert record.episode_return[env_index].item() == pytest.approx(episode_return, rel=1e-5)
            assert not torch.equal(record.final_state[env_index], record.state[env_index])
        else:
            assert torch.equal(record.final_obs[env_index], record.obs[env_index])
    assert_record_contract(record, env)


# Walker2d falls within ~10-30 random steps, so 60 steps cover several automatic resets.
@pytest.mark.parametrize("task", [CHEETAH, "Walker2d-2x3"])
def test_same_seed_and_actions_give_identical_records(task: str) -> None:
    def run(seed: int) -> list[StepRecord]:
        env = make_vector_env(task, num_envs=2, seed=seed)
        generator = torch.Generator().manual_seed(7)
        records = [env.reset(seed=seed)] + [env.step(random_actions(env, generator)) for _ in range(60)]
        env.close()
        return records

    first, second = run(seed=5), run(seed=5)
    for record_a, record_b in zip(first, second):
        assert_records_equal(record_a, record_b)
    assert not torch.equal(run(seed=6)[0].obs, first[0].obs)


# Ant and Walker2d fall under random actions, so both paths also go through automatic resets.
@pytest.mark.parametrize("task", [CHEETAH, "Ant-4x2", "Walker2d-2x3", "Humanoid-9|8"])
def test_index_gathers_give_the_records_of_mamujocos_own_path(task: str) -> None:
    """The adapter's observation and action gathers against MaMuJoCo's per-agent builder and action
    mapping (env.step), on the same seed and actions (beyond the bounds too, to exercise clipping)."""
    gathered, own = make_vector_env(task, num_envs=3, seed=2), make_vector_env(task, num_envs=3, seed=2)
    assert gathered._gather is not None
    own._gather = None
    generator = torch.Generator().manual_seed(3)
    ends = 0
    for _ in range(80):
        actions = random_actions(gathered, generator) * 1.5
        record = gathered.step(actions)
        assert_records_equal(record, own.step(actions))
        ends += int((record.terminated | record.truncated).sum())
    assert task in (CHEETAH, "Humanoid-9|8") or ends > 0  # Ant and Walker2d: resets were covered
    if task == "Ant-4x2":  # its contact forces are clipped to [-1, 1] by MaMuJoCo; the gather does too
        assert gathered._gather.clip_mask.any()


def test_a_task_whose_observations_are_not_a_selection_keeps_mamujocos_path() -> None:
    """Hopper's MaMuJoCo observations clip joint velocities to +-10 (`extra_obs`), which no index
    gather reproduces: the probes find that out and the adapter steps through MaMuJoCo itself."""
    env = make_vector_env("Hopper-3x1", num_envs=2, seed=0)
    assert env._gather is None
    assert_record_contract(env.step(random_actions(env, torch.Generator().manual_seed(0))), env)


def test_records_are_not_overwritten_by_later_steps() -> None:
    env = make_vector_env(CHEETAH, num_envs=2, seed=0)
    generator = torch.Generator().manual_seed(0)
    record = env.step(random_actions(env, generator))
    snapshot = {name: tensor.clone() for name, tensor in vars(record).items()}
    for _ in range(3):
        env.step(random_actions(env, generator))
    for name, tensor in snapshot.items():
        assert torch.equal(getattr(record, name), tensor), name


@pytest.mark.parametrize("shape", [(2, 6), (2, 6, 2), (3, 6, 1), (2, 5, 1)])
def test_wrong_action_shape_raises(shape: tuple[int, ...]) -> None:
    env = make_vector_env(CHEETAH, num_envs=2, seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(torch.zeros(shape))


def test_nan_action_raises() -> None:
    env = make_vector_env(CHEETAH, num_envs=1, seed=0)
    with pytest.raises(ValueError, match="NaN"):
        env.step(torch.full((1, 6, 1), float("nan")))


@pytest.mark.parametrize(
    "task", ["Foo-2x3", "HalfCheetah-7x1", "Ant-4x2d", "HalfCheetah", "HalfCheetah-", "-6x1", ""]
)
def test_unknown_or_malformed_task_raises_user_error(task: str) -> None:
    with pytest.raises(UserError) as raised:
        make_vector_env(task, num_envs=1, seed=0)
    assert "\n" not in str(raised.value)


def test_missing_simulator_raises_missing_extra_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gymnasium_robotics", None)  # makes the import fail
    with pytest.raises(MissingExtraError, match=r"seqmarl\[mujoco\]"):
        make_vector_env(CHEETAH, num_envs=1, seed=0)


def test_registry_builds_the_adapter() -> None:
    env = make_any_vector_env(f"mamujoco:{CHEETAH}", num_envs=1, seed=0)
    assert isinstance(env, GuardedVectorEnv) and isinstance(env.inner, MaMujocoVectorEnv)
    assert env.spec.name == f"mamujoco:{CHEETAH}"


def test_ant_spec_and_step() -> None:
    env = make_vector_env("Ant-4x2", num_envs=2, seed=0)
    assert (env.spec.n_agents, env.spec.obs_dim, env.spec.state_dim) == (4, 42, 105)
    assert env.spec.action_space == ContinuousActions(dim=2, low=(-1.0, -1.0), high=(1.0, 1.0))
    assert_record_contract(env.step(torch.zeros(2, 4, 2)), env)


def test_uneven_action_dims_are_padded_and_ignored() -> None:
    # Humanoid-9|8: agent 1 drives 8 joints, so the 9th entry of its action is padding.
    env = make_vector_env("Humanoid-9|8", num_envs=1, seed=0)
    assert (env.spec.n_agents, env.spec.obs_dim, env.spec.action_space.dim) == (2, 242, 9)
    assert (env.reset(seed=0).obs[0, 1, 170:] == 0).all()
    actions = torch.full((1, 2, 9), 0.1)
    padded = actions.clone()
    padded[0, 1, 8] = -0.3
    step = env.step(actions)
    assert_records_equal(step, make_vector_env("Humanoid-9|8", num_envs=1, seed=0).step(padded))


def test_shared_action_bounds() -> None:
    low, high = shared_action_bounds(
        [np.array([-1.0, -2.0], dtype=np.float32), np.array([-1.0], dtype=np.float32)],
        [np.array([1.0, 2.0], dtype=np.float32), np.array([1.0], dtype=np.float32)],
    )
    assert low.tolist() == [-1.0, -2.0] and high.tolist() == [1.0, 2.0]
    with pytest.raises(UserError, match="different action bounds"):
        shared_action_bounds([np.array([-1.0]), np.array([-0.5])], [np.array([1.0]), np.array([1.0])])
