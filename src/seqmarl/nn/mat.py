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

import torch
import torch.nn.functional as F
from torch import nn

from seqmarl.nn import distributions as dist
from seqmarl.nn.layers import MLP, RELU_GAIN, SMALL_GAIN, Attention, KVCache, init_linear
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


class EncoderBlock(nn.Module):
    def __init__(self, config: MATConfig):
        super().__init__()
        self.pre_norm = config.pre_norm
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.attn = Attention(config.n_embd, config.n_head)
        self.mlp = MLP(config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, E) -> (B, N, E)
        if self.pre_norm:
            h = self.ln1(x)
            x = x + self.attn(h, h, causal=False)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, x, causal=False))
        return self.ln2(x + self.mlp(x))


class DecoderBlock(nn.Module):
    """Causal self-attention over action tokens, then the reference's causal "cross" attention (queries
    from the encoded observation of the same agent, keys/values from the action stream, residual from
    the encoded observation), then an MLP."""

    def __init__(self, config: MATConfig):
        super().__init__()
        self.pre_norm = config.pre_norm
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.ln3 = nn.LayerNorm(config.n_embd)
        self.self_attn = Attention(config.n_embd, config.n_head)
        self.cross_attn = Attention(config.n_embd, config.n_head)
        self.mlp = MLP(config.n_embd)
        if config.pre_norm:
            self.ln_rep = nn.LayerNorm(config.n_embd)  # normalises the encoder stream used as queries

    # The three sub-layers, written once and used by both the full pass and the cached step.
    def _self_in(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln1(x) if self.pre_norm else x

    def _after_self(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        return x + attended if self.pre_norm else self.ln1(x + attended)

    def _cross_kv_in(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln2(x) if self.pre_norm else x

    def _cross_q_in(self, rep: torch.Tensor) -> torch.Tensor:
        return self.ln_rep(rep) if self.pre_norm else rep

    def _after_cross(self, rep: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        y = rep + attended
        if self.pre_norm:
            return y + self.mlp(self.ln3(y))
        y = self.ln2(y)
        return self.ln3(y + self.mlp(y))

    def forward(self, x: torch.Tensor, rep: torch.Tensor) -> torch.Tensor:
        """x: (B, N, E) action tokens, rep: (B, N, E) encoded observations -> (B, N, E)."""
        h = self._self_in(x)
        x = self._after_self(x, self.self_attn(h, h, causal=True))
        attended = self.cross_attn(self._cross_q_in(rep), self._cross_kv_in(x), causal=True)
        return self._after_cross(rep, attended)

    def step(self, x: torch.Tensor, rep_i: torch.Tensor, i: int, caches: tuple[KVCache, KVCache]):
        """Token i only. x, rep_i: (B, 1, E); the caches hold tokens 0..i-1 and receive token i."""
        self_cache, cross_cache = caches
        h = self._self_in(x)
        k, v = self_cache.append(i, *self.self_attn.project_kv(h))  # (B, H, i+1, D)
        x = self._after_self(x, self.self_attn.attend(h, k, v, causal=False))
        k, v = cross_cache.append(i, *self.cross_attn.project_kv(self._cross_kv_in(x)))
        attended = self.cross_attn.attend(self._cross_q_in(rep_i), k, v, causal=False)
        return self._after_cross(rep_i, attended)


def _head(n_embd: int, n_out: int) -> nn.Sequential:
    """Linear -> GELU -> LayerNorm -> Linear, as the reference's value and policy heads."""
    return nn.Sequential(
        init_linear(nn.Linear(n_embd, n_embd), RELU_GAIN),
        nn.GELU(),
        nn.LayerNorm(n_embd),
        init_linear(nn.Linear(n_embd, n_out), SMALL_GAIN),
    )


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
        self.value_head = _head(E, 1)

    def encode(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs (B, N, O) -> encoded tokens (B, N, E), per-agent values (B, N)."""
        x = self.enc_ln(F.gelu(self.obs_embed(obs)))  # (B, N, E)
        for block in self.enc_blocks:
            x = block(x)
        rep = self.enc_ln_final(x)
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
        self.policy_head = _head(E, A)

    # ----------------------------------------------------------------------------------------- decoder
    def _embed_actions(self, prev: torch.Tensor | None, B: int, device: torch.device) -> torch.Tensor:
        """Embed one action token per row; prev=None gives the start token. -> (B, L, E)."""
        if self.discrete:
            index = torch.zeros(B, 1, dtype=torch.long, device=device) if prev is None else prev + 1
            x = self.action_embed(index)
        else:
            if prev is None:
                prev = torch.zeros(B, 1, self.action_width, device=device)
            x = self.action_embed_linear(prev)
        return self.dec_ln(F.gelu(x))

    def _shifted_tokens(self, actions: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: token i embeds agent i-1's action, token 0 the start token. -> (B, N, E)."""
        B = actions.shape[0]
        start = self._embed_actions(None, B, actions.device)  # (B, 1, E)
        rest = self._embed_actions(actions[:, :-1], B, actions.device)  # (B, N-1, E)
        return torch.cat([start, rest], dim=1)

    def _std(self) -> torch.Tensor:
        return torch.sigmoid(self.std_param) * self.config.std_scale  # (A,)

    def evaluate(self, obs: torch.Tensor, action_mask: torch.Tensor, actions: torch.Tensor) -> EvalOutput:
        """Teacher-forced pass. obs (B, N, O), action_mask (B, N, A) bool, actions (B, N) or (B, N, A)."""
        rep, value = self.encode(obs)
        x = self._shifted_tokens(actions)  # (B, N, E)
        for block in self.dec_blocks:
            x = block(x, rep)
        out = self.policy_head(self.dec_ln_final(x))  # (B, N, A)
        if self.discrete:
            log_prob, entropy = dist.categorical_log_prob_entropy(
                dist.masked_logits(out, action_mask), actions
            )
        else:
            log_prob, entropy = dist.gaussian_log_prob_entropy(out, self._std(), actions)
        return EvalOutput(log_prob=log_prob, entropy=entropy, value=value)

    @torch.no_grad()
    def act(
        self,
        obs: torch.Tensor,
        action_mask: torch.Tensor,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> ActOutput:
        """Generate actions agent by agent with a key/value cache. obs (B, N, O), mask (B, N, A)."""
        B, N, _ = obs.shape
        rep, value = self.encode(obs)  # (B, N, E), (B, N)
        H, E = self.config.n_head, self.config.n_embd
        caches = [(KVCache(B, H, N, E // H, rep), KVCache(B, H, N, E // H, rep)) for _ in self.dec_blocks]
        actions, log_probs = [], []
        prev: torch.Tensor | None = None
        for i in range(N):
            x = self._embed_actions(prev, B, obs.device)  # (B, 1, E)
            for block, block_caches in zip(self.dec_blocks, caches):
                x = block.step(x, rep[:, i : i + 1], i, block_caches)
            out = self.policy_head(self.dec_ln_final(x))  # (B, 1, A)
            if self.discrete:
                logits = dist.masked_logits(out, action_mask[:, i : i + 1])
                a = dist.categorical_sample(logits, deterministic, generator)  # (B, 1)
                lp, _ = dist.categorical_log_prob_entropy(logits, a)
            else:
                std = self._std()
                a = dist.gaussian_sample(out, std, deterministic, generator)  # (B, 1, A)
                lp, _ = dist.gaussian_log_prob_entropy(out, std, a)
            actions.append(a)
            log_probs.append(lp)
            prev = a
        return ActOutput(actions=torch.cat(actions, dim=1), log_prob=torch.cat(log_probs, dim=1), value=value)
