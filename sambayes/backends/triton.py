"""The triton backend: each phase is one fused Triton kernel launch per bucket, noise
drawn in-kernel. Same functions and arguments as :mod:`.eager`; see there for the contract.

The kernels and their launchers live in :mod:`sambayes.kernels` (one file per phase,
byte counts in their docstrings); this module only runs them on the tensors' device.
They index memory flat, so :mod:`sambayes.backends` sends them contiguous tensors only.

Triton is optional: without it, importing this module raises an ImportError that says
how to get it, which :mod:`sambayes.backends` reports when the backend is asked for.
"""

from __future__ import annotations

import contextlib
import functools
import re

import torch

try:
    import triton
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("Triton is not installed; pip install 'sambayes[triton]'") from exc

# tl.randn with 64-bit offsets is Philox4x32 (the noise of every other backend) from Triton 3.4 on;
# older versions switch to Philox4x64 and would draw other numbers
if tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2]) < (3, 4):  # pragma: no cover
    raise ImportError(f"Triton {triton.__version__} is too old: the triton backend needs Triton >= 3.4")

from ..kernels import _multi_tensor
from ..kernels.bsam_perturb import bsam_perturb as _bsam_perturb
from ..kernels.bsam_sample import bsam_sample as _bsam_sample
from ..kernels.bsam_update import bsam_update as _bsam_update
from ..kernels.find_nonfinite import find_nonfinite as _find_nonfinite
from ..kernels.fold_grads import fold_grads as _fold_grads
from ..kernels.ivon_accumulate import ivon_accumulate as _ivon_accumulate
from ..kernels.ivon_update import ivon_update as _ivon_update
from ..kernels.restore import restore as _restore
from ..kernels.sam_perturb import sam_perturb as _sam_perturb
from ..kernels.sam_sq_norm import sam_sq_norm as _sam_sq_norm
from ..kernels.sam_update_adamw import sam_update_adamw as _sam_update_adamw
from ..kernels.sam_update_sgd import sam_update_sgd as _sam_update_sgd

#: the kernels run in Triton's interpreter (CPU tensors), not compiled for a GPU
INTERPRETED = _multi_tensor.INTERPRETED


def _on_their_device(launcher):
    """The launcher, run on its tensors' GPU: Triton launches on the current device and its stream."""

    @functools.wraps(launcher)
    def run(tensors, *args, **kwargs):
        device = tensors[0].device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return launcher(tensors, *args, **kwargs)

    return torch.no_grad()(run)


# each phase: the launcher of its file in sambayes.kernels, on its tensors' device
bsam_sample = _on_their_device(_bsam_sample)
bsam_perturb = _on_their_device(_bsam_perturb)
bsam_update = _on_their_device(_bsam_update)
find_nonfinite = _on_their_device(_find_nonfinite)
fold_grads = _on_their_device(_fold_grads)
restore = _on_their_device(_restore)
sam_sq_norm = _on_their_device(_sam_sq_norm)
sam_perturb = _on_their_device(_sam_perturb)
sam_update_sgd = _on_their_device(_sam_update_sgd)
sam_update_adamw = _on_their_device(_sam_update_adamw)
ivon_accumulate = _on_their_device(_ivon_accumulate)
ivon_update = _on_their_device(_ivon_update)
