"""Installing: the extension compiles on first use when the install could not build it (says so once and
is cached: tests/test_packaging.py, from the sdist in a fresh environment), names what is missing when it
cannot compile; ``auto`` never falls back silently."""

import errno
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from sambayes import _build, backends

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )


def test_the_cpu_backend_is_there_however_the_package_was_installed():
    # built at install (--no-build-isolation) or compiled on first use (a plain pip install): never missing
    assert backends.why_unavailable("cpu", "cpu") is None
    assert backends.resolve("cpu", "cpu").BUILT.startswith(("built at install", "compiled on first use"))


def test_first_use_build_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no compiler, no ninja
    monkeypatch.setenv("SAMBAYES_BUILD_DIR", str(tmp_path / "build"))
    with pytest.raises(ImportError, match=r"cannot compile the C\+\+ extension: missing") as caught:
        _build.compile_now()
    assert "a C++ compiler" in str(caught.value) and "ninja (pip install ninja)" in str(caught.value)
    assert not (tmp_path / "build").exists()  # stopped before doing anything


@pytest.mark.parametrize("last_holder", ["this machine", "another machine", "no file locks"])
def test_a_lock_file_goes_only_when_its_build_is_known_dead(tmp_path, monkeypatch, capfd, last_holder):
    """PyTorch's ``lock`` file goes when the folder's last holder ran on this machine (it is not running: the
    folder's OS lock is free); it stays, and the wait is named, when the last holder ran elsewhere or the file
    system has no locks (tests/test_packaging.py has the whole of it, with a real build folder)."""
    fcntl = pytest.importorskip("fcntl")
    host = socket.gethostname() if last_holder == "this machine" else "another-machine"
    (tmp_path / ".sambayes-lock").write_text(f"{host} 12345\n")
    (tmp_path / "lock").touch()
    if last_holder == "no file locks":

        def refused(*args):
            raise OSError(errno.ENOLCK, "No locks available")

        monkeypatch.setattr(fcntl, "flock", refused)
    with _build._build_lock(tmp_path):
        said = capfd.readouterr().err
        if last_holder == "this machine":
            assert not (tmp_path / "lock").exists() and "left by a build that was killed" in said
            assert (tmp_path / ".sambayes-lock").read_text() == f"{host} {os.getpid()}\n"  # now this process
        else:
            assert (tmp_path / "lock").exists() and f"waiting for {tmp_path / 'lock'} to go" in said


def test_the_sources_ship_with_the_package():
    # a plain install compiles from the copy inside the package: every source the recipe names is there
    folder = _build.source_dir()
    for name in _build.CPU_SOURCES + _build.CUDA_SOURCES + _build.EMULATED_SOURCES:
        assert (folder / name).is_file(), name
    headers = {path.name for suffix in ("*.h", "*.cuh") for path in (ROOT / "csrc").glob(suffix)}
    assert headers and headers <= {path.name for suffix in ("*.h", "*.cuh") for path in folder.glob(suffix)}
    setup = (ROOT / "setup.py").read_text()
    assert '"sambayes.csrc": "csrc"' in setup and '"sambayes.csrc": ["*.cpp", "*.cu", "*.cuh", "*.h"]' in setup


@pytest.mark.slow
def test_auto_says_once_when_it_falls_back():
    code = (
        "import torch, sambayes\n"
        "model = torch.nn.Linear(3, 2)\n"
        "opt = sambayes.BSAM(model.parameters(), num_data=10)\n"
        "def closure():\n"
        "    loss = model(torch.ones(4, 3)).sum(); loss.backward(); return loss\n"
        "for _ in range(3): opt.step(closure)\n"
        "print(sambayes.backends.pick('auto', 'cpu'), sambayes.backends.pick('auto', torch.device('cpu')))\n"
    )
    result = _python(code, SAMBAYES_NO_EXTENSION="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["eager", "eager"]
    assert result.stderr.count("backend 'auto' runs 'eager' on cpu, slower than the preferred 'cpu'") == 1
    assert "SAMBAYES_NO_EXTENSION is set" in result.stderr


@pytest.mark.slow
def test_auto_is_silent_when_it_gets_the_preferred_backend():
    result = _python(
        "import warnings, sambayes; warnings.simplefilter('error'); print(sambayes.backends.pick('auto', 'cpu'))"
    )
    assert result.returncode == 0 and result.stdout.strip() == "cpu", result.stderr
