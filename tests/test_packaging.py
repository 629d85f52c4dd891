"""The package as a user gets it: the licence, the declared Python, and (slow) a source distribution
that installs into a fresh virtual environment, compiles its extension on first use (once, then from its
cache) and passes a fast subset of its own tests there."""

from __future__ import annotations

import os
import pathlib
import re
import select
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: what a fresh environment runs from the unpacked sdist: the authors' trajectories on every backend
#: installed (the fused C++ one compiled on first use from the shipped sources), the command line, the verdicts
SUBSET = ["tests/test_trajectories.py", "tests/test_cli.py", "tests/test_demo.py"]
SUBSET_NAMES = "eager or info or triton or command_line or paired or side_by_side or case"
#: a markdown link or image to a path (no scheme such as https:, not an anchor)
RELATIVE = re.compile(r"!?\[[^\]]*\]\((?![a-z][a-z0-9+.-]*:|#)[^)\s]+\)")


def test_the_licence_is_bsd_3_clause_of_the_sambayes_developers():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License") and "Copyright (c) 2026, the sambayes developers" in text
    setup = (ROOT / "setup.py").read_text()
    assert 'license="BSD-3-Clause"' in setup and 'license_files=["LICENSE"]' in setup


def test_one_minimum_python_everywhere():
    setup = (ROOT / "setup.py").read_text()
    (minimum,) = re.findall(r'python_requires=">=3\.(\d+)"', setup)
    assert f'target-version = "py3{minimum}"' in (ROOT / "ruff.toml").read_text()
    assert f"Python ≥ 3.{minimum}" in (ROOT / "README.md").read_text()
    assert sys.version_info >= (3, int(minimum))


def _run(command: list[str], cwd: pathlib.Path, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=1200, env={**os.environ, **env}, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_the_sdist_installs_in_a_fresh_venv_and_passes_its_tests(tmp_path):
    pytest.importorskip("build")
    _run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path / "dist"), str(ROOT)],
        ROOT,
    )
    (sdist,) = (tmp_path / "dist").glob("sambayes-*.tar.gz")
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()  # an empty folder
    with tarfile.open(sdist) as archive:
        archive.extractall(unpacked, filter="data")
    (source,) = unpacked.iterdir()
    for needed in (
        "tests/conftest.py",
        "tests/harness.py",
        "tests/golden.py",
        "tests/trajectories.py",
        "tests/data/trajectories.pt",
        "LICENSE",
        "ALGORITHM.md",
        "mkdocs.yml",
        "csrc/bindings.cpp",
    ):
        assert (source / needed).is_file(), needed
    metadata = (source / "PKG-INFO").read_text()
    header, _, description = metadata.partition("\n\n")
    assert "License: BSD-3-Clause" in header and "License-File: LICENSE" in header
    assert "Requires-Python: >=3.10" in header
    assert 'Requires-Dist: triton>=3.4; (sys_platform == "linux"' in header  # not on a Mac or Windows
    assert not [line for line in header.splitlines() if "triton" in line and 'extra == "test"' in line]
    assert "## Quick start" in description and not RELATIVE.findall(description), RELATIVE.findall(description)

    # a fresh environment: PyPI's CPU build of PyTorch first (so nothing pulls a CUDA build), then the package
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], tmp_path)
    _run([python, "-m", "pip", "install", "-q", f"{source}[test]", "torch==2.13.0"], tmp_path)
    build = tmp_path / "build"  # the extension compiles on first use, here: nothing shared with other runs
    missing = subprocess.run([python, "-c", "import triton"], capture_output=True, text=True, check=False)
    assert missing.returncode != 0, "the CPU-only test extra installed Triton"
    # the very recipe a plain `pip install .` relies on: the first use compiles the shipped sources once, says so,
    # into an empty cache; then loads from it, silently
    code = (
        "import torch; from sambayes import _build, _philox\n"
        "ext = _build.compile_now()\n"
        "z = torch.empty(1001); torch.ops.sambayes_C.philox_randn_(z, 77, 5)\n"
        "assert torch.allclose(z, _philox.randn_range(77, 5, 1001), rtol=3e-7, atol=1e-12)\n"
        "print(ext.__file__)\n"
    )
    first = _run([python, "-c", code], tmp_path, SAMBAYES_BUILD_DIR=str(build))
    assert f"sambayes: compiling the C++ extension once (about a minute) into {build}" in first.stderr
    assert pathlib.Path(first.stdout.strip()).parent == build
    again = _run([python, "-c", code], tmp_path, SAMBAYES_BUILD_DIR=str(build))
    assert "compiling" not in again.stderr  # cached: no second build, no message
    _check_a_killed_build_is_cleared([python, "-c", code], tmp_path, build)
    info = _run([python, "-m", "sambayes", "info"], tmp_path, SAMBAYES_BUILD_DIR=str(build)).stdout
    spec = pathlib.Path(re.search(r"specification \(ALGORITHM.md\): (.+)", info).group(1))
    assert spec.is_file() and venv in spec.parents, info  # inside the installed package
    licence = _run(
        [python, "-c", "import importlib.metadata as m; print(m.metadata('sambayes')['License-File'])"], tmp_path
    ).stdout.strip()
    assert licence == "LICENSE"
    # the unpacked sdist's tests against the installed package: run from outside the source folder
    result = _run(
        [
            python,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not slow",
            "-k",
            SUBSET_NAMES,
            *[str(source / t) for t in SUBSET],
        ],
        tmp_path,
        SAMBAYES_BUILD_DIR=str(build),
        PYTHONPATH="",
    )
    summary = result.stdout.strip().splitlines()[-1]
    # and an editable install of the same sources (what the README's command does) finds the specification there
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "-e", str(source)], tmp_path)
    info = _run([python, "-m", "sambayes", "info"], tmp_path, SAMBAYES_NO_EXTENSION="1").stdout
    assert f"specification (ALGORITHM.md): {source / 'ALGORITHM.md'}" in info, info
    assert " passed" in summary and "failed" not in summary and "error" not in summary, result.stdout[-3000:]
    assert int(summary.split(" passed")[0].split()[-1]) >= 12, summary


def _check_a_killed_build_is_cleared(command: list[str], cwd: pathlib.Path, build: pathlib.Path) -> None:
    """A build killed midway (a job's time limit, kill -9) leaves PyTorch's lock file, on which every later load
    waited, silently and forever: the next load says so, removes it and loads from the cache. And a load while
    another process holds the folder's build lock (is building) waits for it, saying so."""
    fcntl = pytest.importorskip("fcntl")
    (build / "lock").touch()  # what the killed build left
    env = {**os.environ, "SAMBAYES_BUILD_DIR": str(build)}
    with open(build / ".sambayes-lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a process building there holds it
        load = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        said, deadline = b"", time.monotonic() + 300
        try:
            while b"waiting for another process building or loading" not in said:
                ready, _, _ = select.select([load.stderr], [], [], max(0.0, deadline - time.monotonic()))
                chunk = os.read(load.stderr.fileno(), 4096) if ready else b""
                assert chunk, f"the load neither said it waits nor went on waiting: {said.decode()[-3000:]}"
                said += chunk
            fcntl.flock(held, fcntl.LOCK_UN)
            _, err = load.communicate(timeout=300)
        finally:
            load.kill()  # (a no-op when it is done; a load that waits silently would wait forever)
    err = said.decode() + err.decode()
    assert load.returncode == 0, err[-3000:]
    assert f"removing {build / 'lock'}, left by a build that was killed" in err and not (build / "lock").exists()
    assert "compiling" not in err  # still the cached build
