"""The process set-up of a run (seqmarl.runinfo): the allocator setting that keeps freed memory."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from seqmarl.errors import UserError
from seqmarl.runinfo import keep_freed_memory

# One forward/backward of an MLP on 3200 x 27 tokens (E = 64, as in a PPO update at N = 27, with a wide
# hidden layer: an 88 MB activation, above glibc's largest automatic mmap threshold); prints the minor
# page faults per step once warm. By default each step maps its big tensors afresh and faults them in.
# With keep, the heap grows over the first 2-4 steps (how far depends on how freed blocks happen to
# merge) and then reuses its pages: steps 5-10 fault ~0, with at most one 20-30k bump, so the warm-up
# is four steps and the count the mean of the next six.
FAULTS_PER_STEP = """
import resource, torch
from seqmarl.runinfo import keep_freed_memory
print(keep_freed_memory())
torch.set_num_threads(1)
mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
x = torch.randn(86_400, 64)
for _ in range(4):
    mlp(x).square().mean().backward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    mlp(x).square().mean().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 6)
"""


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's (Linux)"
)
def test_keep_freed_memory_reuses_the_pages_of_an_update():
    faults = {}
    for choice in ("system", "keep"):
        done = subprocess.run(
            [sys.executable, "-c", FAULTS_PER_STEP],
            env={**os.environ, "SEQMARL_MALLOC": choice},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        said, count = done.stdout.split()
        assert said == choice
        faults[choice] = int(count)
    # Measured here (10 runs): 40-96k faults per step by default, 0-5.4k with keep. The first CI run
    # to fail counted over steps 2-4, still in keep's warm-up: 43k against 85k.
    assert faults["system"] > 88_000_000 // 4096  # at least the hidden activation, mapped afresh
    assert faults["keep"] < faults["system"] / 4


def test_a_wrong_malloc_choice_is_refused(monkeypatch):
    monkeypatch.setenv("SEQMARL_MALLOC", "sytem")
    with pytest.raises(UserError, match="SEQMARL_MALLOC='sytem': use keep"):
        keep_freed_memory()
    monkeypatch.setenv("SEQMARL_MALLOC", "system")
    assert keep_freed_memory() == "system"
