"""The optimiser every algorithm steps with: Adam over parameters kept in one flat tensor.

`FlatAdam(params, lr, eps)` moves the parameters' data into one flat tensor (each parameter becomes a
view of its slice) and gives them gradients that are views of a second flat tensor. Clipping the
gradient norm and Adam's step then run as one op each over the whole model, where torch's per-tensor
path runs one (fused Adam) or ~10 (for-loop Adam) per weight tensor plus Python bookkeeping for each:
MAT has 63 weight tensors, and the clip and the step took ~1.3 ms of a ~35 ms update at N = 3 agents,
~0.2 ms here (docs/performance.md, "Flat Adam, even chunks, leftover-row tiles, and the interleaved
rate"). The update rule is torch's Adam (its fused kernel where the
device has one, `adam`), so a step is the same arithmetic element by element; the clip is torch's
rule, its norm summed in another order.

What a caller must keep to:
- Call `zero_grad()` before each backward (it zeroes the flat gradient and hands every parameter its
  view again), then `clip_grad_norm_` and `step`. A gradient that someone replaced in between (a
  `model.zero_grad()`, `p.grad = ...`) is copied into the flat one before the clip and the step.
- Do not move the parameters to new memory after construction (`model.to(other_device)`,
  `p.data = ...`): `step` checks and raises, since a moved parameter would no longer be stepped.
  `load_state_dict` of the model copies in place and is fine.
- Checkpoints: `state_dict()` writes, and `load_state_dict()` reads, torch's own per-parameter Adam
  layout (`torch.optim.Adam(params).state_dict()`), so checkpoints from before this optimiser resume,
  and its checkpoints load into a plain torch Adam.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def adam(params: Any, lr: float, eps: float = 1e-8) -> torch.optim.Adam:
    """Adam, with torch's fused kernel where the device has one (CPU, CUDA): one pass over all
    parameters per step instead of ~10 ops per tensor (0.65 against 2.6 ms per step for MAT's 63 weight
    tensors, docs/performance.md). The same update rule; only the rounding of its arithmetic differs."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
    except RuntimeError:  # a device without the fused kernel
        return torch.optim.Adam(params, lr=lr, eps=eps)


class FlatAdam:
    """Adam over `params` held as views of one flat tensor (see the module docstring)."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, eps: float = 1e-8):
        self.params = list(params)
        if not self.params:
            raise ValueError("FlatAdam: no parameters to optimise")
        first = self.params[0]
        if any(p.device != first.device or p.dtype != first.dtype for p in self.params):
            raise ValueError("FlatAdam: every parameter must share one device and dtype")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("FlatAdam: a parameter is listed twice")
        self.sizes = [p.numel() for p in self.params]
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        self.flat = nn.Parameter(flat)
        self.flat.grad = torch.zeros_like(flat)
        for p, view in zip(self.params, self._views(self.flat.data), strict=True):
            p.data = view
        self.grads = self._views(self.flat.grad)
        self.addresses = [p.data_ptr() for p in self.params]
        self.optimizer = adam([self.flat], lr, eps)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """`flat` cut into one view per parameter, shaped like it."""
        return [part.view_as(p) for part, p in zip(flat.split(self.sizes), self.params, strict=True)]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def fused(self) -> bool:
        return bool(self.optimizer.defaults.get("fused"))

    def zero_grad(self) -> None:
        """Zero every gradient; each parameter's `.grad` is its view of the flat gradient again."""
        self.flat.grad.zero_()
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g

    def _gather(self) -> None:
        """Gradients that are not the flat gradient's views (someone set `.grad` to None, or to a tensor
        of their own, after `zero_grad`) are copied into it, so nothing is lost."""
        if all(p.grad is g for p, g in zip(self.params, self.grads, strict=True)):
            return
        for p, g in zip(self.params, self.grads, strict=True):
            if p.grad is not g:
                if p.grad is None:
                    g.zero_()
                else:
                    g.copy_(p.grad)
                p.grad = g

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients to a total 2-norm of at most `max_norm`; returns the norm before. torch's
        rule (`torch.nn.utils.clip_grad_norm_`: scale by min(1, max_norm / (norm + 1e-6))) on the one
        flat gradient, without its per-tensor grouping."""
        self._gather()
        grad = self.flat.grad
        norm = torch.linalg.vector_norm(grad)
        grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    def step(self) -> None:
        if any(p.data_ptr() != a for p, a in zip(self.params, self.addresses, strict=True)):
            raise RuntimeError(
                "FlatAdam: a parameter was moved to new memory after the optimiser was made "
                "(model.to(...) or p.data = ...); make the optimiser after moving the model"
            )
        self._gather()
        self.optimizer.step()

    # --------------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """torch's per-parameter Adam layout: parameter i's moments are views of the flat ones (saved
        once, as one storage)."""
        inner = self.optimizer.state_dict()
        group = {**inner["param_groups"][0], "params": list(range(len(self.params)))}
        flat_state = inner["state"].get(0)
        state: dict[int, dict[str, Any]] = {}
        if flat_state is not None:
            views = {key: self._views(value) for key, value in flat_state.items() if key != "step"}
            for i in range(len(self.params)):
                # Each its own step tensor: torch's fused Adam, given one tensor shared by all
                # parameters, would count every parameter's step on it.
                state[i] = {"step": flat_state["step"].clone(), **{key: v[i] for key, v in views.items()}}
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Accepts torch's per-parameter Adam layout for these parameters (from `state_dict`, or from
        `torch.optim.Adam(params)` over the same parameters in the same order)."""
        groups = saved["param_groups"]
        ids = [i for group in groups for i in group["params"]]
        if len(ids) != len(self.params):
            raise ValueError(
                f"optimiser state for {len(ids)} parameters, but this model has {len(self.params)}"
            )
        group = {key: value for key, value in groups[0].items() if key != "params"}
        entries = [saved["state"].get(i) for i in ids]
        state: dict[int, dict[str, Any]] = {}
        present = [e for e in entries if e is not None]
        if present:
            # A parameter that never had a gradient has no entry in torch's per-tensor Adam: its
            # moments are zero, as they are here.
            step = torch.tensor(max(float(e["step"]) for e in present), dtype=torch.float32)
            moments = {}
            for key in ("exp_avg", "exp_avg_sq"):
                parts = []
                for i, (e, p) in enumerate(zip(entries, self.params, strict=True)):
                    part = torch.zeros(p.numel()) if e is None else e[key].reshape(-1)
                    if part.numel() != p.numel():
                        raise ValueError(
                            f"optimiser state of parameter {i} has {part.numel()} entries, but the "
                            f"parameter has shape {tuple(p.shape)}"
                        )
                    parts.append(part.to(self.flat))
                moments[key] = torch.cat(parts)
            state[0] = {"step": step, **moments}
        self.optimizer.load_state_dict({"state": state, "param_groups": [{**group, "params": [0]}]})
