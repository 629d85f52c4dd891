"""The CUDA sources (sambayes/_build.py's CUDA_SOURCES) compile with nvcc for sm_80 and sm_90
(when nvcc is on PATH), and no kernel spills registers.

The build is conftest's ``nvcc_build`` (``sambayes.kernels._compile_check_cuda.compile_objects``: each
file to an object with PyTorch's include paths; a CPU-only PyTorch lacks one generated CUDA header,
which it writes), shared with tests/test_sass_budget.py.
"""

import re

import pytest

from sambayes._build import CUDA_SOURCES


@pytest.mark.slow
def test_cuda_kernels_compile_for_sm80_and_sm90(nvcc_build):
    folder, result = nvcc_build
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for name in CUDA_SOURCES:
        source = folder / name
        assert source.with_suffix(".o").stat().st_size > 0, name
    report = result.stdout + result.stderr
    for arch in ("sm_80", "sm_90"):
        assert f"for '{arch}'" in report, f"no ptxas report for {arch}"
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert spills and all(stores == loads == "0" for stores, loads in spills), "a kernel spills registers"
