import json
import pathlib

import pytest
import torch

DATA = pathlib.Path(__file__).parent / "data"


def load_golden(name: str) -> dict:
    return json.loads((DATA / name).read_text())


class GoldenMLP(torch.nn.Module):
    """The golden files' model: logits = tanh(x @ w1 + b1) @ w2 + b2 (w stored [in, out])."""

    def __init__(self, init: dict, dtype=torch.float64):
        super().__init__()
        for name in ("w1", "b1", "w2", "b2"):
            setattr(self, name, torch.nn.Parameter(torch.tensor(init[name], dtype=dtype)))

    def forward(self, x):
        return torch.tanh(x @ self.w1 + self.b1) @ self.w2 + self.b2


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
