"""Write the instruction tables of the docs (docs/triton.md, docs/cext.md): compile both tiers for sm_90
(no GPU needed) and replace their generated blocks with :func:`._sass.markdown_table`.

    python -m sambayes.kernels._sass_docs docs

``tests/budget.py`` checks that the pages hold the tables this writes, where the toolchain is the one
that wrote them.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

from . import _compile_check_cuda, _sass


def toolchains() -> dict[str, str]:
    """The compilers that produce each tier's code, as the docs tables name them."""
    out = {}
    try:
        import triton

        out["triton"] = f"Triton {triton.__version__} (ptxas of its wheel)"
    except ImportError:
        pass
    try:
        version = subprocess.run(
            [_compile_check_cuda.tool("nvcc"), "--version"], capture_output=True, text=True, check=True
        ).stdout
        found = re.search(r"release (\d+\.\d+)", version)
        out["cuda"] = f"nvcc {found.group(1) if found else '?'}"
    except (FileNotFoundError, subprocess.CalledProcessError):
        pass
    return out


def main(argv=None) -> None:
    """Write the tables of the docs: compile both tiers for sm_90 and replace the generated blocks."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("docs", help="the docs folder (docs/)")
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    triton_out = subprocess.run(
        [sys.executable, "-m", "sambayes.kernels._compile_check", "--arch", "90"]
        + ["--dtypes", "fp32,bf16", "--stored", "state,bf16"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    reports = {"triton": [json.loads(line) for line in triton_out.splitlines()]}
    with tempfile.TemporaryDirectory() as tmp:
        result = _compile_check_cuda.compile_objects(pathlib.Path(tmp), archs=(90,))
        if result.returncode != 0:
            raise SystemExit(result.stdout[-4000:] + result.stderr[-4000:])
        reports["cuda"] = _compile_check_cuda.reports(_compile_check_cuda.objects(pathlib.Path(tmp)), 90)
    names = toolchains()
    for tier, page in _sass.DOCS.items():
        path = pathlib.Path(args.docs) / page
        text = path.read_text()
        path.write_text(_sass.with_docs_block(text, tier, _sass.markdown_table(reports[tier], names[tier])))
        print(f"{path}: {len(_sass.held(reports[tier]))} kernels")


if __name__ == "__main__":
    main()
