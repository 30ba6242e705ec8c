"""Env stepping of the MaMuJoCo adapter: its index gathers (`envs/mamujoco.py`, `_Gather`) against
MaMuJoCo's own per-agent observation builder and action mapping, side by side in one process
(alternating calls on two vectors of the same task, seed and actions), checking that both give the same
records bit for bit.

    python bench/env_step.py [--tasks HalfCheetah-6x1 Ant-4x2] [--envs 40] [--json OUT] [--baseline FILE]
"""

from __future__ import annotations

import common
import torch

from seqmarl.envs.mamujoco import MaMujocoVectorEnv


def bench_task(task: str, num_envs: int, steps: int, device: torch.device) -> dict:
    gathered, own = MaMujocoVectorEnv(task, num_envs, seed=0), MaMujocoVectorEnv(task, num_envs, seed=0)
    if gathered._gather is None:
        return {"name": f"{task}/envs={num_envs}", "task": task, "envs": num_envs, "gather": False}
    own._gather = None  # MaMuJoCo's own path: env.step(dict of per-agent actions)
    E, N, A = num_envs, gathered.spec.n_agents, gathered.spec.action_space.dim
    generator = torch.Generator().manual_seed(0)
    actions = [torch.rand(E, N, A, generator=generator) * 2 - 1 for _ in range(steps)]
    records: dict[str, list] = {"gather": [], "mamujoco": []}
    position = {"gather": 0, "mamujoco": 0}

    def stepper(name: str, env: MaMujocoVectorEnv):
        def step() -> None:
            records[name].append(env.step(actions[position[name] % steps]))
            position[name] += 1

        return step

    ms = common.time_alternating_ms(
        {"gather": stepper("gather", gathered), "mamujoco": stepper("mamujoco", own)}, device, steps - 1
    )
    identical = all(
        torch.equal(tensor, getattr(b, field))
        for a, b in zip(records["gather"], records["mamujoco"])
        for field, tensor in vars(a).items()
    )
    gathered.close()
    own.close()
    return {
        "name": f"{task}/envs={num_envs}",
        "task": task,
        "envs": num_envs,
        "gather": True,
        "gather_ms": ms["gather"],
        "mamujoco_ms": ms["mamujoco"],
        "speedup": ms["mamujoco"] / ms["gather"],
        "env_steps_per_s": num_envs * 1e3 / ms["gather"],
        "identical_records": identical,
    }


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["HalfCheetah-6x1", "Ant-4x2"])
    p.add_argument("--envs", type=int, default=40, help="simulators per vector (the HalfCheetah preset: 40)")
    p.add_argument("--steps", type=int, default=200, help="vector steps per path")
    args = p.parse_args()
    device = common.setup(args)
    steps = 10 if args.quick else args.steps
    rows = [bench_task(task, args.envs, steps, device) for task in args.tasks]
    common.print_table(
        rows,
        [
            ("name", "task / envs", "s"),
            ("mamujoco_ms", "MaMuJoCo's path (ms/step)", ".2f"),
            ("gather_ms", "gathers (ms/step)", ".2f"),
            ("speedup", "speed-up", ".2f"),
            ("env_steps_per_s", "env steps/s (gathers)", ",.0f"),
            ("identical_records", "identical records", ""),
        ],
    )
    if not all(row.get("identical_records", True) for row in rows):
        raise SystemExit("the two paths gave different records")
    common.write_json(args.json, {"benchmark": "env_step", "machine": common.machine(device), "rows": rows})
    if not common.compare_with_baseline(rows, args.baseline, "env_steps_per_s", higher_is_better=True):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
