"""Fused against for-loop Adam inside each on-policy algorithm's update: N = 3, 3200 samples, one epoch,
one minibatch, the synthetic batch of bench/update.py; the two optimisers step the same weights, called
alternately (median ms of REPEATS rounds).

    PYTHONPATH=src python bench/baselines/fused_adam/algorithms.py THREADS mappo,happo,mat REPEATS
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/
import common  # noqa: E402
from update import ACTIONS, OBS_DIM, synthetic_batch  # noqa: E402

from seqmarl import runinfo  # noqa: E402
from seqmarl.algos import make_algorithm  # noqa: E402
from seqmarl.config import build_config  # noqa: E402
from seqmarl.types import DiscreteActions, EnvSpec  # noqa: E402


def for_loop_twin(optimizer: torch.optim.Optimizer) -> torch.optim.Adam:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return torch.optim.Adam(params, lr=5e-4, eps=1e-5)


def main() -> None:
    runinfo.keep_freed_memory()
    torch.set_num_threads(int(sys.argv[1]))
    names, repeats = sys.argv[2].split(","), int(sys.argv[3])
    device = torch.device("cpu")
    spec = EnvSpec("bench", 3, OBS_DIM, OBS_DIM, DiscreteActions(ACTIONS), 100, False)
    batch = synthetic_batch(3200, 3, device)
    generator = torch.Generator().manual_seed(0)
    for name in names:
        config = build_config(
            {"algo": name, "env": {"name": "smax:3m"}, "ppo": {"epochs": 1, "num_minibatches": 1}}
        )
        torch.manual_seed(0)
        algorithm = make_algorithm(name, spec, config, device)
        actors = getattr(algorithm, "actor_optimizers", None)  # HAPPO: one per agent, besides the critic's
        fused = (algorithm.optimizer, actors)
        loop = (for_loop_twin(algorithm.optimizer), [for_loop_twin(o) for o in actors] if actors else None)

        def update(optimizers, algorithm=algorithm):
            def run() -> None:
                algorithm.optimizer = optimizers[0]
                if optimizers[1] is not None:
                    algorithm.actor_optimizers = optimizers[1]
                algorithm.update(batch, 5e-4, generator)

            return run

        t = common.time_alternating_ms(
            {"fused": update(fused), "loop": update(loop)}, device, repeats, warmup=2
        )
        print(
            f"{name:8s} fused {t['fused']:.1f} ms, for-loop {t['loop']:.1f} ms, "
            f"gain {t['loop'] / t['fused']:.2f}"
        )


if __name__ == "__main__":
    main()
