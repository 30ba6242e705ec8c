"""The PPO update of MAT: forward, loss, backward and Adam on 3200 samples x N agents, one minibatch,
through `MATAlgorithm.update` (the trainer's own code path), against the matmul rate measured in this run.

    python bench/update.py [--quick] [--json OUT] [--baseline FILE] [--compare-attention]
                           [--compare-fused] [--compare-adam] [--compare-pass] [--ops]
                           [--reference-src DIR]

With `--compare-attention` every row also times the same update with torch's attention kernel instead of
the C++ loops for few tokens (nn/layers.py, `cpp_decode.use_training_attention`), alternating call by
call, and prints the gain. `--compare-fused` does the same with torch's GELU and LayerNorm instead of
the C++ ones (`cpp_decode.use_training_fused`), and `--compare-adam` with torch's Adam over the weight
tensors one by one (fused kernel, and for-loop) instead of Adam over one flat tensor
(`seqmarl.algos.optim.FlatAdam`). `--compare-pass` times the update with MAT's per-layer
autograd pass (torch's matmuls, the C++ attention/GELU/LayerNorm above) instead of its whole forward and
backward as one C++ pass (`cpp_decode.use_training_pass`, nn/mat.py `_TrainingPass`).

With `--reference-src DIR` (a checkout of PKU-MARL/Multi-Agent-Transformer, e.g. be3ff49) every row also
times the reference's own update on the same batch in the same process: its `MultiAgentTransformer`
(imported from DIR, not copied), its PPO loss as its `MATTrainer.ppo_update` computes it (SMAC settings:
clip 0.05, Huber 10, value normaliser, active masks, entropy 0.01, grad clip 10, Adam 5e-4 / eps 1e-5),
fed numpy arrays as its buffer does. The two updates alternate call by call, so load changes hit both.

Model FLOPs per token are counted analytically from the config (bench/common.py states the formula);
achieved GFLOP/s = FLOPs per token x tokens / time (model FLOPs, as model-FLOP utilisation counts them).
The C++ pass does not execute all of them: with discrete actions the first decoder block's q/k/v Linear
runs once per token value (the token table), so "executed FLOPs, of model-shape rate" also prints the
rate of the work actually done. Two matmul rates are measured in the same process:
- model shape: (3200*N x 64) @ (64 x 64) forward and input gradient, (64 x 3200*N) @ (3200*N x 64)
  weight gradient, one of each (the shapes the update is made of);
- square: 2048 x 2048 x 2048 (the machine's best case).
The target (>= 70% of the matmul rate) is read against the model-shape rate; both ratios are printed.

With `--ops` every row also runs a few updates of the per-layer pass (the C++ whole pass runs its own
matmuls, no aten op to time) with each aten call timed (a TorchDispatchMode: the kernel's own time, not
the dispatcher's; the C++ attention/GELU/LayerNorm calls are not aten calls and are left out) and prints
what the matmuls (mm, addmm) take inside the update: their share of the
update's time and their GFLOP/s there. That rate over the model-shape rate is the update's ceiling with
torch's matmuls: the fraction the update would reach if everything but its matmuls took no time.
"""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import common
import torch

from seqmarl.algos.mat import MATAlgorithm
from seqmarl.buffer import RolloutBatch
from seqmarl.config import PPOConfig
from seqmarl.nn import cpp_decode
from seqmarl.nn.mat import MATConfig
from seqmarl.types import DiscreteActions, EnvSpec

OBS_DIM, ACTIONS = 100, 10  # REFERENCE.md 4
# The reference's own update timings on this machine kind (REFERENCE.md 4), for context.
REFERENCE_UPDATE_MS = {3: 88.0, 10: 251.0, 27: 755.0, 64: 3952.0}


class PerTensorAdam:
    """torch's Adam over the weight tensors one by one (as before FlatAdam), with FlatAdam's interface:
    `fused` picks its fused kernel or its for-loop."""

    def __init__(self, params, fused: bool):
        self.params = list(params)
        self.optimizer = torch.optim.Adam(
            self.params, lr=5e-4, eps=1e-5, fused=fused, foreach=False if not fused else None
        )
        self.param_groups = self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm)

    def step(self) -> None:
        self.optimizer.step()


def synthetic_batch(samples: int, N: int, device: torch.device) -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(samples, N, ACTIONS, generator=g) > 0.3
    mask[..., 0] = True
    actions = torch.multinomial(mask.reshape(-1, ACTIONS).float(), 1, generator=g).reshape(samples, N)
    batch = RolloutBatch(
        obs=torch.randn(samples, N, OBS_DIM, generator=g),
        state=torch.randn(samples, OBS_DIM, generator=g),  # not read by MAT
        action_mask=mask,
        alive=torch.rand(samples, N, generator=g) > 0.05,
        actions=actions,
        log_prob=-torch.rand(samples, N, generator=g) * 2.0,
        values=torch.randn(samples, N, generator=g) * 0.1,
        advantages=torch.randn(samples, generator=g),
        returns=torch.randn(samples, generator=g),
    )
    return RolloutBatch(*(getattr(batch, f).to(device) for f in batch.__dataclass_fields__))


def load_reference(src: Path) -> types.SimpleNamespace:
    """The reference's model and value normaliser, imported from a checkout without running its
    `mat/__init__.py` (which imports every simulator)."""
    if not (src / "mat" / "algorithms" / "mat" / "algorithm" / "ma_transformer.py").is_file():
        sys.exit(f"--reference-src {src}: not a checkout of PKU-MARL/Multi-Agent-Transformer")
    package = types.ModuleType("mat")
    package.__path__ = [str(src / "mat")]
    sys.modules["mat"] = package
    from mat.algorithms.mat.algorithm.ma_transformer import MultiAgentTransformer
    from mat.utils.util import huber_loss
    from mat.utils.valuenorm import ValueNorm

    return types.SimpleNamespace(model=MultiAgentTransformer, value_norm=ValueNorm, huber=huber_loss)


def reference_update(
    ref: types.SimpleNamespace, batch: RolloutBatch, device: torch.device
) -> Callable[[], None]:
    """One update of the reference MAT on `batch`, written after its MATTrainer.ppo_update (SMAC
    settings). Inputs go in as numpy arrays, as its buffer hands them over."""
    S, N = batch.actions.shape
    torch.manual_seed(0)
    model = ref.model(OBS_DIM, OBS_DIM, ACTIONS, N, 1, 64, 1, device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, eps=1e-5)
    value_norm = ref.value_norm(1, device=device)
    obs, actions = batch.obs.cpu().numpy(), batch.actions.unsqueeze(-1).cpu().numpy()
    available = batch.action_mask.float().cpu().numpy()
    old_log_prob, old_value = batch.log_prob.unsqueeze(-1), batch.values.unsqueeze(-1)  # (S, N, 1)
    advantages = batch.advantages[:, None, None].expand(S, N, 1)
    returns = batch.returns[:, None].expand(S, N).reshape(-1, 1)  # the normaliser's (S*N, 1) layout
    active = batch.alive.float().unsqueeze(-1)
    clip = 0.05

    def update() -> None:
        log_prob, value, entropy = model(obs, obs, actions, available)
        ratio = torch.exp(log_prob - old_log_prob)
        surrogate = torch.min(ratio * advantages, torch.clamp(ratio, 1 - clip, 1 + clip) * advantages)
        policy_loss = (-surrogate.sum(-1, keepdim=True) * active).sum() / active.sum()
        value_norm.update(returns)
        target = value_norm.normalize(returns).reshape(S, N, 1)
        clipped = old_value + (value - old_value).clamp(-clip, clip)
        value_loss = torch.max(ref.huber(target - value, 10.0), ref.huber(target - clipped, 10.0))
        value_loss = (value_loss * active).sum() / active.sum()
        loss = policy_loss - entropy.mean() * 0.01 + value_loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()

    return update


def bench_row(
    N: int,
    samples: int,
    repeats: int,
    device: torch.device,
    square_rate: float,
    ref: types.SimpleNamespace | None = None,
    compare_attention: bool = False,
    compare_fused: bool = False,
    compare_adam: bool = False,
    ops: bool = False,
    compare_pass: bool = False,
) -> dict:
    spec = EnvSpec("bench", N, OBS_DIM, OBS_DIM, DiscreteActions(ACTIONS), 100, False)
    torch.manual_seed(0)
    algorithm = MATAlgorithm(spec, MATConfig(), PPOConfig(epochs=1, num_minibatches=1), device)
    batch = synthetic_batch(samples, N, device)
    generator = torch.Generator().manual_seed(0)

    c = cpp_decode
    switches = (c.use_training_attention, c.use_training_fused, c.use_training_pass)  # as the user left them
    fused_adam = algorithm.optimizer
    # The optimisers step the same weights, each keeping its own moments: the times are what matter.
    per_tensor = (
        [PerTensorAdam(algorithm.model.parameters(), fused) for fused in (True, False)]
        if compare_adam
        else []
    )

    def update(attention: bool, fused: bool, whole: bool, optimizer) -> Callable:
        def run() -> None:
            cpp_decode.use_training_attention, cpp_decode.use_training_fused = attention, fused
            cpp_decode.use_training_pass = whole
            algorithm.optimizer = optimizer
            algorithm.update(batch, 5e-4, generator)

        return run

    fns = {"ours": update(*switches, fused_adam)}
    per_layer = update(switches[0], switches[1], False, fused_adam)  # layer by layer, not one C++ pass
    if compare_attention:  # the same update with torch's attention kernel throughout
        fns["sdpa"] = update(False, switches[1], False, fused_adam)
    if compare_fused:  # ... with torch's GELU and LayerNorm
        fns["torch_fused"] = update(switches[0], False, False, fused_adam)
    if compare_pass:  # ... layer by layer through autograd, not as one C++ pass
        fns["per_layer"] = per_layer
    if per_tensor:  # ... with torch's Adam tensor by tensor: its fused kernel, and its for-loop
        fns["per_tensor_adam"] = update(*switches, per_tensor[0])
        fns["loop_adam"] = update(*switches, per_tensor[1])
    if ref is not None:
        fns["reference"] = reference_update(ref, batch, device)
    try:
        if len(fns) == 1:
            update_ms = common.time_ms(fns["ours"], device, repeats, warmup=2)
            timed = {}
        else:
            timed = common.time_alternating_ms(fns, device, repeats, warmup=2)
            update_ms = timed["ours"]
    finally:
        c.use_training_attention, c.use_training_fused, c.use_training_pass = switches
        algorithm.optimizer = fused_adam
    reference_same_run_ms, sdpa_ms = timed.get("reference"), timed.get("sdpa")
    torch_fused_ms, loop_adam_ms = timed.get("torch_fused"), timed.get("loop_adam")
    per_tensor_adam_ms = timed.get("per_tensor_adam")
    per_layer_ms = timed.get("per_layer")
    tokens = samples * N
    shape = common.ModelShape(N, OBS_DIM, ACTIONS, discrete=True)
    flops_per_token = common.train_flops_per_token(shape)
    achieved = flops_per_token * tokens / (update_ms / 1e3) / 1e9
    # The C++ pass skips some of the counted work (the token table); the rate of what it executes:
    whole_pass = cpp_decode.pass_name("auto", device) == "cpp"
    skipped = common.token_table_flops_per_token(shape) if whole_pass else 0.0
    executed = (flops_per_token - skipped) * tokens / (update_ms / 1e3) / 1e9
    model_rate = common.model_shape_gflops(tokens, 64, device)
    # The same ratio with the update and the matmuls timed in turn, round by round (common.py): the
    # ratio above compares the update's median with the best of three later matmul readings.
    interleaved, interleaved_rate = common.interleaved_fraction(
        fns["ours"], flops_per_token * tokens, tokens, 64, device, repeats
    )
    # The aten matmuls are those of the per-layer pass: the C++ pass runs its own (no aten op to time).
    split = op_split(per_layer, device) if ops else {}
    matmul_rate = split["matmul_flops"] / split["matmul_ms"] / 1e6 if split else None
    if split:
        top = sorted(split["op_ms"].items(), key=lambda kv: -kv[1])[:6]
        print(f"  N={N}: aten ms per update: " + ", ".join(f"{k} {v:.1f}" for k, v in top), file=sys.stderr)
    return {
        "name": f"N={N}/samples={samples}",
        "N": N,
        "samples": samples,
        "update_ms": update_ms,
        "reference_ms": REFERENCE_UPDATE_MS.get(N) if samples == 3200 else None,
        "reference_same_run_ms": reference_same_run_ms,
        "ours_over_reference": update_ms / reference_same_run_ms if reference_same_run_ms else None,
        "train_attention": cpp_decode.attention_name("auto", device, tokens=N),
        "sdpa_attention_ms": sdpa_ms,
        "attention_gain": sdpa_ms / update_ms if sdpa_ms else None,
        "train_fused": cpp_decode.fused_name("auto", device),
        "train_pass": cpp_decode.pass_name("auto", device),
        "per_layer_ms": per_layer_ms,
        "pass_gain": per_layer_ms / update_ms if per_layer_ms else None,
        "torch_fused_ms": torch_fused_ms,
        "fused_gain": torch_fused_ms / update_ms if torch_fused_ms else None,
        "adam": "flat, fused" if fused_adam.fused else "flat, for-loop",
        "per_tensor_adam_ms": per_tensor_adam_ms,
        "flat_adam_gain": per_tensor_adam_ms / update_ms if per_tensor_adam_ms else None,
        "loop_adam_ms": loop_adam_ms,
        "adam_gain": loop_adam_ms / update_ms if loop_adam_ms else None,
        "tokens_per_s": tokens / (update_ms / 1e3),
        "mflops_per_token": flops_per_token / 1e6,
        "gflops": achieved,
        "matmul_model_shape_gflops": model_rate,
        "matmul_square_gflops": square_rate,
        "fraction_of_model_shape_rate": achieved / model_rate,
        "interleaved_fraction_of_model_shape_rate": interleaved,
        "interleaved_model_shape_gflops": interleaved_rate,
        "executed_gflops": executed,
        "executed_fraction_of_model_shape_rate": executed / model_rate,
        "fraction_of_square_rate": achieved / square_rate,
        "matmul_ms_in_update": split.get("matmul_ms"),
        "matmul_share_of_update": split["matmul_ms"] / update_ms if split else None,
        "matmul_gflops_in_update": matmul_rate,
        "ceiling_of_model_shape_rate": matmul_rate / model_rate if split else None,
        "aten_ms_per_update": split.get("op_ms"),
    }


def op_split(update: Callable[[], None], device: torch.device, updates: int = 3) -> dict:
    """Kernel time per aten op over `updates` calls of `update`, per update; the matmuls' FLOPs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    op_ms: dict[str, float] = {}
    matmul_flops = 0.0

    class Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal matmul_flops
            common.synchronize(device)
            start = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            common.synchronize(device)
            name = func.overloadpacket.__name__
            op_ms[name] = op_ms.get(name, 0.0) + (time.perf_counter() - start) * 1e3 / updates
            if name in ("mm", "addmm"):
                a, b = args[-2], args[-1]  # addmm(bias, a, b), mm(a, b)
                matmul_flops += 2.0 * a.shape[0] * a.shape[1] * b.shape[1] / updates
            return out

    with Timer():
        for _ in range(updates):
            update()
    matmul_ms = op_ms.get("mm", 0.0) + op_ms.get("addmm", 0.0)
    return {"op_ms": op_ms, "matmul_ms": matmul_ms, "matmul_flops": matmul_flops}


def main() -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, nargs="+", default=[3, 10, 27, 64])
    p.add_argument("--samples", type=int, default=3200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--reference-src",
        type=Path,
        metavar="DIR",
        help="a checkout of PKU-MARL/Multi-Agent-Transformer: time its update beside ours, alternating",
    )
    p.add_argument(
        "--compare-attention",
        action="store_true",
        help="also time the same update with torch's attention kernel (not the C++ one), alternating",
    )
    p.add_argument(
        "--compare-fused",
        action="store_true",
        help="also time the same update with torch's GELU and LayerNorm (not the C++ ones), alternating",
    )
    p.add_argument(
        "--compare-adam",
        action="store_true",
        help="also time the same update with torch's Adam tensor by tensor (fused, for-loop), alternating",
    )
    p.add_argument(
        "--compare-pass",
        action="store_true",
        help="also time the same update layer by layer through autograd (not as one C++ pass), alternating",
    )
    p.add_argument(
        "--ops",
        action="store_true",
        help="also time each aten op inside the update: the matmuls' share, their rate there, the ceiling",
    )
    args = p.parse_args()
    if args.quick:
        args.agents, args.samples, args.repeats = [3], 64, 2
    device = common.setup(args)
    machine = common.machine(device)
    print(
        f"# update: {machine['cpu']} / {machine['device']}, torch {machine['torch']}, "
        f"{machine['threads']} threads, malloc {machine['malloc']}, load {machine['load_average']}, "
        f"commit {machine['commit']}"
    )
    square_rate = common.square_gflops(device, size=256 if args.quick else 2048)
    ref = load_reference(args.reference_src) if args.reference_src else None
    rows = []
    for N in args.agents:
        compare = (args.compare_attention, args.compare_fused, args.compare_adam, args.ops, args.compare_pass)
        row = bench_row(N, args.samples, args.repeats, device, square_rate, ref, *compare)
        rows.append(row)
        print(f"  {rows[-1]['name']}: {rows[-1]['update_ms']:.1f} ms", file=sys.stderr)
    common.print_table(
        rows,
        [
            ("N", "N", "d"),
            ("samples", "samples", "d"),
            ("update_ms", "update ms", ".1f"),
            ("reference_ms", "reference MAT ms (REFERENCE.md 4)", ".0f"),
            *(
                [
                    ("reference_same_run_ms", "reference MAT ms, this run", ".1f"),
                    ("ours_over_reference", "ours / reference", ".2f"),
                ]
                if ref
                else []
            ),
            ("train_attention", "attention", "s"),
            *(
                [
                    ("sdpa_attention_ms", "with torch's attention ms", ".1f"),
                    ("attention_gain", "C++ attention gain", ".2f"),
                ]
                if args.compare_attention
                else []
            ),
            ("train_fused", "GELU/LayerNorm", "s"),
            *(
                [
                    ("torch_fused_ms", "with torch's GELU/LayerNorm ms", ".1f"),
                    ("fused_gain", "C++ GELU/LayerNorm gain", ".2f"),
                ]
                if args.compare_fused
                else []
            ),
            ("train_pass", "pass", "s"),
            *(
                [("per_layer_ms", "per-layer pass ms", ".1f"), ("pass_gain", "whole-pass gain", ".2f")]
                if args.compare_pass
                else []
            ),
            ("adam", "Adam", "s"),
            *(
                [
                    ("per_tensor_adam_ms", "per-tensor fused Adam ms", ".1f"),
                    ("flat_adam_gain", "flat Adam gain", ".2f"),
                    ("loop_adam_ms", "per-tensor for-loop Adam ms", ".1f"),
                    ("adam_gain", "gain over for-loop", ".2f"),
                ]
                if args.compare_adam
                else []
            ),
            ("tokens_per_s", "tokens/s", ",.0f"),
            ("mflops_per_token", "MFLOP/token (fwd+bwd)", ".3f"),
            ("gflops", "achieved GFLOP/s", ".1f"),
            ("matmul_model_shape_gflops", "matmul GFLOP/s, model shape", ".1f"),
            ("fraction_of_model_shape_rate", "of model-shape rate", ".0%"),
            ("executed_fraction_of_model_shape_rate", "executed FLOPs, of model-shape rate", ".0%"),
            ("interleaved_model_shape_gflops", "model-shape GFLOP/s, interleaved", ".1f"),
            ("interleaved_fraction_of_model_shape_rate", "of model-shape rate, interleaved", ".0%"),
            ("matmul_square_gflops", "matmul GFLOP/s, square", ".1f"),
            ("fraction_of_square_rate", "of square rate", ".0%"),
            *(
                [
                    ("matmul_share_of_update", "matmuls' share of the update", ".0%"),
                    ("matmul_gflops_in_update", "matmul GFLOP/s inside the update", ".1f"),
                    ("ceiling_of_model_shape_rate", "ceiling (of model-shape rate)", ".0%"),
                ]
                if args.ops
                else []
            ),
        ],
    )
    common.write_json(args.json, {"benchmark": "update", "machine": machine, "rows": rows})
    ok = common.compare_with_baseline(rows, args.baseline, "update_ms", higher_is_better=False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
