"""Every Python example of the docs (``docs/*.md``) and of README.md runs, so the docs cannot drift
from the code.

The examples of one page run in order, as one program, in a fresh interpreter: a page may build its
model in one block and train it in the next. An HTML comment on the line before a block changes that:
``<!-- test: torchrun 2 -->`` runs the block alone under ``torchrun --nproc_per_node=2`` (CPU, gloo),
and ``<!-- test: cuda -->`` runs it alone, on a machine with a CUDA device (skipped elsewhere, saying so).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
BLOCK = re.compile(r"^(?P<indent>[ ]*)```python[ ]*\n(?P<code>.*?)^(?P=indent)```[ ]*$", re.MULTILINE | re.DOTALL)
DIRECTIVE = re.compile(r"<!--\s*test:\s*(?P<how>[^>]*?)\s*-->\s*$")
#: the groups that spawn processes or train for more than a few seconds: the quick loop leaves them out
SLOW = {"distributed.md", "frameworks.md"}


def blocks(page: pathlib.Path) -> list[tuple[int, str, str]]:
    """(line, how, code) of every python block of ``page``; how: "" (in order with the page's others),
    "torchrun N" or "cuda"."""
    text = page.read_text()
    found = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        directive = DIRECTIVE.search(before)
        found.append((line, directive.group("how") if directive else "", textwrap.dedent(match.group("code"))))
    return found


def programs() -> list:
    """One pytest param per program: the page's ordinary blocks together, and each directed block alone."""
    params = []
    for page in PAGES:
        found = blocks(page)
        ordinary = [(line, code) for line, how, code in found if not how]
        groups = [("in order", ordinary)] if ordinary else []
        groups += [(f"{how} (line {line})", [(line, code)]) for line, how, code in found if how]
        for name, parts in groups:
            marks = [pytest.mark.slow] if page.name in SLOW or name.startswith("torchrun") else []
            params.append(pytest.param(page, name, parts, id=f"{page.name}:{name}", marks=marks))
    return params


def _source(page: pathlib.Path, parts: list[tuple[int, str]]) -> str:
    return "".join(f"# ---- {page.name}, the block at line {line}\n{code}\n" for line, code in parts)


@pytest.mark.parametrize(("page", "name", "parts"), programs())
def test_the_examples_run(tmp_path, page, name, parts):
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"{page.name}, line {parts[0][0]}: needs a CUDA device")
    script = tmp_path / "example.py"
    source = _source(page, parts)
    if name.startswith("torchrun"):
        # the example has run (an error has ended it already); skip the interpreter's teardown, where
        # gloo's threads can abort a process ("terminate called without an active exception") once in
        # a few dozen runs, whatever the program did (tests/dist_workers.py does the same)
        source += "import os, sys\nsys.stdout.flush()\nsys.stderr.flush()\nos._exit(0)\n"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update(OMP_NUM_THREADS="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    command = [sys.executable, str(script)]
    if name.startswith("torchrun"):
        processes = name.split()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        command.append(str(script))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, f"{page.name} ({name}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


def test_the_pages_have_examples_and_the_directives_are_known():
    every = [(page, how) for page in PAGES for _, how, _ in blocks(page)]
    assert len(every) >= 20, every  # the docs are full of examples: a parsing slip would drop them all
    for page, how in every:
        assert how in ("", "cuda") or re.fullmatch(r"torchrun \d+", how), (page.name, how)
    python_fences = sum(page.read_text().count("```python") for page in PAGES)
    assert python_fences == len(every)  # no python block escapes the pattern (e.g. indented oddly)
