"""Task names -> adapters. "smax:3m" selects the SMAX adapter with map "3m".

Simulator packages are imported lazily inside each adapter module, so a missing extra only matters
when that simulator is asked for, and then gives a one-line MissingExtraError.
"""

from __future__ import annotations

import importlib

from seqmarl.envs.base import VectorEnv
from seqmarl.envs.guard import GuardedVectorEnv
from seqmarl.errors import UserError

# family -> module holding `make_vector_env(task: str, num_envs: int, seed: int) -> VectorEnv`; a module
# whose simulator can run on a GPU takes `sim_device` too and lists it in SIM_DEVICES
FAMILIES: dict[str, str] = {
    "smax": "seqmarl.envs.smax",
    "mamujoco": "seqmarl.envs.mamujoco",
}


def split_env_name(name: str) -> tuple[str, str]:
    """ "smax:3m" -> ("smax", "3m"), with a clear error for anything else."""
    family, sep, task = name.partition(":")
    if not sep or not task or family not in FAMILIES:
        raise UserError(
            f"unknown env {name!r}; expected FAMILY:TASK with FAMILY one of {sorted(FAMILIES)} "
            "(e.g. smax:3m, mamujoco:HalfCheetah-6x1)"
        )
    return family, task


def make_vector_env(name: str, num_envs: int, seed: int, sim_device: str = "cpu") -> GuardedVectorEnv:
    """The adapter for `name`, inside the guard that restarts a failing simulator and checks every record
    (seqmarl/envs/guard.py). Training, evaluation and benchmarks all get their envs here. `sim_device`
    ("cpu" or "gpu", EnvConfig) says where the simulator runs; records are CPU tensors either way."""
    family, task = split_env_name(name)
    if num_envs < 1:
        raise UserError(f"num_envs must be >= 1, got {num_envs}")
    module = importlib.import_module(FAMILIES[family])
    devices = getattr(module, "SIM_DEVICES", ("cpu",))
    if sim_device not in devices:
        raise UserError(f"env.sim_device={sim_device!r}: {family} runs on {' or '.join(devices)} only")
    where = {} if sim_device == "cpu" else {"sim_device": sim_device}

    def build(seed: int) -> VectorEnv:
        # Looked up at every (re)build, so a restart goes through whatever the module exports then.
        return module.make_vector_env(task, num_envs=num_envs, seed=seed, **where)

    return GuardedVectorEnv(build, seed)
