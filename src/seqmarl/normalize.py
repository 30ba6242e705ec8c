"""Running statistics: the value normaliser (MAPPO-style) that keeps value targets near unit scale."""

from __future__ import annotations

import torch


class RunningMeanStd:
    """Exact running mean/variance over every value seen (Chan et al.'s parallel update), in float64."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.mean = torch.zeros((), dtype=torch.float64, device=device)
        self.var = torch.ones((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64).flatten()
        if x.numel() == 0:
            return
        batch_mean, batch_var, n = x.mean(), x.var(unbiased=False), float(x.numel())
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean = self.mean + delta * n / total
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> torch.Tensor:
        return self.var.clamp_min(1e-8).sqrt()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std).to(x.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.std + self.mean).to(x.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self.mean.device
        self.mean, self.var, self.count = (state[k].to(device) for k in ("mean", "var", "count"))


class IdentityNormalizer(RunningMeanStd):
    """Used when value normalisation is switched off: same interface, no scaling."""

    def update(self, x: torch.Tensor) -> None:
        return

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x
