"""The GPU speed the compiled code predicts, without a GPU (kernels/_sass.py; the method in
docs/performance.md, "Predicted from the compiled code"): every kernel of both tiers, float32 and
bfloat16 parameters, bSAM's precision and momentum in float32 and in bfloat16, compiled for sm_90, must
be predicted at 95% or more of an H100 copy at 1.755 GHz; a change that pushes one under fails with
where its instructions go. Checked by the tests that compile each tier once per run,
tests/test_triton_compiled.py and tests/test_nvcc_compile.py (conftest's builds), with the kernels
that must be memory-bound and the tables of the docs.
"""

from __future__ import annotations

import pathlib

import pytest
from sambayes.kernels import _sass, _sass_docs

from sambayes.phases import PHASES

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
#: the share of an H100 copy every held kernel must be predicted at, at the sustained clock
BUDGET = 95.0
#: (tier, phase, variant): the kernels held at a lower floor (their share when the budget was set, rounded
#: down), and why; a floor only ever rises. The noise of a sample costs about 40 instructions per element
#: (a Philox call per four elements, one log and one sine-cosine per two, each within an ulp or two as
#: ALGORITHM.md asks; docs/performance.md counts them), nearly all of the 45 that 8 bytes per element
#: (bfloat16 parameters and precision) allow at 95%: the sample moves too few bytes to hide its noise there.
NOISE_FLOOR = "the noise's own instructions over 8 bytes per element"
BELOW_BUDGET: dict[tuple[str, str, str], tuple[float, str]] = {
    ("triton", "bsam_sample", "bf16, stored bf16"): (91.5, NOISE_FLOOR),
    ("cuda", "bsam_sample", "bf16, stored bf16"): (91.5, NOISE_FLOOR),
    ("cuda", "bsam_sample", "bf16, stored bf16, capturable"): (91.5, NOISE_FLOOR),
}


def failures(tier: str, reports: list[dict]) -> list[str]:
    """Every way the tier's reports miss: a phase not compiled or not modelled, a kernel under its floor or
    without a vector loop, a memory-bound kernel not predicted at copy, a stale docs table."""
    out = []
    held = _sass.held(reports)
    found = {(r["phase"], r["param"], r.get("stored")) for r in held}
    for phase in PHASES:  # every phase, both parameter dtypes, compiled and modelled
        for param in _sass.HELD_PARAMS:
            if (phase.name, param, None) not in found:
                out.append(f"{tier}: no report for {phase.name} with {param} parameters")
    for r in held:
        floor, why = BELOW_BUDGET.get((tier, r["phase"], _sass.variant(r)), (BUDGET, ""))
        name = f"{tier} {r['phase']} ({_sass.variant(r)})"
        if r.get("not_vectorized"):
            out.append(f"{name}: no vector loop: {_sass.breakdown(r)}")
        elif r["pct_copy_predicted"] < floor:
            reason = f" ({why})" if why else ""
            out.append(
                f"{name}: {r['pct_copy_predicted']}% of copy predicted, under {floor}%{reason}: {_sass.breakdown(r)}"
            )
        # θ = m moves 6 to 8 B per element with a handful of instructions: the model must see a copy
        if r["phase"] == "restore" and not (
            r["pct_copy_predicted"] >= BUDGET and r["instructions_per_element"] < r["instruction_budget_95"] / 2
        ):
            out.append(f"{name}: a copy not predicted at copy speed: {_sass.breakdown(r)}")
    text = (DOCS / _sass.DOCS[tier]).read_text()
    block = _sass.docs_block(text, tier)
    toolchain = _sass_docs.toolchains().get(tier)
    if block is None:
        out.append(f"docs/{_sass.DOCS[tier]} has no generated block for {tier}")
    elif toolchain is not None and toolchain in block and block != _sass.markdown_table(reports, toolchain):
        out.append(f"docs/{_sass.DOCS[tier]}'s table is stale: python -m sambayes.kernels._sass_docs docs")
    return out


def check(tier: str, reports: list[dict]) -> None:
    """Fail with every miss of :func:`failures` at once."""
    missed = failures(tier, reports)
    if missed:
        pytest.fail("\n".join(missed), pytrace=False)
