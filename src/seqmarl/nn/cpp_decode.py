"""Loads the C++ cached decode loop (csrc/decode.cpp), built on first use with torch's extension builder.

`MATConfig.decode` picks the implementation of the cached decode:
- "auto" (default): the C++ loop when it builds on this machine, else the Python loop with a one-line
  notice. Both compute the same maths (the C++ attention sums in another order), so they choose the
  same actions, with policy outputs equal within float32 rounding.
- "cpp": the C++ loop; a machine that cannot build it is a user error.
- "python": the Python loop (`MultiAgentTransformer._decode_cached`).

The build needs a C++ compiler and ninja (the `ninja` wheel is a dependency). It takes about a minute,
once per machine and torch version: torch keeps the result under TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions) and reuses it while the source is unchanged; concurrent processes wait on
torch's lock instead of building twice.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import sys
import threading
import time
from importlib import resources
from types import ModuleType

import torch

from seqmarl.errors import UserError

MODES = ("auto", "cpp", "python")

# Inside the C++ module, CPU float32 decoding on an x86-64 CPU with AVX2 and FMA runs a fused loop
# (raw rows, hand-vectorised matmuls, one batch slice per thread); anything else runs the loop of ATen
# ops. Set this to False to force the ATen loop everywhere: the tests and bench/decode.py compare the two.
use_fused_loop = True
# The same module also holds attention forward/backward loops for the update's sequences of few tokens
# (nn/layers.py `Attention`), used for CPU float32 with AVX2/FMA up to this many tokens; False (or
# model.decode=python) leaves training attention to torch's kernel: the tests compare the two.
use_training_attention = True
# The whole update with these loops against torch's kernel, 2 threads (OpenMP), at N = 3 / 27 / 32 / 64
# agents: 1.53x / 1.15-1.17x / 1.10x / 0.91x as fast (1 thread at 27 / 64: 1.02x / 0.88x;
# docs/performance.md), hence the limit.
TRAINING_ATTENTION_MAX_TOKENS = 32
# And GELU, residual + LayerNorm, and the masked categorical's log-prob and entropy forward/backward in
# one pass each (nn/layers.py `gelu`, `add_layer_norm`; nn/distributions.py
# `masked_categorical_log_prob_entropy`), for CPU float32 with AVX2/FMA at any size; False leaves them
# to torch.
use_training_fused = True
# And MAT's whole forward and backward in the update as one C++ pass (nn/mat.py `_TrainingPass`): CPU
# float32 with AVX2/FMA, post-LayerNorm blocks; False keeps the per-layer autograd pass (the tests
# compare the two, bench/update.py --compare-pass times them).
use_training_pass = True
LAYER_NORM_EPS = 1e-5  # the C++ LayerNorm's epsilon (nn.LayerNorm's default); other values go to torch
NAME = "seqmarl_decode"

_lock = threading.Lock()
_module: ModuleType | None = None
_failure: str | None = None  # why the build failed; set once, then "auto" falls back silently


def _add_ninja_to_path() -> None:
    """torch runs `ninja` from PATH; the `ninja` wheel puts it next to the interpreter, which is not on
    PATH when a virtual environment is used without activating it (as the Makefile does)."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja

        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([d for d in dirs if d not in path] + path)


def _build_root() -> str:
    from torch.utils.cpp_extension import get_default_build_root

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


def _already_built() -> bool:
    return bool(glob.glob(os.path.join(_build_root(), "**", f"{NAME}*.so"), recursive=True))


# torch's builder holds `<root>/<name>/lock` while it compiles and every other process waits, silently
# and for ever, while the file exists. A process killed mid-build (Ctrl-C, a timeout) leaves it behind.
# A build takes about a minute (a few on a loaded machine), so a lock older than this is stale.
STALE_BUILD_LOCK_SECONDS = 900


def _clear_stale_lock(build_dir: str) -> None:
    lock = os.path.join(build_dir, "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return  # no lock: nobody is building
    if age > STALE_BUILD_LOCK_SECONDS:
        print(
            f"seqmarl: removing {lock}, left {age / 60:.0f} minutes ago by a build that was stopped",
            file=sys.stderr,
        )
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)
    else:
        print(
            f"seqmarl: waiting for another process to finish building the C++ decode step ({lock}; "
            f"if no build is running, delete that file)",
            file=sys.stderr,
        )


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load

    compiler = os.environ.get("CXX", "c++")  # what torch's build runs
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH")
    _add_ninja_to_path()
    if not _already_built():
        print("seqmarl: building the C++ decode step (once per machine, about a minute)...", file=sys.stderr)
    _clear_stale_lock(os.path.join(_build_root(), NAME))
    source = resources.files("seqmarl.nn") / "csrc" / "decode.cpp"
    with resources.as_file(source) as path:
        return load(NAME, [str(path)], extra_cflags=["-O3", *openmp_flags()], verbose=False)


def openmp_flags() -> list[str]:
    """`-fopenmp` where torch itself runs on OpenMP (its Linux wheels). Without it, `at::parallel_for` in
    csrc/decode.cpp compiles to a plain serial loop, and every C++ loop ran on one thread whatever
    `run.threads` said (docs/performance.md, "OpenMP in the C++ loops"). Only the compile flag: the
    module links no OpenMP runtime of its own, its GOMP_* calls resolve to the one torch has loaded."""
    return ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []


def check_mode(mode: str) -> None:
    """A `model.decode` value that is not one of MODES is a user error (MATConfig checks it too)."""
    if mode not in MODES:
        raise UserError(f"model.decode must be one of {', '.join(MODES)}, got {mode!r}")


def loop_name(mode: str, device: torch.device) -> str:
    """Which cached decode loop acts for float32 weights on `device`: "python", "cpp-aten" or
    "cpp-fused". The three round differently, so run directories record it (meta.json)."""
    module = extension(mode)
    if module is None:
        return "python"
    if device.type == "cpu" and use_fused_loop and module.fused_available():
        return "cpp-fused"
    return "cpp-aten"


def _vector_module(mode: str, x: torch.Tensor) -> ModuleType | None:
    """The module when its AVX2/FMA loops can take `x`: CPU float32, mode auto/cpp, a CPU with AVX2/FMA."""
    if mode == "python" or x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    module = extension(mode)
    return module if module is not None and module.fused_available() else None


def training_attention(mode: str, x: torch.Tensor) -> ModuleType | None:
    """The module whose `attention_forward` / `attention_backward` run attention over the tokens of
    `x` (B, L, H, D), or None for torch's kernel: another device or dtype, more tokens than
    TRAINING_ATTENTION_MAX_TOKENS, no AVX2/FMA, mode "python", or the switch above off."""
    if not use_training_attention or x.shape[1] > TRAINING_ATTENTION_MAX_TOKENS:
        return None
    return _vector_module(mode, x)


def training_kernels(mode: str, x: torch.Tensor) -> ModuleType | None:
    """The module whose GELU, residual + LayerNorm and masked categorical loops take `x`, or None for
    torch's: another device or dtype, no AVX2/FMA, mode "python", or `use_training_fused` off."""
    return _vector_module(mode, x) if use_training_fused else None


def training_pass(mode: str, x: torch.Tensor) -> ModuleType | None:
    """The module whose `training_forward` / `training_backward` run MAT's whole update pass on `x`'s
    device and dtype, or None for the per-layer autograd pass."""
    return _vector_module(mode, x) if use_training_pass else None


def pass_name(mode: str, device: torch.device) -> str:
    """How MAT's update runs its forward and backward on `device` (float32, post-LayerNorm): "cpp" (one C++
    pass) or "per-layer" (autograd) (meta.json, bench/update.py)."""
    return "cpp" if training_pass(mode, torch.empty(1, device=device)) is not None else "per-layer"


def attention_name(mode: str, device: torch.device, tokens: int = 1) -> str:
    """Which kernel attends in training on `device` (float32) over `tokens` tokens: "cpp" or "sdpa"
    (meta.json, bench/update.py)."""
    probe = torch.empty(1, tokens, 1, 1, device=device)
    return "cpp" if training_attention(mode, probe) is not None else "sdpa"


def fused_name(mode: str, device: torch.device) -> str:
    """Which GELU / LayerNorm kernels run in training on `device` (float32): "cpp" or "torch" (meta.json)."""
    return "cpp" if training_kernels(mode, torch.empty(1, device=device)) is not None else "torch"


def extension(mode: str) -> ModuleType | None:
    """The compiled module for `mode` ("auto"/"cpp"), or None to decode in Python."""
    global _module, _failure
    check_mode(mode)
    if mode == "python":
        return None
    with _lock:
        if _module is None and _failure is None:
            try:
                _module = _build()
            except Exception as error:  # no compiler, no ninja, a failed build: say why, keep going
                # the end of a failed build's log says why; the start only repeats the command
                text = " ".join(str(error).split())
                _failure = (text if len(text) <= 300 else "..." + text[-300:]) or type(error).__name__
                if mode == "auto":
                    print(
                        f"seqmarl: the C++ decode step is unavailable ({_failure}); decoding in Python "
                        "(same actions, slower). Set model.decode=python to skip the build.",
                        file=sys.stderr,
                    )
    if _module is None and mode == "cpp":
        raise UserError(f"model.decode=cpp, but the C++ decode step does not build here: {_failure}")
    return _module
