import json
import os
import pathlib

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors:
# set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # and the CUDA kernels run on the CPU too, as the backend "cuda-emulated" (sambayes/backends/emulated.py)
    os.environ.setdefault("SAMBAYES_CUDA_EMULATED", "1")

import pytest

from sambayes import backends

DATA = pathlib.Path(__file__).parent / "data"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: Every backend that can run here, on the device the tests use (the C++ extension not compiled yet:
#: collecting the tests compiles nothing; the first test that runs the extension does)
AVAILABLE_BACKENDS = [b for b in backends.NAMES if backends.why_unavailable(b, DEVICE, load=False) is None]


def pytest_collection_modifyitems(config, items):
    """The slow tests first (a stable sort: each file's order kept): spread over the workers of
    ``pytest -n``, the longest ones run side by side at the start instead of ending the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def load_golden(name: str) -> dict:
    return json.loads((DATA / name).read_text())


class GoldenMLP(torch.nn.Module):
    """The golden files' model: logits = tanh(x @ w1 + b1) @ w2 + b2 (w stored [in, out])."""

    def __init__(self, init: dict, dtype=torch.float64, device="cpu"):
        super().__init__()
        for name in ("w1", "b1", "w2", "b2"):
            setattr(self, name, torch.nn.Parameter(torch.tensor(init[name], dtype=dtype, device=device)))

    def forward(self, x):
        return torch.tanh(x @ self.w1 + self.b1) @ self.w2 + self.b2


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- the kernels compiled for sm_90, once per run: tests/test_triton_compiled.py and
# tests/test_nvcc_compile.py check everything of a build in one test (the instruction budget of
# tests/budget.py included), so that under pytest -n one worker compiles it while the others run the rest


def _shared_build(tmp_path_factory, name: str, build) -> tuple[pathlib.Path, dict]:
    """(folder, ``build(folder)``): the build (a JSON-able dict) made once per test run, shared by the
    xdist workers through the run's base temporary folder and a file lock."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above the workers' own
    folder = root / name
    done = folder / "build.json"
    with FileLock(str(folder) + ".lock"):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            done.write_text(json.dumps(build(folder)))
    return folder, json.loads(done.read_text())


@pytest.fixture(scope="session")
def triton_reports(tmp_path_factory) -> list[dict]:
    """The reports of ``python -m sambayes.kernels._compile_check --arch 90`` for float32 and bfloat16
    parameters, bSAM's precision and momentum in the state dtype and in bfloat16 (no GPU needed): one
    subprocess, as Triton compiles only where TRITON_INTERPRET is unset. Skips without Triton's NVIDIA
    backend."""
    pytest.importorskip("triton")
    try:
        from triton.backends import nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no NVIDIA backend")
    _, built = _shared_build(
        tmp_path_factory,
        "triton-sm90",
        lambda folder: {"reports": _compile_check_reports("--dtypes", "fp32,bf16", "--stored", "state,bf16")},
    )
    return built["reports"]


def _compile_check_reports(*args: str) -> list[dict]:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run(
        [sys.executable, "-m", "sambayes.kernels._compile_check", "--arch", "90", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture(scope="session")
def nvcc_build(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """The CUDA sources compiled by nvcc for sm_80 and sm_90 (``_compile_check_cuda.compile_objects``):
    (folder of the objects, {"returncode", "stdout", "stderr"} of nvcc with ptxas's report). Skips
    without nvcc."""
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    from sambayes.kernels import _compile_check_cuda

    def build(folder):
        result = _compile_check_cuda.compile_objects(folder, archs=(80, 90))
        return {"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}

    return _shared_build(tmp_path_factory, "nvcc", build)


@pytest.fixture(scope="session")
def cuda_reports(nvcc_build) -> list[dict]:
    """The sm_90 reports of ``python -m sambayes.kernels._compile_check_cuda`` for the objects of nvcc_build."""
    from sambayes.kernels import _compile_check_cuda

    folder, result = nvcc_build
    assert result["returncode"] == 0, result["stdout"][-4000:] + result["stderr"][-4000:]
    return _compile_check_cuda.reports(_compile_check_cuda.objects(folder), 90)
