"""Algorithms by name. Each declares what it supports so that an impossible pairing is refused up front."""

from __future__ import annotations

import torch

from seqmarl.errors import UserError
from seqmarl.types import EnvSpec


def algorithm_names() -> list[str]:
    return ["mat"]


def make_algorithm(name: str, spec: EnvSpec, config, device: torch.device):  # config: TrainConfig
    if name not in algorithm_names():
        raise UserError(f"unknown algorithm {name!r}; available: {', '.join(algorithm_names())}")
    from seqmarl.algos.mat import MATAlgorithm

    algorithm_class = MATAlgorithm
    if spec.discrete and not algorithm_class.supports_discrete:
        raise UserError(f"{name} does not support discrete actions ({spec.name})")
    if not spec.discrete and not algorithm_class.supports_continuous:
        raise UserError(f"{name} does not support continuous actions ({spec.name})")
    return algorithm_class(spec, config.model, config.ppo, device)
