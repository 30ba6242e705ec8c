"""Contract tests of the SMAX adapter on the real JaxMARL simulator."""

import pytest
import torch

from seqmarl.envs.registry import make_vector_env
from seqmarl.errors import UserError


def random_valid_actions(record, generator):
    mask = record.action_mask.float()  # (E, N, A)
    flat = torch.multinomial(mask.reshape(-1, mask.shape[-1]), 1, generator=generator)
    return flat.reshape(mask.shape[:2])


@pytest.fixture(scope="module")
def env():
    return make_vector_env("smax:3m", num_envs=4, seed=0)


def test_spec_3m_and_2s3z():
    spec = make_vector_env("smax:3m", 2, 0).spec
    assert (spec.n_agents, spec.obs_dim, spec.state_dim, spec.action_space.n) == (3, 75, 72, 8)
    assert spec.max_episode_steps == 101 and spec.has_win and spec.discrete
    spec = make_vector_env("smax:2s3z", 2, 0).spec
    assert (spec.n_agents, spec.obs_dim, spec.state_dim, spec.action_space.n) == (5, 127, 120, 10)


def test_step_record_contract(env):
    generator = torch.Generator().manual_seed(0)
    record = env.reset(seed=1)
    E, N, O, S, A = 4, 3, 75, 72, 8
    finished = 0
    for _ in range(130):
        alive_before = record.alive
        record = env.step(random_valid_actions(record, generator))
        shapes = {
            "obs": (E, N, O),
            "state": (E, S),
            "action_mask": (E, N, A),
            "alive": (E, N),
            "reward": (E,),
            "terminated": (E,),
            "truncated": (E,),
            "final_obs": (E, N, O),
            "final_state": (E, S),
            "final_alive": (E, N),
            "episode_return": (E,),
            "episode_length": (E,),
            "won": (E,),
        }
        for name, shape in shapes.items():
            assert tuple(getattr(record, name).shape) == shape, name
        assert record.obs.dtype == torch.float32 and record.action_mask.dtype == torch.bool
        assert record.episode_length.dtype == torch.int64 and record.won.dtype == torch.bool
        assert record.action_mask.any(-1).all()  # at least one action for every agent
        dead = ~record.alive
        if dead.any():  # dead agents can only stop (index 4)
            assert record.action_mask[dead][:, 4].all() and record.action_mask[dead].sum(-1).eq(1).all()
        assert torch.isfinite(record.reward).all()
        assert not (record.terminated & record.truncated).any()
        done = record.done
        if done.any():
            finished += int(done.sum())
            assert (record.episode_length[done] <= 101).all() and (record.episode_length[done] >= 1).all()
            assert record.alive[done].all()  # a fresh episode: every ally alive again
            assert not torch.equal(record.obs[done], record.final_obs[done])
            # a win needs every enemy dead, so it is never a time-limit truncation
            assert not (record.won & record.truncated).any()
            # truncation only at the time limit, and with allies still standing
            assert (record.episode_length[record.truncated] == 101).all()
            assert record.final_alive[record.truncated].any(-1).all()
        # agents alive before the step who are dead after it show up in final_alive, never resurrect
        assert not (record.final_alive & ~alive_before)[~done].any()
    assert finished > 0


def test_time_limit_is_truncation_with_bootstrap_observation():
    from seqmarl.envs.smax import SmaxVectorEnv

    env = SmaxVectorEnv("3m", num_envs=4, seed=0, max_steps=5)  # battles are never decided in 5 steps
    record = env.reset(seed=0)
    stop = torch.full((4, 3), 4)
    for t in range(6):
        previous = record
        record = env.step(stop)
        assert record.done.any() == (t == 5)  # SMAX's limit check comes before its step count
    assert record.truncated.all() and not record.terminated.any()
    assert (record.episode_length == 6).all() and env.spec.max_episode_steps == 6
    assert record.final_alive.all() and record.alive.all()
    # the final observation belongs to the old episode (close to the previous step), the new one to a reset
    assert not torch.equal(record.final_obs, record.obs)
    assert (record.final_obs - previous.obs).abs().mean() < (record.obs - previous.obs).abs().mean()


def test_same_seed_same_trajectory():
    records = []
    for _ in range(2):
        env = make_vector_env("smax:3m", num_envs=3, seed=0)
        generator = torch.Generator().manual_seed(5)
        record = env.reset(seed=7)
        for _ in range(40):
            record = env.step(random_valid_actions(record, generator))
        records.append(record)
    for name in records[0].__dataclass_fields__:
        assert torch.equal(getattr(records[0], name), getattr(records[1], name)), name


def test_no_recompilation_after_first_step(env):
    generator = torch.Generator().manual_seed(0)
    record = env.reset(seed=3)
    for _ in range(5):
        record = env.step(random_valid_actions(record, generator))
    record = env.reset(seed=4)  # a reset state feeds the step again: must not compile a second version
    for _ in range(5):
        record = env.step(random_valid_actions(record, generator))
    assert env._step._cache_size() == 1


def test_bad_inputs():
    with pytest.raises(UserError, match="unknown SMAX map 'no_such_map'"):
        make_vector_env("smax:no_such_map", 2, 0)
    env = make_vector_env("smax:3m", 2, 0)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(torch.zeros(2, 4, dtype=torch.long))


def test_missing_jaxmarl_names_the_extra(monkeypatch):
    import sys

    from seqmarl.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "jaxmarl", None)  # makes `import jaxmarl` fail as if not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'seqmarl\[smax\]'"):
        make_vector_env("smax:3m", 2, 0)
