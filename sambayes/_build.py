"""How the C++/CUDA extension is built: at install (setup.py) or on first use (:func:`compile_now`).

``setup.py`` builds ``sambayes._C`` when PyTorch is importable where it runs (``pip install
--no-build-isolation``). A plain ``pip install .`` builds in an isolated environment without
PyTorch, so the package installs without it; the first use of the ``cpu`` or ``cuda`` backend
then compiles the same sources, with the same flags, through ``torch.utils.cpp_extension.load``
(ninja), once: the result is cached per PyTorch build and reused while the sources are unchanged.

This module imports nothing but the standard library at the top: setup.py loads it by path,
before PyTorch is known to be there.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import socket
import sys
import sysconfig
import time

# csrc/: the ops by family and device (docs/cext.md says which file holds what)
CPU_SOURCES = ["bindings.cpp", "bsam_cpu.cpp", "sam_cpu.cpp", "grads_cpu.cpp", "philox_cpu.cpp", "ivon_cpu.cpp"]
CUDA_SOURCES = ["bsam_cuda.cu", "sam_cuda.cu", "grads_cuda.cu", "ivon_cuda.cu"]
# at::parallel_for is OpenMP in PyTorch's builds; no errno from sqrt, so that the loops vectorize (as PyTorch's own flags)
# -Wno-maybe-uninitialized: gcc 12 flags _mm512_undefined_epi32 inside its own AVX-512 headers
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wno-maybe-uninitialized"]
NVCC_FLAGS = ["-O3"]
LINK_FLAGS = ["-fopenmp"]
#: codes for csrc/bindings.cpp's note on why the CUDA kernels are missing
CUDA_SKIPPED = {"env": 1, "cpu_torch": 2, "no_toolkit": 3, "failed": 4}
#: the module name of a first-use build (an install builds ``sambayes._C``)
JIT_NAME = "sambayes_C"

#: the emulated CUDA tier (backend "cuda-emulated", docs/cext.md): CUDA_SOURCES compiled by the C++ compiler
#: for the host, through one-line wrappers, with the op schemas of bindings.cpp and the execution layer
EMULATED_SOURCES = ["bindings.cpp", "cuda_emulated.cpp"]
#: no FMA contraction (ISO C++): the host's rounding, line by line; -O2 keeps the first build near a minute
EMULATED_FLAGS = ["-O2", "-fopenmp", "-DSAMBAYES_EMULATED", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
#: the variants of the emulated tier, (compile flags, link flags) by name; a build joins some with "+"
#: ("sanitized+fma"), as $SAMBAYES_CUDA_EMULATED names it (sambayes/backends/emulated.py)
EMULATED_VARIANTS = {
    # AddressSanitizer and UndefinedBehaviorSanitizer, stopping at the first report; needs libasan preloaded
    "sanitized": (
        ["-O1", "-g1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
        ["-fsanitize=address,undefined"],
    ),
    # products fused into FMAs wherever the compiler can, as nvcc fuses them (--fmad=true)
    "fma": (["-mfma", "-ffp-contract=fast", "-fexpensive-optimizations"], []),
}


def cuda_skip_reason(torch, cuda_home: str | None) -> str | None:
    """Why the CUDA kernels are not built (a key of CUDA_SKIPPED), or None to build them."""
    if os.environ.get("SAMBAYES_NO_CUDA", "0") not in ("", "0"):
        return "env"
    if torch.version.cuda is None:
        return "cpu_torch"
    if cuda_home is None:
        return "no_toolkit"
    return None


def default_cuda_arch_list(torch) -> None:
    """With no GPU to ask, build for A100 and H100 plus PTX for newer GPUs (unless the user chose)."""
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"


def source_dir() -> pathlib.Path:
    """csrc/: inside the installed package, or beside it in a source tree."""
    here = pathlib.Path(__file__).resolve().parent
    for folder in (here / "csrc", here.parent / "csrc"):
        if (folder / CPU_SOURCES[0]).is_file():
            return folder
    raise ImportError(f"the C++ sources (csrc/) are neither in {here} nor beside it: reinstall sambayes")


def cache_dir(torch) -> pathlib.Path:
    """Where a first-use build goes: $SAMBAYES_BUILD_DIR, else one folder per Python and PyTorch build
    under $XDG_CACHE_HOME (default ~/.cache)."""
    if os.environ.get("SAMBAYES_BUILD_DIR"):
        return pathlib.Path(os.environ["SAMBAYES_BUILD_DIR"])
    root = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return root / "sambayes" / f"{python}-torch{torch.__version__}".replace("+", "-")


def cached_build(torch) -> pathlib.Path | None:
    """The first-use build in :func:`cache_dir`, if there is one of these sources and no older than
    they are; else None (then the first use compiles). A build of another copy's sources (another
    install sharing the cache) does not count: loading it would compile these."""
    built = cache_dir(torch) / f"{JIT_NAME}.so"
    src = source_dir()
    newest_source = max(path.stat().st_mtime for path in src.iterdir())
    if not built.is_file() or built.stat().st_mtime < newest_source:
        return None
    recipe = built.with_name("build.ninja")  # torch's first-use build names its sources there
    if recipe.is_file() and f" {src / CPU_SOURCES[0]}\n" not in recipe.read_text():
        return None
    return built


def missing_tools() -> list[str]:
    """What a first-use build needs and this machine lacks, each with how to get it."""
    from torch.utils.cpp_extension import is_ninja_available

    missing = []
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        missing.append(f"a C++ compiler ({compiler!r} is not on PATH: install g++ or clang, or set CXX)")
    if not (pathlib.Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        missing.append("the Python headers (Python.h; e.g. the python3-dev package)")
    if not is_ninja_available():
        missing.append("ninja (pip install ninja)")
    return missing


def compile_now():
    """Compile (or load from the cache) the extension from csrc/; returns the module.

    Says in one line when it compiles and where the result goes; raises ImportError naming
    what is missing (compiler, headers, ninja) or with the compiler's message.
    """
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, load

    src = source_dir()
    skip = cuda_skip_reason(torch, CUDA_HOME)
    missing = missing_tools()
    if missing:
        raise ImportError("cannot compile the C++ extension: missing " + "; ".join(missing))
    sources = [src / name for name in CPU_SOURCES + ([] if skip else CUDA_SOURCES)]
    build = cache_dir(torch)
    build.mkdir(parents=True, exist_ok=True)
    if cached_build(torch) is None:
        print(f"sambayes: compiling the C++ extension once (about a minute) into {build}", file=sys.stderr)
    if skip is None:
        default_cuda_arch_list(torch)
        try:
            return _load(load, sources, CXX_FLAGS + ["-DSAMBAYES_WITH_CUDA"], build, with_cuda=True)
        except ImportError as exc:  # as at install: the CPU kernels without the CUDA ones, and say why
            print(f"sambayes: {exc}; compiling the CPU kernels only", file=sys.stderr)
            sources = [path for path in sources if path.suffix != ".cu"]
            skip = "failed"
    return _load(load, sources, CXX_FLAGS + [f"-DSAMBAYES_CUDA_SKIPPED={CUDA_SKIPPED[skip]}"], build, with_cuda=False)


def emulated_name(build: str) -> str:
    """The module and op library (``torch.ops.<name>``) of an emulated build."""
    return "sambayes_emulated" + "".join(f"_{variant}" for variant in build.split("+") if variant)


def compile_emulated(build: str = ""):
    """Compile (or load from the cache) the emulated CUDA tier; returns the module, whose ops are
    ``torch.ops.<emulated_name(build)>``. ``build``: "" (plain), or variants of EMULATED_VARIANTS joined
    with "+"."""
    import torch
    from torch.utils.cpp_extension import load

    variants = [variant for variant in build.split("+") if variant]
    unknown = [variant for variant in variants if variant not in EMULATED_VARIANTS]
    if unknown:
        raise ImportError(f"no emulated variant {unknown[0]!r}: choose among {sorted(EMULATED_VARIANTS)}, joined by +")
    missing = missing_tools()
    if missing:
        raise ImportError("cannot compile the emulated CUDA tier: missing " + "; ".join(missing))
    src, name = source_dir(), emulated_name(build)
    folder = cache_dir(torch) / name
    (folder / "sources").mkdir(parents=True, exist_ok=True)
    sources = [src / file for file in EMULATED_SOURCES]
    for file in CUDA_SOURCES:  # the .cu files as they are, compiled as C++
        wrapper = folder / "sources" / f"{file}.cpp"
        text = f'#include "{src / file}"\n'
        if not wrapper.is_file() or wrapper.read_text() != text:
            wrapper.write_text(text)
        sources.append(wrapper)
    built = folder / f"{name}.so"
    if not built.is_file() or built.stat().st_mtime < max(path.stat().st_mtime for path in src.iterdir()):
        print(f"sambayes: compiling the emulated CUDA tier once (about a minute) into {folder}", file=sys.stderr)
    cflags = [flag for variant in variants for flag in EMULATED_VARIANTS[variant][0]]
    ldflags = [flag for variant in variants for flag in EMULATED_VARIANTS[variant][1]]
    # sambayes_C: bindings.cpp's and the .cu files' op library becomes this build's own
    cxx = CXX_FLAGS + EMULATED_FLAGS + cflags + [f"-Dsambayes_C={name}", f"-I{src}"]
    return _load(load, sources, cxx, folder, with_cuda=False, name=name, ldflags=LINK_FLAGS + ldflags)


@contextlib.contextmanager
def _build_lock(folder: pathlib.Path):
    """Hold the folder's build lock (an OS lock on ``.sambayes-lock``, which the system drops when its process
    ends, however it ends) while PyTorch builds or loads there.

    PyTorch's own lock, the file ``lock``, stays behind when a build is killed (a signal Python cannot catch:
    a job's time limit, ``kill -9``), and every later build or load there then waits for it to go, silently
    and forever. The holder writes its machine and process into ``.sambayes-lock``: a ``lock`` file found by
    the next holder, when the last holder ran on this machine (OS locks always hold between processes of one
    machine), is that holder's leftover, and goes. Otherwise (no locks on this file system, the last holder
    on another machine sharing the folder, whose lock may not reach here) the ``lock`` file may be a live
    build's: PyTorch waits for it, as before, but the wait is named.
    """
    handle, last_holder = _hold(folder)
    try:
        leftover = folder / "lock"
        if leftover.exists():
            if last_holder.split()[:1] == [socket.gethostname()]:
                print(f"sambayes: removing {leftover}, left by a build that was killed", file=sys.stderr)
                leftover.unlink(missing_ok=True)
            else:
                print(
                    f"sambayes: waiting for {leftover} to go: another machine may be building there; "
                    "if no build runs, a killed one left it: delete it",
                    file=sys.stderr,
                )
        yield
    finally:
        if handle is not None:
            handle.close()  # (closing drops the lock)


def _hold(folder: pathlib.Path):
    """(the folder's ``.sambayes-lock``, locked, now naming this machine and process; the last holder it named):
    locked after saying so when another process holds it for over a second; (None, "") where the OS or the
    file system has no such locks."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None, ""
    handle = open(folder / ".sambayes-lock", "a+")  # noqa: SIM115 - closed by _build_lock
    try:
        deadline = time.monotonic() + 1.0
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    print(f"sambayes: waiting for another process building or loading in {folder}", file=sys.stderr)
                    fcntl.flock(handle, fcntl.LOCK_EX)
                    break
                time.sleep(0.05)
    except OSError:  # a file system without locks (some network mounts): PyTorch's lock file alone
        handle.close()
        return None, ""
    handle.seek(0)
    last_holder = handle.read()
    handle.seek(0)
    handle.truncate()
    handle.write(f"{socket.gethostname()} {os.getpid()}\n")
    handle.flush()
    return handle, last_holder


def _load(
    load,
    sources: list[pathlib.Path],
    cxx: list[str],
    build: pathlib.Path,
    *,
    with_cuda: bool,
    name: str = JIT_NAME,
    ldflags: list[str] = LINK_FLAGS,
):
    try:
        with _build_lock(build):
            return load(
                name,
                [str(path) for path in sources],
                extra_cflags=cxx,
                extra_cuda_cflags=NVCC_FLAGS,
                extra_ldflags=ldflags,
                build_directory=str(build),
                with_cuda=with_cuda,
            )
    except Exception as exc:  # the compiler's own message, its tail, is the useful part
        raise ImportError(
            f"compiling the C++ extension in {build} failed ({type(exc).__name__}: {str(exc)[-2000:]})"
        ) from exc
