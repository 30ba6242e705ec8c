"""MAT action generation: the key/value cache against the same weights decoded without one.

For every row the same model acts on the same observations with the same generator seed: with the cache
(one decoder token per agent) and without one, the whole decoder recomputed for every agent i over
- the prefix 0..i ("uncached", the headline ratio: the cheapest decoding without a cache), and
- all N tokens ("whole sequence": exactly the reference's loop, twice the prefix's work).
The outputs must agree: identical discrete actions, and log-probs / continuous actions within 1e-4
(float32 rounding: the paths multiply matrices of different shapes).
The cached loop is the C++ one (csrc/decode.cpp) when it builds; the same loop in Python is timed
beside it ("C++ gain") and must give the same actions. Where the fused CPU loop runs (x86-64 with
AVX2/FMA), the C++ loop of ATen ops it replaces is timed too ("fused gain"). On a GPU, the call the
rollout makes (torch's default generator) is timed as a CUDA graph replay too ("graph gain";
nn/cuda_graph.py), and its greedy outputs must be the eager call's.

    python bench/decode.py [--quick] [--json OUT] [--baseline FILE] [--decode auto|cpp|python]

Model: n_embd 64, 1 block, 1 head, obs 100, 10 discrete actions or 3 continuous dims (REFERENCE.md 4).
"""

from __future__ import annotations

import dataclasses
import sys

import common
import torch

from seqmarl.nn import cpp_decode
from seqmarl.nn.mat import MATConfig, MultiAgentTransformer
from seqmarl.types import ContinuousActions, DiscreteActions, EnvSpec

OBS_DIM = 100
SPACES = {"discrete": DiscreteActions(10), "continuous": ContinuousActions(3, (-1.0,) * 3, (1.0,) * 3)}
# The reference's own rollout timings on this machine kind (REFERENCE.md 4, discrete, 32 envs), for context.
REFERENCE_ROLLOUT_MS = {3: 3.1, 10: 12.4, 27: 45.6, 64: 230.0}
TOLERANCE = 1e-4  # largest allowed |cached - uncached| for log-probs and continuous actions


def make_inputs(space_name: str, N: int, envs: int, device: torch.device):
    torch.manual_seed(0)
    space = SPACES[space_name]
    spec = EnvSpec("bench", N, OBS_DIM, OBS_DIM, space, 100, False)
    model = MultiAgentTransformer(MATConfig(), spec).to(device).eval()
    with torch.no_grad():  # move away from the near-constant outputs of the tiny init gains
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    obs = torch.randn(envs, N, OBS_DIM, device=device)
    mask = torch.rand(envs, N, space.mask_width, device=device) > 0.3
    mask[..., 0] = True
    return model, obs, mask


def generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(1234)


def bench_row(
    space_name: str,
    N: int,
    envs: int,
    uncached: bool,
    repeats: int,
    device: torch.device,
    decode_mode: str,
    compare_python: bool,
):
    model, obs, mask = make_inputs(space_name, N, envs, device)
    model.config = dataclasses.replace(model.config, decode=decode_mode)

    def act(use_cache: bool, whole_sequence: bool = False):
        return model.act(obs, mask, False, generator(device), use_cache, whole_sequence)

    cached_ms = common.time_ms(lambda: act(True), device, repeats)
    row = {
        "name": f"{space_name}/N={N}/envs={envs}",
        "space": space_name,
        "N": N,
        "envs": envs,
        "decode": decode_mode,
        "cached_ms": cached_ms,
        "reference_ms": REFERENCE_ROLLOUT_MS.get(N) if space_name == "discrete" and envs == 32 else None,
    }
    if compare_python and decode_mode != "python":
        # the same cached loop in Python (the fallback when the C++ step cannot be built)
        model.config = dataclasses.replace(model.config, decode="python")
        row["python_cached_ms"] = common.time_ms(lambda: act(True), device, repeats)
        row["cpp_gain"] = row["python_cached_ms"] / cached_ms
        python_actions = act(True).actions
        model.config = dataclasses.replace(model.config, decode=decode_mode)
        same = act(True).actions
        row["python_same_actions"] = bool((same - python_actions).abs().max() <= TOLERANCE)
    if decode_mode == "cpp" and cpp_decode.use_fused_loop and cpp_decode.extension("cpp").fused_available():
        # the C++ loop of ATen ops, which the fused CPU loop replaces where the CPU has AVX2/FMA
        cpp_decode.use_fused_loop = False
        try:
            row["aten_cached_ms"] = common.time_ms(lambda: act(True), device, repeats)
        finally:
            cpp_decode.use_fused_loop = True
        row["fused_gain"] = row["aten_cached_ms"] / cached_ms
    if device.type == "cuda" and model.config.cuda_graphs:
        # The call the rollout makes (torch's default generator), replayed from a CUDA graph; its greedy
        # actions must be the eager call's.
        row["graph_ms"] = common.time_ms(lambda: model.act(obs, mask), device, repeats)
        row["graph_gain"] = cached_ms / row["graph_ms"]
        graphed = model.act(obs, mask, True)
        model.config = dataclasses.replace(model.config, cuda_graphs=False)
        eager = model.act(obs, mask, True)
        model.config = dataclasses.replace(model.config, cuda_graphs=True)
        row["graph_same_greedy"] = bool(
            (graphed.actions - eager.actions).abs().max() <= TOLERANCE
            and (graphed.log_prob - eager.log_prob).abs().max() <= TOLERANCE
        )
    if uncached:
        # The slow paths are timed fewer times (at N=256 one call takes seconds), warmed up where cheap.
        slow_repeats, slow_warmup = max(1, repeats // 5), int(N <= 64)
        row["uncached_ms"] = common.time_ms(lambda: act(False), device, slow_repeats, slow_warmup)
        row["speedup"] = row["uncached_ms"] / cached_ms
        row["sequence_ms"] = common.time_ms(lambda: act(False, True), device, slow_repeats, slow_warmup)
        row["sequence_speedup"] = row["sequence_ms"] / cached_ms
        a, b, c = act(True), act(False), act(False, True)
        row["max_log_prob_diff"] = max(float((a.log_prob - x.log_prob).abs().max()) for x in (b, c))
        if space_name == "discrete":
            row["actions_equal"] = bool(
                torch.equal(a.actions, b.actions) and torch.equal(a.actions, c.actions)
            )
        else:
            row["max_action_diff"] = max(float((a.actions - x.actions).abs().max()) for x in (b, c))
            row["actions_equal"] = row["max_action_diff"] <= TOLERANCE
        row["outputs_match"] = row["actions_equal"] and row["max_log_prob_diff"] <= TOLERANCE
    for check in ("python_same_actions", "graph_same_greedy"):
        if check in row:
            row["outputs_match"] = row.get("outputs_match", True) and row[check]
    return row


def main() -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, nargs="+", default=[3, 10, 27, 64, 256, 1024])
    p.add_argument("--envs", type=int, default=32)
    p.add_argument("--uncached-max-n", type=int, default=256, help="skip the O(N^2) paths above this N")
    p.add_argument("--large-n-envs", type=int, default=8, help="also time the largest N with this many envs")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--decode",
        choices=cpp_decode.MODES,
        default="auto",
        help="cached decode loop: C++ (auto/cpp) or Python; with C++, the Python loop is timed too",
    )
    args = p.parse_args()
    if args.quick:
        args.agents, args.envs, args.large_n_envs, args.repeats = [3, 9], 4, 2, 2
    device = common.setup(args)
    machine = common.machine(device)
    # "auto" resolves here, once: the C++ step if it builds, else Python (and nothing to compare)
    decode = "cpp" if args.decode != "python" and cpp_decode.extension(args.decode) is not None else "python"
    machine["decode"] = decode
    modes = (decode, decode == "cpp")
    print(
        f"# decode: {machine['cpu']} / {machine['device']}, torch {machine['torch']}, "
        f"{machine['threads']} threads, malloc {machine['malloc']}, load {machine['load_average']}, "
        f"commit {machine['commit']}"
    )

    rows = []
    for space_name in SPACES:
        for N in args.agents:
            uncached = N <= args.uncached_max_n
            rows.append(bench_row(space_name, N, args.envs, uncached, args.repeats, device, *modes))
            print(f"  {rows[-1]['name']}: {rows[-1]['cached_ms']:.2f} ms", file=sys.stderr)
        if args.large_n_envs:
            N = max(args.agents)
            repeats = max(1, args.repeats // 3)
            rows.append(bench_row(space_name, N, args.large_n_envs, False, repeats, device, *modes))

    common.print_table(
        rows,
        [
            ("space", "actions", "s"),
            ("N", "N", "d"),
            ("envs", "envs", "d"),
            ("decode", "cached loop", "s"),
            ("cached_ms", "cached ms", ".2f"),
            ("python_cached_ms", "Python loop ms", ".2f"),
            ("cpp_gain", "C++ gain", ".1f"),
            ("aten_cached_ms", "C++ ATen loop ms", ".2f"),
            ("fused_gain", "fused gain", ".1f"),
            ("graph_ms", "CUDA graph ms", ".2f"),
            ("graph_gain", "graph gain", ".1f"),
            ("uncached_ms", "uncached ms", ".1f"),
            ("speedup", "speedup", ".1f"),
            ("sequence_ms", "whole-sequence ms", ".1f"),
            ("sequence_speedup", "speedup vs whole sequence", ".1f"),
            ("outputs_match", "same outputs", ""),
            ("max_log_prob_diff", "max |dlogp|", ".1e"),
            ("reference_ms", "reference MAT ms (REFERENCE.md 4)", ".1f"),
        ],
    )
    mismatched = [row["name"] for row in rows if row.get("outputs_match") is False]
    if mismatched:
        print(f"cached and uncached outputs differ: {mismatched}")
    common.write_json(args.json, {"benchmark": "decode", "machine": machine, "rows": rows})
    ok = common.compare_with_baseline(rows, args.baseline, "cached_ms", higher_is_better=False)
    return 0 if ok and not mismatched else 1


if __name__ == "__main__":
    sys.exit(main())
