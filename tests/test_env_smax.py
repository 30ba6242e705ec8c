"""Contract tests of the SMAX adapter on the real JaxMARL simulator (shape legend in seqmarl/types.py).

Each new env compiles its reset and step (~6 s), so most tests share one 3m env of E=4.
"""

import sys

import pytest
import torch

from seqmarl.envs.registry import make_vector_env
from seqmarl.envs.smax import SmaxVectorEnv
from seqmarl.errors import MissingExtraError, UserError
from seqmarl.types import DiscreteActions, EnvSpec, StepRecord, step_record_layout

E, N, O, S, A = 4, 3, 75, 72, 8  # 3m: 3 marines against 3
LAYOUT = step_record_layout(EnvSpec("smax:3m", N, O, S, DiscreteActions(A), 101, True), E)
STOP = 4  # SMAX's discrete actions: 4 moves, stop, then "attack enemy i" from index 5


def random_valid_actions(record: StepRecord, generator: torch.Generator) -> torch.Tensor:
    mask = record.action_mask.float()  # (E, N, A)
    flat = torch.multinomial(mask.reshape(-1, mask.shape[-1]), 1, generator=generator)
    return flat.reshape(mask.shape[:2])  # (E, N)


def focus_fire(record: StepRecord) -> torch.Tensor:
    """Every ally shoots the first enemy in range, else walks east: wins about half the 3m battles."""
    attack = record.action_mask[..., STOP + 1 :]  # (E, N, enemies)
    first_target = attack.float().argmax(-1) + STOP + 1
    return torch.where(attack.any(-1), first_target, torch.ones_like(first_target))  # 1: move east


def assert_shapes_and_dtypes(record: StepRecord) -> None:
    for name, (shape, dtype) in LAYOUT.items():
        tensor = getattr(record, name)
        assert (tuple(tensor.shape), tensor.dtype) == (shape, dtype), name


@pytest.fixture(scope="module")
def env() -> SmaxVectorEnv:
    return make_vector_env("smax:3m", num_envs=E, seed=0)


def test_spec_3m_and_2s3z(env):
    spec = env.spec
    assert (spec.name, spec.n_agents, spec.obs_dim, spec.state_dim, spec.action_space.n) == (
        "smax:3m",
        3,
        75,
        72,
        8,
    )
    # SMAX checks its 100-step limit before counting the step, so an undecided battle lasts 101 steps.
    assert spec.max_episode_steps == 101 and spec.has_win and spec.discrete
    spec = make_vector_env("smax:2s3z", 2, 0).spec
    assert (spec.n_agents, spec.obs_dim, spec.state_dim, spec.action_space.n) == (5, 127, 120, 10)


def test_reset_record(env):
    record = env.reset(seed=1)
    assert_shapes_and_dtypes(record)
    assert record.alive.all() and record.action_mask.any(-1).all()
    assert not (record.reward.any() or record.done.any() or record.won.any())
    assert torch.equal(record.final_obs, record.obs) and torch.equal(record.final_alive, record.alive)


def test_step_record_contract(env):
    generator = torch.Generator().manual_seed(0)
    record = env.reset(seed=1)
    running_return, running_length = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.long)
    finished = 0
    for _ in range(130):  # more than one time limit, so every env finishes at least once
        before = record
        record = env.step(random_valid_actions(record, generator))
        assert_shapes_and_dtypes(record)
        assert record.action_mask.any(-1).all()  # every agent, dead or alive, has an action
        dead = ~record.alive
        assert record.action_mask[dead][:, STOP].all() and record.action_mask[dead].sum(-1).eq(1).all()
        assert torch.isfinite(record.reward).all()
        assert not (record.terminated & record.truncated).any()
        assert not (record.won & ~record.terminated).any()  # a win needs every enemy dead
        # nobody comes back to life within an episode
        assert not (record.final_alive & ~before.alive).any()
        running_return += record.reward
        running_length += 1

        done = record.done
        going_on = ~done
        assert torch.equal(record.final_obs[going_on], record.obs[going_on])
        assert torch.equal(record.final_state[going_on], record.state[going_on])
        assert torch.equal(record.final_alive[going_on], record.alive[going_on])
        assert torch.equal(record.final_action_mask[going_on], record.action_mask[going_on])
        assert record.final_action_mask.any(-1).all()  # dead agents can still "stop"
        if not done.any():
            continue
        finished += int(done.sum())
        assert torch.equal(record.episode_length[done], running_length[done])
        assert torch.allclose(record.episode_return[done].double(), running_return[done], atol=1e-4)
        assert ((record.episode_length[done] >= 1) & (record.episode_length[done] <= 101)).all()
        assert (record.episode_length[record.truncated] == 101).all()
        # the new rows start a fresh episode; the final_* rows show how the old one ended
        assert record.alive[done].all() and not torch.equal(record.obs[done], record.final_obs[done])
        assert record.final_alive[record.won | record.truncated].any(-1).all()
        assert not record.final_alive[record.terminated & ~record.won].any()  # a loss or a draw
        running_return[done], running_length[done] = 0.0, 0
    assert finished >= E


def test_wins_end_the_battle_with_the_bonus(env):
    record = env.reset(seed=2)
    outcomes = []
    for _ in range(60):
        record = env.step(focus_fire(record))
        done = record.done
        outcomes += zip(record.won[done].tolist(), record.episode_return[done].tolist())
        assert record.terminated[done].all()  # focused fire decides every battle well before the limit
    won_returns = [episode_return for won, episode_return in outcomes if won]
    lost_returns = [episode_return for won, episode_return in outcomes if not won]
    assert won_returns and lost_returns
    # a win removes all enemy health (1.0 in total) and adds SMAX's won-battle bonus (1.0)
    assert won_returns == pytest.approx([2.0] * len(won_returns), abs=1e-5)
    assert max(lost_returns) < 1.0


def test_time_limit_is_truncation_with_bootstrap_observation():
    env = SmaxVectorEnv("3m", num_envs=2, seed=0, max_steps=5)  # no battle is decided in 6 steps
    record = env.reset(seed=0)
    stop = torch.full((2, N), STOP)
    for t in range(6):
        previous = record
        record = env.step(stop)
        assert record.done.any() == (t == 5)
    assert record.truncated.all() and not record.terminated.any() and not record.won.any()
    assert (record.episode_length == 6).all() and env.spec.max_episode_steps == 6
    assert record.final_alive.all() and record.alive.all()
    # the final observation continues the old episode (close to the step before); obs starts a new one
    assert (record.final_obs - previous.obs).abs().mean() < (record.obs - previous.obs).abs().mean()


def test_same_seed_same_trajectory(env):
    other = make_vector_env("smax:3m", num_envs=E, seed=0)
    trajectories = []
    for vector in (env, other):
        generator = torch.Generator().manual_seed(5)
        record = vector.reset(seed=7)
        trajectory = [record]
        for _ in range(40):
            record = vector.step(random_valid_actions(record, generator))
            trajectory.append(record)
        trajectories.append(trajectory)
    for first, second in zip(*trajectories):
        for name in LAYOUT:
            assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert not torch.equal(env.reset(seed=8).obs, other.reset(seed=7).obs)


def test_no_recompilation_after_first_step(env):
    # Reset hands step a state with a weak-typed leaf, step hands back a strong one: without the dtype
    # normalisation in the adapter the second step compiles a second version (seconds each).
    generator = torch.Generator().manual_seed(0)
    for seed in (3, 4):  # a reset state feeds the step again after the first round
        record = env.reset(seed=seed)
        for _ in range(5):
            record = env.step(random_valid_actions(record, generator))
    adapter = env.inner  # the registry hands out the adapter inside the guard (envs/guard.py)
    assert adapter._step._cache_size() == 1 and adapter._reset._cache_size() == 1


def test_bad_inputs(env):
    with pytest.raises(UserError, match=r"unknown SMAX map 'no_such_map'; valid maps include 3m"):
        make_vector_env("smax:no_such_map", 2, 0)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(torch.zeros(E, N + 1, dtype=torch.long))


def test_a_gpu_simulator_without_a_jax_gpu_is_a_user_error():
    """env.sim_device=gpu where jax has no GPU (CI, this project's machines); tests/test_cuda.py runs SMAX on
    jax's GPU where there is one."""
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("jax sees a GPU here: tests/test_cuda.py covers env.sim_device=gpu")
    with pytest.raises(UserError, match="env.sim_device=gpu, but jax sees no GPU"):
        make_vector_env("smax:3m", 2, 0, sim_device="gpu")


def test_missing_jaxmarl_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "jaxmarl", None)  # makes `import jaxmarl` fail as if not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'seqmarl\[smax\]'"):
        make_vector_env("smax:3m", 2, 0)


def test_importing_jaxmarl_keeps_our_stdout_and_stderr():
    # jaxmarl's mabrax module resets sys.stdout/sys.stderr to the interpreter's originals on import;
    # the adapter must leave a caller's redirection (and pytest's capture) in place. Fresh interpreter,
    # since jaxmarl is imported once per process.
    import subprocess
    import sys

    code = (
        "import io, sys\n"
        "out, err = io.StringIO(), io.StringIO()\n"
        "sys.stdout, sys.stderr = out, err\n"
        "from seqmarl.envs.registry import make_vector_env\n"
        "make_vector_env('smax:3m', 1, 0)\n"
        "ok = sys.stdout is out and sys.stderr is err\n"
        "sys.__stdout__.write(f'{ok} {out.getvalue()!r}')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout == "True ''", result.stdout + result.stderr
