"""Contract tests every algorithm must pass (acting, persistence), and those of the on-policy family
(teacher-forced evaluation, PPO updates), on synthetic batches (no simulator needed)."""

import copy
import io

import pytest
import torch

from seqmarl.algos import algorithm_class, algorithm_names, check_compatible, make_algorithm
from seqmarl.buffer import RolloutBuffer
from seqmarl.config import build_config
from seqmarl.errors import UserError
from seqmarl.types import ContinuousActions, DiscreteActions, EnvSpec

ON_POLICY = ["mat", "mat_dec", "mappo", "ippo", "happo"]
B, N, O, S, A = 16, 3, 7, 11, 5
DISCRETE = EnvSpec("test:discrete", N, O, S, DiscreteActions(A), 50, True)
CONTINUOUS = EnvSpec("test:continuous", N, O, S, ContinuousActions(2, (-1.0,) * 2, (1.0,) * 2), 50, False)
CPU = torch.device("cpu")


def _make(name, spec, **ppo):
    config = build_config({"algo": name, "ppo": {"epochs": 2, "num_minibatches": 2, **ppo}})
    torch.manual_seed(0)
    return make_algorithm(name, spec, config, CPU)


def _inputs(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs, state = torch.randn(B, N, O, generator=g), torch.randn(B, S, generator=g)
    mask = torch.ones(B, N, spec.action_space.mask_width, dtype=torch.bool)
    if spec.discrete:
        mask = torch.rand(B, N, A, generator=g) > 0.4
        mask[..., 0] = True  # at least one action available
    return obs, state, mask


# Every registered algorithm with every action space it supports (QMIX: discrete only).
SUPPORTED = [
    pytest.param(name, spec, id=f"{name}-{kind}")
    for name in algorithm_names()
    for spec, kind in ((DISCRETE, "discrete"), (CONTINUOUS, "continuous"))
    if (
        algorithm_class(name).supports_discrete
        if spec.discrete
        else algorithm_class(name).supports_continuous
    )
]


@pytest.mark.parametrize("name, spec", SUPPORTED)
def test_act_contract_and_checkpoint_round_trip(name, spec):
    algo = _make(name, spec)
    obs, state, mask = _inputs(spec)
    hidden = algo.initial_hidden(B)
    algo.begin_iteration(torch.Generator().manual_seed(0), 0)
    out = algo.act(obs, state, mask, hidden)
    assert out.actions.shape == ((B, N) if spec.discrete else (B, N, 2))
    assert out.log_prob.shape == (B, N) and out.value.shape == (B, N)
    assert algo.values(obs, state).shape == (B, N)
    assert (out.hidden is None) == (hidden is None)  # a recurrent state only with an RNN
    if hidden is not None:
        assert out.hidden.shape == hidden.shape
    if spec.discrete:
        assert mask.gather(-1, out.actions[..., None]).all(), "a masked action was taken"
    greedy = algo.act(obs, state, mask, hidden, deterministic=True).actions
    torch.testing.assert_close(algo.act(obs, state, mask, hidden, deterministic=True).actions, greedy)

    saved = io.BytesIO()  # checkpoints are read back with weights_only=True
    torch.save(algo.state_dict(), saved)
    saved.seek(0)
    torch.manual_seed(1)
    clone = _make(name, spec)
    clone.load_state_dict(torch.load(saved, weights_only=True))
    torch.testing.assert_close(clone.act(obs, state, mask, hidden, deterministic=True).actions, greedy)


def test_qmix_is_refused_for_continuous_actions():
    with pytest.raises(UserError, match="qmix supports discrete actions only"):
        check_compatible("qmix", CONTINUOUS, build_config({"algo": "qmix"}))


@pytest.mark.parametrize("spec", [DISCRETE, CONTINUOUS], ids=["discrete", "continuous"])
@pytest.mark.parametrize("name", ON_POLICY)
def test_act_and_evaluate_agree_on_log_probs(name, spec):
    algo = _make(name, spec)
    obs, state, mask = _inputs(spec)
    out = algo.act(obs, state, mask)
    assert out.actions.shape == ((B, N) if spec.discrete else (B, N, 2))
    assert out.log_prob.shape == (B, N) and out.value.shape == (B, N)
    if spec.discrete:
        assert mask.gather(-1, out.actions[..., None]).all(), "a masked action was sampled"
    buffer = RolloutBuffer(spec, 1, B, CPU)
    buffer.obs[0], buffer.state[0], buffer.action_mask[0] = obs, state, mask
    buffer.actions[0], buffer.log_prob[0], buffer.values[0] = out.actions, out.log_prob, out.value
    buffer.alive[:] = True
    batch = buffer.finish(out.value, torch.ones(B, N, dtype=torch.bool), algo.value_norm, 0.99, 0.95)
    with torch.no_grad():
        again = algo._evaluate(batch)
    torch.testing.assert_close(again.log_prob, out.log_prob)
    torch.testing.assert_close(again.value, out.value)
    torch.testing.assert_close(algo.values(obs, state), out.value)


@pytest.mark.parametrize("name", ON_POLICY)
def test_update_moves_every_part_and_state_dict_round_trips(name):
    spec = DISCRETE
    algo = _make(name, spec)
    obs, state, mask = _inputs(spec)
    T = 4
    buffer = RolloutBuffer(spec, T, B, CPU)
    for t in range(T):
        out = algo.act(obs, state, mask)
        buffer.obs[t], buffer.state[t], buffer.action_mask[t] = obs, state, mask
        buffer.actions[t], buffer.log_prob[t], buffer.values[t] = out.actions, out.log_prob, out.value
    buffer.alive[:] = True
    buffer.rewards[:] = torch.randn(T, B, generator=torch.Generator().manual_seed(1))
    batch = buffer.finish(
        algo.values(obs, state),
        torch.ones(B, N, dtype=torch.bool),
        algo.value_norm,
        0.99,
        0.95,
        per_agent=algo.per_agent_advantages,
    )
    before = {k: v.clone() for k, v in algo.model.state_dict().items()}
    metrics = algo.update(batch, 1e-3, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    for key in ("losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/grad_norm"):
        assert key in metrics
    after = algo.model.state_dict()
    # every top-level part (each HAPPO actor, the critic, encoder and decoder) has moved
    parts = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("actors.") else "") for k in before}
    for part in parts:
        moved = any(not torch.equal(before[k], after[k]) for k in before if k.startswith(part + "."))
        assert moved, f"{name}: {part} did not change in the update"

    clone = _make(name, spec)
    clone.load_state_dict(algo.state_dict())
    torch.testing.assert_close(
        clone.act(obs, state, mask, deterministic=True).actions,
        algo.act(obs, state, mask, deterministic=True).actions,
    )


def test_mappo_critic_reads_the_state_and_ippo_critic_does_not():
    obs, state, _ = _inputs(DISCRETE)
    other_state = torch.randn_like(state)
    mappo, ippo = _make("mappo", DISCRETE), _make("ippo", DISCRETE)
    assert not torch.allclose(mappo.values(obs, state), mappo.values(obs, other_state))
    torch.testing.assert_close(ippo.values(obs, state), ippo.values(obs, other_state))


@pytest.mark.parametrize("name", ["mat_dec", "mappo", "ippo", "happo"])
def test_decentralised_actors_read_only_their_own_observation(name):
    algo = _make(name, CONTINUOUS)
    obs, state, mask = _inputs(CONTINUOUS)
    changed = obs.clone()
    changed[:, 1:] = torch.randn_like(changed[:, 1:])  # everyone but agent 0 sees something else
    a = algo.act(obs, state, mask, deterministic=True).actions
    b = algo.act(changed, torch.randn_like(state), mask, deterministic=True).actions
    torch.testing.assert_close(a[:, 0], b[:, 0])
    assert not torch.allclose(a[:, 1:], b[:, 1:])


def test_mat_dec_weights_do_not_depend_on_agent_count():
    small = _make("mat_dec", DISCRETE)
    big_spec = EnvSpec("test:big", 7, O, S, DiscreteActions(A), 50, True)
    big = _make("mat_dec", big_spec)
    big.model.load_state_dict(small.model.state_dict())  # same shapes: loads without error
    obs = torch.randn(2, 7, O)
    assert big.values(obs, torch.randn(2, S)).shape == (2, 7)


def test_mat_dec_agent_id_lets_the_shared_actor_tell_agents_apart():
    """With mlp.mat_dec_agent_id, agents with the same observation can act differently; without it they
    cannot (one shared actor on the observation alone)."""
    config = build_config({"algo": "mat_dec", "mlp": {"mat_dec_agent_id": True}})
    torch.manual_seed(0)
    with_id = make_algorithm("mat_dec", CONTINUOUS, config, CPU)
    without = _make("mat_dec", CONTINUOUS)
    assert with_id.model.actor.trunk[0].normalized_shape == (O + N,)
    obs, state, mask = _inputs(CONTINUOUS)
    obs[:] = obs[:, :1]  # every agent sees agent 0's observation
    for p in with_id.model.actor.out.parameters():
        torch.nn.init.normal_(p)  # the small-gain init makes the outputs nearly equal either way
    a = with_id.act(obs, state, mask, deterministic=True).actions
    b = without.act(obs, state, mask, deterministic=True).actions
    assert not torch.allclose(a[:, 0], a[:, 1])
    torch.testing.assert_close(b[:, 0], b[:, 1])
    with pytest.raises(UserError, match="mat_dec_agent_id"):
        check_compatible(
            "mat_dec",
            CONTINUOUS,
            build_config(
                {"algo": "mat_dec", "mlp": {"mat_dec_agent_id": True}, "ppo": {"shuffle_agent_order": True}}
            ),
        )


def test_mappo_critic_own_obs_makes_each_value_read_its_own_observation():
    """mlp.critic_own_obs (the MAPPO paper's agent-specific global state): with it, changing agent 1's
    observation moves agent 1's value and no other; without it, the critic reads only state + id."""
    torch.manual_seed(0)
    config = build_config({"algo": "mappo", "mlp": {"critic_own_obs": True}})
    own = make_algorithm("mappo", DISCRETE, config, CPU)
    plain = _make("mappo", DISCRETE)
    assert own.model.critic.trunk[0].normalized_shape == (S + O + N,)
    obs, state, _ = _inputs(DISCRETE)
    changed = obs.clone()
    changed[:, 1] = torch.randn_like(changed[:, 1])
    v, w = own.values(obs, state), own.values(changed, state)
    assert not torch.allclose(v[:, 1], w[:, 1])
    torch.testing.assert_close(torch.cat([v[:, :1], v[:, 2:]], 1), torch.cat([w[:, :1], w[:, 2:]], 1))
    torch.testing.assert_close(plain.values(obs, state), plain.values(changed, state))
    for name, key in (("ippo", "critic_own_obs"), ("mappo", "mat_dec_agent_id")):  # switches it would ignore
        with pytest.raises(UserError, match=f"mlp.{key} is only read by"):
            check_compatible(name, DISCRETE, build_config({"algo": name, "mlp": {key: True}}))


def test_agent_order_shuffle_is_refused_for_agent_specific_models():
    config = build_config({"algo": "mappo", "ppo": {"shuffle_agent_order": True}})
    with pytest.raises(UserError, match="shuffle_agent_order"):
        check_compatible("mappo", DISCRETE, config)
    check_compatible("mat", DISCRETE, build_config({"ppo": {"shuffle_agent_order": True}}))


def test_every_registered_algorithm_builds():
    for name in algorithm_names():
        spec = DISCRETE
        assert make_algorithm(name, spec, build_config({"algo": name}), CPU).name == name


def test_mat_dec_fits_the_mean_value_and_mappo_each_agent():
    value = torch.tensor([[1.0, 3.0]])
    target = torch.tensor([[2.0, 2.0]])
    alive = torch.ones(1, 2, dtype=torch.bool)
    mat_dec, mappo = _make("mat_dec", DISCRETE), _make("mappo", DISCRETE)
    assert mat_dec._value_loss(value, value, target, alive).item() == 0.0  # mean 2 == mean target 2
    assert mappo._value_loss(value, value, target, alive).item() == 0.5  # Huber: 0.5 * 1 per agent


def test_adam_is_fused_on_cpu_and_steps_like_torchs_for_loop_adam():
    from seqmarl.algos.optim import adam

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    twin = copy.deepcopy(model)
    fused = adam(model.parameters(), 1e-2, 1e-5)
    loop = torch.optim.Adam(twin.parameters(), lr=1e-2, eps=1e-5, foreach=False)
    assert fused.defaults["fused"]
    start = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(64, 7)
    for _ in range(20):
        for net, optimizer in ((model, fused), (twin, loop)):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all((a - s).abs().max() > 1e-2 for a, s in zip(model.parameters(), start, strict=True))


def _net_and_twin():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(7, 16), torch.nn.GELU(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)
    )
    return net, copy.deepcopy(net), torch.randn(64, 7)


def _step(net, optimizer, x, clip, flat: bool) -> torch.Tensor:
    optimizer.zero_grad()
    net(x).sin().mean().backward()
    if flat:
        norm = optimizer.clip_grad_norm_(clip)
    else:
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    optimizer.step()
    return norm


def test_flat_adam_steps_like_torchs_adam_tensor_by_tensor_with_clipping():
    """FlatAdam (one flat tensor for all weights) against torch's fused Adam over the tensors one by one,
    with a clip that bites: the same norms and weights after 25 steps, within float32 rounding (the norm
    sums in another order); every weight moved."""
    from seqmarl.algos.optim import FlatAdam

    net, twin, x = _net_and_twin()
    start = [p.detach().clone() for p in net.parameters()]
    flat = FlatAdam(net.parameters(), 1e-2, 1e-5)
    torchs = torch.optim.Adam(twin.parameters(), lr=1e-2, eps=1e-5, fused=True)
    for _ in range(25):
        norm = _step(net, flat, x, 0.05, True)
        torch_norm = _step(twin, torchs, x, 0.05, False)
        torch.testing.assert_close(norm, torch_norm, rtol=1e-5, atol=1e-7)
    assert norm > 0.05  # the clip scaled the gradients
    for a, b, s in zip(net.parameters(), twin.parameters(), start, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert (a - s).abs().max() > 1e-2
    assert all(p.grad is g for p, g in zip(net.parameters(), flat.grads, strict=True))


def test_flat_adam_keeps_gradients_set_elsewhere_and_refuses_moved_weights():
    """A `model.zero_grad()` between FlatAdam's zero_grad and the backward makes autograd hand out
    gradients of its own: they are copied into the flat gradient, not lost. A weight moved to new
    memory after the optimiser was made is refused in one line."""
    from seqmarl.algos.optim import FlatAdam

    net, twin, x = _net_and_twin()
    flat = FlatAdam(net.parameters(), 1e-2, 1e-5)
    torchs = torch.optim.Adam(twin.parameters(), lr=1e-2, eps=1e-5, fused=True)
    for _ in range(3):
        flat.zero_grad()
        net.zero_grad()  # set_to_none: autograd makes new gradient tensors
        net(x).sin().mean().backward()
        flat.clip_grad_norm_(1e9)
        flat.step()
        _step(twin, torchs, x, 1e9, False)
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    net[0].weight.data = net[0].weight.data.clone()
    with pytest.raises(RuntimeError, match="moved to new memory"):
        flat.step()


def test_flat_adam_checkpoints_are_torchs_per_tensor_adam_state():
    """FlatAdam writes and reads torch's own per-parameter Adam layout: its state loads into a plain
    torch Adam over the same weights, and a plain torch Adam's state (a checkpoint from before FlatAdam)
    loads into it; either way the next steps are those of an optimiser that never stopped."""
    from seqmarl.algos.optim import FlatAdam

    net, twin, x = _net_and_twin()
    flat = FlatAdam(net.parameters(), 1e-2, 1e-5)
    torchs = torch.optim.Adam(twin.parameters(), lr=1e-2, eps=1e-5, fused=True)
    for _ in range(5):
        _step(net, flat, x, 1.0, True)
        _step(twin, torchs, x, 1.0, False)
    saved_flat, saved_torch = copy.deepcopy(flat.state_dict()), copy.deepcopy(torchs.state_dict())
    assert saved_flat["param_groups"][0]["params"] == saved_torch["param_groups"][0]["params"]
    assert saved_flat["state"].keys() == saved_torch["state"].keys()
    for i, entry in saved_torch["state"].items():
        assert {k: v.shape for k, v in saved_flat["state"][i].items()} == {
            k: v.shape for k, v in entry.items()
        }
        torch.testing.assert_close(saved_flat["state"][i]["exp_avg"], entry["exp_avg"], rtol=1e-4, atol=1e-7)

    # Cross over: a fresh FlatAdam from torch's state, a fresh torch Adam from FlatAdam's.
    net2, twin2 = copy.deepcopy(twin), copy.deepcopy(net)
    flat2 = FlatAdam(net2.parameters(), 1e-2, 1e-5)
    flat2.load_state_dict(saved_torch)
    torchs2 = torch.optim.Adam(twin2.parameters(), lr=1e-2, eps=1e-5, fused=True)
    torchs2.load_state_dict(saved_flat)
    for _ in range(5):
        _step(twin, torchs, x, 1.0, False)  # the originals go on
        _step(net, flat, x, 1.0, True)
        _step(net2, flat2, x, 1.0, True)
        _step(twin2, torchs2, x, 1.0, False)
    for a, b, c, d in zip(
        twin.parameters(), net2.parameters(), net.parameters(), twin2.parameters(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)  # resumed from torch's state
        torch.testing.assert_close(d, c, rtol=1e-4, atol=1e-6)  # torch resumed from FlatAdam's
    with pytest.raises(ValueError, match="parameters"):
        FlatAdam(torch.nn.Linear(2, 2).parameters(), 1e-2).load_state_dict(saved_torch)
