"""Which of the 320 evaluation battles (seed 777) do the MAT policies in docs/results lose?

Every 320-episode evaluation of a MAT run on smax:3m in docs/results (absolute*.json, last checkpoint or
best.pt) faces the same 320 starts. If a few starts were unwinnable, every policy would lose them.
Run from the repository root: python docs/results/mat_3m_tuning/shared_losses.py
"""

import collections
import glob
import json

losses = {}
for path in sorted(glob.glob("docs/results/*/runs/*/absolute*.json")):
    data = json.load(open(path))
    wins = data["episodes"]["win"]
    if data.get("env") == "smax:3m" and data.get("algo") == "mat" and len(wins) == 320:
        losses[path] = [not won for won in wins]
n = len(losses)
lost_by = [sum(lost[i] for lost in losses.values()) for i in range(320)]
rates = sorted(1 - sum(lost) / 320 for lost in losses.values())
print(f"{n} MAT evaluations of the same 320 smax:3m battles (win rates {rates[0]:.3f}-{rates[-1]:.3f})")
print(f"battles lost by every policy: {sum(k == n for k in lost_by)}; by at least half: "
      f"{sum(k >= n / 2 for k in lost_by)}; by at least a quarter: {sum(k >= n / 4 for k in lost_by)}; "
      f"by none: {sum(k == 0 for k in lost_by)}")
print("battles by the number of policies that lost them:", sorted(collections.Counter(lost_by).items()))
