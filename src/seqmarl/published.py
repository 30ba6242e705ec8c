"""Published numbers to put next to ours (REFERENCE.md section 3), keyed by our env name and algorithm.

SMAX is JaxMARL's re-implementation of SMAC with a heuristic enemy, not StarCraft II's built-in AI, so
the paper's SMAC win rates are a reference point, not a like-for-like comparison.
"""

from __future__ import annotations

MAT_TABLE_1 = "MAT paper Table 1, SMAC win rate"

# (map, steps or None) -> win rate % for mat / mat_dec / mappo / happo / qmix (Wen et al. 2022, Table 1)
_TABLE_1: dict[tuple[str, str | None], tuple[float, float, float, float, float]] = {
    ("3s5z", None): (100.0, 100.0, 72.5, 90.0, 84.3),
    ("5m_vs_6m", "5e6"): (90.6, 83.1, 88.2, 73.8, 75.8),
    ("8m_vs_9m", None): (100.0, 95.0, 93.8, 86.2, 92.6),
    ("25m", None): (100.0, 86.9, 100.0, 0.6, 90.2),
    ("27m_vs_30m", "1e7"): (100.0, 95.3, 93.1, 0.0, 39.2),
    ("MMM2", "1e7"): (93.8, 91.2, 81.8, 0.3, 88.3),
    ("6h_vs_8z", None): (98.8, 93.8, 88.4, 0.0, 9.7),
    ("3s5z_vs_3s6z", "2e7"): (96.5, 85.3, 84.3, 82.8, 68.8),
}


def _published() -> dict[tuple[str, str], list[str]]:
    table: dict[tuple[str, str], list[str]] = {}
    for (task, steps), numbers in _TABLE_1.items():
        for algo, value in zip(("mat", "mat_dec", "mappo", "happo", "qmix"), numbers):
            budget = f" at {steps} steps" if steps else ""
            table.setdefault((f"smax:{task}", algo), []).append(f"{value:g}% ({MAT_TABLE_1}{budget})")
    curves = "reference MAT README curves at 1e7 steps, read off the plot"
    for algo, value in (("mat", 9000), ("mat_dec", 4400), ("happo", 4400), ("mappo", 3500)):
        table.setdefault(("mamujoco:HalfCheetah-6x1", algo), []).append(f"~{value} ({curves})")
    table.setdefault(("mamujoco:Ant-4x2", "happo"), []).append("~6000 (HARL HAPPO at 1e7 steps)")
    table.setdefault(("smax:3s5z_vs_3s6z", "mappo"), []).append("~76% (Mava recurrent MAPPO on SMAX at 1e7)")
    # SMAX's own 5m_vs_6m, final win rates of the JaxMARL paper (Rutherford et al. 2023) at 1e7 steps,
    # read off the dashed lines of instadeepai/Mava docs/images/smax_results/5m_vs_6m.png
    smax = "JaxMARL paper, recurrent, SMAX at 1e7 steps, read off Mava's SMAX benchmark plot"
    for algo, value in (("ippo", 12), ("mappo", 5)):
        table.setdefault(("smax:5m_vs_6m", algo), []).append(f"~{value}% ({smax})")
    return table


PUBLISHED: dict[tuple[str, str], list[str]] = _published()
