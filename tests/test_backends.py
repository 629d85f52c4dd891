"""The dispatch layer (sambayes.backends): buckets, the one fallback, resolution, and the
package's shape: no import cycles, an eager backend that depends on nothing but torch and
the reference noise, backend modules that do not know each other, the kernels beside the
package, the specification shipped with it."""

import ast
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE
from harness import COMPARED, Guarded, assert_rounded, normal

import sambayes
from sambayes import backends, phases

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sambayes"


def _record_calls(monkeypatch, backend, phase):
    """Wrap ``phase`` of the backend (and of the fallback) to record the tensors each was given."""
    calls = []
    for name in dict.fromkeys([backend, backends.FALLBACK]):
        table = backends.implementations(backends.resolve(name, DEVICE))
        original = table[phase]

        def recording(*lists, _name=name, _original=original, **hyper):
            calls.append((_name, [id(t) for t in lists[0]]))
            return _original(*lists, **hyper)

        monkeypatch.setitem(table, phase, recording)
    return calls


@pytest.mark.parametrize("backend", COMPARED)
def test_non_contiguous_tensors_go_to_the_fallback(monkeypatch, backend):
    """A transposed parameter goes to eager whatever the backend; the others stay on it."""
    calls = _record_calls(monkeypatch, backend, phases.RESTORE)
    base = torch.randn(33, 17, device=DEVICE)
    params = [torch.full((17, 33), float("nan"), device=DEVICE).T, Guarded([5, 1025], torch.float32)]
    flat = [params[0]] + params[1].tensors
    weights = [base, *normal([5, 1025], torch.float32)]
    backends.run(backend, phases.RESTORE, flat, weights)
    params[1].check("restore")
    assert_rounded(flat, weights, "param")
    assert sorted(calls) == sorted([(backends.FALLBACK, [id(flat[0])]), (backend, [id(flat[1]), id(flat[2])])])


@pytest.mark.parametrize("backend", COMPARED)
def test_non_contiguous_gradients_go_to_the_fallback(monkeypatch, backend):
    calls = _record_calls(monkeypatch, backend, phases.SAM_PERTURB)
    weights = normal([12, 12], torch.float32)
    grads = [torch.randn(24, device=DEVICE)[::2], *normal([12], torch.float32)]  # a strided view, then a dense one
    params = [torch.full((12,), float("nan"), device=DEVICE) for _ in range(2)]
    scale, inv_scale = torch.tensor(0.5, device=DEVICE), torch.ones((), device=DEVICE)
    want = [w + 0.5 * g for g, w in zip(grads, weights)]
    backends.run(backend, phases.SAM_PERTURB, params, grads, weights, inv_scale=inv_scale, scale=scale, adaptive=False)
    for p, w in zip(params, want):
        torch.testing.assert_close(p, w, rtol=1e-6, atol=1e-6)
    assert sorted(calls) == sorted([(backends.FALLBACK, [id(params[0])]), (backend, [id(params[1])])])


def test_one_call_per_bucket_of_device_and_dtype(monkeypatch):
    calls = _record_calls(monkeypatch, "foreach", phases.RESTORE)
    dtypes = [torch.float32, torch.float64, torch.float32, torch.bfloat16]
    params = [torch.zeros(3, dtype=d, device=DEVICE) for d in dtypes]
    weights = [
        torch.ones(3, dtype=torch.float64 if d == torch.float64 else torch.float32, device=DEVICE) for d in dtypes
    ]
    backends.run("foreach", phases.RESTORE, params, weights)
    assert sorted(len(ids) for _, ids in calls) == [1, 1, 2]  # float32 twice, float64, bfloat16
    assert all(name == "foreach" for name, _ in calls)
    assert all(torch.equal(p, torch.ones_like(p)) for p in params)


def test_auto_is_resolved_once_per_device():
    backends._pick.cache_clear()
    params, weights = [torch.zeros(3)], [torch.ones(3)]
    for _ in range(5):
        backends.run("auto", phases.RESTORE, params, weights)
    info = backends._pick.cache_info()
    assert info.misses == 1 and info.hits == 4
    expected = next(n for n in backends.AUTO_ORDER["cpu"] if backends.why_unavailable(n, "cpu") is None)
    assert backends.pick("auto", "cpu") == expected


def test_unknown_and_unavailable_backends_say_why():
    with pytest.raises(ValueError, match="choose one of"):
        backends.pick("fast", "cpu")
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        backends.pick("cuda", "cpu")
    from sambayes.cli import info

    report = info.report()
    for name in backends.NAMES:
        assert f"  {name} " in report


# ---- the package's shape -----------------------------------------------------------------------


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The sambayes modules a file imports anywhere (at module level, inside functions, or through
    ``importlib.import_module`` with a constant name), as dotted names.

    ``from X import a`` counts as importing the module ``X.a`` when there is one, else ``X``.
    """
    parts = _dotted(path).split(".") + (["__init__"] if path.name == "__init__.py" else [])
    base = parts[:-1]  # the package that level-1 relative imports start from (for __init__: itself)

    def absolute(module, level: int) -> str:
        parent = base[: len(base) - level + 1] if level else []
        return ".".join(parent + ([module] if module else []))

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = absolute(node.module, node.level)
            for alias in node.names:
                found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            name = node.args[0].value
            if name.startswith("."):  # relative to the package the second argument names: ours
                level = len(name) - len(name.lstrip("."))
                name = absolute(name.lstrip("."), level)
            found.add(name)
    return {m for m in found if m.startswith("sambayes")}


def _dotted(path: pathlib.Path) -> str:
    """The module name of a file of the package (kernels/ is installed as sambayes.kernels)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":
        parts.insert(0, "sambayes")
    return ".".join(parts).removesuffix(".__init__")


def _module_files() -> dict[str, pathlib.Path]:
    paths = [*PACKAGE.rglob("*.py"), *(ROOT / "kernels").glob("*.py")]
    return {_dotted(path): path for path in paths}


def test_no_import_cycles_in_the_package():
    """The graph of imports between sambayes modules is acyclic, counting imports inside functions and through
    importlib (checked on the source): a module that needs another lazily still depends on it."""
    files = _module_files()
    graph = {name: {m for m in _imports(path, set(files)) if m in files and m != name} for name, path in files.items()}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_eager_depends_on_torch_and_the_reference_noise_only():
    tree = ast.parse((PACKAGE / "backends" / "eager.py").read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            modules.add(("." * node.level) + (node.module or "") + ":" + ",".join(a.name for a in node.names))
        elif isinstance(node, ast.Import):
            modules.update(a.name for a in node.names)
    assert modules <= {"torch", "__future__:annotations", "..:_philox"}, modules


def test_backend_modules_do_not_import_each_other():
    folder = PACKAGE / "backends"
    names = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    for path in folder.glob("*.py"):
        if path.stem == "__init__":
            continue
        imported = {
            m.rsplit(".", 1)[-1] for m in _imports(path, set(_module_files())) if m.startswith("sambayes.backends")
        }
        assert not imported & names, f"{path.name} imports {imported & names}"


def test_kernels_are_the_ones_beside_the_package():
    from sambayes import kernels

    here = pathlib.Path(sambayes.__file__).resolve().parent
    assert pathlib.Path(kernels.__file__).resolve().parent in (here / "kernels", here.parent / "kernels")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["source tree", "installed"])
def test_another_copy_on_sys_path_gets_its_own_kernels(tmp_path, layout):
    """A second copy imported while this one is installed editable loads its own kernels, from
    ``kernels/`` beside the package (a source tree) or ``sambayes/kernels/`` (a regular install)."""
    other = tmp_path / "other"
    shutil.copytree(PACKAGE, other / "sambayes", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    kernels = other / "kernels" if layout == "source tree" else other / "sambayes" / "kernels"
    shutil.copytree(ROOT / "kernels", kernels, ignore=shutil.ignore_patterns("__pycache__"))
    (kernels / "__init__.py").write_text('"""the other copy\'s kernels"""\nMARK = "other"\n')
    code = "import sambayes, sambayes.kernels as k; print(k.__file__, k.MARK, sambayes.kernels is k)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=other, capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    assert out == [str(kernels / "__init__.py"), "other", "True"], out


def test_the_specification_ships_with_the_project():
    shipped = ROOT / "ALGORITHM.md"
    assert shipped.is_file()
    upstream = ROOT.parent / "shared" / "ALGORITHM.md"
    if upstream.is_file():  # beside the repository: the two must be identical
        assert shipped.read_text() == upstream.read_text(), "ALGORITHM.md differs from ../shared/ALGORITHM.md"


def test_the_golden_data_are_the_shared_ones():
    """tests/data holds copies of the authors' trajectories and the noise vectors, kept identical."""
    upstream = ROOT.parent / "shared" / "golden"
    if not upstream.is_dir():
        pytest.skip("no ../shared/golden beside the repository")
    for path in upstream.glob("*.json"):
        copy = ROOT / "tests" / "data" / path.name
        assert copy.is_file(), f"tests/data/{path.name} is missing"
        assert copy.read_bytes() == path.read_bytes(), f"tests/data/{path.name} differs from ../shared/golden"


@pytest.mark.slow
def test_collecting_the_tests_compiles_nothing(tmp_path):
    """The C++ extension compiles on first use: when a test runs it, not when pytest collects the tests."""
    if importlib.util.find_spec("sambayes._C") is not None:
        pytest.skip("the extension was built at install: nothing would compile")
    env = {**os.environ, "SAMBAYES_BUILD_DIR": str(tmp_path / "build")}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "compiling the C++ extension" not in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "build").exists() or not any((tmp_path / "build").iterdir())
