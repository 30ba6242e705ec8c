"""The Multi-Agent Transformer (Wen et al. 2022, arXiv 2205.14953, section 5).

Tokens are agents. The encoder reads all observations (unmasked self-attention) and gives one value per
agent; the decoder reads the previous agents' actions shifted right, so agent i's policy conditions on
every encoded observation and on the actions of agents 0..i-1.

Two entry points:
- `act`: agent-by-agent generation with a key/value cache. Every decoder attention is causal and all
  other layers act per token, so token i's output depends only on tokens 0..i and caching is exact:
  each agent costs one token through the decoder (the reference recomputes the whole prefix: N^2).
- `evaluate`: one teacher-forced pass over the stored actions, used by the PPO update.

The layer choices follow the reference implementation (REFERENCE.md 2): post-LayerNorm blocks, MLP width
= n_embd, orthogonal init with small gains, and a decoder "cross" attention whose queries come from the
encoded observations and whose keys/values come from the action stream (both attentions causal).
`pre_norm=True` switches every block to pre-LayerNorm. Nothing depends on the number of agents, so one
model acts on tasks with any N.

Shape legend: B batch, N agents, O obs, A actions (discrete count or continuous dims), E embed,
H heads, D = E / H.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from seqmarl.nn import cpp_decode
from seqmarl.nn import distributions as dist
from seqmarl.nn.cuda_graph import GraphedCall
from seqmarl.nn.layers import MLP, RELU_GAIN, SMALL_GAIN, Attention, add_layer_norm, gelu, init_linear
from seqmarl.types import ActOutput, ContinuousActions, DiscreteActions, EnvSpec, EvalOutput


@dataclass(frozen=True)
class MATConfig:
    """Sizes and layer choices of the Multi-Agent Transformer."""

    n_embd: int = 64  # token width E (reference: 64)
    n_head: int = 1  # attention heads (reference: 1)
    n_block: int = 1  # blocks in the encoder and in the decoder (reference: 1)
    pre_norm: bool = False  # pre-LayerNorm blocks; False is the reference's post-LayerNorm
    std_init: float = 1.0  # continuous only: initial pre-sigmoid std parameter (reference: 1)
    std_scale: float = 0.5  # continuous only: std = sigmoid(param) * std_scale (reference: 0.5)
    decode: str = "auto"  # cached decode loop: "cpp", "python", or "auto" (cpp if it builds); see cpp_decode
    cuda_graphs: bool = True  # on a GPU, MAT's act() replays a CUDA graph per batch shape (nn/cuda_graph.py)

    def __post_init__(self) -> None:
        cpp_decode.check_mode(self.decode)


class EncoderBlock(nn.Module):
    def __init__(self, config: MATConfig):
        super().__init__()
        self.pre_norm, self.kernel = config.pre_norm, config.decode
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.attn = Attention(config.n_embd, config.n_head, config.decode)
        self.mlp = MLP(config.n_embd, config.decode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, E) -> (B, N, E)
        k = self.kernel
        if self.pre_norm:
            h = add_layer_norm(x, None, self.ln1, k)
            x = x + self.attn(h, h, causal=False)
            return x + self.mlp(add_layer_norm(x, None, self.ln2, k))
        x = add_layer_norm(x, self.attn(x, x, causal=False), self.ln1, k)
        return add_layer_norm(x, self.mlp(x), self.ln2, k)


class DecoderBlock(nn.Module):
    """Causal self-attention over action tokens, then the reference's causal "cross" attention (queries
    from the encoded observation of the same agent, keys/values from the action stream, residual from
    the encoded observation), then an MLP."""

    def __init__(self, config: MATConfig):
        super().__init__()
        self.pre_norm, self.kernel = config.pre_norm, config.decode
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.ln3 = nn.LayerNorm(config.n_embd)
        self.self_attn = Attention(config.n_embd, config.n_head, config.decode)
        self.cross_attn = Attention(config.n_embd, config.n_head, config.decode)
        self.mlp = MLP(config.n_embd, config.decode)
        if config.pre_norm:
            self.ln_rep = nn.LayerNorm(config.n_embd)  # normalises the encoder stream used as queries

    # The three sub-layers, written once and used by both the full pass and the cached step.
    # (add_layer_norm(x, r, ln, kernel) is ln(x + r), or ln(x) for r = None, in one pass where it can.)
    def _self_in(self, x: torch.Tensor) -> torch.Tensor:
        return add_layer_norm(x, None, self.ln1, self.kernel) if self.pre_norm else x

    def _after_self(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        return x + attended if self.pre_norm else add_layer_norm(x, attended, self.ln1, self.kernel)

    def _cross_kv_in(self, x: torch.Tensor) -> torch.Tensor:
        return add_layer_norm(x, None, self.ln2, self.kernel) if self.pre_norm else x

    def _cross_q_in(self, rep: torch.Tensor) -> torch.Tensor:
        return add_layer_norm(rep, None, self.ln_rep, self.kernel) if self.pre_norm else rep

    def _after_cross(self, rep: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            y = rep + attended
            return y + self.mlp(add_layer_norm(y, None, self.ln3, self.kernel))
        y = add_layer_norm(rep, attended, self.ln2, self.kernel)
        return add_layer_norm(y, self.mlp(y), self.ln3, self.kernel)

    def forward(self, x: torch.Tensor, rep: torch.Tensor) -> torch.Tensor:
        """x: (B, N, E) action tokens, rep: (B, N, E) encoded observations -> (B, N, E)."""
        h = self._self_in(x)
        x = self._after_self(x, self.self_attn(h, h, causal=True))
        attended = self.cross_attn(self._cross_q_in(rep), self._cross_kv_in(x), causal=True)
        return self._after_cross(rep, attended)

    def step(self, x: torch.Tensor, rep_i: torch.Tensor, i: int, cache: DecoderCache) -> torch.Tensor:
        """Token i only, reading and filling the block's cache. x, rep_i: (B, E) -> (B, E).

        The same computation as `forward` at position i, written with the cache's plain weights."""
        B, E = x.shape
        H, D = self.self_attn.n_head, E // self.self_attn.n_head
        w = cache.weights
        layer_norm = lambda t, name: F.layer_norm(t, (E,), *w[name])  # noqa: E731
        h = layer_norm(x, "ln1") if self.pre_norm else x
        qkv = F.linear(h, *w["qkv"]).view(B, 3, H, D)
        k, v = cache.self_attn_kv(i, qkv[:, 1:])  # 2 x (B, H, i+1, D)
        attended = F.scaled_dot_product_attention(qkv[:, 0, :, None], k, v)  # (B, H, 1, D)
        attended = F.linear(attended.reshape(B, E), *w["self_proj"])
        x = x + attended if self.pre_norm else layer_norm(x + attended, "ln1")
        kv = F.linear(layer_norm(x, "ln2") if self.pre_norm else x, *w["cross_kv"]).view(B, 2, H, D)
        k, v = cache.cross_attn_kv(i, kv)  # 2 x (B, H, i+1, D)
        attended = F.scaled_dot_product_attention(cache.cross_q[:, :, i : i + 1], k, v)  # (B, H, 1, D)
        y = rep_i + F.linear(attended.reshape(B, E), *w["cross_proj"])
        mlp = lambda t: F.linear(F.gelu(F.linear(t, *w["mlp_fc"])), *w["mlp_proj"])  # noqa: E731
        if self.pre_norm:
            return y + mlp(layer_norm(y, "ln3"))
        y = layer_norm(y, "ln2")
        return layer_norm(y + mlp(y), "ln3")


def plain(layer: nn.Linear | nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's weight and bias as tensors that do not require grad. While acting, F.linear on these
    costs ~6 us at (32 x 64) @ (64 x 64) against ~16 us for calling the nn.Linear (module dispatch and
    autograd bookkeeping for parameters, even under no_grad): most of a decode step's time."""
    return layer.weight.detach(), layer.bias.detach()


class DecoderCache:
    """What one decoder block keeps while acting on one batch.

    - Plain weights (see `plain`); the self-attention's query/key/value weights fused into one matrix
      and the cross-attention's key/value weights into another: one matmul per token instead of 3 (2).
    - The cross-attention's queries come from the encoded observations, known for every agent before
      the first action is chosen: computed for all N agents in one matmul.
    - Keys and values of the tokens decoded so far, preallocated for N tokens.
    For one query token, attending over the prefix 0..i needs no causal mask.
    """

    def __init__(self, block: DecoderBlock, rep: torch.Tensor):
        B, N, E = rep.shape
        self_attn, cross_attn = block.self_attn, block.cross_attn
        H = self_attn.n_head
        fuse = lambda *layers: tuple(torch.cat(parts) for parts in zip(*map(plain, layers)))  # noqa: E731
        self.weights = {
            "qkv": fuse(self_attn.query, self_attn.key, self_attn.value),  # (3E, E), (3E,)
            "self_proj": plain(self_attn.proj),
            "cross_kv": fuse(cross_attn.key, cross_attn.value),  # (2E, E), (2E,)
            "cross_proj": plain(cross_attn.proj),
            "mlp_fc": plain(block.mlp.fc),
            "mlp_proj": plain(block.mlp.proj),
            "ln1": plain(block.ln1),
            "ln2": plain(block.ln2),
            "ln3": plain(block.ln3),
        }
        self.cross_q = cross_attn.heads(cross_attn.query(block._cross_q_in(rep)))  # (B, H, N, D)
        self.self_kv = rep.new_empty(2, B, H, N, E // H)  # keys [0] and values [1] of tokens 0..N-1
        self.cross_kv = rep.new_empty(2, B, H, N, E // H)

    @staticmethod
    def _append(cache: torch.Tensor, i: int, kv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache.select(3, i).copy_(kv.transpose(0, 1))  # kv (B, 2, H, D) -> slot i of (2, B, H, N, D)
        return cache.narrow(3, 0, i + 1).unbind(0)  # keys, values: 2 x (B, H, i+1, D)

    def self_attn_kv(self, i: int, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._append(self.self_kv, i, kv)

    def cross_attn_kv(self, i: int, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._append(self.cross_kv, i, kv)


# The order in which `_decode_cached` hands a block's plain weights to csrc/decode.cpp (its `Weight`).
CPP_WEIGHT_ORDER = ("qkv", "self_proj", "cross_kv", "cross_proj", "mlp_fc", "mlp_proj", "ln1", "ln2", "ln3")


class _TrainingPass(torch.autograd.Function):
    """The encoder, decoder and both heads of `MultiAgentTransformer.evaluate` forward and backward in one
    C++ pass (csrc/decode.cpp, "The whole training pass of MAT, fused"). Inputs: obs (B, N, O), the
    decoder's input (discrete: (B, N) rows of the action embedding; continuous: (B, N, A) previous
    actions), the weights of `_training_pass_weights`. Outputs: policy outputs (B, N, A), values (B, N)."""

    @staticmethod
    def forward(ctx, module, obs, dec_in, n_block, n_head, *weights):
        out, value, saved = module.training_forward(obs, dec_in, list(weights), n_block, n_head)
        # Weights and the decoder's input through save_for_backward: autograd then refuses a backward after
        # one of them was changed in place, as it does for the per-layer pass.
        ctx.save_for_backward(dec_in, *weights)
        ctx.module, ctx.saved, ctx.shape = module, saved, (n_block, n_head)
        return out, value

    @staticmethod
    def backward(ctx, dout, dvalue):
        dec_in, *weights = ctx.saved_tensors
        grads = ctx.module.training_backward(dout, dvalue, ctx.saved, dec_in, weights, *ctx.shape)
        ctx.saved = None  # the activations go now, not when the graph does
        return (None, None, None, None, None, *grads)


class Head(nn.Sequential):
    """Linear -> GELU -> LayerNorm -> Linear, as the reference's value and policy heads. A Sequential,
    so parameter names (and checkpoints) stay `<head>.0.weight` ...; `forward` runs GELU and LayerNorm
    through `kernel` (nn/layers.py)."""

    def __init__(self, n_embd: int, n_out: int, kernel: str):
        super().__init__(
            init_linear(nn.Linear(n_embd, n_embd), RELU_GAIN),
            nn.GELU(),
            nn.LayerNorm(n_embd),
            init_linear(nn.Linear(n_embd, n_out), SMALL_GAIN),
        )
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = gelu(self[0](x), self.kernel)
        return self[3](add_layer_norm(hidden, None, self[2], self.kernel))


def final_norm(ln: nn.Module, x: torch.Tensor, kernel: str) -> torch.Tensor:
    """A stack's last LayerNorm (pre-LayerNorm models) through `kernel`, or nothing (nn.Identity)."""
    return x if isinstance(ln, nn.Identity) else add_layer_norm(x, None, ln, kernel)


class EncoderMixin:
    """MAT's encoder (observation embedding, unmasked self-attention blocks, per-agent value head), shared
    by MAT and MAT-Dec. A mixin rather than a submodule so the parameter names stay flat."""

    def _build_encoder(self, config: MATConfig, spec: EnvSpec) -> None:
        E = config.n_embd
        # LayerNorm -> Linear -> GELU observation embedding (reference), blocks, value head.
        self.obs_embed = nn.Sequential(
            nn.LayerNorm(spec.obs_dim), init_linear(nn.Linear(spec.obs_dim, E), RELU_GAIN)
        )
        self.enc_ln = nn.LayerNorm(E)
        self.enc_blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_block))
        self.enc_ln_final = nn.LayerNorm(E) if config.pre_norm else nn.Identity()
        self.value_head = Head(E, 1, config.decode)
        self.kernel = config.decode  # which GELU / LayerNorm kernels run (nn/layers.py)

    def encode(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs (B, N, O) -> encoded tokens (B, N, E), per-agent values (B, N)."""
        k = self.kernel
        embedded = self.obs_embed[1](add_layer_norm(obs, None, self.obs_embed[0], k))
        x = add_layer_norm(gelu(embedded, k), None, self.enc_ln, k)  # (B, N, E)
        for block in self.enc_blocks:
            x = block(x)
        rep = final_norm(self.enc_ln_final, x, k)
        return rep, self.value_head(rep).squeeze(-1)

    def values(self, obs: torch.Tensor) -> torch.Tensor:
        return self.encode(obs)[1]  # (B, N)


class MultiAgentTransformer(EncoderMixin, nn.Module):
    def __init__(self, config: MATConfig, spec: EnvSpec):
        super().__init__()
        self.config = config
        self.discrete = isinstance(spec.action_space, DiscreteActions)
        E = config.n_embd
        A = spec.action_space.mask_width
        self.action_width = A
        self._build_encoder(config, spec)

        # Decoder: action-token embedding, blocks, policy head.
        if self.discrete:
            # Row 0 is the start token; action a is row a + 1 (the reference's one-hot of size A + 1
            # into a bias-free linear layer, written as the lookup it is).
            self.action_embed = nn.Embedding(A + 1, E)
            nn.init.orthogonal_(self.action_embed.weight, gain=RELU_GAIN)
        else:
            assert isinstance(spec.action_space, ContinuousActions)
            self.action_embed_linear = init_linear(nn.Linear(A, E), RELU_GAIN)
            self.std_param = nn.Parameter(torch.full((A,), config.std_init))
        self.dec_ln = nn.LayerNorm(E)
        self.dec_blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_block))
        self.dec_ln_final = nn.LayerNorm(E) if config.pre_norm else nn.Identity()
        self.policy_head = Head(E, A, config.decode)
        self._act_graphs = GraphedCall("MAT's act")
        cpp_decode.extension(config.decode)  # build or load it now, not in the middle of a rollout

    def encode(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs (B, N, O) -> encoded tokens (B, N, E), values (B, N). Without gradients (acting, bootstrap
        values) on a CPU that runs the training pass, its encoder loops run it (csrc/decode.cpp
        `encoder_forward`: the same maths, another summation order); otherwise layer by layer."""
        module = None if torch.is_grad_enabled() else self._pass_module(obs)
        if module is None:
            return super().encode(obs)
        c, weights = self.config, self._training_pass_weights(encoder_only=True)
        return module.encoder_forward(obs, weights, c.n_block, c.n_head)

    def _pass_module(self, x: torch.Tensor) -> ModuleType | None:
        """The C++ module whose training pass (and its encoder loops) can run this model on `x`'s device
        and dtype, or None: pre-LayerNorm blocks, or what cpp_decode.training_pass refuses."""
        return None if self.config.pre_norm else cpp_decode.training_pass(self.config.decode, x)

    # ----------------------------------------------------------------------------------------- decoder
    def _token_inputs(self, previous: torch.Tensor) -> torch.Tensor:
        """What the action embedding reads: the start, then each previous agent's action. previous (B, L)
        int -> (B, L+1) rows of the embedding (0 = start, a + 1 = action a), or (B, L, A) float ->
        (B, L+1, A) with the reference's zeros first."""
        if self.discrete:
            return torch.cat([previous.new_zeros(previous.shape[0], 1), previous + 1], dim=1)
        return torch.cat([previous.new_zeros(previous.shape[0], 1, self.action_width), previous], dim=1)

    def _tokens(self, previous: torch.Tensor) -> torch.Tensor:
        """Decoder input: the start token, then one token per previous agent's action.
        previous (B, L) int or (B, L, A) float -> (B, L+1, E)."""
        inputs = self._token_inputs(previous)
        x = self.action_embed(inputs) if self.discrete else self.action_embed_linear(inputs)
        return add_layer_norm(gelu(x, self.kernel), None, self.dec_ln, self.kernel)  # (B, L+1, E)

    def _decode(self, x: torch.Tensor, rep: torch.Tensor) -> torch.Tensor:
        """The whole decoder over L tokens: x (B, L, E), rep (B, L, E) -> policy outputs (B, L, A)."""
        for block in self.dec_blocks:
            x = block(x, rep)
        return self.policy_head(final_norm(self.dec_ln_final, x, self.kernel))

    def _std(self) -> torch.Tensor:
        return torch.sigmoid(self.std_param) * self.config.std_scale  # (A,)

    def _log_prob_entropy(
        self, out: torch.Tensor, action_mask: torch.Tensor, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy outputs (B, N, A) (logits or means) and actions -> log-probs, entropies (B, N)."""
        if self.discrete:
            return dist.masked_categorical_log_prob_entropy(out, action_mask, actions, self.kernel)
        return dist.gaussian_log_prob_entropy(out, self._std(), actions)

    def evaluate(self, obs: torch.Tensor, action_mask: torch.Tensor, actions: torch.Tensor) -> EvalOutput:
        """Teacher-forced pass. obs (B, N, O), action_mask (B, N, A) bool, actions (B, N) or (B, N, A).

        With gradients on a CPU that runs csrc/decode.cpp's vector loops, the encoder, decoder and heads
        run as one C++ pass (`_TrainingPass`: same maths, another summation order); the log-probs and
        entropies are taken here either way."""
        module = self._pass_module(obs) if torch.is_grad_enabled() else None
        if module is not None:
            c = self.config
            out, value = _TrainingPass.apply(
                module,
                obs,
                self._token_inputs(actions[:, :-1]),
                c.n_block,
                c.n_head,
                *self._training_pass_weights(),
            )
        else:
            rep, value = self.encode(obs)
            out = self._decode(self._tokens(actions[:, :-1]), rep)  # (B, N, A)
        log_prob, entropy = self._log_prob_entropy(out, action_mask, actions)
        return EvalOutput(log_prob=log_prob, entropy=entropy, value=value)

    def _training_pass_weights(self, encoder_only: bool = False) -> list[torch.Tensor]:
        """The weights in the order csrc/decode.cpp's training pass reads them (up to the value head with
        `encoder_only`); each attention's query / key / value weights side by side (torch.cat, so
        autograd hands each its own gradient)."""
        own = lambda layer: [layer.weight, layer.bias]  # noqa: E731
        side_by_side = lambda *ls: [torch.cat([x.weight for x in ls]), torch.cat([x.bias for x in ls])]  # noqa: E731
        w = own(self.obs_embed[0]) + own(self.obs_embed[1]) + own(self.enc_ln)
        for b in self.enc_blocks:
            w += side_by_side(b.attn.query, b.attn.key, b.attn.value) + own(b.attn.proj) + own(b.ln1)
            w += own(b.mlp.fc) + own(b.mlp.proj) + own(b.ln2)
        w += own(self.value_head[0]) + own(self.value_head[2]) + own(self.value_head[3])
        if encoder_only:
            return w
        w += [self.action_embed.weight] if self.discrete else own(self.action_embed_linear)
        w += own(self.dec_ln)
        for b in self.dec_blocks:
            sa, ca = b.self_attn, b.cross_attn
            w += side_by_side(sa.query, sa.key, sa.value) + own(sa.proj) + own(b.ln1)
            w += own(ca.query) + side_by_side(ca.key, ca.value) + own(ca.proj) + own(b.ln2)
            w += own(b.mlp.fc) + own(b.mlp.proj) + own(b.ln3)
        w += own(self.policy_head[0]) + own(self.policy_head[2]) + own(self.policy_head[3])
        return w

    @torch.no_grad()
    def act(
        self,
        obs: torch.Tensor,
        action_mask: torch.Tensor,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        whole_sequence: bool = False,
    ) -> ActOutput:
        """Generate actions agent by agent. obs (B, N, O), mask (B, N, A).

        `use_cache=False` decodes without a cache: for agent i the whole decoder is recomputed over the
        tokens 0..i (O(N^2) tokens), or with `whole_sequence=True` over all N tokens, not-yet-chosen
        actions included, exactly as the reference's loop does (causal masking makes the extra tokens
        irrelevant; they only cost time). Kept for the equivalence tests and bench/decode.py. All the
        sampling noise is drawn before the first agent acts, so every path consumes the same draws and
        gives the same actions.

        On a GPU with `config.cuda_graphs`, the cached call with torch's default generator replays a CUDA
        graph recorded per batch shape (nn/cuda_graph.py: same maths; its draws advance per replay).
        """
        if self.config.cuda_graphs and obs.is_cuda and generator is None and use_cache:
            params = [*self.parameters(), *self.buffers()]  # what a replay reads where it lies
            actions, log_prob, value = self._act_graphs(
                self._act_tensors, params, [obs, action_mask], (deterministic,)
            )
            return ActOutput(actions=actions, log_prob=log_prob, value=value)
        return self._act_eager(obs, action_mask, deterministic, generator, use_cache, whole_sequence)

    def _act_tensors(self, obs: torch.Tensor, action_mask: torch.Tensor, deterministic: bool) -> tuple:
        """What a CUDA graph records: the cached call with the default generator, as a tuple of tensors."""
        out = self._act_eager(obs, action_mask, deterministic)
        return out.actions, out.log_prob, out.value

    def _act_eager(
        self,
        obs: torch.Tensor,
        action_mask: torch.Tensor,
        deterministic: bool,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        whole_sequence: bool = False,
    ) -> ActOutput:
        B, N, _ = obs.shape
        rep, value = self.encode(obs)  # (B, N, E), (B, N)
        shape = (B, N, self.action_width)
        noise = None if deterministic else dist.sampling_noise(shape, self.discrete, obs.device, generator)
        offset = self._sampling_offset(action_mask, noise)  # (B, N, A) or None
        if use_cache:
            out, actions = self._decode_cached(rep, offset)  # (B, N, A), (B, N) or (B, N, A)
        else:
            out, actions = self._decode_uncached(rep, offset, whole_sequence)
        log_prob, _ = self._log_prob_entropy(out, action_mask, actions)
        return ActOutput(actions=actions, log_prob=log_prob, value=value)

    def _sampling_offset(self, action_mask: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor | None:
        """What `_choose` adds to agent i's policy output. Discrete: Gumbel noise (argmax of logits +
        Gumbel is a sample), with unavailable actions pushed to MASKED_LOGIT; continuous: std * noise."""
        if self.discrete:
            offset = torch.zeros_like(action_mask, dtype=torch.float32) if noise is None else noise
            return offset.masked_fill(~action_mask, dist.MASKED_LOGIT)  # (B, N, A)
        return None if noise is None else self._std() * noise  # (B, N, A)

    def _choose(self, out_i: torch.Tensor, offset_i: torch.Tensor | None) -> torch.Tensor:
        """Agent i's action from its policy output (B, A): (B,) int64 or (B, A) float."""
        if self.discrete:
            return (out_i + offset_i).argmax(dim=-1)
        return out_i if offset_i is None else out_i + offset_i

    def _empty_actions(self, rep: torch.Tensor) -> torch.Tensor:
        B, N, _ = rep.shape
        if self.discrete:
            return rep.new_empty(B, N, dtype=torch.long)
        return rep.new_empty(B, N, self.action_width)

    def _policy_head_weights(self) -> list[torch.Tensor]:
        """Plain weights (see `plain`) of the policy head: Linear, LayerNorm, Linear, then dec_ln_final's
        when it is a LayerNorm (pre-LayerNorm blocks)."""
        fc, _, ln, out = self.policy_head
        weights = [*plain(fc), *plain(ln), *plain(out)]
        if isinstance(self.dec_ln_final, nn.LayerNorm):
            weights += plain(self.dec_ln_final)
        return weights

    def _plain_policy_head(self):
        """dec_ln_final -> policy head on plain weights: (B, E) -> (B, A)."""
        fc_w, fc_b, ln_w, ln_b, out_w, out_b, *final = self._policy_head_weights()
        E = self.config.n_embd

        def head(x: torch.Tensor) -> torch.Tensor:
            if final:
                x = F.layer_norm(x, (E,), *final)
            return F.linear(F.layer_norm(F.gelu(F.linear(x, fc_w, fc_b)), (E,), ln_w, ln_b), out_w, out_b)

        return head

    def _decoder_inputs(self, B: int) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """What the cached loop starts from: the first decoder token (B, E), and what turns a chosen action
        into the next token. Discrete: the fixed table of embedded action tokens (A, E), looked up per
        agent. Continuous: no table, and the plain weights of the action embedding and dec_ln."""
        if self.discrete:
            # (A+1, E), row 0 the start token; the same kernels as `_tokens`, so acting and the update agree
            k = self.kernel
            table = add_layer_norm(gelu(self.action_embed.weight, k), None, self.dec_ln, k)
            return table[0].expand(B, self.config.n_embd), table[1:], []
        start = self._tokens(self.action_embed_linear.weight.new_empty(B, 0, self.action_width))[:, 0]
        return start, None, [*plain(self.action_embed_linear), *plain(self.dec_ln)]

    def _decode_cached(
        self, rep: torch.Tensor, offset: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per agent through the decoder, keys/values of earlier agents from the cache.
        rep (B, N, E) -> policy outputs (B, N, A), actions. Per-agent tensors are split off once and the
        results stacked once: each agent step is a few dozen tiny ops, so per-op overhead is the cost.
        The same loop in C++ (csrc/decode.cpp: ATen calls, or on x86-64 CPUs with AVX2/FMA a fused loop
        over raw rows; docs/performance.md) runs instead when it builds (config.decode)."""
        B, N, E = rep.shape
        caches = [DecoderCache(block, rep) for block in self.dec_blocks]
        start, action_tokens, embed = self._decoder_inputs(B)
        extension = cpp_decode.extension(self.config.decode)
        if extension is not None:
            blocks = [
                [t for name in CPP_WEIGHT_ORDER for t in cache.weights[name]]
                + [cache.cross_q, cache.self_kv, cache.cross_kv]
                for cache in caches
            ]
            head = self._policy_head_weights()
            n_head, pre_norm, fused = self.config.n_head, self.config.pre_norm, cpp_decode.use_fused_loop
            return extension.decode(
                rep, blocks, head, start, action_tokens, embed, offset, n_head, pre_norm, fused
            )
        rep_rows = rep.unbind(1)  # N x (B, E)
        offset_rows = [None] * N if offset is None else offset.unbind(1)  # N x (B, A)
        outs, actions = [], []
        head = self._plain_policy_head()
        x = start
        for i in range(N):
            for block, cache in zip(self.dec_blocks, caches):
                x = block.step(x, rep_rows[i], i, cache)
            out_i = head(x)  # (B, A)
            a = self._choose(out_i, offset_rows[i])
            outs.append(out_i)
            actions.append(a)
            if action_tokens is not None:
                x = action_tokens.index_select(0, a)  # (B, E)
            else:
                embed_w, embed_b, ln_w, ln_b = embed
                x = F.layer_norm(F.gelu(F.linear(a, embed_w, embed_b)), (E,), ln_w, ln_b)  # (B, E)
        return torch.stack(outs, dim=1), torch.stack(actions, dim=1)

    def _decode_uncached(
        self, rep: torch.Tensor, offset: torch.Tensor | None, whole_sequence: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Without a cache: for agent i, the whole decoder over tokens 0..i (or 0..N-1)."""
        B, N, _ = rep.shape
        out = rep.new_empty(B, N, self.action_width)
        actions = self._empty_actions(rep).zero_()  # later agents' placeholders: any valid action
        for i in range(N):
            if whole_sequence:
                out_i = self._decode(self._tokens(actions[:, :-1]), rep)[:, i]  # (B, A)
            else:
                out_i = self._decode(self._tokens(actions[:, :i]), rep[:, : i + 1])[:, -1]  # (B, A)
            out[:, i] = out_i
            actions[:, i] = self._choose(out_i, None if offset is None else offset[:, i])
        return out, actions
