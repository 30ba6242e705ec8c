"""End-to-end training throughput of MAT (env steps/s) with the task presets (the paper's settings,
REFERENCE.md 2), a profile of where the time goes, and the compute bound.

    python bench/train.py [--envs smax:3m ...] [--algo mat] [--per-layer] [--quick] [--json OUT]
                          [--baseline FILE]

`--algo` times another algorithm with its own preset (rows named "TASK/ALGO"); the compute bound is
MAT's FLOP count, so it is given for MAT only. `--per-layer` runs MAT's update layer by layer through
autograd instead of as one C++ pass (`cpp_decode.use_training_pass`), for an end-to-end A/B between two
runs of this script.

The trainer (seqmarl.train.train) runs unmodified; this script only wraps what it calls, from outside:
the training envs' `step` (env), the algorithm's `act` and `values` (act), `collect` (the rollout loop:
its time minus env and act is data movement: buffer writes, transfers, episode bookkeeping), the buffer's
`finish` (GAE), `update`, and per-iteration wall time (the rest is "other": logging, checkpointing, the
loop). The first `--warmup` iterations (JAX compilation, allocator warm-up) and the last one (it holds
the final checkpoint) are left out of the numbers. Evaluation is replaced by a no-op: the trainer
evaluates only before the first iteration and in the last one, both outside the timed window.

Compute bound: the model FLOPs of one env step are N tokens x (one forward pass with the cache while
acting + epochs x forward/backward in the update) (bench/common.py gives the per-token counts); the
bound is the matmul rate measured in this run at the update's shapes divided by that. That rate is
measured twice: after training, as the best of three readings (`common.model_shape_gflops`), and for
MAT between every two iterations (the forward and weight-gradient shapes three times each, ~ms; its
time is taken out of the iteration it fell in), so that each iteration's fraction of the bound compares
it with the rate of the same phase of the machine, whose speed drifts by 15-35% within minutes; the
"interleaved" column is the median of those fractions.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable

import common
import torch

import seqmarl.train as trainer
from seqmarl.buffer import RolloutBuffer
from seqmarl.config import build_config, merge, preset_for
from seqmarl.rollout import EpisodeStats

PHASES = ("env", "act", "data", "gae", "update", "other")


class Profile:
    """Seconds per phase for every iteration; an iteration starts when `collect` is called."""

    def __init__(self) -> None:
        self.iterations: list[dict[str, float]] = []
        self.starts: list[float] = []
        self.cpu_starts: list[float] = []  # process CPU time (all threads, user + system)
        self.in_collect = False
        # Matmul-rate probes run just before iterations 1, 2, ...: (GFLOP/s, wall s, CPU s) each.
        self.probes: list[tuple[float, float, float]] = []

    def begin_iteration(self) -> None:
        self.starts.append(time.perf_counter())
        self.cpu_starts.append(time.process_time())
        self.iterations.append(defaultdict(float))

    def timed(self, fn: Callable, phase: str) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.iterations:
                    where = "_in_collect" if self.in_collect else ""
                    self.iterations[-1][phase + where] += time.perf_counter() - start

        return wrapper

    def iteration_wall(self, i: int) -> float:
        """Wall seconds of iteration i, less the rate probe that ran at its end (before iteration i + 1)."""
        probe = self.probes[i][1] if i < len(self.probes) else 0.0
        return self.starts[i + 1] - self.starts[i] - probe

    def split(self, first: int, last: int) -> tuple[float, float, dict[str, float]]:
        """Wall seconds and process CPU seconds of iterations [first, last), and the wall seconds of
        each phase within them (the rate probes between them left out)."""
        totals = dict.fromkeys(PHASES, 0.0)
        wall = sum(self.iteration_wall(i) for i in range(first, last))
        cpu = self.cpu_starts[last] - self.cpu_starts[first] - sum(p[2] for p in self.probes[first:last])
        for t in self.iterations[first:last]:
            collect = t["collect"]
            totals["env"] += t["env_in_collect"]
            totals["act"] += t["act_in_collect"] + t["act"]
            totals["data"] += collect - t["env_in_collect"] - t["act_in_collect"]
            totals["gae"] += t["gae"]
            totals["update"] += t["update"]
        totals["other"] = wall - sum(totals.values())
        return wall, cpu, totals


def run_training(
    env_name: str,
    algo: str,
    overrides: dict,
    iterations: int,
    warmup: int,
    profile: Profile,
    probe: Callable[[int], float] | None = None,
):
    """Train with the trainer's own loop, wrapped for timing. Returns the config used. `probe(tokens)`,
    if given, measures the matmul rate at the update's minibatch of `tokens` rows between iterations."""
    preset = preset_for(env_name, algo)
    settings = merge(merge(preset, {"algo": algo}), overrides)
    config = build_config(merge(settings, {"env": {"name": env_name}}))
    steps_per_iteration = config.ppo.rollout_length * config.env.num_envs
    with tempfile.TemporaryDirectory() as out_dir:
        run = {
            "total_steps": steps_per_iteration * (warmup + iterations + 1),
            "eval_every": 0,
            "checkpoint_every": 0,
            "out_dir": out_dir,
            "progress": False,
            "tensorboard": False,
            "threads": torch.get_num_threads(),
        }
        config = build_config(merge(settings, {"env": {"name": env_name}, "run": run}))

        made_envs: list = []

        def make_vector_env(*args, **kwargs):
            envs = original["make_vector_env"](*args, **kwargs)
            if not made_envs:  # the first is the training vector; the second is for evaluation
                envs.step = profile.timed(envs.step, "env")
            made_envs.append(envs)
            return envs

        def make_algorithm(*args, **kwargs):
            algorithm = original["make_algorithm"](*args, **kwargs)
            algorithm.act = profile.timed(algorithm.act, "act")
            algorithm.values = profile.timed(algorithm.values, "act")
            algorithm.update = profile.timed(algorithm.update, "update")
            return algorithm

        def collect(*args, **kwargs):
            if probe is not None and profile.starts:  # between two iterations
                wall, cpu = time.perf_counter(), time.process_time()
                samples = config.ppo.rollout_length * config.env.num_envs // config.ppo.num_minibatches
                rate = probe(samples * made_envs[0].spec.n_agents)
                profile.probes.append((rate, time.perf_counter() - wall, time.process_time() - cpu))
            profile.begin_iteration()
            profile.in_collect = True
            try:
                return original["collect"](*args, **kwargs)
            finally:
                profile.in_collect = False
                profile.iterations[-1]["collect"] = time.perf_counter() - profile.starts[-1]

        class TimedBuffer(RolloutBuffer):
            finish = profile.timed(RolloutBuffer.finish, "gae")

        def evaluate(*args, **kwargs):
            return EpisodeStats()

        patches = {
            "make_vector_env": make_vector_env,
            "make_algorithm": make_algorithm,
            "collect": collect,
            "RolloutBuffer": TimedBuffer,
            "evaluate": evaluate,
        }
        original = {name: getattr(trainer, name) for name in patches}
        try:
            for name, replacement in patches.items():
                setattr(trainer, name, replacement)
            trainer.train(config)
        finally:
            for name, value in original.items():
                setattr(trainer, name, value)
        spec = made_envs[0].spec
    return config, spec


def bench_row(
    env_name: str, overrides: dict, iterations: int, warmup: int, device: torch.device, algo: str = "mat"
) -> dict:
    profile = Profile()

    def probe(tokens: int) -> float:
        return common.model_shape_gflops(tokens, 64, device, samples=1, repeats=3)

    config, spec = run_training(
        env_name, algo, overrides, iterations, warmup, profile, probe if algo == "mat" else None
    )
    wall, cpu, phases = profile.split(warmup, warmup + iterations)
    steps_per_iteration = config.ppo.rollout_length * config.env.num_envs
    steps = steps_per_iteration * iterations
    flops_per_env_step = rate = bound = interleaved = None
    if algo == "mat":  # the FLOP count (bench/common.py) is MAT's
        shape = common.ModelShape(spec.n_agents, spec.obs_dim, spec.action_space.mask_width, spec.discrete)
        flops_per_env_step = spec.n_agents * (
            common.act_flops_per_token(shape) + config.ppo.epochs * common.train_flops_per_token(shape)
        )
        minibatch_tokens = config.ppo.rollout_length * config.env.num_envs // config.ppo.num_minibatches
        rate = common.model_shape_gflops(minibatch_tokens * spec.n_agents, 64, device)
        bound = rate * 1e9 / flops_per_env_step
        # Iteration i against the rate probed right after it (before iteration i + 1).
        interleaved = statistics.median(
            steps_per_iteration
            / profile.iteration_wall(i)
            / (profile.probes[i][0] * 1e9 / flops_per_env_step)
            for i in range(warmup, warmup + iterations)
        )
    row = {
        "name": env_name if algo == "mat" else f"{env_name}/{algo}",
        "algo": algo,
        "N": spec.n_agents,
        "envs": config.env.num_envs,
        "rollout_length": config.ppo.rollout_length,
        "epochs": config.ppo.epochs,
        "minibatches": config.ppo.num_minibatches,
        "iterations_timed": iterations,
        "steps_per_s": steps / wall,
        "mflops_per_env_step": None if flops_per_env_step is None else flops_per_env_step / 1e6,
        "matmul_model_shape_gflops": rate,
        "bound_steps_per_s": bound,
        "fraction_of_bound": None if bound is None else steps / wall / bound,
        "interleaved_fraction_of_bound": interleaved,
        "seconds_per_iteration": wall / iterations,
        # Steps per second of process CPU time: on a loaded machine wall time also counts the time
        # other processes held the cores; CPU time counts this process's own work (and its page faults).
        "steps_per_cpu_s": steps / cpu,
    }
    for phase in PHASES:
        row[f"{phase}_fraction"] = phases[phase] / wall
    return row


def main() -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--envs", nargs="+", default=["smax:3m", "smax:27m_vs_30m", "mamujoco:HalfCheetah-6x1"])
    p.add_argument("--iterations", type=int, default=4, help="timed iterations per task")
    p.add_argument("--warmup", type=int, default=1, help="iterations left out at the start")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument("--algo", default="mat", help="algorithm (its preset applies); the bound is MAT's only")
    p.add_argument("--per-layer", action="store_true", help="MAT update layer by layer, not one C++ pass")
    args = p.parse_args()
    if args.per_layer:
        from seqmarl.nn import cpp_decode

        cpp_decode.use_training_pass = False
    from seqmarl.algos import algorithm_names

    if args.algo not in algorithm_names():
        p.error(f"unknown algorithm {args.algo!r}; available: {', '.join(algorithm_names())}")
    overrides: dict = {}
    if args.quick:
        args.iterations, args.warmup = 2, 1
        if args.envs == p.get_default("envs"):
            args.envs = ["mamujoco:HalfCheetah-6x1"]
        overrides = {"env": {"num_envs": 2, "eval_envs": 1}, "ppo": {"rollout_length": 8, "epochs": 1}}
    for assignment in args.set:
        section_key, _, value = assignment.partition("=")
        section, _, key = section_key.partition(".")
        overrides = merge(overrides, {section: {key: value}})
    device = common.setup(args)
    overrides = merge(overrides, {"run": {"device": device.type}})
    machine = common.machine(device)
    print(
        f"# train: {machine['cpu']} / {machine['device']}, torch {machine['torch']}, "
        f"{machine['threads']} threads, malloc {machine['malloc']}, load {machine['load_average']}, "
        f"commit {machine['commit']}"
    )
    rows = []
    for env_name in args.envs:
        rows.append(bench_row(env_name, overrides, args.iterations, args.warmup, device, args.algo))
        print(f"  {env_name}: {rows[-1]['steps_per_s']:.0f} env steps/s", file=sys.stderr)
    common.print_table(
        rows,
        [
            ("name", "task", "s"),
            ("N", "N", "d"),
            ("envs", "envs", "d"),
            ("steps_per_s", "env steps/s", ",.0f"),
            ("steps_per_cpu_s", "per CPU s", ",.0f"),
            ("bound_steps_per_s", "compute bound", ",.0f"),
            ("fraction_of_bound", "of bound", ".0%"),
            ("interleaved_fraction_of_bound", "of bound, interleaved", ".0%"),
            *[(f"{phase}_fraction", phase, ".0%") for phase in PHASES],
        ],
    )
    print(
        "compute bound = matmul GFLOP/s at the update's shapes (measured here) / model MFLOP per env step: "
        + ", ".join(
            f"{r['name']} {r['matmul_model_shape_gflops']:.0f}/{r['mflops_per_env_step']:.2f}"
            for r in rows
            if r["bound_steps_per_s"] is not None
        )
    )
    common.write_json(args.json, {"benchmark": "train", "machine": machine, "rows": rows})
    ok = common.compare_with_baseline(rows, args.baseline, "steps_per_s", higher_is_better=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
