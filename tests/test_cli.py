"""The ``sambayes`` command as a whole: the tools live in ``sambayes.cli``, apart from the library, and
``info`` reports without compiling the extension and without a training warning."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import sambayes
from sambayes.cli import info

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _info(tmp_path: pathlib.Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "SAMBAYES_BUILD_DIR": str(tmp_path / "build"), **env}
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "sambayes", "info", *args],
        check=False,
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=600,
    )


def test_info_on_a_fresh_machine_compiles_nothing_and_says_how(tmp_path):
    if info.importlib.util.find_spec("sambayes._C") is not None:
        import pytest

        pytest.skip("sambayes._C was built at install: there is nothing to compile")
    result = _info(tmp_path)  # an empty build cache: nothing was compiled here yet
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no compile message, no warning about what training would run
    assert not (tmp_path / "build").exists() or not any((tmp_path / "build").iterdir())
    out = result.stdout
    assert "C++ extension: not compiled yet" in out and "python -m sambayes info --compile" in out
    assert "cpu (auto picks: cpu, once compiled (its first step compiles it))" in out
    assert "  cpu      not compiled yet" in out and "  eager    available" in out


def test_info_without_the_extension_warns_nothing_and_names_the_pick(tmp_path):
    result = _info(tmp_path, SAMBAYES_NO_EXTENSION="1")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "cpu (auto picks: eager, not the preferred backend (see below))" in result.stdout
    assert "SAMBAYES_NO_EXTENSION is set" in result.stdout


def test_info_says_where_the_specification_is(tmp_path):
    result = _info(tmp_path, SAMBAYES_NO_EXTENSION="1")
    line = next(line for line in result.stdout.splitlines() if line.startswith("specification (ALGORITHM.md): "))
    path = pathlib.Path(line.split(": ", 1)[1])
    assert path.is_file() and path.read_text().startswith("# What sambayes computes")
    assert path.parent in (pathlib.Path(sambayes.__file__).resolve().parent, ROOT)  # installed, or a source tree


def test_the_triton_hint_describes_and_does_not_prescribe(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as on a user's machine
    result = subprocess.run(
        [sys.executable, "-m", "sambayes", "info"],
        check=False,
        capture_output=True,
        text=True,
        env={**env, "SAMBAYES_NO_EXTENSION": "1", "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("  triton "))
    assert "set TRITON_INTERPRET" not in line and "run on NVIDIA GPUs" in line, line
    if "not installed" not in line:  # Triton installed: its interpreter is for tests
        assert "a testing tool" in line, line


def test_the_command_line_lives_apart_from_the_library():
    package = ROOT / "sambayes"
    assert not (package / "demo").exists() and not (package / "bench.py").exists()
    core = [p for p in package.rglob("*.py") if "cli" not in p.relative_to(package).parts]
    for path in core:
        if path.name == "__main__.py":
            continue
        assert "sambayes.cli" not in path.read_text() and "from .cli" not in path.read_text(), path
    assert (package / "__main__.py").read_text().count("\n") < 12  # just hands over to sambayes.cli


def test_a_cached_build_of_other_sources_is_not_this_copys(tmp_path, monkeypatch):
    """Another install's first-use build in the same cache: loading it would compile these sources, so
    info must not call it compiled (and compile_now says it compiles)."""
    import torch

    from sambayes import _build

    monkeypatch.setenv("SAMBAYES_BUILD_DIR", str(tmp_path))
    built = tmp_path / f"{_build.JIT_NAME}.so"
    built.write_bytes(b"")  # newer than the sources
    ninja = tmp_path / "build.ninja"
    source = _build.source_dir() / _build.CPU_SOURCES[0]
    ninja.write_text(f"build bindings.o: compile {source}\n")
    assert _build.cached_build(torch) == built  # these sources: cached
    ninja.write_text(f"build bindings.o: compile {tmp_path / 'other' / 'csrc' / _build.CPU_SOURCES[0]}\n")
    assert _build.cached_build(torch) is None  # another copy's: loading it would compile
