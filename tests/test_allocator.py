"""The allocator settings of the Train worker (``qpo_ray.allocator``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FAULTS_SCRIPT = """
import resource, sys, torch
from qpo_ray.allocator import keep_freed_memory

def faults():  # page faults of 50 steps that each allocate and free two 4 MiB tensors
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        (torch.ones(16, 64, 1024) * 2).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

faults()
before = faults()
ok = keep_freed_memory()
faults()
print(before, faults(), ok)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_stops_the_page_faults_of_each_step():
    # In a fresh interpreter: the options last for the life of the process.
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, ok = out.stdout.split()
    assert ok == "True"
    # glibc's defaults fault fresh pages in for many of these blocks; tuned, freed blocks are reused.
    assert int(after) * 10 < max(int(before), 1000), out.stdout
