"""Known-answer tests of GAE and of the buffer's terminated/truncated handling."""

import torch

from seqmarl.buffer import RolloutBuffer, compute_gae, joint_value
from seqmarl.normalize import IdentityNormalizer
from seqmarl.types import DiscreteActions, EnvSpec


def test_gae_hand_computed_with_termination_and_truncation():
    gamma, lam = 0.9, 0.5
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0])
    values = torch.tensor([0.5, 1.0, 1.5, 2.0])
    # step 1 terminates (next value 0), step 2 is truncated and bootstraps from V(final_obs) = 10,
    # step 3 is the last of the rollout and bootstraps from V(obs after it) = 3.
    next_values = torch.tensor([1.0, 0.0, 10.0, 3.0])
    continues = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv = compute_gae(rewards, values, next_values, continues, gamma, lam)
    d3 = 4.0 + 0.9 * 3.0 - 2.0  # 4.7
    d2 = 3.0 + 0.9 * 10.0 - 1.5  # 10.5, does not see step 3 (new episode)
    d1 = 2.0 + 0.0 - 1.0  # 1.0, terminal
    d0 = 1.0 + 0.9 * 1.0 - 0.5  # 1.4
    expected = torch.tensor([d0 + 0.45 * d1, d1, d2, d3])
    torch.testing.assert_close(adv, expected)


def test_gae_lambda_one_is_discounted_return_minus_value():
    torch.manual_seed(0)
    T, gamma = 6, 0.97
    rewards, values = torch.rand(T), torch.rand(T)
    last = torch.tensor(0.7)
    next_values = torch.cat([values[1:], last[None]])
    adv = compute_gae(rewards, values, next_values, torch.ones(T), gamma, 1.0)
    ret, expected = last.clone(), torch.zeros(T)
    for t in reversed(range(T)):
        ret = rewards[t] + gamma * ret
        expected[t] = ret - values[t]
    torch.testing.assert_close(adv, expected)


def test_joint_value_averages_alive_agents_only():
    values = torch.tensor([[1.0, 2.0, 30.0]])
    alive = torch.tensor([[True, True, False]])
    torch.testing.assert_close(joint_value(values, alive), torch.tensor([1.5]))


def _buffer(T=3, E=2, N=2):
    spec = EnvSpec("test", N, 4, 3, DiscreteActions(5), 100, False)
    buf = RolloutBuffer(spec, T, E, torch.device("cpu"))
    buf.alive[:] = True
    return buf


def test_buffer_bootstraps_truncation_but_not_termination():
    buf = _buffer()
    buf.values[:] = 1.0
    buf.rewards[:] = 0.0
    buf.final_values[1] = 5.0  # value of the last observation of the episodes cut at step 1
    buf.final_alive[1] = True
    buf.truncated[1, 0] = True  # env 0: time limit at step 1
    buf.terminated[1, 1] = True  # env 1: terminal at step 1
    last = torch.full((2, 2), 2.0)
    batch = buf.finish(
        last, torch.ones(2, 2, dtype=torch.bool), IdentityNormalizer(), gamma=1.0, gae_lambda=1.0
    )
    adv = batch.advantages.reshape(3, 2)
    # env 0, step 1: 0 + V(final)=5 - 1 = 4; env 1, step 1: 0 + 0 - 1 = -1
    assert adv[1, 0].item() == 4.0 and adv[1, 1].item() == -1.0
    # last step bootstraps from the observation after the rollout: 0 + 2 - 1 = 1
    assert adv[2, 0].item() == 1.0 and adv[2, 1].item() == 1.0
    # step 0 continues into step 1 of the same episode: (0 + 1 - 1) + adv[1]
    assert adv[0, 0].item() == 4.0 and adv[0, 1].item() == -1.0
    torch.testing.assert_close(batch.returns, batch.advantages + 1.0)


def test_per_agent_advantages_run_one_trace_per_agent():
    """per_agent=True (MAT-Dec, MAPPO, IPPO): agent i's advantages are GAE on its own values."""
    torch.manual_seed(0)
    T, E, N, gamma, lam = 4, 2, 3, 0.9, 0.8
    buf = _buffer(T, E, N)
    buf.values[:] = torch.rand(T, E, N)
    buf.rewards[:] = torch.rand(T, E)
    buf.terminated[2, 1] = True
    buf.truncated[1, 0] = True
    buf.final_values[1] = torch.rand(E, N)
    last = torch.rand(E, N)
    alive = torch.ones(E, N, dtype=torch.bool)
    batch = buf.finish(last, alive, IdentityNormalizer(), gamma, lam, per_agent=True)
    adv = batch.advantages.reshape(T, E, N)
    for e in range(E):
        for i in range(N):
            values = buf.values[:, e, i]
            following = torch.cat([values[1:], last[e, i : i + 1]])
            next_values = torch.where(buf.truncated[:, e], buf.final_values[:, e, i], following)
            next_values = next_values.masked_fill(buf.terminated[:, e], 0.0)
            continues = (~(buf.terminated[:, e] | buf.truncated[:, e])).float()
            expected = compute_gae(buf.rewards[:, e], values, next_values, continues, gamma, lam)
            torch.testing.assert_close(adv[:, e, i], expected)
    torch.testing.assert_close(batch.returns, batch.advantages + batch.values)
