"""A benchmark spec: algorithms x tasks x seeds, budgets, overrides and the evaluation protocol.

Read from YAML (bench/specs/*.yaml) and/or `seqmarl benchmark` flags, validated here so that a bad
spec fails with one line before anything runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from seqmarl.errors import UserError

SPEC_KEYS = (
    "out",
    "workers",
    "threads",
    "steps",
    "seeds",
    "algos",
    "envs",
    "exclude",
    "set",
    "eval",
    "thresholds",
)
EVAL_KEYS = ("every", "episodes", "absolute_factor", "absolute_checkpoint")


@dataclass(frozen=True)
class EvalProtocol:
    """Every `every` env steps, `episodes` deterministic episodes; at the end `absolute_factor` x as many
    on `absolute_checkpoint`: "best" (best.pt, the best periodic evaluation's), "last" (the final
    checkpoint) or "average:K" (the weights of the K newest kept checkpoints averaged, `seqmarl average
    --last K`; K <= run.keep_checkpoints of every run, checked when the benchmark plans its runs).
    None = the task preset's value (SMAX: 50k / 32, MaMuJoCo: 100k / 10)."""

    every: int | None = None
    episodes: int | None = None
    absolute_factor: int = 10
    absolute_checkpoint: str = "best"

    @property
    def average_last(self) -> int | None:
        """K of "average:K", else None."""
        return parse_absolute_checkpoint(self.absolute_checkpoint)


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark: every (seed, env, algo) combination is one run."""

    out: Path  # root of the run directories
    algos: tuple[str, ...]
    envs: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: dict[str, int]  # env -> env steps per run
    workers: int = 1  # parallel worker processes
    threads: int = 0  # torch threads per worker; 0 = cores // workers
    overrides: tuple[str, ...] = ()  # SECTION.KEY=VALUE applied to every run
    exclude: frozenset[tuple[str, str]] = frozenset()  # (env, algo) pairs not run (e.g. qmix on MaMuJoCo)
    eval: EvalProtocol = field(default_factory=EvalProtocol)
    thresholds: dict[str, float] = field(default_factory=dict)  # env -> value, for the report

    @property
    def threads_per_worker(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)


def parse_seeds(value: Any) -> tuple[int, ...]:
    """5 -> (5,); [0, 2] -> (0, 2); "0-4" -> (0, 1, 2, 3, 4); "0-2,7" -> (0, 1, 2, 7)."""
    if isinstance(value, bool):
        raise UserError(f"seeds: expected e.g. 0-4, 0,2,5 or a list, got {value!r}")
    if isinstance(value, int):
        value = [value]
    if isinstance(value, str):
        seeds: list[int] = []
        for part in value.replace(" ", "").split(","):
            low, dash, high = part.partition("-")
            if not (low.isdigit() and (not dash or high.isdigit())) or (dash and int(high) < int(low)):
                raise UserError(f"seeds: expected e.g. 0-4, 0,2,5 or a list, got {value!r}")
            seeds.extend(range(int(low), int(high) + 1) if dash else [int(low)])
        value = seeds
    if not isinstance(value, list) or not value:
        raise UserError(f"seeds: expected e.g. 0-4, 0,2,5 or a list, got {value!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in value):
        raise UserError(f"seeds: expected non-negative integers, got {value!r}")
    if len(set(value)) != len(value):
        raise UserError(f"seeds: repeated seed in {value!r}")
    return tuple(value)


def _names(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise UserError(f"{key}: expected a list of names (or a comma-separated string), got {value!r}")
    if len(set(value)) != len(value):
        raise UserError(f"{key}: repeated name in {value!r}")
    return tuple(value)


def _positive_int(value: Any, key: str) -> int:
    try:
        number = float(value)  # YAML reads 2e6 as a string
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number >= 1 or not float(number).is_integer():
        raise UserError(f"{key}: expected a positive integer, got {value!r}")
    return int(number)


def _steps(value: Any, envs: tuple[str, ...]) -> dict[str, int]:
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(envs))
        missing = [env for env in envs if env not in value]
        if unknown or missing:
            raise UserError(
                f"steps: per-task budgets must name exactly the envs (unknown {unknown}, missing {missing})"
            )
        return {env: _positive_int(value[env], f"steps.{env}") for env in envs}
    if value is None:
        raise UserError("steps: a budget is required (one number, or one per env)")
    return {env: _positive_int(value, "steps") for env in envs}


def _exclude_pair(item: Any) -> tuple[str, str]:
    """'ENV ALGO' -> (ENV, ALGO)."""
    env, _, algo = str(item).strip().partition(" ")
    return env, algo.strip()


def drop_unselected(data: dict[str, Any]) -> dict[str, Any]:
    """A spec file whose envs/algos were replaced on the command line (a slice: `--envs smax:2s3z`): its
    excludes, thresholds and per-env budgets for envs or algos outside the slice no longer apply, so they
    are dropped instead of being reported as errors. Everything else is still checked by build_spec."""
    envs = set(_names(data.get("envs"), "envs"))
    algos = set(_names(data.get("algos"), "algos"))
    data = dict(data)
    if isinstance(data.get("exclude"), list):
        pairs = [_exclude_pair(item) for item in data["exclude"]]
        data["exclude"] = [f"{env} {algo}" for env, algo in pairs if env in envs and algo in algos]
    for key in ("thresholds", "steps"):
        if isinstance(data.get(key), dict):
            data[key] = {env: value for env, value in data[key].items() if env in envs}
    return data


def parse_absolute_checkpoint(which: Any) -> int | None:
    """eval.absolute_checkpoint: best or last -> None; average:K -> K (K >= 2); anything else fails.
    Whether every run keeps K checkpoints depends on its resolved config, so the benchmark checks
    that once it has planned the runs (`benchmark.check_run_configs`)."""
    if which in ("best", "last"):
        return None
    kind, _, k = str(which).partition(":")
    if kind != "average" or not k.isdigit() or int(k) < 2:
        raise UserError(
            f"eval.absolute_checkpoint: expected best, last or average:K (K >= 2 checkpoints), got {which!r}"
        )
    return int(k)


def build_spec(data: dict[str, Any]) -> BenchmarkSpec:
    """Validate a spec mapping (from YAML, with command-line flags merged in) into a BenchmarkSpec."""
    from seqmarl.algos import algorithm_names
    from seqmarl.config import parse_assignment
    from seqmarl.envs.registry import split_env_name

    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise UserError(f"unknown benchmark spec key {unknown[0]!r}; allowed: {', '.join(SPEC_KEYS)}")
    for key in ("algos", "envs", "seeds"):
        if data.get(key) is None:
            raise UserError(f"benchmark spec needs {key!r}")
    algos = _names(data["algos"], "algos")
    for algo in algos:
        if algo not in algorithm_names():
            raise UserError(f"unknown algorithm {algo!r}; available: {', '.join(algorithm_names())}")
    envs = _names(data["envs"], "envs")
    for env in envs:
        split_env_name(env)
    overrides = data.get("set") or {}
    if not isinstance(overrides, dict):
        raise UserError(f"set: expected a mapping SECTION.KEY: VALUE, got {overrides!r}")
    assignments = tuple(f"{key}={value}" for key, value in overrides.items())
    for assignment in assignments:
        parse_assignment(assignment)  # keys and values: against each run's config, once runs are planned
    protocol = data.get("eval") or {}
    if not isinstance(protocol, dict) or set(protocol) - set(EVAL_KEYS):
        raise UserError(f"eval: expected a mapping with keys {', '.join(EVAL_KEYS)}, got {protocol!r}")
    eval_protocol = EvalProtocol(
        every=_positive_int(protocol["every"], "eval.every") if "every" in protocol else None,
        episodes=_positive_int(protocol["episodes"], "eval.episodes") if "episodes" in protocol else None,
        absolute_factor=_positive_int(protocol.get("absolute_factor", 10), "eval.absolute_factor"),
        absolute_checkpoint=protocol.get("absolute_checkpoint", "best"),
    )
    parse_absolute_checkpoint(eval_protocol.absolute_checkpoint)
    exclude = set()
    for item in data.get("exclude") or []:
        env, algo = _exclude_pair(item)
        if env not in envs or algo not in algos:
            raise UserError(
                f"exclude: expected 'ENV ALGO' with ENV among envs and ALGO among algos, got {item!r}"
            )
        exclude.add((env, algo))
    thresholds = data.get("thresholds") or {}
    if not isinstance(thresholds, dict) or set(thresholds) - set(envs):
        raise UserError(f"thresholds: expected a mapping ENV: VALUE over the spec's envs, got {thresholds!r}")
    return BenchmarkSpec(
        out=Path(data.get("out") or "runs/benchmark"),
        algos=algos,
        envs=envs,
        seeds=parse_seeds(data["seeds"]),
        steps=_steps(data.get("steps"), envs),
        workers=_positive_int(data.get("workers", 1), "workers"),
        threads=_positive_int(data["threads"], "threads") if data.get("threads") else 0,
        overrides=assignments,
        exclude=frozenset(exclude),
        eval=eval_protocol,
        thresholds={env: float(value) for env, value in thresholds.items()},
    )


def load_spec_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise UserError(f"cannot read benchmark spec {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"benchmark spec {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"benchmark spec {path} must hold a mapping")
    return data
