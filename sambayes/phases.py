"""The phases, each declared once: its tensor roles, which of them it writes, its scalars.

A phase is one memory pass of a step (ALGORITHM.md), implemented by every backend under the
phase's name with the same arguments: the tensor lists of its roles, in order, then its
device scalars (the step's found-inf flag, 1/scale, ...), then its scalars as keywords. The
eager backend (:mod:`sambayes.backends.eager`) is the executable spec of each.

What follows from a declaration: the dispatch moves the version counters of the roles a phase
writes (:func:`sambayes.backends.run`), the Triton kernels build their launch tables from the
roles' kinds, the C++ extension's fake implementations are registered per phase, the functions of
the backends of fused ops forward to them by their schemas (:func:`op_functions`), and tests hold
every backend's signature, the op schemas of ``csrc/bindings.cpp`` and the compile check of the
Triton kernels to these declarations (``tests/test_phases.py``).

Role kinds (the dtype each tensor of a role has, for parameters of dtype P):

====  ==================================================================================
P     the parameter dtype (parameters, gradient buffers)
S     the master dtype :func:`master_dtype` (state: ``mean``, ``weight``, ...)
R     the stored state of bSAM and IVON (``precision``, ``momentum``): the master dtype, or
      bfloat16 over float32 master state (``state_dtype=torch.bfloat16``)
X     a running sum of the step in the master dtype; the Triton and CUDA tables address
      it relative to its first tensor (it lives only within a step)
I     an int per tensor (``offsets``: its first element's index in the group's flat
      concatenation, the noise's element index), not a tensor
====  ==================================================================================

This module imports nothing of sambayes: the kernels and every backend may import it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import NamedTuple

import torch


def master_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the state and the math for parameters of ``param_dtype``: float64 for float64
    parameters, float32 (master weights) for float32, bfloat16 and float16 ones."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def step_args(value, number) -> tuple:
    """(number argument, tensor argument) of a fused kernel for a step scalar (``seed``, ``lr``), which the
    phases take as a Python number or as a 0-dim tensor on the bucket's device (``capturable=True``): a
    tensor goes as is, read by the kernel on the device, next to a dummy number; a number by value,
    through ``number`` (int, float), next to None."""
    if isinstance(value, torch.Tensor):
        return number(0), value
    return number(value), None


class Role(NamedTuple):
    """One tensor list of a phase: its argument name, its kind (see the module docstring), whether
    the phase writes it in place."""

    name: str
    kind: str
    written: bool = False


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, a cheap dict key for the dispatch
class Phase:
    """One phase: ``roles`` (tensor lists, in argument order), ``device_scalars`` (0-dim tensors on the
    bucket's device after the lists), ``scalars`` (keyword-only), what it returns (None: it writes in
    place), and whether it raises the step's ``found_inf`` flag on a non-finite gradient it reads."""

    name: str
    roles: tuple[Role, ...]
    device_scalars: tuple[str, ...] = ()
    scalars: tuple[str, ...] = ()
    returns: str | None = None
    checks_grads: bool = False
    #: argument positions of the roles written in place (derived)
    writes: tuple[int, ...] = dataclasses.field(init=False)
    #: the kinds of the tensor-list roles, in order: a Triton launch table's layout (derived)
    kinds: str = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "writes", tuple(i for i, role in enumerate(self.roles) if role.written))
        object.__setattr__(self, "kinds", "".join(role.kind for role in self.roles if role.kind != "I"))

    @property
    def arguments(self) -> tuple[str, ...]:
        """Every argument's name, in the order of the backends' functions."""
        return tuple(role.name for role in self.roles) + self.device_scalars + self.scalars

    def signature(self) -> inspect.Signature:
        """The signature of every backend's function for this phase: the roles and device scalars, then the
        scalars as keywords (for a backend that forwards generic arguments, as the emulated tier does)."""
        positional = [role.name for role in self.roles] + list(self.device_scalars)
        kinds = [inspect.Parameter.POSITIONAL_OR_KEYWORD] * len(positional)
        kinds += [inspect.Parameter.KEYWORD_ONLY] * len(self.scalars)
        return inspect.Signature([inspect.Parameter(n, k) for n, k in zip(positional + list(self.scalars), kinds)])


P, S, R, X, I = "P", "S", "R", "X", "I"

# ---- bSAM ----------------------------------------------------------------------------------------
#: θ = m + z / sqrt(N·s), z drawn from Philox(seed) at each element's noise index
BSAM_SAMPLE = Phase(
    "bsam_sample",
    (Role("params", P, True), Role("means", S), Role("precisions", R), Role("offsets", I)),
    scalars=("num_data", "seed"),
)
#: θ = m + ρ·g/s ; curvature_sum (+)= sqrt(s)·|g| ; g consumed (zeroed)
BSAM_PERTURB = Phase(
    "bsam_perturb",
    (
        Role("params", P, True),
        Role("grads", P, True),
        Role("means", S),
        Role("precisions", R),
        Role("curvature_sums", X, True),
    ),
    ("found_inf", "inv_scale"),
    ("rho", "accumulate"),
    checks_grads=True,
)
#: the roles of an update of a Gaussian posterior's state (bSAM's, IVON's): the parameters and the gradient sums
#: in .grad, written (θ = m, the sums zeroed), the state, the curvature sums read, the element indices
POSTERIOR_UPDATE_ROLES = (
    Role("params", P, True),
    Role("grad_sums", P, True),
    Role("means", S, True),
    Role("precisions", R, True),
    Role("momentums", R, True),
    Role("curvature_sums", X),
    Role("offsets", I),
)
#: momentum, mean (old precision), precision from the means over sub-batches; θ = m; sums zeroed
BSAM_UPDATE = Phase(
    "bsam_update",
    POSTERIOR_UPDATE_ROLES,
    ("found_inf", "inv_scale"),
    ("lr", "beta1", "beta2", "weight_decay", "damping", "splits", "seed"),
)

# ---- gradients and rest, for every optimizer -----------------------------------------------------
#: found_inf = 1 if a gradient holds an inf or NaN
FIND_NONFINITE = Phase("find_nonfinite", (Role("grads", P),), ("found_inf",), checks_grads=True)
#: grad_sum (+)= h_j in the master dtype; the last sub-batch puts the total back into .grad
FOLD_GRADS = Phase(
    "fold_grads",
    (Role("grads", P, True), Role("grad_sums", X, True)),
    ("found_inf",),
    ("first", "last"),
    checks_grads=True,
)
#: θ = m (or w): the model back at rest
RESTORE = Phase("restore", (Role("params", P, True), Role("weights", S)))

# ---- SAM -----------------------------------------------------------------------------------------
#: Σ (T·g)² over a bucket: a partial sum of the global norm
SAM_SQ_NORM = Phase(
    "sam_sq_norm",
    (Role("grads", P), Role("weights", S)),
    ("found_inf", "inv_scale"),
    ("adaptive",),
    returns="sq_norm",
    checks_grads=True,
)
#: w' = w + scale·T²·g ; g consumed (zeroed)
SAM_PERTURB = Phase(
    "sam_perturb",
    (Role("params", P, True), Role("grads", P, True), Role("weights", S)),
    ("inv_scale",),
    ("scale", "adaptive"),
)
#: heavy ball (or Nesterov) on the mean perturbed-point gradient; θ = w
SAM_UPDATE_SGD = Phase(
    "sam_update_sgd",
    (Role("params", P, True), Role("grad_sums", P, True), Role("weights", S, True), Role("momentums", S, True)),
    ("found_inf", "inv_scale"),
    ("lr", "momentum", "weight_decay", "nesterov", "splits"),
)
#: AdamW on the mean perturbed-point gradient; θ = w
SAM_UPDATE_ADAMW = Phase(
    "sam_update_adamw",
    (
        Role("params", P, True),
        Role("grad_sums", P, True),
        Role("weights", S, True),
        Role("momentums", S, True),
        Role("variances", S, True),
    ),
    ("found_inf", "inv_scale", "step"),
    ("lr", "beta1", "beta2", "eps", "weight_decay", "splits"),
)

# ---- IVON (docs/ivon.md) ---------------------------------------------------------------------------
#: the gradient g_j of sample j (θ = m + z_j/sqrt(ess·s): BSAM_SAMPLE) joins the sums over samples, unscaled:
#: grad_sum (+)= g_j ; curvature_sum (+)= z_j·g_j (price: z_j regenerated from the sample's seed) or g_j²
#: (gradsq); g consumed (zeroed), the last sample's sum back into .grad (one sample: .grad keeps g)
IVON_ACCUMULATE = Phase(
    "ivon_accumulate",
    (Role("grads", P, True), Role("grad_sums", X, True), Role("curvature_sums", X, True), Role("offsets", I)),
    ("found_inf",),
    ("seed", "price", "first", "last"),
    checks_grads=True,
)
#: ḡ, c̄ the means over samples (unscaled); momentum; Hessian h = s − δ (Riemannian step); mean with the new
#: precision, clipped; θ = m. ``summed`` False (one sample, one replica): c from .grad and the noise of
#: ``noise_seed``, curvature_sums not read (pass any master-dtype tensors of the right sizes: the means)
IVON_UPDATE = Phase(
    "ivon_update",
    POSTERIOR_UPDATE_ROLES,
    ("found_inf", "inv_scale", "step"),
    (
        "lr",
        "beta1",
        "beta2",
        "ess",
        "weight_decay",
        "clip_radius",
        "debias",
        "price",
        "summed",
        "splits",
        "noise_seed",
        "seed",
    ),
)

#: every phase, in the order of ALGORITHM.md's step
PHASES = (
    BSAM_SAMPLE,
    BSAM_PERTURB,
    BSAM_UPDATE,
    FIND_NONFINITE,
    FOLD_GRADS,
    RESTORE,
    SAM_SQ_NORM,
    SAM_PERTURB,
    SAM_UPDATE_SGD,
    SAM_UPDATE_ADAMW,
    IVON_ACCUMULATE,
    IVON_UPDATE,
)


# ---- the backends of fused ops: one function per phase, from its op's schema ----------------------------

#: the schema types converted from what the phases take (Python numbers, or lists of them)
_CONVERT: dict[str, Callable] = {"int": int, "float": float, "bool": bool, "int[]": lambda v: [int(x) for x in v]}


def op_functions(ops) -> dict[str, Callable]:
    """The backend functions of a library of fused ops (the extension's ``cpu`` and ``cuda`` backends, the
    emulated CUDA tier): ``{phase name: function}`` for every phase, with the phase's signature (``signature``),
    forwarding to the op ``ops.<phase name>``, whose schema (``csrc/bindings.cpp``) names the arguments.

    Each argument goes where the op's schema puts it, converted to the schema's type. A step scalar (``lr``,
    ``seed``; :func:`step_args`) given as a tensor goes in the op's ``<name>_tensor`` argument, read by the kernel
    on the device, next to a dummy number. How each argument travels is worked out here, once per phase."""
    return {phase.name: _forwarder(phase, getattr(ops, phase.name).default) for phase in PHASES}


def _forwarder(phase: Phase, op) -> Callable:
    schema = op._schema.arguments
    # the step scalars: the phase's arguments the op also takes as <name>_tensor
    step_scalars = {a.name.removesuffix("_tensor") for a in schema if a.name.endswith("_tensor")} & set(phase.arguments)
    # per argument of the op: (the phase's argument it takes, its conversion, what it takes of a step scalar)
    plan = []
    for argument in schema:
        base = argument.name.removesuffix("_tensor")
        if base != argument.name and base in step_scalars:
            plan.append((base, None, "tensor"))
        else:
            plan.append((argument.name, _CONVERT.get(str(argument.type)), "number" if base in step_scalars else ""))
    names = phase.arguments[: len(phase.roles) + len(phase.device_scalars)]

    @torch.no_grad()
    def function(*args, **kwargs):
        values = dict(zip(names, args), **kwargs)
        call = []
        for name, convert, step_scalar in plan:
            value = values[name]
            if step_scalar and isinstance(value, torch.Tensor):  # read by the kernel; a dummy number beside it
                call.append(value if step_scalar == "tensor" else convert(0))
            elif step_scalar == "tensor":
                call.append(None)
            else:
                call.append(value if convert is None else convert(value))
        return op(*call)

    function.__name__ = function.__qualname__ = phase.name
    function.__signature__ = phase.signature()
    function.__doc__ = f"The fused op {phase.name} (see sambayes.backends.eager.{phase.name})."
    return function
