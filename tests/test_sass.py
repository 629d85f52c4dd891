"""kernels/_sass.py without a compiler: the issue-limited model's numbers, and the steady-state path
of hand-written SASS (a Triton-like block with a masked tail and a slow path; a CUDA-like vector loop
with a scalar rest loop and stores under a predicate)."""

import pytest
from sambayes.kernels import _sass


def test_the_model_at_its_corners():
    # memory time of 8 B at 2.9 TB/s; issue rate 132 SMs x 128 x 1.755 GHz x 0.8
    per_instruction = 1 / (132 * 128 * 1.755e9 * 0.8)
    memory = 8 / 2.9e12
    at = memory / per_instruction  # instructions per element whose issue time equals the memory time
    assert _sass.predicted_share(at / 2, 8, 1.755) == pytest.approx(100 / (1 + 1 / 16) ** 0.25)  # 98.5%
    assert _sass.predicted_share(at, 8, 1.755) == pytest.approx(100 / 2**0.25)  # 84%
    assert _sass.predicted_share(0, 8, 1.755) == 100
    budget = _sass.instruction_budget(8, 95.0)
    assert _sass.predicted_share(budget, 8, 1.755) == pytest.approx(95.0)
    assert _sass.predicted_share(budget, 8, 1.98) > 95.0  # the boost clock issues more


def _sass_text(lines: list[str]) -> str:
    body = "\n".join(f"        /*{4 * 16 * i:04x}*/                   {line} ;" for i, line in enumerate(lines))
    return "\t\tFunction : kernel\n" + body


STRAIGHT = [
    "LDG.E.64 R2, desc[UR4][R2.64]",  # the table
    "ISETP.GE.AND P0, PT, R2, 0x400, PT",
    "@!P0 BRA 0x0280",  # the masked tail at 10
    "LDG.E.128 R4, desc[UR4][R4.64]",
    "FSETP.GEU.AND P1, PT, R4, 1, PT",
    "@!P1 BRA 0x0200",  # the slow path at 8
    "FMUL R4, R4, R5",
    "STG.E.128 desc[UR4][R6.64], R4",
    "EXIT",  # 8: the slow path
    "CALL.REL.NOINC 0x0300",
    "EXIT",  # 10: the tail
    "@P0 LDG.E R4, desc[UR4][R4.64]",
    "@P0 STG.E desc[UR4][R6.64], R4",
    "EXIT",
]


def test_the_straight_path_is_the_full_block_without_its_slow_path():
    (instructions,) = _sass.parse(_sass_text(STRAIGHT)).values()
    function = _sass.Function(instructions)
    path = function.straight()
    assert [str(i).split("*/ ")[1] for i in function.path_instructions(path)][3:] == STRAIGHT[3:9]
    assert path.wide == 8 + 32  # the table entry and the two vectors


LOOP = [
    "LDG.E.64 R2, desc[UR4][R2.64]",  # 0
    "ISETP.GE.AND P0, PT, R2, R3, PT",  # 1
    "@P0 BRA 0x02c0",  # 2: no vectors: the rest at 11
    "LDG.E.128 R4, desc[UR4][R8.64]",  # 3: the vector loop
    "LDG.E.128 R12, desc[UR4][R10.64]",  # 4
    "FFMA R4, R4, R12, R5",  # 5
    "@P1 STG.E.128 desc[UR4][R8.64], R4",  # 6: a stage that writes the sum ...
    "@!P1 STG.E.128 desc[UR4][R10.64], R4",  # 7: ... or the other
    "IADD3 R2, R2, 0x100, RZ",  # 8
    "ISETP.LT.AND P0, PT, R2, R3, PT",  # 9
    "@P0 BRA 0x00c0",  # 10: back to 3
    "ISETP.GE.AND P2, PT, R2, R7, PT",  # 11: the rest, element by element
    "@P2 EXIT",  # 12
    "LDG.E R4, desc[UR4][R8.64]",  # 13
    "STG.E desc[UR4][R8.64], R4",  # 14
    "IADD3 R2, R2, 0x100, RZ",  # 15
    "BRA 0x02c0",  # 16: back to 11
]


def test_the_loop_iteration_moves_the_phase_s_bytes():
    (instructions,) = _sass.parse(_sass_text(LOOP)).values()
    function = _sass.Function(instructions, vector_bytes=16)
    # 4 elements of 12 B (two 4-byte streams read, one written): a guarded store may not run
    iteration, overhead = function.loop(unit=48)
    assert iteration.wide == 48 and iteration.instructions == 8
    assert overhead.instructions == 3 + 2  # into the loop; out of it, the rest skipped
    report = _sass.report_loop(instructions, elements_per_thread=64, bytes_per_element=12, vector=4, vector_bytes=16)
    assert report["elements_per_iteration"] == 4
    assert report["instructions_per_element"] == pytest.approx(8 / 4 + 5 / 64, abs=0.01)
    assert report["memory_instructions"] == {"LDG.E.128": 2, "STG.E.128": 2}


def test_the_bytes_of_every_phase_are_declared():
    from sambayes.phases import PHASES

    assert set(_sass.STREAMS) == {p.name for p in PHASES}
    assert _sass.phase_bytes("bsam_update", "fp32", "fp32") == 40  # docs/triton.md, "Bytes per parameter"
    assert _sass.phase_bytes("bsam_update", "fp32", "fp32", "bf16") == 32
    assert _sass.phase_bytes("bsam_sample", "bf16", "fp32", "bf16") == 8


def test_the_docs_blocks_round_trip():
    text = "before\n" + _sass._BEGIN.format(tier="cuda") + "\nold\n" + _sass._END + "\nafter\n"
    new = _sass.with_docs_block(text, "cuda", "| table |")
    assert _sass.docs_block(new, "cuda") == "| table |"
    assert new.startswith("before\n") and new.endswith("\nafter\n")
    assert _sass.docs_block(new, "triton") is None
