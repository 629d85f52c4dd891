"""Defaults a torch user expects: a run seeded with torch.manual_seed is reproducible, bare parameters of a
model with BatchNorm layers get a warning with the fix, a closure that forgets backward() gets one too, and
the optimizer says which backend runs each device."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import sambayes

_SCRIPT = """
import torch, torch.nn.functional as F, sambayes
torch.manual_seed(123)
model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
opt = sambayes.BSAM(model, num_data=100)
x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
for _ in range(2):
    opt.step(lambda: F.cross_entropy(model(x), y).backward())
print(opt.param_groups[0]["seed"], torch.cat([p.detach().flatten() for p in model.parameters()]).tolist())
"""


def test_seed_none_is_reproducible_under_torch_manual_seed_and_draws_nothing_from_torch():
    runs = [
        subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True, timeout=300).stdout
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and runs[0].strip()
    model = torch.nn.Linear(2, 2)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sambayes.BSAM(model, num_data=10)  # building it consumes nothing of torch's stream
    assert torch.equal(torch.rand(3), expected)


def test_each_optimizer_of_a_seeded_script_gets_its_own_seed_and_another_torch_seed_another_run():
    torch.manual_seed(1)
    a = sambayes.BSAM([torch.nn.Parameter(torch.ones(2))], num_data=1)
    b = sambayes.BSAM([torch.nn.Parameter(torch.ones(2))], num_data=1)
    torch.manual_seed(2)
    other = sambayes.BSAM([torch.nn.Parameter(torch.ones(2))], num_data=1)
    seeds = [o.param_groups[0]["seed"] for o in (a, b, other)]
    assert len(set(seeds)) == 3 and all(0 <= s < 2**63 for s in seeds)
    assert a.state_dict()["param_groups"][0]["seed"] == seeds[0]  # the checkpoint keeps it


@pytest.mark.parametrize("kind", ["bsam", "sam"])
def test_bare_parameters_of_a_model_with_batchnorm_warn_with_the_fix(kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))
    build = (lambda p: sambayes.BSAM(p, num_data=10)) if kind == "bsam" else (lambda p: sambayes.SAM(p, lr=0.1))
    with pytest.warns(UserWarning, match=r"bare parameters of a model with BatchNorm.*Pass the module") as caught:
        build(model.parameters())
    assert caught[0].filename == __file__  # it points at the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none with the module passed, none without BatchNorm
        build(model)
        build(torch.nn.Linear(3, 3).parameters())


def test_a_closure_that_forgets_backward_warns():
    model = torch.nn.Linear(3, 2)
    opt = sambayes.SAM(model, lr=0.1)
    before = model.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="does the closure call loss.backward"):
        opt.step(lambda: model(torch.randn(4, 3)).sum())
    assert torch.equal(model.weight, before)


def test_backend_used_names_the_backend_of_each_device():
    opt = sambayes.BSAM(torch.nn.Linear(2, 2), num_data=10)
    assert opt.backend_used == {torch.device("cpu"): sambayes.backends.pick("auto", "cpu")}
    assert sambayes.SAM(torch.nn.Linear(2, 2), lr=0.1, backend="eager").backend_used == {torch.device("cpu"): "eager"}
