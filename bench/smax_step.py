"""SMAX's jitted vector step (reset of finished episodes included, as the adapter runs it) on each device
jax sees, alternating in one process, with the same key and actions on each. It says where the
simulator should run beside a GPU model: the adapter (`envs/smax.py`) runs it on jax's CPU device.
"same rewards and ends as the CPU" is reported, not required: on an H200 the GPU's float rounding moved
the battles apart within 100 steps (docs/performance.md, "On a CUDA GPU").

    python bench/smax_step.py [--tasks 3m 27m_vs_30m] [--envs 32] [--json OUT] [--baseline FILE]
"""

from __future__ import annotations

import time

import common
import numpy as np

from seqmarl.envs.smax import _compiled_functions


def bench_task(task: str, num_envs: int, steps: int) -> list[dict]:
    import jax

    reset, step = _compiled_functions(task, num_envs, None)
    devices = {"cpu": jax.devices("cpu")[0]}
    if jax.default_backend() != "cpu":
        devices[jax.default_backend()] = jax.devices()[0]
    rng = np.random.default_rng(0)
    carries, records, times = {}, {}, {name: [] for name in devices}
    for name, device in devices.items():
        with jax.default_device(device):
            carries[name], first = reset(jax.random.PRNGKey(0))
            n_actions = first["action_mask"].shape[-1]
            carries[name], _ = step(carries[name], np.zeros(first["alive"].shape, np.int32))  # compile
            jax.block_until_ready(carries[name])
        records[name] = []
    for _ in range(steps):
        actions = rng.integers(0, n_actions, size=first["alive"].shape, dtype=np.int32)
        for name, device in devices.items():  # alternating: machine drift hits both alike
            with jax.default_device(device):
                start = time.perf_counter()
                carries[name], record = step(carries[name], actions)
                jax.block_until_ready(record)
                times[name].append(time.perf_counter() - start)
            records[name].append((np.asarray(record["reward"]), np.asarray(record["terminated"])))
    cpu_ms = 1e3 * float(np.median(times["cpu"]))
    rows = []
    for name in devices:
        ms = 1e3 * float(np.median(times[name]))
        same = all(
            np.allclose(a[0], b[0], atol=1e-4) and np.array_equal(a[1], b[1])
            for a, b in zip(records[name], records["cpu"])
        )
        rows.append(
            {
                "name": f"{task}/envs={num_envs}/{name}",
                "task": task,
                "jax_device": str(devices[name]),
                "step_ms": ms,
                "env_steps_per_s": num_envs / (ms / 1e3),
                "cpu_over_this": cpu_ms / ms,
                "same_as_cpu": same,
            }
        )
    return rows


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["3m", "27m_vs_30m"])
    p.add_argument("--envs", type=int, default=32, help="battles per vector (the SMAX presets: 32)")
    p.add_argument("--steps", type=int, default=200, help="timed vector steps per device")
    args = p.parse_args()
    device = common.setup(args)
    steps = 10 if args.quick else args.steps
    rows = [row for task in args.tasks for row in bench_task(task, args.envs, steps)]
    common.print_table(
        rows,
        [
            ("name", "task / envs / jax device", "s"),
            ("step_ms", "ms per vector step (median)", ".3f"),
            ("env_steps_per_s", "env steps/s", ",.0f"),
            ("cpu_over_this", "speed-up over jax's CPU", ".2f"),
            ("same_as_cpu", "same rewards and ends as the CPU", ""),
        ],
    )
    common.write_json(args.json, {"benchmark": "smax_step", "machine": common.machine(device), "rows": rows})
    if not common.compare_with_baseline(rows, args.baseline, "env_steps_per_s", higher_is_better=True):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
