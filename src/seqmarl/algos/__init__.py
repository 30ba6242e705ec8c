"""Algorithms by name. Each declares what it supports so that an impossible pairing is refused up front.

| name    | actor                          | critic                     | advantages | actions    |
|---------|--------------------------------|----------------------------|------------|------------|
| mat     | MAT decoder, agent by agent    | MAT encoder, all obs       | joint      | both       |
| mat_dec | shared MLP on own obs          | MAT encoder, all obs       | per agent  | both       |
| mappo   | shared MLP on obs + agent id   | MLP on global state + id   | per agent  | both       |
| ippo    | shared MLP on obs + agent id   | MLP on own obs + id        | per agent  | both       |
| happo   | one MLP per agent, sequential  | MLP on global state        | joint      | both       |
| qmix    | shared GRU Q-net, eps-greedy   | monotonic mixer on state   | none (TD)  | discrete   |
"""

from __future__ import annotations

import importlib

import torch

from seqmarl.errors import UserError
from seqmarl.types import EnvSpec

# name -> (module, class); imported lazily so `seqmarl --help` stays fast.
_REGISTRY = {
    "mat": ("seqmarl.algos.mat", "MATAlgorithm"),
    "mat_dec": ("seqmarl.algos.mat_dec", "MATDecAlgorithm"),
    "mappo": ("seqmarl.algos.mappo", "MAPPOAlgorithm"),
    "ippo": ("seqmarl.algos.mappo", "IPPOAlgorithm"),
    "happo": ("seqmarl.algos.happo", "HAPPOAlgorithm"),
    "qmix": ("seqmarl.algos.qmix", "QMIXAlgorithm"),
}


def algorithm_names() -> list[str]:
    return list(_REGISTRY)


def algorithm_class(name: str):
    if name not in _REGISTRY:
        raise UserError(f"unknown algorithm {name!r}; available: {', '.join(algorithm_names())}")
    module, attr = _REGISTRY[name]
    return getattr(importlib.import_module(module), attr)


def check_compatible(name: str, spec: EnvSpec, config) -> None:
    """Refuse an algorithm/task/config combination that cannot work, before anything starts."""
    cls = algorithm_class(name)
    if spec.discrete and not cls.supports_discrete:
        raise UserError(f"{name} does not support discrete actions ({spec.name})")
    if not spec.discrete and not cls.supports_continuous:
        raise UserError(
            f"{name} supports discrete actions only; {spec.name} has continuous actions "
            f"(use one of: {', '.join(n for n in _REGISTRY if algorithm_class(n).supports_continuous)})"
        )
    for key, owner in (("critic_own_obs", "mappo"), ("mat_dec_agent_id", "mat_dec")):
        if getattr(config.mlp, key) and name != owner:  # a switch the chosen algorithm would ignore
            raise UserError(f"mlp.{key} is only read by {owner}; {name} does not use it (set it to false)")
    if getattr(cls, "on_policy", True) and config.ppo.shuffle_agent_order:
        if not cls.permutable:
            raise UserError(
                f"ppo.shuffle_agent_order is only for order-free models (mat, mat_dec); {name} has "
                "agent-specific weights or inputs"
            )
        if name == "mat_dec" and config.mlp.mat_dec_agent_id:
            raise UserError(
                "ppo.shuffle_agent_order needs an order-free model; mlp.mat_dec_agent_id gives MAT-Dec's "
                "actor agent-specific inputs (set one of them to false)"
            )


def make_algorithm(name: str, spec: EnvSpec, config, device: torch.device):  # config: TrainConfig
    check_compatible(name, spec, config)
    cls = algorithm_class(name)
    if name == "mat":
        return cls(spec, config.model, config.ppo, device)
    if name == "mat_dec":
        return cls(spec, config.model, config.mlp, config.ppo, device)
    if name == "qmix":  # the replay keeps one unfinished episode per training env
        return cls(spec, config.qmix, config.env.num_envs, device)
    return cls(spec, config.mlp, config.ppo, device)
