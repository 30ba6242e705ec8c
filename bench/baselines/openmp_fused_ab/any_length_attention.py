"""Run a bench script with the update's C++ attention allowed at any number of tokens (to re-check
`cpp_decode.TRAINING_ATTENTION_MAX_TOKENS`):

    python bench/baselines/openmp_fused_ab/any_length_attention.py bench/update.py --agents 27 32 64 \
        --threads 2 --repeats 9 --compare-attention
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from seqmarl.nn import cpp_decode  # noqa: E402

cpp_decode.TRAINING_ATTENTION_MAX_TOKENS = 10_000
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
