"""``sambayes bench``: run for real at a tiny size (the table, the verdict, the exit code); bad
flags are usage errors (exit code 2, one error line, nothing timed)."""

from __future__ import annotations

import re
import runpy
import sys

import pytest
import torch

from sambayes import backends
from sambayes.cli import bench, main

TINY = ["--numel", "2048", "--tensors", "3", "--repeats", "3", "--device", "cpu"]
CPU = torch.device("cpu")
#: a table row: optimizer, backend, ms/step, 20%, 80%, steps, x fastest, x floor
ROW = re.compile(r"^(bSAM|SAM|IVON)\s+(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$")


def table(out: str) -> dict[tuple[str, str], dict[str, float]]:
    rows = {}
    for line in out.splitlines():
        match = ROW.match(line)
        if match:
            optimizer, backend, ms, _, _, steps, x_fastest, x_floor = match.groups()
            rows[optimizer, backend] = {
                "ms": float(ms),
                "steps": int(steps),
                "x_fastest": float(x_fastest),
                "x_floor": float(x_floor),
            }
    return rows


def run_as_python_m(monkeypatch, *argv: str) -> int:
    """``python -m sambayes *argv`` in this interpreter (no second torch import): its exit code."""
    monkeypatch.setattr(sys, "argv", ["sambayes", *argv])
    monkeypatch.delitem(sys.modules, "sambayes.__main__", raising=False)  # runpy warns if it is there
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("sambayes", run_name="__main__", alter_sys=True)
    return exit_info.value.code


def test_bench_command_times_every_backend_here_and_names_the_fastest(capsys, monkeypatch):
    code = run_as_python_m(monkeypatch, "bench", *TINY)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "sambayes bench" in captured.err  # the progress bar
    out = captured.out
    assert "2,048 float32 parameters in 3 tensors" in out
    header = r"^optimizer\s+backend\s+ms/step\s+20%\s+80%\s+steps\s+x fastest\s+x floor$"
    assert re.search(header, out, re.MULTILINE), out
    timed = [name for name in backends.NAMES if bench.why_not_timed(name, CPU) is None]
    rows = table(out)
    assert set(rows) == {(optimizer, name) for optimizer in ("bSAM", "SAM", "IVON") for name in timed}, out
    for optimizer in ("bSAM", "SAM", "IVON"):
        mine = [row for (o, _), row in rows.items() if o == optimizer]
        fastest = min(row["ms"] for row in mine)
        for row in mine:
            assert row["ms"] > 0 and row["steps"] == 3 and row["x_floor"] > 0
            assert row["x_fastest"] == pytest.approx(row["ms"] / fastest, rel=0.01, abs=0.01)
        assert min(row["x_fastest"] for row in mine) == 1.0
    for name in backends.NAMES:  # every backend is timed or skipped with its reason
        if name not in timed:
            assert f"skipped {name} on cpu: {bench.why_not_timed(name, CPU)}" in out
    last = out.strip().splitlines()[-1]
    bsam = {name: row["ms"] for (o, name), row in rows.items() if o == "bSAM"}
    best = min(bsam, key=bsam.get)
    assert last.startswith(f'fastest on cpu: backend="{best}" ('), last
    auto = backends.pick("auto", CPU)
    assert last.endswith('backend="auto" picks it') == (auto == best), last
    assert 'backend="auto" picks' in last


def test_a_backend_that_fails_is_a_row_and_exit_code_1(capsys, monkeypatch):
    public_step = bench.public_step

    def failing(optimizer, params, grads, backend):
        step, opt = public_step(optimizer, params, grads, backend)
        if backend != "eager":
            return step, opt

        def broken():
            raise RuntimeError("broken on purpose\nsecond line")

        return broken, opt

    monkeypatch.setattr(bench, "public_step", failing)
    assert main(["bench", *TINY, "--backends", "eager,foreach"]) == 1
    out = capsys.readouterr().out
    assert "bSAM      eager    error: RuntimeError: broken on purpose" in out
    assert "SAM       eager    error: RuntimeError: broken on purpose" in out
    assert "IVON      eager    error: RuntimeError: broken on purpose" in out
    assert set(table(out)) == {("bSAM", "foreach"), ("SAM", "foreach"), ("IVON", "foreach")}
    assert out.strip().splitlines()[-1].startswith('fastest on cpu: backend="foreach"')


def test_help_describes_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "which backend runs an optimizer step fastest on this machine" in out
    for flag in ("--numel", "--tensors", "--backends", "--device", "--repeats", "--threads"):
        assert flag in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "bench" in capsys.readouterr().out


BAD_FLAGS = [
    (["--numel", "0"], "--numel 0: need at least 1 parameter"),
    (["--numel", "many"], "argument --numel: 'many' is not a whole number"),
    (["--tensors", "0"], "--tensors 0: need at least 1 tensor"),
    (["--tensors", "5000"], "--tensors 5000: more tensors than --numel 2048"),
    (["--repeats", "0"], "--repeats 0: need at least 1 timed step"),
    (["--repeats", "1.5"], "argument --repeats: invalid int value"),
    (["--threads", "0"], "--threads 0: need at least 1"),
    (["--backends", "fast"], "--backends fast: unknown backend 'fast'; choose from eager,foreach,triton,cpu,cuda"),
    (["--backends", "cpu,foo"], "--backends cpu,foo: unknown backend 'foo'; choose from"),  # the bad item named
    (["--backends", "foo,cpu,bar"], "unknown backends 'foo', 'bar'; choose from"),
    (["--backends", ","], "--backends ',': name at least one of eager,foreach,triton,cpu,cuda"),
    (["--device", "gpu"], "--device 'gpu' is not a torch device"),
    (["--device", ","], "--device ',': name at least one device"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
]
if not torch.cuda.is_available():
    BAD_FLAGS += [
        (["--device", "cuda"], "--device cuda: this PyTorch"),
        (["--backends", "cuda"], "--backends cuda: none can run on cpu: backend 'cuda' is not available"),
    ]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS)
def test_bad_flags_exit_2_with_one_error_line(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *TINY, *flags])
    assert exit_info.value.code == 2  # argparse's usage error
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing was timed
    lines = captured.err.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert errors == [lines[-1]], captured.err  # one line says what is wrong, after the usage
    assert re.match(r"sambayes( bench)?: error: ", lines[-1]) and message in lines[-1], captured.err
    assert all(line.startswith(("usage:", " ")) for line in lines[:-1]), captured.err


@pytest.mark.parametrize(("numel", "tensors"), [(1, 1), (3, 2), (8, 5), (40, 16), (2048, 3), (262_144, 16)])
def test_synthetic_shapes_add_up_for_any_size(numel, tensors):
    sizes = [shape[0] for shape in bench.synthetic_shapes(numel, tensors)]
    assert len(sizes) == tensors and sum(sizes) == numel and min(sizes) >= 1
