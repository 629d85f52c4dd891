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
