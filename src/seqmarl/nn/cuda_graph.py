"""A call replayed from a CUDA graph: MAT's acting on a GPU (nn/mat.py `MultiAgentTransformer.act`).

On a GPU, acting at the model's sizes is launch-bound: the cached decode issues a few dozen tiny kernels
per agent, each costing more to launch than to run (docs/performance.md, "On a CUDA GPU"). A CUDA graph
records the whole call once per input signature and then launches it as one unit.

What a replay reads, and so when a recorded graph is still valid:
- the input tensors are copied into the graph's own input buffers before each replay;
- the weights are read where they lie: in-place changes (the optimiser's step, `load_state_dict` into the
  same tensors) are seen by the next replay, but a parameter moved to new memory (`.to()`, `p.data = ...`,
  `load_state_dict(assign=True)`) is not. The key therefore holds every parameter's (and buffer's)
  address, so such a change records a new graph instead of replaying a stale one (and a graph whose
  addresses all hold the current tensors again reads them correctly);
- random draws come from torch's default CUDA generator, which advances on every replay (graph-safe
  Philox offsets): a seeded run repeats, but its draws differ from the eager call's.
The outputs are copied out of the graph's buffers, which the next replay overwrites.

A call that cannot be recorded (an op that waits on the host, say) raises inside the capture; the
wrapper then runs eagerly from there on and says so once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable

import torch

MAX_GRAPHS = 16  # recorded signatures kept per wrapper; the oldest goes first (each holds its own memory)


Fn = Callable[..., tuple[torch.Tensor, ...]]


class GraphedCall:
    """`fn(*tensors, *flags)` -> tuple of tensors, replayed from a CUDA graph per signature: the tensors'
    shapes, dtypes and device, the hashable `flags`, and the addresses of `params` (see module doc).
    `fn` is passed on every call rather than kept, so that a copied model never replays its original's
    graphs; a copy starts with none."""

    def __init__(self, name: str):
        self.name = name
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple]] = {}
        self.failure: str | None = None

    def __deepcopy__(self, memo: dict) -> GraphedCall:
        return GraphedCall(self.name)

    def __getstate__(self) -> dict:
        return {"name": self.name, "graphs": {}, "failure": None}

    def __call__(
        self, fn: Fn, params: list[torch.Tensor], tensors: list[torch.Tensor], flags: tuple
    ) -> tuple:
        if self.failure is not None:
            return fn(*tensors, *flags)
        key = (
            tuple((t.shape, t.dtype, t.device) for t in tensors),
            flags,
            tuple(p.data_ptr() for p in params),
        )
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._record(fn, tensors, flags)
            except RuntimeError as error:
                self.failure = " ".join(str(error).split())[:300]
                print(f"seqmarl: {self.name} runs without a CUDA graph ({self.failure})", file=sys.stderr)
                return fn(*tensors, *flags)
            if len(self.graphs) >= MAX_GRAPHS:
                self.graphs.pop(next(iter(self.graphs)))
            self.graphs[key] = entry
        graph, inputs, outputs = entry
        for buffer, tensor in zip(inputs, tensors):
            buffer.copy_(tensor)
        graph.replay()
        return tuple(o.clone() for o in outputs)

    @staticmethod
    def _record(fn: Fn, tensors: list[torch.Tensor], flags: tuple):
        device = tensors[0].device
        inputs = [t.clone() for t in tensors]
        # Warm up on a side stream first (lazy library set-up must not land inside the capture), with the
        # generator put back afterwards: recording consumes no draws, so a run resumed from a checkpoint
        # (whose new process records its graphs again) draws what the uninterrupted run drew.
        rng = torch.cuda.get_rng_state(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn(*inputs, *flags)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.set_rng_state(rng, device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn(*inputs, *flags)
        return graph, inputs, tuple(outputs)
