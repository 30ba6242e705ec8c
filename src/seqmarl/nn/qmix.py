"""QMIX's networks (Rashid et al. 2018): a recurrent Q-network shared by all agents and a monotonic mixing
network whose weights are produced from the global state by hypernetworks.

Layer choices follow pymarl2's tuned QMIX: agent = Linear -> ReLU -> GRU -> Linear; mixer = hypernetworks
of two layers for both mixing weight matrices, one layer for the first bias, two for the state value
V(s) that replaces the last bias; absolute values make the mixing weights non-negative, and an ELU
between the two mixing layers. One addition: a LayerNorm on the state input (see QMixer).

Shape legend: B batch (envs or episodes), L time steps, N agents, I agent input features,
H GRU width, A actions, S state, M mixing embedding, P hypernetwork width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MASKED_Q = -1e10  # finite, so a masked Q times a zero weight stays 0 (never NaN)


def agent_inputs(obs: torch.Tensor, previous_action: torch.Tensor) -> torch.Tensor:
    """Each agent's own observation + one-hot agent id + one-hot previous action (all zeros at an
    episode's first step), as pymarl's `obs_agent_id` and `obs_last_action`.

    obs (B, L, N, O), previous_action (B, L, N, A) one-hot -> (B, L, N, O + N + A).
    """
    B, L, N, _ = obs.shape
    ids = torch.eye(N, device=obs.device, dtype=obs.dtype).expand(B, L, N, N)
    return torch.cat([obs, ids, previous_action], dim=-1)


class RecurrentQAgent(nn.Module):
    """Per-agent Q-values from a GRU over the agent's own input history; one set of weights for all."""

    def __init__(self, input_dim: int, hidden: int, n_actions: int):
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Linear(input_dim, hidden)
        # nn.GRU rather than a Python loop over GRUCell: the same equations, one fused call per sequence
        # when training on whole episodes, and a length-1 sequence when acting.
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.q = nn.Linear(hidden, n_actions)

    def forward(self, inputs: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (B, L, N, I), hidden (B, N, H) before the first step -> Q (B, L, N, A), hidden (B, N, H)
        after the last step."""
        B, L, N, _ = inputs.shape
        x = F.relu(self.embed(inputs))  # (B, L, N, H)
        x = x.transpose(1, 2).reshape(B * N, L, self.hidden)  # (B*N, L, H): one sequence per agent
        # contiguous: cuDNN's GRU refuses a strided hidden state (an expanded initial one, say); the CPU
        # kernel takes it, so only the GPU showed it (tests/test_cuda.py)
        h0 = hidden.reshape(1, B * N, self.hidden).contiguous()  # (1, B*N, H)
        y, h = self.gru(x, h0)  # (B*N, L, H), (1, B*N, H)
        q = self.q(y).view(B, N, L, -1).transpose(1, 2)  # (B, L, N, A)
        return q, h.view(B, N, self.hidden)


class QMixer(nn.Module):
    """Q_tot(s, q_1..q_N), monotonic in every q_i: dQ_tot/dq_i >= 0 because every path from q_i to Q_tot
    goes through non-negative weights (abs of the hypernetwork outputs) and the increasing ELU."""

    def __init__(self, n_agents: int, state_dim: int, embed: int, hypernet_embed: int):
        super().__init__()
        self.n_agents, self.embed = n_agents, embed
        # SMAX's global state carries absolute positions (0..32) where SMAC's is scaled to about [-1, 1];
        # normalising it (as our MAPPO critic does) keeps the hypernetworks' outputs, and so the initial
        # Q_tot, at the scale pymarl2's settings were tuned for. It does not touch monotonicity in q.
        self.state_norm = nn.LayerNorm(state_dim)
        self.hyper_w1 = nn.Sequential(
            nn.Linear(state_dim, hypernet_embed), nn.ReLU(), nn.Linear(hypernet_embed, n_agents * embed)
        )
        self.hyper_b1 = nn.Linear(state_dim, embed)
        self.hyper_w2 = nn.Sequential(
            nn.Linear(state_dim, hypernet_embed), nn.ReLU(), nn.Linear(hypernet_embed, embed)
        )
        self.value = nn.Sequential(nn.Linear(state_dim, embed), nn.ReLU(), nn.Linear(embed, 1))

    def forward(self, agent_qs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """agent_qs (..., N), state (..., S) -> Q_tot (...)."""
        lead = agent_qs.shape[:-1]
        q = agent_qs.reshape(-1, 1, self.n_agents)  # (B', 1, N)
        s = self.state_norm(state.reshape(-1, state.shape[-1]))  # (B', S)
        w1 = self.hyper_w1(s).abs().view(-1, self.n_agents, self.embed)  # (B', N, M)
        b1 = self.hyper_b1(s).view(-1, 1, self.embed)  # (B', 1, M)
        hidden = F.elu(torch.bmm(q, w1) + b1)  # (B', 1, M)
        w2 = self.hyper_w2(s).abs().view(-1, self.embed, 1)  # (B', M, 1)
        q_tot = torch.bmm(hidden, w2).view(-1) + self.value(s).view(-1)  # (B',)
        return q_tot.view(lead)
