"""The CUDA path, against the CPU path with the same weights and inputs.

Everything here needs a CUDA device and is skipped without one: CI has no GPU. These tests ran on an
NVIDIA H200 lent to this work (docs/performance.md, "On a CUDA GPU"); run them on any GPU machine with
`python -m pytest -q tests/test_cuda.py`. On the GPU the model runs other kernels than on the CPU (the
C++ decode loop's ATen ops instead of the fused CPU loop, the per-layer autograd update instead of the
one C++ pass, torch's attention, GELU and LayerNorm), so these are cross-checks between two
implementations of the same maths, not copies of the CPU tests.
"""

import copy
import dataclasses
import importlib.util
import io
import json

import pytest
import torch

from seqmarl.algos import algorithm_class, algorithm_names, make_algorithm
from seqmarl.buffer import RolloutBuffer
from seqmarl.config import build_config
from seqmarl.nn import cpp_decode
from seqmarl.nn.mat import MATConfig, MultiAgentTransformer
from seqmarl.types import ContinuousActions, DiscreteActions, EnvSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
B, N, O, S, A = 32, 5, 11, 13, 7
SPECS = {
    "discrete": EnvSpec("test:discrete", N, O, S, DiscreteActions(A), 50, True),
    "continuous": EnvSpec(
        "test:continuous", N, O, S, ContinuousActions(3, (-1.0,) * 3, (1.0,) * 3), 50, False
    ),
}


def _inputs(spec: EnvSpec, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    obs, state = torch.randn(B, N, O, generator=g), torch.randn(B, S, generator=g)
    mask = torch.ones(B, N, spec.action_space.mask_width, dtype=torch.bool)
    if spec.discrete:
        mask = torch.rand(B, N, A, generator=g) > 0.4
        mask[..., 0] = True
    return obs, state, mask


def _perturbed_mat(spec: EnvSpec, config: MATConfig) -> MultiAgentTransformer:
    """A CPU model whose outputs depend on every weight (the reference's small init gains make them
    nearly constant, which would let a broken CUDA path pass)."""
    torch.manual_seed(0)
    model = MultiAgentTransformer(config, spec)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _on(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("decode", ["cpp", "python"])
@pytest.mark.parametrize("space", SPECS)
def test_cuda_cached_decode_matches_uncached_and_the_cpu(space, decode):
    """On CUDA the cached loop (C++ ATen ops, or Python) gives the uncached decode's actions for the same
    draws, and the CPU model's greedy actions, log-probs and values."""
    spec = SPECS[space]
    config = MATConfig(decode=decode if decode == "python" or cpp_decode.extension("auto") else "python")
    cpu_model = _perturbed_mat(spec, config)
    gpu_model = _perturbed_mat(spec, config).to(CUDA)
    obs, _, mask = _inputs(spec)
    g_obs, g_mask = _on(CUDA, obs, mask)
    with torch.no_grad():
        for deterministic in (False, True):
            cached = gpu_model.act(g_obs, g_mask, deterministic, torch.Generator(CUDA).manual_seed(3))
            uncached = gpu_model.act(
                g_obs, g_mask, deterministic, torch.Generator(CUDA).manual_seed(3), False
            )
            assert cached.actions.device.type == "cuda"
            if spec.discrete:
                assert torch.equal(cached.actions, uncached.actions)
            torch.testing.assert_close(cached.actions, uncached.actions, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cached.log_prob, uncached.log_prob, atol=1e-5, rtol=1e-5)
        greedy_gpu = gpu_model.act(g_obs, g_mask, True)
        greedy_cpu = cpu_model.act(obs, mask, True)
    if spec.discrete:
        assert torch.equal(greedy_gpu.actions.cpu(), greedy_cpu.actions)
    torch.testing.assert_close(greedy_gpu.actions.cpu(), greedy_cpu.actions, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(greedy_gpu.log_prob.cpu(), greedy_cpu.log_prob, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(greedy_gpu.value.cpu(), greedy_cpu.value, atol=1e-4, rtol=1e-4)


def _greedy_matches(model: MultiAgentTransformer, obs: torch.Tensor, mask: torch.Tensor) -> None:
    """The graphed greedy call against the same model's eager call (cuda_graphs off)."""
    graphed = model.act(obs, mask, True)
    model.config = dataclasses.replace(model.config, cuda_graphs=False)
    try:
        eager = model.act(obs, mask, True)
    finally:
        model.config = dataclasses.replace(model.config, cuda_graphs=True)
    if model.discrete:
        assert torch.equal(graphed.actions, eager.actions)
    torch.testing.assert_close(graphed.actions, eager.actions, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(graphed.log_prob, eager.log_prob, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(graphed.value, eager.value, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("space", SPECS)
def test_graphed_act_replays_the_eager_call_and_follows_the_weights(space):
    """MAT's act() from a CUDA graph (nn/cuda_graph.py): the eager call's results; a weight changed in
    place is seen by the next replay; a parameter moved to new memory, or another batch shape, records a
    new graph instead of replaying a stale one; a copied model starts without graphs."""
    spec = SPECS[space]
    model = _perturbed_mat(spec, MATConfig()).to(CUDA)
    obs, _, mask = _inputs(spec)
    obs, mask = _on(CUDA, obs, mask)
    graphs = model._act_graphs
    _greedy_matches(model, obs, mask)
    assert graphs.failure is None and len(graphs.graphs) == 1
    _greedy_matches(model, obs + 0.5, mask)  # new inputs, same graph
    assert len(graphs.graphs) == 1
    with torch.no_grad():  # as the optimiser's step does
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    _greedy_matches(model, obs, mask)
    assert len(graphs.graphs) == 1
    for p in model.parameters():  # as .to() or load_state_dict(assign=True) do
        p.data = p.data.clone()
    _greedy_matches(model, obs, mask)
    assert len(graphs.graphs) == 2
    _greedy_matches(model, obs[:7], mask[:7])
    assert len(graphs.graphs) == 3
    clone = copy.deepcopy(model)
    assert not clone._act_graphs.graphs
    _greedy_matches(clone, obs, mask)


def test_graphed_sampling_is_seeded_advances_and_matches_evaluate():
    spec = SPECS["discrete"]
    model = _perturbed_mat(spec, MATConfig()).to(CUDA)
    obs, _, mask = _on(CUDA, *_inputs(spec))
    torch.manual_seed(7)
    first, second = model.act(obs, mask), model.act(obs, mask)
    assert model._act_graphs.failure is None and len(model._act_graphs.graphs) == 1
    assert not torch.equal(first.actions, second.actions)  # each replay draws anew
    torch.manual_seed(7)
    assert torch.equal(model.act(obs, mask).actions, first.actions)  # and a seed repeats them
    assert mask.gather(-1, first.actions[..., None]).all(), "a masked action was sampled"
    with torch.no_grad():
        teacher = model.evaluate(obs, mask, first.actions)
    torch.testing.assert_close(first.log_prob, teacher.log_prob, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first.value, teacher.value, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("space", SPECS)
def test_cuda_update_gradients_match_the_cpu_pass(space):
    """The gradients of the PPO-shaped loss on CUDA (layer by layer through autograd) equal the CPU's (one
    C++ pass where this CPU runs it) within float32 rounding."""
    spec = SPECS[space]
    obs, _, mask = _inputs(spec)
    # Sampled, not greedy, actions: a continuous greedy action is the mean itself, where the log-prob's
    # gradient (a - mean) / std^2 is float32 rounding noise on either device.
    with torch.no_grad():
        actions = _perturbed_mat(spec, MATConfig()).act(obs, mask, False, torch.Generator().manual_seed(5))
    grads = {}
    for device in (CPU, CUDA):
        model = _perturbed_mat(spec, MATConfig()).to(device)
        d_obs, d_mask, d_actions = _on(device, obs, mask, actions.actions)
        out = model.evaluate(d_obs, d_mask, d_actions)
        loss = out.log_prob.sum() + 0.5 * out.value.square().sum() + 0.01 * out.entropy.sum()
        loss.backward()
        grads[device.type] = {k: p.grad.cpu() for k, p in model.named_parameters() if p.grad is not None}
    assert grads["cuda"].keys() == grads["cpu"].keys() and grads["cpu"]
    # Per parameter, the difference's norm within 1e-4 of the gradient's norm, plus 1e-6 of the whole
    # gradient's: the key biases' gradients are zero in exact arithmetic (softmax ignores a constant added
    # to every logit), so theirs is rounding noise on both devices. A wrong gradient misses by ~1e4 times
    # this; the CPU's two passes (C++ and layer by layer) keep within 0.15 of it.
    total = torch.cat([g.flatten() for g in grads["cpu"].values()]).norm()
    for key, grad in grads["cpu"].items():
        error = (grads["cuda"][key] - grad).norm()
        assert error <= 1e-4 * grad.norm() + 1e-6 * total, (
            f"{key}: |diff| {error:.3g}, |grad| {grad.norm():.3g}"
        )


def _algorithm(name: str, spec: EnvSpec, device: torch.device):
    config = build_config({"algo": name, "ppo": {"epochs": 2, "num_minibatches": 2}})
    torch.manual_seed(0)
    return make_algorithm(name, spec, config, device)


ON_POLICY = [n for n in algorithm_names() if n != "qmix"]


@pytest.mark.parametrize("name", ON_POLICY)
def test_every_on_policy_algorithm_acts_and_updates_on_cuda_like_on_the_cpu(name):
    """Same weights on both devices: the same greedy actions, then one PPO update each from the same
    batch and minibatch draws gives the same losses, and the CUDA weights stay on CUDA and move."""
    spec = SPECS["discrete"]
    cpu, gpu = _algorithm(name, spec, CPU), _algorithm(name, spec, CUDA)
    gpu.load_state_dict(cpu.state_dict())
    obs, state, mask = _inputs(spec)
    metrics, before = {}, {k: v.clone() for k, v in gpu.model.state_dict().items()}
    for algo, device in ((cpu, CPU), (gpu, CUDA)):
        d_obs, d_state, d_mask = _on(device, obs, state, mask)
        algo.begin_iteration(torch.Generator().manual_seed(0), 0)
        T = 3
        buffer = RolloutBuffer(spec, T, B, device)
        for t in range(T):
            out = algo.act(d_obs, d_state, d_mask, deterministic=True)
            buffer.obs[t], buffer.state[t], buffer.action_mask[t] = d_obs, d_state, d_mask
            buffer.actions[t], buffer.log_prob[t], buffer.values[t] = out.actions, out.log_prob, out.value
        buffer.alive[:] = True
        buffer.rewards[:] = torch.randn(T, B, generator=torch.Generator().manual_seed(1)).to(device)
        batch = buffer.finish(
            algo.values(d_obs, d_state),
            torch.ones(B, N, dtype=torch.bool, device=device),
            algo.value_norm,
            0.99,
            0.95,
            per_agent=algo.per_agent_advantages,
        )
        metrics[device.type] = algo.update(batch, 1e-3, torch.Generator().manual_seed(0))
    for key in ("losses/policy_loss", "losses/value_loss", "losses/entropy"):
        assert metrics["cuda"][key] == pytest.approx(metrics["cpu"][key], rel=1e-3, abs=1e-5), key
    after = gpu.model.state_dict()
    assert all(v.device.type == "cuda" for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_qmix_acts_and_learns_on_cuda():
    assert "qmix" in algorithm_names() and algorithm_class("qmix").supports_discrete
    spec = SPECS["discrete"]
    algo = _algorithm("qmix", spec, CUDA)
    obs, state, mask = _on(CUDA, *_inputs(spec))
    hidden = algo.initial_hidden(B)
    algo.begin_iteration(torch.Generator().manual_seed(0), 0)
    out = algo.act(obs, state, mask, hidden)
    assert out.actions.device.type == "cuda" and out.actions.shape == (B, N)
    assert mask.gather(-1, out.actions[..., None]).all()


def test_a_checkpoint_written_on_cuda_loads_on_the_cpu():
    spec = SPECS["continuous"]
    gpu = _algorithm("mat", spec, CUDA)
    saved = io.BytesIO()
    torch.save(gpu.state_dict(), saved)
    saved.seek(0)
    cpu = _algorithm("mat", spec, CPU)
    cpu.load_state_dict(torch.load(saved, weights_only=True, map_location="cpu"))
    obs, state, mask = _inputs(spec)
    want = gpu.act(*_on(CUDA, obs, state, mask), deterministic=True).actions.cpu()
    torch.testing.assert_close(
        cpu.act(obs, state, mask, deterministic=True).actions, want, atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("sim_device", ["cpu", "gpu"])
def test_smax_records_are_host_tensors_wherever_the_simulator_runs(sim_device):
    """SMAX beside a GPU: on jax's CPU (the default) or its GPU (env.sim_device=gpu), the records are CPU
    tensors (StepRecord's contract; the env guard reads them through numpy), jax has not taken the GPU's
    memory, and a GPU simulator continues exactly from its saved state."""
    if importlib.util.find_spec("jaxmarl") is None:
        pytest.skip("SMAX needs the smax extra (jaxmarl)")
    from seqmarl.envs.registry import make_vector_env

    envs = make_vector_env("smax:3m", 4, 0, sim_device=sim_device)
    first = envs.reset(0)
    assert all(getattr(first, f).device.type == "cpu" for f in ("obs", "state", "action_mask", "reward"))
    free, total = torch.cuda.mem_get_info()
    assert free > total / 2, "jax preallocated the GPU's memory"
    generator = torch.Generator().manual_seed(0)

    def actions(record):  # a random available action per agent
        return torch.multinomial(
            record.action_mask.reshape(-1, record.action_mask.shape[-1]).float(), 1, generator=generator
        ).view(record.action_mask.shape[:2])

    record = first
    for _ in range(5):
        record = envs.step(actions(record))
    saved, plan = envs.get_state(), [actions(record) for _ in range(10)]
    run = [envs.step(a).reward.clone() for a in plan]
    envs.set_state(saved)
    again = [envs.step(a).reward.clone() for a in plan]
    assert all(torch.equal(a, b) for a, b in zip(run, again))


@pytest.mark.parametrize("sim_device", ["cpu", "gpu"])
def test_cli_trains_mat_on_smax_on_cuda_and_records_the_device(sim_device, tmp_path, capsys):
    """The main job on the GPU: a short `seqmarl train` on smax:3m with --device cuda (SMAX on jax's CPU,
    or with env.sim_device=gpu on jax's GPU), then `eval`."""
    # find_spec, not importorskip: importing jaxmarl outside the SMAX adapter's guard resets sys.stdout
    # (envs/smax.py `_make_smax`), which would take the output away from capsys
    if importlib.util.find_spec("jaxmarl") is None:
        pytest.skip("SMAX needs the smax extra (jaxmarl)")
    from seqmarl.cli import main

    argv = ["train", "--env", "smax:3m", "--steps", "640", "--num-envs", "4", "--device", "cuda"]
    argv += ["--out-dir", str(tmp_path), "--run-name", "gpu", "--no-progress"]
    settings = ("ppo.rollout_length=20", "env.eval_envs=2", "run.eval_episodes=2", "ppo.epochs=2")
    for setting in (*settings, f"env.sim_device={sim_device}"):
        argv += ["--set", setting]
    assert main(argv) == 0
    meta = json.loads((tmp_path / "gpu" / "meta.json").read_text())
    assert "cuda" in json.dumps(meta).lower(), meta
    assert (tmp_path / "gpu" / "curve.png").is_file()
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "gpu"), "--episodes", "2", "--device", "cuda"]) == 0
    assert "eval/episodic_return" in capsys.readouterr().out
