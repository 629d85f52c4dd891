"""``python -m sambayes info``: the versions, where the specification is, and which backend can run
on each device here and why not. It compiles nothing: when the C++ extension has not been compiled
yet it says so, and how to compile it (``--compile``, or the first use of its backends)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import platform
import warnings

import torch

from .. import __version__, _build, backends
from ._common import first_line, why_unavailable

_NOT_COMPILED = "not compiled yet (see 'C++ extension' above)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the C++ extension now if it is not compiled yet (about a minute, once), then report",
    )


def specification() -> pathlib.Path | None:
    """ALGORITHM.md, the specification: inside the installed package, or beside it in a source tree."""
    here = pathlib.Path(__file__).resolve().parent.parent
    return next((p for p in (here / "ALGORITHM.md", here.parent / "ALGORITHM.md") if p.is_file()), None)


def _extension() -> tuple[bool, str]:
    """(whether asking the extension's backends loads it without compiling, a line about it)."""
    if os.environ.get("SAMBAYES_NO_EXTENSION", "0") not in ("", "0"):
        return True, "turned off (SAMBAYES_NO_EXTENSION is set)"
    if importlib.util.find_spec(f"{__package__.rpartition('.')[0]}._C") is None and _build.cached_build(torch) is None:
        missing = _build.missing_tools()
        how = (
            f"this machine lacks {'; '.join(missing)}"
            if missing
            else "the first step with backend 'cpu' or 'cuda' (or 'auto') compiles it, once (about a minute), "
            f"into {_build.cache_dir(torch)}; `python -m sambayes info --compile` compiles it now"
        )
        return False, f"not compiled yet: {how}"
    reason = backends.why_unavailable("cpu", "cpu")
    return True, reason or backends.resolve("cpu", "cpu").BUILT


def _auto(device: str, loadable: bool) -> str:
    """What backend="auto" picks on ``device``: said here instead of the warning that training gives
    when it is not the preferred one; without compiling the extension when it is not compiled yet."""
    if not loadable:
        for name in backends.AUTO_ORDER[torch.device(device).type]:
            if name in ("cpu", "cuda"):
                return f"{name}, once compiled (its first step compiles it)"
            if backends.why_unavailable(name, device) is None:
                return name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        picked = backends.pick("auto", device)
    return f"{picked}, not the preferred backend (see below)" if caught else picked


def report(compile_extension: bool = False) -> str:
    """The report of ``python -m sambayes info``."""
    if compile_extension:
        backends.why_unavailable("cpu", "cpu")  # imports the extension's backend: compiles it if need be
    spec = specification()
    lines = [
        f"sambayes {__version__}  torch {torch.__version__}  Python {platform.python_version()}",
        f"specification (ALGORITHM.md): {spec if spec else 'not found beside the package'}",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as exc:  # noqa: BLE001 - any failure to import: report it
        lines.append(
            f"triton: not importable ({type(exc).__name__}); for NVIDIA GPUs on Linux: pip install 'sambayes[triton]'"
        )
    loadable, extension = _extension()
    lines.append(f"C++ extension: {extension}")
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for i in range(torch.cuda.device_count()):
        lines.append(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    for device in devices:
        lines.append(f"\n{device} (auto picks: {_auto(device, loadable)})")
        for name in backends.NAMES:
            if name in ("cpu", "cuda") and not loadable:
                lines.append(f"  {name:8s} {_NOT_COMPILED}")
                continue
            reason = why_unavailable(name, device)
            lines.append(
                f"  {name:8s} {'available' if reason is None else 'unavailable: ' + first_line(Exception(reason))}"
            )
    return "\n".join(lines)
