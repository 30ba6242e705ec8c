"""Before/after for acting: `act()` of the MAT at a git revision against the working tree, side by side in
one process (same weights, same observations, alternating calls), so that the ratio is robust to load.

    python bench/ab_act.py --before 7fa6b3d [--agents 3 27 64] [--json OUT]

The revision's nn/ package (layers, distributions, mat) is loaded under another name; both models get
the same state dict, and their log-probs for the same actions are checked to agree.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import common
import torch

from seqmarl.nn import mat as after_mat
from seqmarl.types import ContinuousActions, DiscreteActions, EnvSpec

SPACES = {"discrete": DiscreteActions(10), "continuous": ContinuousActions(3, (-1.0,) * 3, (1.0,) * 3)}


def git(*argv: str) -> str:
    return subprocess.run(["git", *argv], cwd=common.REPO, capture_output=True, text=True, check=True).stdout


def load_revision(revision: str, directory: Path):
    """The nn/ package at `revision` (every file: modules, and the C++ source where it has one) as the
    package `before_nn`; returns its mat module."""
    package = directory / "before_nn"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for path in git("ls-tree", "-r", "--name-only", revision, "src/seqmarl/nn/").split():
        target = package / Path(path).relative_to("src/seqmarl/nn")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(git("show", f"{revision}:{path}").replace("seqmarl.nn", "before_nn"))
    sys.path.insert(0, str(directory))
    return importlib.import_module("before_nn.mat")


def main() -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="git revision to compare against")
    p.add_argument("--agents", type=int, nargs="+", default=[3, 27, 64])
    p.add_argument("--envs", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    if args.quick:
        args.agents, args.envs, args.repeats = [3], 4, 3
    device = common.setup(args)
    machine = common.machine(device)
    print(
        f"# act before/after: {args.before} vs working tree ({machine['commit']}), {machine['cpu']}, "
        f"torch {machine['torch']}, {machine['threads']} threads, load {machine['load_average']}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        before_mat = load_revision(args.before, Path(directory))
        for space_name, space in SPACES.items():
            for N in args.agents:
                spec = EnvSpec("bench", N, 100, 100, space, 100, False)
                torch.manual_seed(0)
                after = after_mat.MultiAgentTransformer(after_mat.MATConfig(), spec).to(device)
                before = before_mat.MultiAgentTransformer(before_mat.MATConfig(), spec).to(device)
                before.load_state_dict(after.state_dict())
                obs = torch.randn(args.envs, N, 100, device=device)
                mask = torch.ones(args.envs, N, space.mask_width, dtype=torch.bool, device=device)
                actions = after.act(obs, mask).actions
                with torch.no_grad():  # same weights: the teacher-forced passes must agree
                    drift = (
                        before.evaluate(obs, mask, actions).log_prob
                        - after.evaluate(obs, mask, actions).log_prob
                    )
                median = common.time_alternating_ms(
                    {"before": partial(before.act, obs, mask), "after": partial(after.act, obs, mask)},
                    device,
                    args.repeats,
                )
                rows.append(
                    {
                        "name": f"{space_name}/N={N}/envs={args.envs}",
                        "before_ms": median["before"],
                        "after_ms": median["after"],
                        "speedup": median["before"] / median["after"],
                        "max_log_prob_diff": float(drift.abs().max()),
                    }
                )
    common.print_table(
        rows,
        [
            ("name", "row", "s"),
            ("before_ms", f"{args.before} ms", ".2f"),
            ("after_ms", "now ms", ".2f"),
            ("speedup", "speedup", ".2f"),
            ("max_log_prob_diff", "max |dlogp|", ".1e"),
        ],
    )
    common.write_json(
        args.json, {"benchmark": "ab_act", "before": args.before, "machine": machine, "rows": rows}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
