"""Run a bench script with the C++ module built without -fopenmp (as before commit c25b481), to compare
the two builds in separate processes:

    TORCH_EXTENSIONS_DIR=/tmp/ext_no_openmp python bench/baselines/openmp_fused_ab/without_openmp.py \
        bench/decode.py --agents 3 27 64 --uncached-max-n 0 --large-n-envs 0 --threads 2 --repeats 10

Use its own TORCH_EXTENSIONS_DIR: the two builds share a module name.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from seqmarl.nn import cpp_decode  # noqa: E402

cpp_decode.openmp_flags = lambda: []
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
