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

import glob
import os
import shutil
import sys
import threading
from importlib import resources
from types import ModuleType

import torch

from seqmarl.errors import UserError

MODES = ("auto", "cpp", "python")

# Inside the C++ module, CPU float32 decoding on an x86-64 CPU with AVX2 and FMA runs a fused loop
# (raw rows, hand-vectorised matmuls, one batch slice per thread); anything else runs the loop of ATen
# ops. Set this to False to force the ATen loop everywhere: the tests and bench/decode.py compare the two.
use_fused_loop = True
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


def _already_built() -> bool:
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return bool(glob.glob(os.path.join(root, "**", f"{NAME}*.so"), recursive=True))


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load

    compiler = os.environ.get("CXX", "c++")  # what torch's build runs
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH")
    _add_ninja_to_path()
    if not _already_built():
        print("seqmarl: building the C++ decode step (once per machine, about a minute)...", file=sys.stderr)
    source = resources.files("seqmarl.nn") / "csrc" / "decode.cpp"
    with resources.as_file(source) as path:
        return load(NAME, [str(path)], extra_cflags=["-O3"], verbose=False)


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
