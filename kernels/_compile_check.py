"""Compile every kernel ahead of time for a GPU architecture (no GPU needed) and report
what the machine code does: 128-bit global loads/stores, registers, local memory, and the
steady-state path's instructions per element with the share of an H100 copy they predict
(``instructions_per_element``, ``pct_copy_predicted``: :mod:`._sass`, docs/performance.md).

    python -m sambayes.kernels._compile_check [--arch 90]    # prints one JSON object per kernel
    python -m sambayes.kernels._compile_check --stored bf16  # bSAM's kernels with bfloat16 precision/momentum
    python -m sambayes.kernels._compile_check --capturable   # lr and seeds read from device memory

Needs Triton's NVIDIA backend (ptxas and cuobjdump ship with the wheel) and
TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import (
    _multi_tensor,
    _sass,
    bsam_perturb,
    bsam_sample,
    bsam_update,
    find_nonfinite,
    fold_grads,
    ivon_accumulate,
    ivon_update,
    restore,
    sam_perturb,
    sam_sq_norm,
    sam_update_adamw,
    sam_update_sgd,
)

# phase: (its kernel, the kernel's extra constexprs); PARAM/STATE/ALIGNED/BLOCK (and STORED where the kernel has
# it) are filled in per dtype. Every phase of sambayes.phases (tests/test_phases.py)
KERNELS = {
    "bsam_sample": (bsam_sample._bsam_sample_kernel, {}),
    "bsam_perturb": (bsam_perturb._bsam_perturb_kernel, {"ACCUMULATE": True}),
    "bsam_update": (bsam_update._bsam_update_kernel, {}),
    "find_nonfinite": (find_nonfinite._find_nonfinite_kernel, {}),
    "fold_grads": (fold_grads._fold_grads_kernel, {"STAGE": 1}),
    "restore": (restore._restore_kernel, {}),
    "sam_sq_norm": (sam_sq_norm._sq_norm_kernel, {"ADAPTIVE": False, "SPAN": sam_sq_norm.SPAN}),
    "sam_perturb": (sam_perturb._sam_perturb_kernel, {"ADAPTIVE": False}),
    "sam_update_sgd": (sam_update_sgd._sam_update_sgd_kernel, {"NESTEROV": False}),
    "sam_update_adamw": (sam_update_adamw._sam_update_adamw_kernel, {}),
    "ivon_accumulate": (ivon_accumulate._ivon_accumulate_kernel, {"STAGE": ivon_accumulate.MIDDLE, "PRICE": True}),
    "ivon_update": (ivon_update._ivon_update_kernel, {"SUMMED": True, "PRICE": True}),
}

#: phase: (the report's flag, the constexprs) of a second compilation its report holds apart (_sass.variant)
VARIANTS = {"ivon_update": ("one_sample", {"SUMMED": False, "PRICE": True})}

#: capturable=True's step scalars in device memory, by argument name (otherwise None: constexprs)
STEP_POINTERS = {"lr_ptr": "*fp64", "decay_ptr": "*fp64", "seed_ptr": "*i64", "noise_seed_ptr": "*i64"}


def _arg_type(param, state: str) -> str:
    if param.annotation_type:  # hyperparameters: annotated tl.float64
        return param.annotation_type
    if param.name == "table":
        return "*i64"
    if param.name == "partials":
        return "*" + state
    if param.name in ("found_inf", "inv_scale_ptr"):
        return "*fp32"
    if param.name in ("corrections_ptr", "scale_ptr"):  # float64 on the device, read in the state dtype
        return "*fp64"
    if param.name in ("seed", "noise_seed") or param.name.endswith("_base"):  # a seed; an "X" role's first address
        return "i64"
    if param.name in ("splits", "num_blocks"):
        return "i32"
    raise ValueError(f"no type for kernel argument {param.name!r}")


def has_stored(kernel) -> bool:
    """Whether the kernel reads bSAM's stored state (precision, momentum) through a ``STORED`` dtype."""
    return "STORED" in kernel.arg_names


def compile_kernel(kernel, constexprs: dict, param, arch: int, stored=None, capturable: bool = False):
    """The CompiledKernel of ``kernel`` for params of tl dtype ``param`` on sm_<arch>; ``stored``: the
    dtype of its stored state (kernels with a ``STORED`` constexpr), None for the state dtype;
    ``capturable``: its lr and seed arguments are pointers to device memory (else None)."""
    state = tl.float64 if param == tl.float64 else tl.float32
    values = dict(PARAM=param, STATE=state, STORED=stored or state, ALIGNED=True, BLOCK=_multi_tensor.BLOCK)
    values.update(constexprs)
    signature, constants = {}, {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constants[p.name] = values[p.name]
        elif p.name in STEP_POINTERS and not capturable:
            signature[p.name] = "constexpr"
            constants[p.name] = None
        elif p.name in STEP_POINTERS:
            signature[p.name] = STEP_POINTERS[p.name]
        else:
            signature[p.name] = _arg_type(p, "fp64" if state == tl.float64 else "fp32")
    # the table comes from the caching allocator: 16-byte aligned, as Triton assumes for tensor arguments
    attrs = {(kernel.arg_names.index("table"),): [["tt.divisibility", 16]]}
    for name in kernel.arg_names:  # an "X" role's base is a tensor's address: Triton specializes it as such
        if name.endswith("_base"):
            attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": _multi_tensor.warps(kernel)}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def sass_report(compiled, bytes_per_element: float, blocks: int = 1) -> dict:
    """Counts of global load/store widths, the resource usage, and the steady-state path's model
    (the full blocks: ``blocks`` of BLOCK elements over the program's threads, moving ``bytes_per_element``;
    :func:`._sass.report_straight`), from the cubin's SASS."""
    cuobjdump = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    ops = re.findall(r"\b(LDG|STG|LDL|STL)(\.[A-Z0-9.]+)?", sass)
    resources = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", usage))
    (instructions,) = _sass.parse(sass).values()
    per_block = _multi_tensor.BLOCK // (32 * compiled.metadata.num_warps)  # elements per thread and block
    model = _sass.report_straight(
        instructions, elements_per_thread=blocks * per_block, bytes_per_element=bytes_per_element
    )
    moved = sum(count * _sass.WIDTHS.get(op.split(".")[-1], 0) for op, count in model["memory_instructions"].items())
    if moved < blocks * per_block * bytes_per_element and _sass.Function(instructions).back_edges():
        # a program of several blocks whose bodies the compiler merged into a loop: its iteration is a block
        model = _sass.report_loop(
            instructions,
            elements_per_thread=blocks * per_block,
            bytes_per_element=bytes_per_element,
            vector=per_block,
            vector_bytes=16,
        )
    return {
        "ldg128": sum(1 for op, mod in ops if op == "LDG" and ".128" in mod),
        "stg128": sum(1 for op, mod in ops if op == "STG" and ".128" in mod),
        "ldg": sum(1 for op, _ in ops if op == "LDG"),
        "stg": sum(1 for op, _ in ops if op == "STG"),
        "local_ops": sum(1 for op, _ in ops if op in ("LDL", "STL")),
        "registers": int(resources.get("REG", -1)),
        "local_bytes": int(resources.get("LOCAL", -1)),
        "stack_bytes": int(resources.get("STACK", -1)),
        **model,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100")
    parser.add_argument("--dtypes", default="fp32,bf16", help="parameter dtypes: fp32, bf16, fp16, fp64")
    parser.add_argument(
        "--stored",
        default="state",
        help="dtypes of bSAM's stored precision and momentum: state (the state dtype), bf16 (only the "
        "kernels that have stored state, and not for fp64 parameters); reports of bf16 carry stored=bf16",
    )
    parser.add_argument(
        "--capturable", action="store_true", help="only the kernels with step scalars, reading them from memory"
    )
    args = parser.parse_args(argv)
    if _multi_tensor.INTERPRETED:
        raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile")
    names = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}
    for stored in args.stored.split(","):
        if stored not in ("state", "bf16"):
            raise SystemExit(f"--stored {stored}: state or bf16")
        for dtype in args.dtypes.split(","):
            for phase, (kernel, constexprs) in KERNELS.items():
                if stored == "bf16" and (not has_stored(kernel) or dtype == "fp64"):
                    continue
                if args.capturable and not STEP_POINTERS.keys() & set(kernel.arg_names):
                    continue
                compilations = [(None, constexprs)]
                if phase in VARIANTS:
                    flag, changed = VARIANTS[phase]
                    compilations.append((flag, {**constexprs, **changed}))
                for flag, values in compilations:
                    compiled = compile_kernel(
                        kernel, values, names[dtype], args.arch, names.get(stored), args.capturable
                    )
                    report = dict(phase=phase, kernel=kernel.__name__, param=dtype, arch=f"sm_{args.arch}")
                    if stored == "bf16":
                        report["stored"] = stored
                    if args.capturable:
                        report["capturable"] = True
                    if flag:
                        report[flag] = True
                    state = "fp64" if dtype == "fp64" else "fp32"
                    stored_name = "bf16" if stored == "bf16" else None
                    nbytes = _sass.phase_bytes(phase, dtype, state, stored_name, one_sample=flag == "one_sample")
                    report.update(sass_report(compiled, nbytes, values.get("SPAN", 1)))
                    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
