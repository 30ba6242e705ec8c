"""The one environment interface every adapter implements (shape legend in seqmarl/types.py)."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from seqmarl.types import EnvSpec, StepRecord


class VectorEnv(Protocol):
    """E copies of one task, stepped together, resetting themselves when an episode ends.

    Adapters implement this; registry.make_vector_env hands them out inside the guard (envs/guard.py),
    which restarts a simulator that raises and checks every record against the spec.
    """

    spec: EnvSpec
    num_envs: int  # E

    def reset(self, seed: int) -> StepRecord:
        """Start E fresh episodes; reward, terminated, truncated and discarded are all zero/False."""
        ...

    def step(self, actions: torch.Tensor) -> StepRecord:
        """Apply one joint action per env.

        actions: (E, N) int64 for discrete spaces, (E, N, A) float32 for continuous ones (the adapter
        clips to the bounds). May live on any device; the returned record is on the CPU.
        """
        ...

    def get_state(self) -> dict[str, Any]:
        """The simulators' full state (every env's physics or battle state, PRNG keys, running episode
        bookkeeping) as a dict of tensors and plain values, for checkpoints (exact resume)."""
        ...

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue exactly from `get_state()`'s output, taken from a vector of the same task and size."""
        ...

    def close(self) -> None: ...
