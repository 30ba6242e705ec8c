"""MAT's two entry points agree, decoding is causal, masks are respected, N is free."""

import dataclasses
import shutil

import pytest
import torch

from seqmarl.errors import UserError
from seqmarl.nn import cpp_decode
from seqmarl.nn.mat import MATConfig, MultiAgentTransformer
from seqmarl.types import ContinuousActions, DiscreteActions, EnvSpec

SPACES = {"discrete": DiscreteActions(7), "continuous": ContinuousActions(3, (-1.0,) * 3, (1.0,) * 3)}
CONFIGS = {
    "reference": MATConfig(),
    "deep-prenorm": MATConfig(n_embd=32, n_head=4, n_block=3, pre_norm=True),
}


def make(space_name: str, config_name: str, N=5, B=6, seed=0, *, space=None, config=None):
    """A model with perturbed weights, observations and a mask; `space`/`config` replace the named ones."""
    torch.manual_seed(seed)
    space = space or SPACES[space_name]
    spec = EnvSpec("test", N, 11, 9, space, 100, False)
    model = MultiAgentTransformer(config or CONFIGS[config_name], spec)
    # Perturb every parameter: the reference's tiny init gains make outputs nearly constant, which
    # would let a broken decoder pass these tests.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    obs = torch.randn(B, N, 11)
    mask = torch.rand(B, N, space.mask_width) > 0.4
    mask[..., 0] = True
    return model, obs, mask


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("space_name", SPACES)
def test_cached_act_matches_teacher_forced_evaluate(space_name, config_name):
    model, obs, mask = make(space_name, config_name)
    for deterministic in (False, True):
        out = model.act(obs, mask, deterministic=deterministic)
        ev = model.evaluate(obs, mask, out.actions)
        torch.testing.assert_close(out.log_prob, ev.log_prob, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.value, ev.value)
    # Entropy: the cached path's per-step distribution equals the teacher-forced one.
    # (checked through log-probs of every action: evaluate with each action swapped in)
    if space_name == "discrete":
        out = model.act(obs, mask)
        N = obs.shape[1]
        for i in range(N):
            for a in range(7):
                actions = out.actions.clone()
                actions[:, i] = a
                ev = model.evaluate(obs, mask, actions)
                # agent i's distribution is fixed by agents < i, whose actions did not change
                ref = model.evaluate(obs, mask, out.actions)
                torch.testing.assert_close(ev.entropy[:, : i + 1], ref.entropy[:, : i + 1])


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("space_name", SPACES)
def test_agent_outputs_do_not_depend_on_later_agents(space_name, config_name):
    model, obs, mask = make(space_name, config_name)
    actions = model.act(obs, mask).actions
    base = model.evaluate(obs, mask, actions)
    N = obs.shape[1]
    for i in range(N):
        changed = model.act(obs, mask).actions  # fresh draws
        changed[:, :i] = actions[:, :i]  # agents < i keep their actions; agents >= i change
        changed[:, i] = actions[
            :, i
        ]  # ... and agent i's own action is the same, so its log-prob is comparable
        out = model.evaluate(obs, mask, changed)
        torch.testing.assert_close(out.log_prob[:, : i + 1], base.log_prob[:, : i + 1])
        torch.testing.assert_close(out.entropy[:, : i + 1], base.entropy[:, : i + 1])
    # and it does depend on earlier agents (the test above is not vacuous)
    if space_name == "discrete":
        flipped = actions.clone()
        flipped[:, 0] = (flipped[:, 0] + 1) % 7
        assert not torch.allclose(model.evaluate(obs, mask, flipped).entropy[:, 1:], base.entropy[:, 1:])


def test_masked_actions_are_never_sampled():
    model, obs, mask = make("discrete", "reference", N=4, B=64)
    for _ in range(20):
        actions = model.act(obs, mask).actions  # (B, N)
        assert mask.gather(-1, actions.unsqueeze(-1)).all()
    greedy = model.act(obs, mask, deterministic=True).actions
    assert mask.gather(-1, greedy.unsqueeze(-1)).all()


def test_single_available_action_has_log_prob_zero():
    model, obs, mask = make("discrete", "reference")
    mask[:] = False
    mask[..., 3] = True
    out = model.act(obs, mask)
    assert (out.actions == 3).all()
    torch.testing.assert_close(out.log_prob, torch.zeros_like(out.log_prob))


@pytest.mark.parametrize("space_name", SPACES)
def test_one_model_serves_any_number_of_agents(space_name):
    model, _, _ = make(space_name, "reference", N=3)
    for N in (1, 3, 8):
        obs = torch.randn(2, N, 11)
        mask = torch.ones(2, N, SPACES[space_name].mask_width, dtype=torch.bool)
        out = model.act(obs, mask)
        assert out.log_prob.shape == (2, N) and out.value.shape == (2, N)
        torch.testing.assert_close(
            model.evaluate(obs, mask, out.actions).log_prob, out.log_prob, atol=1e-5, rtol=1e-5
        )


def test_encoder_values_are_permutation_equivariant():
    model, obs, _ = make("discrete", "reference")
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(model.values(obs[:, perm]), model.values(obs)[:, perm])


def test_categorical_sampler_matches_softmax_frequencies():
    from seqmarl.nn import distributions as dist

    logits = torch.tensor([0.0, 1.0, 2.0, 5.0]).expand(40000, 1, 4)
    mask = torch.tensor([True, True, True, False]).expand(40000, 1, 4)
    generator = torch.Generator().manual_seed(0)
    samples = dist.categorical_sample(dist.masked_logits(logits, mask), False, generator).flatten()
    freq = torch.bincount(samples, minlength=4).float() / samples.numel()
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0, -1e10]), 0)
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("space_name", SPACES)
def test_cached_act_matches_uncached_act_for_the_same_draws(space_name, config_name):
    """The key/value cache changes the cost of acting, not its result: with the same generator seed both
    paths consume the same noise and give the same actions (discrete: exactly equal; continuous: within
    float32 rounding, since the two paths multiply matrices of different shapes) and log-probs."""
    model, obs, mask = make(space_name, config_name, N=9, B=16)
    for deterministic, whole_sequence in ((False, False), (False, True), (True, False)):
        cached = model.act(obs, mask, deterministic, torch.Generator().manual_seed(3))
        uncached = model.act(
            obs, mask, deterministic, torch.Generator().manual_seed(3), False, whole_sequence
        )
        if space_name == "discrete":
            assert torch.equal(cached.actions, uncached.actions)
        else:
            torch.testing.assert_close(cached.actions, uncached.actions, atol=1e-5, rtol=0)
        torch.testing.assert_close(cached.log_prob, uncached.log_prob, atol=1e-5, rtol=0)
        torch.testing.assert_close(cached.value, uncached.value, atol=0, rtol=0)
    # and the draws matter: another seed gives other actions
    sampled = model.act(obs, mask, False, torch.Generator().manual_seed(3))
    other = model.act(obs, mask, False, torch.Generator().manual_seed(4))
    assert not torch.equal(other.actions, sampled.actions)


HAS_COMPILER = any(shutil.which(cc) for cc in ("c++", "g++", "clang++"))


def act_with_each_loop(model, obs, mask, deterministic: bool, seed: int) -> dict:
    """`act` with the C++ and with the Python cached loop, the same draws for both, both from the
    per-layer encoder (these tests are about the decode loops; the C++ encoder has its own test below)."""
    results = {}
    switch = cpp_decode.use_training_pass
    cpp_decode.use_training_pass = False
    try:
        for mode in ("cpp", "python"):
            model.config = dataclasses.replace(model.config, decode=mode)
            results[mode] = model.act(obs, mask, deterministic, torch.Generator().manual_seed(seed))
    finally:
        cpp_decode.use_training_pass = switch
    return results


def assert_same_decode(results: dict, discrete: bool) -> None:
    """Same discrete actions; continuous actions and log-probs within float32 rounding (the tolerance of
    the act-vs-evaluate test)."""
    cpp, python = results["cpp"], results["python"]
    if discrete:
        assert torch.equal(cpp.actions, python.actions)
    torch.testing.assert_close(cpp.actions, python.actions, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cpp.log_prob, python.log_prob, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the C++ decode step cannot be built here")
@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("space_name", SPACES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "aten"])
def test_cpp_decode_gives_the_python_decode_results(space_name, config_name, fused, monkeypatch):
    """csrc/decode.cpp's two loops (the fused CPU loop, where this CPU has AVX2/FMA, and the loop of ATen
    ops) compute the Python cached loop's maths in another summation order: same draws -> same discrete
    actions, and log-probs / continuous actions within float32 rounding (the tolerance of the
    act-vs-evaluate test above). Built here (a compiler is present), so a broken build fails instead of
    falling back."""
    model, obs, mask = make(space_name, config_name, N=9, B=16)
    assert cpp_decode.extension("cpp") is not None
    monkeypatch.setattr(cpp_decode, "use_fused_loop", fused)
    for deterministic in (False, True):
        assert_same_decode(act_with_each_loop(model, obs, mask, deterministic, 3), space_name == "discrete")


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the C++ decode step cannot be built here")
def test_the_acting_decode_loop_is_named(monkeypatch):
    """meta.json records which loop acts (they round differently): the mode, the fused switch, the CPU
    and the device decide it."""
    cpu = torch.device("cpu")
    assert cpp_decode.loop_name("python", cpu) == "python"
    fused_here = cpp_decode.extension("cpp").fused_available()
    assert cpp_decode.loop_name("cpp", cpu) == ("cpp-fused" if fused_here else "cpp-aten")
    assert cpp_decode.loop_name("cpp", torch.device("cuda")) == "cpp-aten"  # the fused loop is CPU-only
    monkeypatch.setattr(cpp_decode, "use_fused_loop", False)
    assert cpp_decode.loop_name("auto", cpu) == "cpp-aten"


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the C++ decode step cannot be built here")
@pytest.mark.parametrize("space_name", SPACES)
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_cpp_decode_is_as_exact_as_the_other_loops(space_name, threads):
    """The fused loop's own kernels (matmul tiles with row and column remainders, vectorised exp/erf,
    attention over more keys than a vector holds, the batch split over threads) against float64: its
    log-probs are as close to a float64 teacher-forced evaluate as the Python loop's are. B = 7 rows
    (not a multiple of the 4-row tile) and N = 40 agents (attention over up to 40 keys)."""
    extension = cpp_decode.extension("cpp")
    if not extension.fused_available():
        pytest.skip("this CPU has no AVX2/FMA: the fused loop does not run here")
    model, obs, mask = make(space_name, "reference", N=40, B=7, seed=1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = act_with_each_loop(model, obs, mask, False, 5)
    finally:
        torch.set_num_threads(previous)
    if space_name == "discrete":
        assert torch.equal(results["cpp"].actions, results["python"].actions)
    actions = results["python"].actions
    actions = actions if space_name == "discrete" else actions.double()
    exact = model.double().evaluate(obs.double(), mask, actions)
    error = {mode: (r.log_prob.double() - exact.log_prob).abs().max().item() for mode, r in results.items()}
    assert error["cpp"] <= 2 * error["python"] + 1e-6, error


def test_unknown_decode_mode_is_a_user_error():
    with pytest.raises(UserError, match="model.decode"):
        MATConfig(decode="cuda")


def test_a_failed_cpp_build_falls_back_to_python_or_is_a_user_error(monkeypatch, capsys):
    """No compiler (simulated): "auto" decodes in Python with a one-line notice, "cpp" is refused."""

    def no_compiler():
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpp_decode, "_build", no_compiler)
    monkeypatch.setattr(cpp_decode, "_module", None)
    monkeypatch.setattr(cpp_decode, "_failure", None)
    model, obs, mask = make("discrete", "reference")
    assert "no C++ compiler found" in capsys.readouterr().err
    reference = dataclasses.replace(model.config, decode="python")
    expected = model.act(obs, mask, True).actions
    model.config = reference
    torch.testing.assert_close(model.act(obs, mask, True).actions, expected)
    with pytest.raises(UserError, match="does not build here"):
        cpp_decode.extension("cpp")


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the C++ decode step cannot be built here")
@pytest.mark.parametrize("keys", [1, 5, 24, 25, 80])
def test_cpp_single_query_attention_matches_torch(keys):
    """decode.cpp's own attention loop (up to 24 keys) and its hand-over to torch's kernel (beyond):
    both equal torch's attention, for several heads and a query that is a strided view, as in decode."""
    extension = cpp_decode.extension("cpp")
    torch.manual_seed(keys)
    qkv = torch.randn(6, 3, 4, 16)  # (B, 3, H, D), as the decoder's fused projection
    q = qkv[:, 0].unsqueeze(2)  # (B, H, 1, D), not contiguous
    cache = torch.randn(6, 4, 100, 16)  # (B, H, N, D), the first `keys` slots in use
    k, v = cache[:, :, :keys], cache.flip(2)[:, :, :keys].contiguous()
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(extension.attend_one(q, k, v), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the C++ decode step cannot be built here")
@pytest.mark.parametrize("space_name", SPACES)
@pytest.mark.parametrize("B, N", [(1, 1), (5, 3), (9, 30)])
def test_cpp_decode_with_widths_off_the_vector_size(space_name, B, N):
    """Widths that are not multiples of 8 floats (E = 36 with 3 heads of 12, 2 blocks; E = 20 with
    pre-LayerNorm), one action dimension, a single env and agent: the vector kernels' remainder paths
    give the Python loop's actions and log-probs."""
    space = DiscreteActions(3) if space_name == "discrete" else ContinuousActions(1, (-1.0,), (1.0,))
    for config in (MATConfig(n_embd=36, n_head=3, n_block=2), MATConfig(n_embd=20, n_head=2, pre_norm=True)):
        model, obs, mask = make(space_name, "", N, B, seed=N, space=space, config=config)
        assert_same_decode(act_with_each_loop(model, obs, mask, False, 1), space_name == "discrete")


def backward_weighted(out: torch.Tensor) -> None:
    """Backward of a weighted sum, so every output element gets its own gradient."""
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()


def assert_as_close_to_float64_as_torch(run) -> None:
    """`run(use_cpp, dtype)` returns an output and gradients. The C++ kernels' float32 results must be
    as close to torch's float64 results as torch's own float32 results are (2x slack, plus a hair)."""
    exact = run(False, torch.float64)  # torch's kernels in float64: the reference
    ours, torchs = run(True, torch.float32), run(False, torch.float32)
    for mine, theirs, truth in zip(ours, torchs, exact, strict=True):
        mine, theirs, truth = mine.double(), theirs.double(), truth.double()
        error, torch_error = (mine - truth).abs().max().item(), (theirs - truth).abs().max().item()
        assert error <= 2 * torch_error + 1e-6 * truth.abs().max().item() + 1e-9, (error, torch_error)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the C++ decode step cannot be built here")
@pytest.mark.parametrize("tokens", [1, 5, 16, 27, 32])
@pytest.mark.parametrize("heads, width", [(1, 64), (2, 64), (3, 36)])
@pytest.mark.parametrize("causal", [False, True])
def test_cpp_training_attention_matches_torch_forward_and_backward(tokens, heads, width, causal, monkeypatch):
    """The update's attention over few tokens (csrc/decode.cpp, nn/layers.py): its output and the
    gradients of every input and weight are as close to a float64 computation as those of torch's
    scaled_dot_product_attention in float32, with queries and keys/values from different streams and
    several heads and a head size off the vector width (12)."""
    from seqmarl.nn.layers import Attention

    if not cpp_decode.extension("cpp").fused_available():
        pytest.skip("this CPU has no AVX2/FMA: torch's kernel attends in training here")
    torch.manual_seed(tokens)
    attention = Attention(width, heads, kernel="cpp")
    with torch.no_grad():
        for p in attention.parameters():
            p.add_(0.3 * torch.randn_like(p))
    queries, keys = torch.randn(2, 7, tokens, width).unbind(0)
    assert cpp_decode.training_attention("cpp", queries.view(7, tokens, heads, -1)) is not None

    def run(use_cpp: bool, dtype: torch.dtype) -> list[torch.Tensor]:
        monkeypatch.setattr(cpp_decode, "use_training_attention", use_cpp)
        attention.to(dtype).zero_grad()
        inputs = [x.to(dtype, copy=True).requires_grad_() for x in (queries, keys)]  # fresh leaves
        out = attention(*inputs, causal=causal)
        backward_weighted(out)
        return [out, *(x.grad for x in inputs), *(p.grad for p in attention.parameters())]

    assert_as_close_to_float64_as_torch(run)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the C++ decode step cannot be built here")
@pytest.mark.parametrize("shape", [(7, 5, 64), (3, 2, 100), (600, 20)])
@pytest.mark.parametrize("residual", [False, True])
def test_cpp_gelu_and_layer_norm_match_torch_forward_and_backward(shape, residual, monkeypatch):
    """The update's GELU and residual + LayerNorm (csrc/decode.cpp, nn/layers.py): outputs and the
    gradients of the input, the residual, the weight and the bias are as close to a float64
    computation as torch's float32 kernels are. Widths on and off the vector width (64, 100, 20), and
    more rows than one chunk of the backward's weight sums (600 > 256)."""
    from torch import nn

    from seqmarl.nn.layers import add_layer_norm, gelu

    if not cpp_decode.extension("cpp").fused_available():
        pytest.skip("this CPU has no AVX2/FMA: torch's kernels run in training here")
    torch.manual_seed(len(shape) + int(residual))
    ln = nn.LayerNorm(shape[-1])
    with torch.no_grad():
        ln.weight.add_(0.5 * torch.randn_like(ln.weight))
        ln.bias.add_(0.5 * torch.randn_like(ln.bias))
    x0, r0 = (2.0 * torch.randn(2, *shape)).unbind(0)
    assert cpp_decode.training_kernels("cpp", x0) is not None

    def run(use_cpp: bool, dtype: torch.dtype) -> list[torch.Tensor]:
        monkeypatch.setattr(cpp_decode, "use_training_fused", use_cpp)
        ln.to(dtype).zero_grad()
        x, r = (t.to(dtype, copy=True).requires_grad_() for t in (x0, r0))  # fresh leaves
        y = add_layer_norm(gelu(x, "cpp"), r if residual else None, ln, "cpp")
        backward_weighted(y)
        return [y, x.grad, r.grad if residual else torch.zeros(1), ln.weight.grad, ln.bias.grad]

    assert_as_close_to_float64_as_torch(run)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the C++ decode step cannot be built here")
@pytest.mark.parametrize("rows, width", [(3, 1), (40, 7), (3000, 10)])
def test_cpp_masked_categorical_matches_torch_forward_and_backward(rows, width, monkeypatch):
    """The update's masked categorical log-prob and entropy (csrc/decode.cpp, nn/distributions.py):
    both, and the gradient of the logits from weighted gradients of both, are as close to a float64
    computation as torch's float32 ops are. Rows with one available action, with every action
    unavailable (the masked logit then ties them all, as in torch), one action only, and more rows than
    one task of the loop (3000 > 1024). Out-of-range actions are refused."""
    from seqmarl.nn.distributions import masked_categorical_log_prob_entropy

    if not cpp_decode.extension("cpp").fused_available():
        pytest.skip("this CPU has no AVX2/FMA: torch's ops run in training here")
    g = torch.Generator().manual_seed(rows)
    logits0 = 3.0 * torch.randn(rows, 1, width, generator=g)
    mask = torch.rand(rows, 1, width, generator=g) < 0.7
    mask[0] = False  # nothing available
    mask[-1] = False
    mask[-1, 0, -1] = True  # one action available
    actions = torch.distributions.Categorical(logits=torch.where(mask, 0.0, -1e9)).sample()
    assert cpp_decode.training_kernels("cpp", logits0) is not None

    def run(use_cpp: bool, dtype: torch.dtype) -> list[torch.Tensor]:
        monkeypatch.setattr(cpp_decode, "use_training_fused", use_cpp)
        logits = logits0.to(dtype, copy=True).requires_grad_()
        log_prob, entropy = masked_categorical_log_prob_entropy(logits, mask, actions, "cpp")
        used = type(log_prob.grad_fn).__name__ == "_MaskedCategoricalBackward"
        assert used == (use_cpp and dtype == torch.float32)
        backward_weighted(torch.cat([log_prob, entropy], dim=1))
        return [log_prob, entropy, logits.grad]

    assert_as_close_to_float64_as_torch(run)
    module = cpp_decode.extension("cpp")
    with pytest.raises(RuntimeError, match="an action outside"):
        module.categorical_forward(logits0, mask, torch.full_like(actions, width))


def test_cpp_layer_norm_without_grad_keeps_nothing_and_matches():
    """Under no_grad (acting) the C++ LayerNorm computes the output only, and it is torch's."""
    from torch import nn

    from seqmarl.nn.layers import add_layer_norm

    if not HAS_COMPILER or not cpp_decode.extension("cpp").fused_available():
        pytest.skip("no C++ build or no AVX2/FMA here")
    ln, x = nn.LayerNorm(36), torch.randn(50, 36)
    module = cpp_decode.training_kernels("cpp", x)
    with torch.no_grad():
        y, xhat, rstd = module.add_layer_norm_forward(x, None, ln.weight, ln.bias, False)
        assert xhat.numel() == 0 and rstd.numel() == 0
        torch.testing.assert_close(add_layer_norm(x, None, ln, "cpp"), ln(x))
    torch.testing.assert_close(y, ln(x).detach())


def test_cpp_training_kernels_give_the_same_bits_with_any_thread_count():
    """The C++ loops split rows across OpenMP threads (the module is built with -fopenmp on Linux), and
    the LayerNorm backward sums its weight gradients per fixed chunk of rows: 1 and 2 threads give
    identical bits, so a run's numbers do not depend on `run.threads` through these kernels."""
    if not HAS_COMPILER or not cpp_decode.extension("cpp").fused_available():
        pytest.skip("no C++ build or no AVX2/FMA here")
    module = cpp_decode.extension("cpp")
    g = torch.Generator().manual_seed(0)
    x, r, dy = (torch.randn(1000, 5, 64, generator=g) for _ in range(3))
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    q, k, v, do = (torch.randn(700, 6, 2, 32, generator=g) for _ in range(4))

    def everything() -> list[torch.Tensor]:
        y, xhat, rstd = module.add_layer_norm_forward(x, r, w, b, True)
        out, probs = module.attention_forward(q, k, v, True)
        return [
            module.gelu_forward(x),
            module.gelu_backward(dy, x),
            y,
            *module.layer_norm_backward(dy, xhat, rstd, w),
            out,
            *module.attention_backward(do, q, k, v, probs, True),
        ]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = everything()
        torch.set_num_threads(2)
        two = everything()
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(one, two, strict=True):
        assert torch.equal(a, c)


def test_training_kernels_go_to_torch_beyond_their_domain(monkeypatch):
    """float64, mode python, the switch off, or a LayerNorm with another epsilon: torch's kernels."""
    from torch import nn

    from seqmarl.nn.layers import add_layer_norm

    x = torch.zeros(2, 4, 8)
    assert cpp_decode.training_kernels("python", x) is None
    assert cpp_decode.training_kernels("auto", x.double()) is None
    assert cpp_decode.fused_name("python", torch.device("cpu")) == "torch"
    monkeypatch.setattr(cpp_decode, "use_training_fused", False)
    assert cpp_decode.training_kernels("auto", x) is None
    monkeypatch.setattr(cpp_decode, "use_training_fused", True)
    ln = nn.LayerNorm(8, eps=1e-3)
    torch.testing.assert_close(add_layer_norm(x + 1.0, x, ln, "auto"), ln(x + 1.0))


def test_training_attention_goes_to_torch_beyond_its_domain():
    """More tokens than the C++ loops are faster for, float64, mode python: torch's kernel."""
    few = torch.zeros(2, 4, 1, 8)
    many = torch.zeros(2, cpp_decode.TRAINING_ATTENTION_MAX_TOKENS + 1, 1, 8)
    assert cpp_decode.training_attention("python", few) is None
    assert cpp_decode.training_attention("auto", many) is None
    assert cpp_decode.training_attention("auto", few.double()) is None
    assert cpp_decode.attention_name("python", torch.device("cpu")) == "sdpa"
    assert cpp_decode.attention_name("auto", torch.device("cpu"), tokens=many.shape[1]) == "sdpa"


def test_a_stale_build_lock_is_removed_and_a_fresh_one_waited_for(tmp_path, capsys):
    """torch's builder waits for ever while `<root>/<name>/lock` exists; a process killed mid-build
    leaves it behind. An old lock is removed with a notice; a recent one is left (a build may be
    running) and the wait is announced."""
    import os
    import time

    lock = tmp_path / "lock"
    lock.touch()
    cpp_decode._clear_stale_lock(str(tmp_path))
    assert lock.exists() and "waiting for another process" in capsys.readouterr().err
    old = time.time() - cpp_decode.STALE_BUILD_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    cpp_decode._clear_stale_lock(str(tmp_path))
    assert not lock.exists() and "removing" in capsys.readouterr().err
    cpp_decode._clear_stale_lock(str(tmp_path))  # no lock: nothing to say
    assert capsys.readouterr().err == ""


PASS_CASES = {
    "reference": (DiscreteActions(7), MATConfig(), 3),
    "continuous": (ContinuousActions(3, (-1.0,) * 3, (1.0,) * 3), MATConfig(), 5),
    "deep-heads": (DiscreteActions(4), MATConfig(n_embd=32, n_head=4, n_block=2), 9),
    "one-agent": (DiscreteActions(5), MATConfig(n_embd=16), 1),
    "odd-width": (DiscreteActions(6), MATConfig(n_embd=36, n_head=3), 4),  # E and D = 12 off the vector width
}


def pass_results(model, obs, mask, actions, dtype: torch.dtype) -> list[torch.Tensor]:
    """Log-probs, entropies, values and every parameter's gradient of one teacher-forced pass."""
    model.to(dtype).zero_grad()
    out = model.evaluate(obs.to(dtype), mask, actions if actions.dtype == torch.long else actions.to(dtype))
    backward_weighted(torch.cat([out.log_prob, out.entropy, out.value], dim=1))
    return [out.log_prob, out.entropy, out.value, *(p.grad for p in model.parameters())]


def check_pass_against_float64(model, obs, mask, space, monkeypatch) -> None:
    """The C++ pass's log-probs, entropies, values and gradients are about as close to a float64
    per-layer pass as the float32 per-layer pass is."""
    if not cpp_decode.extension("cpp").fused_available():
        pytest.skip("this CPU has no AVX2/FMA: the per-layer pass runs in training here")
    B, N = obs.shape[:2]
    if isinstance(space, DiscreteActions):
        actions = torch.distributions.Categorical(logits=torch.where(mask, 0.0, -1e9)).sample()
    else:
        actions = torch.randn(B, N, space.dim)
    assert cpp_decode.training_pass("auto", obs) is not None

    def run(use_pass: bool, dtype: torch.dtype) -> list[torch.Tensor]:
        monkeypatch.setattr(cpp_decode, "use_training_pass", use_pass)
        results = pass_results(model, obs, mask, actions, dtype)
        used = type(results[2].grad_fn).__name__ == "_TrainingPassBackward"  # the values come straight out
        assert used == (use_pass and dtype == torch.float32)
        return results

    exact = run(False, torch.float64)
    ours, torchs = run(True, torch.float32), run(False, torch.float32)
    # Both passes sum each weight gradient over the batch's rows and its branches in different orders
    # (the C++ pass row by row within chunks of ~128 rows, then chunk by chunk). Over 24 draws (6 seeds x
    # the first four cases) its float32 error was at most 4.4x torch's, on a draw where torch's own error was
    # 2e-5 relative; a wrong gradient is off by O(1) relative. Gradients that are zero in exact
    # arithmetic (the key biases: softmax ignores a constant added to every score) are rounding noise in
    # both passes, measured against 1% of the largest gradient entry.
    scale = max(t.abs().max().item() for t in exact[3:])
    for mine, theirs, truth in zip(ours, torchs, exact, strict=True):
        mine, theirs, truth = mine.double(), theirs.double(), truth.double()
        error, torch_error = (mine - truth).abs().max().item(), (theirs - truth).abs().max().item()
        size = max(truth.abs().max().item(), 1e-2 * scale)
        assert error <= 8 * torch_error + 1e-5 * size, (error, torch_error, size)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the C++ decode step cannot be built here")
@pytest.mark.parametrize("case", PASS_CASES)
def test_whole_training_pass_matches_the_per_layer_pass(case, monkeypatch):
    """MAT's forward and backward for the update as one C++ pass (nn/mat.py `_TrainingPass`): the
    log-probs, entropies, values and the gradient of every parameter are about as close to a float64
    per-layer pass as the float32 per-layer pass is (float32 summation-order noise). Discrete and
    continuous actions, several heads and blocks, one agent, and widths off the vector width (the
    observation's 11, the actions', and E = 36 with heads of 12)."""
    space, config, N = PASS_CASES[case]
    model, obs, mask = make("", "", N=N, B=40, space=space, config=config)
    check_pass_against_float64(model, obs, mask, space, monkeypatch)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the C++ decode step cannot be built here")
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 13, 14])
def test_whole_training_pass_with_every_matmul_row_remainder(rows, monkeypatch):
    """The pass's matmuls (csrc/decode.cpp `mm`) run 6-row tiles and put the 1-5 rows left over in tiles
    of other shapes; a remainder of 1 or 2 after a 6-row strip goes with that strip's rows as 4 + 3 or
    4 + 4. One thread and one agent make a chunk of exactly `rows` token rows, so each of those paths
    runs for the row-wise matmuls; the weight gradients' matmuls (rows = a layer's outputs: 16, 11, 48,
    32, 5, 1) take others. Each against float64, as above."""
    space = DiscreteActions(5)
    model, obs, mask = make("", "", N=1, B=rows, space=space, config=MATConfig(n_embd=16))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_pass_against_float64(model, obs, mask, space, monkeypatch)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the C++ decode step cannot be built here")
def test_whole_training_pass_gives_the_same_bits_every_time_and_its_domain():
    """Two passes over the same batch give identical gradients (per-thread gradient buffers are added in
    thread order); pre-LayerNorm models, float64 and mode python take the per-layer pass; a weight
    changed in place before the backward and a token row outside the embedding table are refused."""
    model, obs, mask = make("discrete", "reference", N=4, B=300)
    if not cpp_decode.extension("cpp").fused_available():
        pytest.skip("this CPU has no AVX2/FMA")
    actions = torch.zeros(300, 4, dtype=torch.long)
    first, second = (pass_results(model, obs, mask, actions, torch.float32) for _ in range(2))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert cpp_decode.training_pass("python", obs) is None
    assert cpp_decode.training_pass("auto", obs.double()) is None
    assert cpp_decode.pass_name("auto", torch.device("cpu")) == "cpp"
    prenorm, obs2, mask2 = make("discrete", "deep-prenorm", N=4, B=8)
    out = prenorm.evaluate(obs2, mask2, torch.zeros(8, 4, dtype=torch.long))
    assert type(out.value.grad_fn).__name__ != "_TrainingPassBackward"
    out = model.evaluate(obs, mask, actions)
    with torch.no_grad():
        model.dec_ln.weight.mul_(2.0)  # an in-place change between forward and backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.value.sum().backward()
    module = cpp_decode.extension("cpp")
    weights = [w.detach().contiguous() for w in model._training_pass_weights()]
    with pytest.raises(RuntimeError, match="token rows must lie in"):
        module.training_forward(obs, torch.full((300, 4), 8, dtype=torch.long), weights, 1, 1)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the C++ decode step cannot be built here")
@pytest.mark.parametrize("case", PASS_CASES)
def test_acting_encoder_pass_matches_the_per_layer_encoder(case, monkeypatch):
    """Without gradients (acting, bootstrap values) MAT's encoder and value head run as the training
    pass's encoder loops (csrc/decode.cpp `encoder_forward`): the encoded tokens and values agree with
    the per-layer encoder within float32 rounding, and with gradients on `encode` stays per layer."""
    space, config, N = PASS_CASES[case]
    model, obs, _ = make("", "", N=N, B=33, space=space, config=config)
    if not cpp_decode.extension("cpp").fused_available():
        pytest.skip("this CPU has no AVX2/FMA")
    with torch.no_grad():
        rep, value = model.encode(obs)
        monkeypatch.setattr(cpp_decode, "use_training_pass", False)
        rep_ref, value_ref = model.encode(obs)
        monkeypatch.setattr(cpp_decode, "use_training_pass", True)
    assert rep.shape == rep_ref.shape == (33, N, config.n_embd) and value.shape == (33, N)
    torch.testing.assert_close(rep, rep_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(value, value_ref, rtol=1e-5, atol=1e-5)
    assert model.encode(obs)[1].requires_grad  # with gradients: the per-layer encoder, differentiable
