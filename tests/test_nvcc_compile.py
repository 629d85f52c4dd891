"""The CUDA sources (sambayes/_build.py's CUDA_SOURCES) compile with nvcc for sm_80 and sm_90
(when nvcc is on PATH), no kernel spills registers, and every kernel is within the instruction budget
on sm_90 (tests/budget.py).

The build is conftest's ``nvcc_build`` (``sambayes.kernels._compile_check_cuda.compile_objects``: each
file to an object with PyTorch's include paths; a CPU-only PyTorch lacks one generated CUDA header,
which it writes), compiled once for all these checks.
"""

import re

import budget
import pytest

from sambayes._build import CUDA_SOURCES


@pytest.mark.slow
def test_cuda_kernels_compile_for_sm80_and_sm90_without_spills_and_within_the_budget(nvcc_build):
    folder, result = nvcc_build
    assert result["returncode"] == 0, result["stdout"][-4000:] + result["stderr"][-4000:]
    for name in CUDA_SOURCES:
        source = folder / name
        assert source.with_suffix(".o").stat().st_size > 0, name
    report = result["stdout"] + result["stderr"]
    for arch in ("sm_80", "sm_90"):
        assert f"for '{arch}'" in report, f"no ptxas report for {arch}"
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert spills and all(stores == loads == "0" for stores, loads in spills), "a kernel spills registers"
    from sambayes.kernels import _compile_check_cuda

    budget.check("cuda", _compile_check_cuda.reports(_compile_check_cuda.objects(folder), 90))
