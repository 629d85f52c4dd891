"""The negative controls of CI's sanitizer step (.ci/run): the emulated CUDA tier built with
AddressSanitizer and UndefinedBehaviorSanitizer ("sanitized+fma", sambayes/_build.py) stops at a
vector load from a misaligned address and at a row that runs past its tensor, faults put into the
rows on purpose (the build's inject_fault), and runs the same launch clean without them.

Each case runs in a child process with libasan preloaded, as CI's step runs the phase tests.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
from conftest import AVAILABLE_BACKENDS

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD = "sanitized+fma"


def libasan() -> str | None:
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        return None
    found = subprocess.run([compiler, "-print-file-name=libasan.so"], capture_output=True, text=True, check=False)
    path = found.stdout.strip()
    return path if os.path.isabs(path) else None


pytestmark = pytest.mark.skipif(
    "cuda-emulated" not in AVAILABLE_BACKENDS or libasan() is None,
    reason="needs the cuda-emulated backend and the compiler's libasan",
)

#: restore of 1025 float32 weights that start 4 bytes into their storage: no row is 16-byte aligned
LAUNCH = """
import sys, torch
from sambayes.backends import emulated
emulated.ops.inject_fault(sys.argv[1])
weights = torch.randn(1026)[1:]
params = torch.empty(1025)
emulated.restore([params], [weights])
print("clean" if torch.equal(params, weights) else "wrong")
"""


@pytest.mark.parametrize(
    "fault, report",
    [
        ("misaligned", "runtime error: .*misaligned address .* requires 16 byte alignment"),
        ("overrun", "ERROR: AddressSanitizer: heap-buffer-overflow"),
        ("", None),
    ],
    ids=["misaligned-vector-load", "row-past-its-tensor", "no-fault"],
)
def test_the_sanitized_build_stops_a_fault(fault, report):
    env = dict(os.environ, SAMBAYES_CUDA_EMULATED=BUILD, LD_PRELOAD=libasan(), ASAN_OPTIONS="detect_leaks=0")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    # the first run compiles the sanitized build (minutes), which CI's sanitizer step then reuses
    child = subprocess.run(
        [sys.executable, "-c", LAUNCH, fault], capture_output=True, text=True, env=env, timeout=1200, check=False
    )
    if report is None:
        assert child.returncode == 0 and child.stdout.strip() == "clean", child.stderr[-3000:]
    else:
        assert child.returncode != 0 and "clean" not in child.stdout, child.stdout + child.stderr[-3000:]
        assert re.search(report, child.stderr), child.stderr[-3000:]
