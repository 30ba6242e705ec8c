"""Typed, frozen configuration: one dataclass per component, presets from YAML, validated overrides.

Each component receives only its own section: the env factory gets EnvConfig, the model MATConfig, the
PPO update PPOConfig, QMIX QMIXConfig, the trainer RunConfig. Overrides arrive as nested dicts (YAML
presets, `--set section.key=value`, CLI flags) and are checked key by key against the dataclass fields,
so a typo names the key and the allowed ones instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any

import yaml

from seqmarl.errors import UserError
from seqmarl.nn.mat import MATConfig
from seqmarl.nn.mlp import MLPConfig


@dataclass(frozen=True)
class EnvConfig:
    """Which task, and how many copies are stepped together."""

    name: str = "smax:3m"  # FAMILY:TASK, e.g. smax:3m, mamujoco:HalfCheetah-6x1
    num_envs: int = 32  # E parallel environments for training rollouts
    eval_envs: int = 32  # parallel environments for evaluation (one episode each per round)
    # where the simulator runs: "cpu", or "gpu" for SMAX on jax's GPU (records still reach the trainer as
    # CPU tensors). On an H200, SMAX's step for 32 battles of 27m_vs_30m took 2.1 ms on the GPU against
    # 21.3 ms on the host's CPU, and 1.2 ms against 1.0 ms for 3m (docs/performance.md, "On a CUDA GPU").
    sim_device: str = "cpu"

    def __post_init__(self) -> None:
        _check(
            self.sim_device in ("cpu", "gpu"),
            f"env.sim_device must be 'cpu' or 'gpu', not {self.sim_device!r}",
        )


@dataclass(frozen=True)
class PPOConfig:
    """The PPO update (shared by every on-policy algorithm)."""

    lr: float = 5e-4  # Adam learning rate
    lr_schedule: str = "linear"  # "linear" decay to 0 over the run, or "constant"
    adam_eps: float = 1e-5
    rollout_length: int = 100  # T steps per env per iteration
    epochs: int = 15  # passes over each rollout
    num_minibatches: int = 1  # minibatches per epoch (split over env-steps, all agents kept together)
    clip: float = 0.05  # ratio clip of the surrogate objective
    value_clip: float = 0.05  # clip of the value change (normalised scale)
    entropy_coef: float = 0.01
    value_coef: float = 1.0
    max_grad_norm: float = 10.0
    gamma: float = 0.99
    gae_lambda: float = 0.95
    huber_delta: float = 10.0  # Huber loss threshold of the value loss; 0 gives plain MSE
    value_norm: bool = True  # running normalisation of value targets
    shuffle_agent_order: bool = False  # permute the decision order every iteration (paper, section 5)

    def __post_init__(self) -> None:
        _check(self.lr > 0, "ppo.lr must be > 0")
        _check(self.lr_schedule in ("linear", "constant"), "ppo.lr_schedule must be 'linear' or 'constant'")
        _check(self.rollout_length >= 1, "ppo.rollout_length must be >= 1")
        _check(self.epochs >= 1, "ppo.epochs must be >= 1")
        _check(self.num_minibatches >= 1, "ppo.num_minibatches must be >= 1")
        _check(0 < self.clip < 1, "ppo.clip must be in (0, 1)")
        _check(
            0 < self.gamma <= 1 and 0 <= self.gae_lambda <= 1, "ppo.gamma in (0, 1], ppo.gae_lambda in [0, 1]"
        )
        _check(self.huber_delta >= 0, "ppo.huber_delta must be >= 0 (0 = MSE)")


@dataclass(frozen=True)
class QMIXConfig:
    """QMIX (value decomposition, off-policy): pymarl2's tuned settings unless a preset says otherwise.

    The trainer still collects `ppo.rollout_length` steps of `env.num_envs` envs per iteration; QMIX cuts
    them into episodes, stores them, and then makes one update per `episodes_per_update` new episodes.
    """

    lr: float = 1e-3  # Adam learning rate, constant (the trainer's PPO lr schedule does not apply)
    gamma: float = 0.99
    td_lambda: float = 0.6  # TD(lambda) targets (pymarl2); 0 gives one-step targets
    buffer_size: int = 5000  # replay capacity in episodes (preallocated, padded to the time limit)
    batch_size: int = 128  # episodes per update
    episodes_per_update: int = 8  # one update per this many finished episodes (pymarl2: 8 parallel envs)
    target_update_interval: int = 25  # updates between hard target copies (pymarl2: 200 episodes / 8)
    epsilon_start: float = 1.0  # exploration rate at step 0
    epsilon_finish: float = 0.05  # ... after epsilon_anneal_steps env steps, and from then on
    epsilon_anneal_steps: int = 100_000  # env steps of the linear anneal
    max_grad_norm: float = 10.0
    rnn_hidden: int = 64  # GRU width of the agent network
    mixing_embed: int = 32  # width of the mixing network
    hypernet_embed: int = 64  # hidden width of the hypernetworks producing the mixing weights

    def __post_init__(self) -> None:
        _check(self.lr > 0, "qmix.lr must be > 0")
        _check(0 < self.gamma <= 1, "qmix.gamma must be in (0, 1]")
        _check(0 <= self.td_lambda <= 1, "qmix.td_lambda must be in [0, 1]")
        _check(self.batch_size >= 1, "qmix.batch_size must be >= 1")
        _check(self.buffer_size >= self.batch_size, "qmix.buffer_size must be >= qmix.batch_size")
        _check(self.episodes_per_update >= 1, "qmix.episodes_per_update must be >= 1")
        _check(self.target_update_interval >= 1, "qmix.target_update_interval must be >= 1")
        _check(
            0 <= self.epsilon_finish <= self.epsilon_start <= 1,
            "qmix epsilons must satisfy 0 <= epsilon_finish <= epsilon_start <= 1",
        )
        _check(self.epsilon_anneal_steps >= 1, "qmix.epsilon_anneal_steps must be >= 1")
        _check(self.max_grad_norm > 0, "qmix.max_grad_norm must be > 0")
        _check(
            min(self.rnn_hidden, self.mixing_embed, self.hypernet_embed) >= 1,
            "qmix.rnn_hidden, mixing_embed and hypernet_embed must be >= 1",
        )


@dataclass(frozen=True)
class RunConfig:
    """The training run: budget, seed, evaluation, checkpoints, device."""

    total_steps: int = 1_000_000  # env steps (per env copy summed: iterations * T * E)
    seed: int = 0
    eval_every: int = 50_000  # env steps between deterministic evaluations (0 = only at the end)
    eval_episodes: int = 32  # episodes per evaluation
    checkpoint_every: int = 200_000  # env steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 3  # most recent checkpoints kept on disk
    out_dir: str = "runs"  # parent folder of run directories
    run_name: str = ""  # run directory name; empty = ENV_ALGO_sSEED_TIMESTAMP
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = True  # also write TensorBoard event files

    def __post_init__(self) -> None:
        _check(self.total_steps >= 1, "run.total_steps must be >= 1")
        _check(self.eval_every >= 0 and self.checkpoint_every >= 0, "run.eval_every/checkpoint_every >= 0")
        _check(self.eval_episodes >= 1, "run.eval_episodes must be >= 1")
        _check(self.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    algo: str = "mat"
    env: EnvConfig = field(default_factory=EnvConfig)
    model: MATConfig = field(default_factory=MATConfig)  # MAT, and MAT-Dec's encoder
    mlp: MLPConfig = field(default_factory=MLPConfig)  # MLP actors/critics (MAT-Dec, MAPPO, IPPO, HAPPO)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    qmix: QMIXConfig = field(default_factory=QMIXConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = ("env", "model", "mlp", "ppo", "qmix", "run")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a YAML/CLI value into the field's declared type, or raise a UserError naming the key."""
    target = typing.get_args(annotation)[0] if isinstance(annotation, types.UnionType) else annotation
    target = {"int": int, "float": float, "bool": bool, "str": str}.get(target, target)
    if isinstance(value, str) and target is not str:
        lowered = value.strip().lower()
        if target is bool:
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise UserError(f"{key}: expected true/false, got {value!r}")
        try:
            return target(float(lowered)) if target is int and "e" in lowered else target(lowered)
        except ValueError:
            raise UserError(f"{key}: expected {target.__name__}, got {value!r}") from None
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if target is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, target) or (target is int and isinstance(value, bool)):
        raise UserError(f"{key}: expected {target.__name__}, got {value!r}")
    return value


def _apply(section: Any, overrides: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(type(section))
    names = [f.name for f in fields(section)]
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise UserError(f"unknown config key {prefix}.{key}; allowed: {', '.join(names)}")
        changes[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    return dataclasses.replace(section, **changes)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def build_config(overrides: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from nested overrides {algo, env: {...}, model: {...}, ppo: {...}, qmix: {...},
    run: {...}}."""
    allowed = ("algo",) + SECTIONS
    for key in overrides:
        if key not in allowed:
            raise UserError(f"unknown config section {key!r}; allowed: {', '.join(allowed)}")
    config = TrainConfig()
    changes: dict[str, Any] = {}
    if "algo" in overrides:
        changes["algo"] = str(overrides["algo"])
    for name in SECTIONS:
        section_overrides = overrides.get(name) or {}
        if not isinstance(section_overrides, dict):
            raise UserError(f"config section {name!r} must be a mapping, got {section_overrides!r}")
        changes[name] = _apply(getattr(config, name), section_overrides, name)
    return dataclasses.replace(config, **changes)


def parse_assignment(text: str) -> dict[str, Any]:
    """'ppo.lr=1e-4' -> {'ppo': {'lr': '1e-4'}} (typed later against the field)."""
    key, sep, value = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise UserError(f"--set expects SECTION.KEY=VALUE (e.g. ppo.lr=1e-4), got {text!r}")
    return {section: {name: value}}


def load_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping")
    return data


def preset_for(env_name: str, algo: str = "mat") -> dict[str, Any]:
    """The paper's settings for a task (REFERENCE.md 2), from configs/FAMILY.yaml: family defaults, then
    the task's own entries, then the algorithm's entries (`algorithms.ALGO`)."""
    family, _, task = env_name.partition(":")
    resource = resources.files("seqmarl") / "configs" / f"{family}.yaml"
    if not resource.is_file():
        return {}
    data = yaml.safe_load(resource.read_text()) or {}
    preset = merge(data.get("defaults", {}), (data.get("tasks") or {}).get(task, {}))
    return merge(preset, (data.get("algorithms") or {}).get(algo, {}))


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved with TrainConfig.to_dict (checkpoints, run directories)."""
    return build_config(data)
