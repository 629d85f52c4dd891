"""What the commands share: one-line errors, help text without docstring markup, and why a
backend cannot run here, told as a user of the command needs it."""

from __future__ import annotations

import re

import torch

from .. import backends

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")  # :func:`run`, :data:`SHIFTS`
_LITERAL = re.compile(r"``([^`]+)``")  # ``python -m sambayes demo``


def first_line(exc: Exception) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def plain(doc: str | None) -> str:
    """A module docstring as a command's ``--help`` prints it: reST roles and literals without their markup."""
    return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", doc or "")).strip()


def why_unavailable(name: str, device: torch.device | str) -> str | None:
    """:func:`sambayes.backends.why_unavailable`, but Triton on the CPU described as what it is: a GPU
    backend, whose interpreter on the CPU is a testing tool, not a way to run it fast."""
    device = torch.device(device)
    # the emulated CUDA tier, a test tool, is reported without compiling it
    reason = backends.why_unavailable(name, device, load=name != "cuda-emulated")
    if name == "triton" and device.type == "cpu":
        if reason is None:
            return None  # TRITON_INTERPRET=1 was set: the interpreter runs them
        if "TRITON_INTERPRET" in reason:  # Triton is there, the kernels were compiled for GPUs
            return (
                "the Triton kernels run on NVIDIA GPUs; on a CPU only Triton's interpreter runs them "
                "(TRITON_INTERPRET=1 in the environment), a testing tool far slower than every other backend"
            )
        if "not installed" in reason:  # nothing to install on a CPU: say what Triton is for
            return "Triton is not installed; its kernels run on NVIDIA GPUs (pip install 'sambayes[triton]' there)"
    return reason
