"""Every BSAM and SAM scenario of tests/trajectories.py reproduces its saved trajectory bit for bit,
on every CPU backend: refactors of the optimizer change no number."""

import pytest
import torch
from conftest import AVAILABLE_BACKENDS
from trajectories import PATH, SCENARIOS, run

SAVED = torch.load(PATH)


# the scenarios skip a step on purpose (an inf gradient): the saved run holds the skip
@pytest.mark.filterwarnings("ignore:.*non-finite gradient, step skipped:RuntimeWarning")
@pytest.mark.parametrize("backend", [b for b in SAVED["runs"]["bsam"] if b in AVAILABLE_BACKENDS])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_trajectory_is_bit_identical_to_the_saved_one(name, backend):
    saved = SAVED["runs"][name][backend]
    for step, (got, want) in enumerate(zip(run(name, backend), saved, strict=True)):
        differs = got.view(torch.int64) != want.view(torch.int64)  # bitwise: NaN where NaN was
        if differs.any():
            where = differs.nonzero().flatten()[:5].tolist()
            pytest.fail(
                f"{name} on {backend}, step {step}: differs from {SAVED['commit'][:10]} at flat index {where} "
                f"({got[where].tolist()} vs {want[where].tolist()})"
            )
