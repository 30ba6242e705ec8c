"""QMIX: the mixer is monotonic, targets match hand-computed ones, exploration respects action masks,
episodes are cut from the rollout stream with every step kept exactly once, and a saved state continues
a run bit for bit."""

import copy
import io
import math

import torch

from seqmarl.algos import make_algorithm
from seqmarl.algos.qmix import td_lambda_targets
from seqmarl.buffer import RolloutBuffer
from seqmarl.config import build_config
from seqmarl.nn.qmix import QMixer
from seqmarl.replay import EpisodeBatch, EpisodeReplay
from seqmarl.rollout import collect
from seqmarl.types import DiscreteActions, EnvSpec, StepRecord

CPU = torch.device("cpu")


def _algorithm(spec: EnvSpec, num_envs: int = 4, **qmix):
    config = build_config({"algo": "qmix", "env": {"num_envs": num_envs}, "qmix": qmix})
    return make_algorithm("qmix", spec, config, CPU)


def test_mixer_is_monotonic_in_every_agent_q():
    torch.manual_seed(0)
    mixer = QMixer(n_agents=4, state_dim=6, embed=8, hypernet_embed=16)
    with torch.no_grad():  # scramble the weights well away from their init, signs included
        for p in mixer.parameters():
            p.normal_(0.0, 2.0)
    q = torch.randn(256, 4, requires_grad=True)
    q_tot = mixer(q, torch.randn(256, 6) * 5)  # (256,)
    (grad,) = torch.autograd.grad(q_tot.sum(), q)  # rows are independent: per-sample dQ_tot/dq_i
    assert (grad >= 0).all()
    assert (grad > 0).any()


def _set(linear: torch.nn.Linear, weight: list, bias: list) -> None:
    linear.weight.copy_(torch.tensor(weight))
    linear.bias.copy_(torch.tensor(bias))


@torch.no_grad()
def test_mixer_known_answer():
    mixer = QMixer(n_agents=2, state_dim=2, embed=1, hypernet_embed=1)
    # The LayerNorm with zero gain outputs its bias: the hypernetworks see s' = [1, 2] whatever the state.
    mixer.state_norm.weight.zero_()
    mixer.state_norm.bias.copy_(torch.tensor([1.0, 2.0]))
    _set(mixer.hyper_w1[0], [[1.0, 1.0]], [0.0])  # relu(1 + 2) = 3
    _set(mixer.hyper_w1[2], [[1.0], [-2.0]], [0.0, 1.0])  # [3, -5] -> abs -> w1 = [3, 5]
    _set(mixer.hyper_b1, [[0.5, 0.0]], [-10.0])  # b1 = -9.5
    _set(mixer.hyper_w2[0], [[1.0, 0.0]], [0.0])  # relu(1) = 1
    _set(mixer.hyper_w2[2], [[-2.0]], [0.0])  # -2 -> abs -> w2 = 2
    _set(mixer.value[0], [[0.0, 1.0]], [0.0])  # relu(2) = 2
    _set(mixer.value[2], [[3.0]], [1.0])  # V = 7
    q = torch.tensor([[1.0, 2.0], [-1.0, -1.0]])
    q_tot = mixer(q, torch.randn(2, 2))
    # [1, 2]: elu(3 + 10 - 9.5) * 2 + 7 = 14;  [-1, -1]: elu(-3 - 5 - 9.5) * 2 + 7 = 2 (e^-17.5 - 1) + 7
    torch.testing.assert_close(q_tot, torch.tensor([14.0, 2 * (math.exp(-17.5) - 1) + 7]))


def test_td_lambda_targets_known_answer():
    gamma, lam = 0.9, 0.5
    rewards = torch.tensor([[1.0, 2.0, 0.5]])
    next_values = torch.tensor([[4.0, 6.0, 10.0]])  # V(s1), V(s2), V(s3)
    continues = torch.tensor([[True, True, False]])
    # G2 = 0.5 + 0.9 * 10 = 9.5;  G1 = 2 + 0.9 * (0.5 * 6 + 0.5 * 9.5) = 8.975
    # G0 = 1 + 0.9 * (0.5 * 4 + 0.5 * 8.975) = 6.83875
    expected = torch.tensor([[6.83875, 8.975, 9.5]])
    torch.testing.assert_close(td_lambda_targets(rewards, next_values, continues, gamma, lam), expected)
    # lambda 0: one-step targets
    torch.testing.assert_close(
        td_lambda_targets(rewards, next_values, continues, gamma, 0.0), rewards + gamma * next_values
    )


def test_targets_of_a_terminated_and_a_truncated_episode():
    """Double-Q TD(lambda) targets through the algorithm, with networks replaced by readable stubs:
    the online Q of slot t is obs[..., 0:2], the target Q obs[..., 2:4], the mixers sum over agents."""
    spec = EnvSpec("test:tiny", 1, 4, 1, DiscreteActions(2), 5, True)
    algo = _algorithm(spec, gamma=0.9, td_lambda=0.5)
    algo.agent = lambda inputs, h0: (inputs[..., 0:2], None)
    algo.target_agent = lambda inputs, h0: (inputs[..., 2:4], None)
    algo.mixer = algo.target_mixer = lambda q, state: q.sum(-1)
    obs = torch.zeros(2, 3, 1, 4)  # (B, Lb + 1, N, O)
    mask = torch.ones(2, 3, 1, 2, dtype=torch.bool)
    # Episode 0 (2 steps, terminated): at s1 the online net prefers action 0, which is unavailable, so
    # the greedy action is 1 and the target net values it at 4 (not its own max 7). Its end state s2 has
    # large target values that must not be used.
    obs[0, 1, 0] = torch.tensor([5.0, 1.0, 7.0, 4.0])
    mask[0, 1, 0, 0] = False
    obs[0, 2, 0] = torch.tensor([0.0, 0.0, 100.0, 100.0])
    # Episode 1 (1 step, cut by the time limit): bootstraps from the observation it was cut in (slot 1):
    # online argmax is action 1, target value 5 (not the target's max 9).
    obs[1, 1, 0] = torch.tensor([0.0, 1.0, 9.0, 5.0])
    batch = EpisodeBatch(
        obs=obs,
        state=torch.zeros(2, 3, 1),
        action_mask=mask,
        actions=torch.zeros(2, 2, 1, dtype=torch.long),
        rewards=torch.tensor([[1.0, 2.0], [3.0, 0.0]]),
        length=torch.tensor([2, 1]),
        terminated=torch.tensor([True, False]),
    )
    _, targets, filled = algo._q_and_targets(batch)
    # ep 0: G1 = 2 + 0 (terminal);  G0 = 1 + 0.9 * (0.5 * 4 + 0.5 * 2) = 3.7.   ep 1: G0 = 3 + 0.9 * 5 = 7.5
    torch.testing.assert_close(targets[filled.bool()], torch.tensor([3.7, 2.0, 7.5]))


def test_epsilon_greedy_never_picks_a_masked_action():
    spec = EnvSpec("test:masked", 3, 5, 4, DiscreteActions(6), 20, True)
    algo = _algorithm(spec)
    with torch.no_grad():  # make action 0 by far the greedy choice everywhere
        algo.agent.q.bias[0] = 1e3
    g = torch.Generator().manual_seed(0)
    E = 64
    for epsilon in (0.0, 0.5, 1.0):
        algo.epsilon = epsilon
        for _ in range(20):
            mask = torch.rand(E, 3, 6, generator=g) > 0.5
            mask[:8, :, 0] = False  # the greedy action is unavailable here
            mask[torch.arange(E), :, torch.randint(1, 6, (E,), generator=g)] = True  # one at least
            for deterministic in (False, True):
                out = algo.act(
                    torch.randn(E, 3, 5, generator=g), torch.randn(E, 4), mask, None, deterministic
                )
                assert mask.gather(-1, out.actions[..., None]).all()
    dead = torch.zeros(E, 3, 6, dtype=torch.bool)
    dead[..., 4] = True  # a dead agent can only stop
    assert (algo.act(torch.randn(E, 3, 5), torch.randn(E, 4), dead).actions == 4).all()


def test_episodes_are_cut_across_rollouts_with_every_step_once():
    """3 envs, rollouts of 7 steps, episodes of various lengths that end (terminated or truncated) inside
    and across rollouts; obs[..., 0] carries a unique id per step."""
    L, E, T = 10, 3, 7
    spec = EnvSpec("test:cut", 2, 3, 2, DiscreteActions(3), L, True)
    replay = EpisodeReplay(spec, capacity=50, num_envs=E, device=CPU)
    ends = {
        0: {2: "term", 8: "trunc", 14: "term"},  # episodes 0-2, 3-8, 9-14; 15-20 unfinished
        1: {5: "trunc", 11: "trunc"},  # 0-5, 6-11; 12-20 unfinished
        2: {0: "term", 6: "term", 13: "trunc"},  # 0, 1-6, 7-13; 14-20 unfinished
    }
    steps = 3 * T
    for call in range(3):
        buffer = RolloutBuffer(spec, T, E, CPU)
        for t in range(T):
            absolute = call * T + t
            for e in range(E):
                buffer.obs[t, e, :, 0] = 1000 * e + absolute
                buffer.actions[t, e] = absolute % 3
                buffer.rewards[t, e] = absolute
                kind = ends[e].get(absolute)
                buffer.terminated[t, e] = kind == "term"
                buffer.truncated[t, e] = kind == "trunc"
                buffer.final_obs[t, e, :, 0] = -(1000 * e + absolute)  # what the episode was cut in
                buffer.final_action_mask[t, e] = True
        replay.extend(buffer)
    ring, size = replay.ring, replay.size
    assert size == 8
    seen = []
    for i in range(size):
        n = int(ring.length[i])
        ids = ring.obs[i, :n, 0, 0].long().tolist()
        env, first = divmod(ids[0], 1000)
        assert ids == [1000 * env + first + k for k in range(n)], "one env, consecutive steps"
        last = first + n - 1
        assert ends[env][last] == ("term" if ring.terminated[i] else "trunc")
        assert ring.rewards[i, :n].tolist() == [float(first + k) for k in range(n)]
        end_slot = ring.obs[i, n, 0, 0].item()
        assert end_slot == (0.0 if ring.terminated[i] else -(1000 * env + last))
        assert ring.action_mask[i, n].all() != bool(ring.terminated[i])
        assert (ring.obs[i, n + 1 :] == 0).all() and (ring.rewards[i, n:] == 0).all()  # zero padding
        seen += ids
    for e in range(E):  # the unfinished tails hold the rest
        n = int(replay.tails.length[e])
        seen += replay.tails.obs[e, :n, 0, 0].long().tolist()
    assert sorted(seen) == sorted(1000 * e + t for e in range(E) for t in range(steps))


class CountingEnv:
    """A deterministic fake battle: obs and state are functions of each env's step counter and of the
    actions taken; an episode ends when the counter reaches a per-env length (terminated, odd envs) or
    the time limit (truncated)."""

    def __init__(self, spec: EnvSpec, num_envs: int):
        self.spec, self.num_envs = spec, num_envs
        self.t = torch.zeros(num_envs, dtype=torch.long)
        self.episode = torch.zeros(num_envs, dtype=torch.long)
        self.signal = torch.zeros(num_envs)

    def _view(self) -> dict[str, torch.Tensor]:
        E, N, O, S = self.num_envs, self.spec.n_agents, self.spec.obs_dim, self.spec.state_dim
        base = (self.t[:, None, None] + torch.arange(N * O).view(1, N, O)).float()
        obs = torch.sin(base * 0.3 + self.signal[:, None, None])
        state = torch.cos(torch.arange(S)[None].float() + self.t[:, None] * 0.2 + self.signal[:, None])
        mask = torch.ones(E, N, self.spec.action_space.n, dtype=torch.bool)
        mask[:, :, -1] = self.t[:, None] % 2 == 0  # the last action is available every other step
        return {"obs": obs, "state": state, "action_mask": mask, "alive": torch.ones(E, N, dtype=torch.bool)}

    def reset(self, seed: int) -> StepRecord:
        self.t.zero_()
        view = self._view()
        E = self.num_envs
        return StepRecord(
            **view,
            reward=torch.zeros(E),
            terminated=torch.zeros(E, dtype=torch.bool),
            truncated=torch.zeros(E, dtype=torch.bool),
            final_obs=view["obs"],
            final_state=view["state"],
            final_alive=view["alive"],
            final_action_mask=view["action_mask"],
            episode_return=torch.zeros(E),
            episode_length=torch.zeros(E, dtype=torch.long),
            won=torch.zeros(E, dtype=torch.bool),
            discarded=torch.zeros(E, dtype=torch.bool),
        )

    def step(self, actions: torch.Tensor) -> StepRecord:
        E = self.num_envs
        reward = (actions == 1).float().mean(-1)
        self.signal = 0.5 * self.signal + actions.float().mean(-1)
        self.t += 1
        final = self._view()
        length = 3 + (torch.arange(E) + self.episode) % 4
        terminated = (self.t == length) & (torch.arange(E) % 2 == 1)
        truncated = (self.t == self.spec.max_episode_steps) & ~terminated
        done = terminated | truncated
        self.t[done] = 0
        self.episode += done.long()
        self.signal[done] = 0.0
        view = self._view()
        return StepRecord(
            **view,
            reward=reward,
            terminated=terminated,
            truncated=truncated,
            final_obs=final["obs"],
            final_state=final["state"],
            final_alive=final["alive"],
            final_action_mask=final["action_mask"],
            episode_return=torch.zeros(E),
            episode_length=torch.zeros(E, dtype=torch.long),
            won=torch.zeros(E, dtype=torch.bool),
            discarded=torch.zeros(E, dtype=torch.bool),
        )


def _iterations(algo, env, record, hidden, generator, step, count, T):
    buffer = RolloutBuffer(env.spec, T, env.num_envs, CPU)
    for _ in range(count):
        algo.begin_iteration(generator, step)
        record, hidden, _ = collect(env, algo, buffer, record, hidden, CPU)
        algo.learn(buffer, record, 0.0, generator)
        step += T * env.num_envs
    return record, hidden, step


def test_state_dict_continues_the_run_exactly():
    spec = EnvSpec("test:count", 2, 4, 3, DiscreteActions(3), 6, True)
    E, T = 4, 5
    settings = dict(
        batch_size=4, buffer_size=8, episodes_per_update=2, target_update_interval=2, epsilon_anneal_steps=100
    )
    torch.manual_seed(0)
    algo, env = _algorithm(spec, E, **settings), CountingEnv(spec, E)
    generator = torch.Generator().manual_seed(0)
    record, hidden, step = _iterations(algo, env, env.reset(0), algo.initial_hidden(E), generator, 0, 6, T)
    assert algo.updates > 0 and algo.replay.size == 8  # the ring has wrapped around
    assert (algo.replay.tails.length > 0).any()  # some episodes are unfinished

    saved = io.BytesIO()
    torch.save(algo.state_dict(), saved)
    snapshot = (copy.deepcopy(env), record, hidden.clone(), generator.get_state(), torch.get_rng_state())
    _iterations(algo, env, record, hidden, generator, step, 2, T)

    torch.manual_seed(123)  # a differently initialised instance: everything must come from the state
    fresh = _algorithm(spec, E, **settings)
    saved.seek(0)
    fresh.load_state_dict(torch.load(saved, weights_only=True))
    env, record, hidden, generator_state, rng_state = snapshot
    generator = torch.Generator()
    generator.set_state(generator_state)
    torch.set_rng_state(rng_state)
    _iterations(fresh, env, record, hidden, generator, step, 2, T)

    for name in ("agent", "mixer", "target_agent", "target_mixer"):
        a, b = getattr(algo, name).state_dict(), getattr(fresh, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert (algo.updates, algo.episodes_owed, algo.epsilon) == (
        fresh.updates,
        fresh.episodes_owed,
        fresh.epsilon,
    )
    a, b = algo.replay.state_dict(), fresh.replay.state_dict()
    assert all(torch.equal(a["ring"][k], b["ring"][k]) for k in a["ring"])
    assert all(torch.equal(a["tails"][k], b["tails"][k]) for k in a["tails"])
