"""The demo end to end (``python -m sambayes demo --quick`` as a user runs it), its schedule,
and its determinism."""

import argparse
import csv
import math
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from sambayes import demo
from sambayes.__main__ import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROWS = ["SGD", "Adam", "SAM", "bSAM (mean)", "bSAM (4-sample BMA)"]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "sambayes", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def test_cli_demo_quick_writes_table_and_figures(tmp_path):
    out = tmp_path / "demo"
    result = _run("demo", "--quick", "--seeds", "0", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"backend auto -> {demo.backend_name('auto', 'cpu')}," in result.stdout  # it says which backend ran
    for name in ("results.md", "results.csv", "runs.csv", "reliability.png", "training_curves.png", "two_moons.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("reliability.png", "training_curves.png", "two_moons.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    markdown = (out / "results.md").read_text()
    assert markdown in result.stdout  # the printed table is the written one
    assert [line.split(" | ")[0].strip("| ") for line in markdown.splitlines()[2:]] == ROWS
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["method"] for row in table] == ROWS
    for row in table:
        assert row["seeds"] == "2"
        assert 50 <= float(row["accuracy_mean"]) <= 100  # 2 epochs reach ~87 %: well above chance (10 %)
        for key in ("nll_mean", "ece_mean", "auroc_mean", "ood_auroc_mean", "nll_std"):
            assert math.isfinite(float(row[key])), (row["method"], key)
        assert 0 <= float(row["ece_mean"]) <= 1 and 0 <= float(row["auroc_mean"]) <= 1
    with open(out / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * len(ROWS)


def test_cli_info_lists_the_backends():
    result = _run("info")
    assert result.returncode == 0, result.stderr
    assert "eager" in result.stdout and "foreach" in result.stdout


def test_cli_rejects_an_unknown_backend():
    result = _run("demo", "--quick", "--backend", "nonsense")
    assert result.returncode != 0 and "nonsense" in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "foo"], "--device 'foo' is not a torch device"),
        (["--threads", "0"], "--threads 0: need at least 1"),
        (["--seeds", "-1"], "--seeds: -1 is negative"),
        (["--seeds", "1", "1"], "--seeds: 1 is given twice"),
        (["--out", "results.md/demo"], "cannot create the folder"),  # a file in the way
    ],
)
def test_cli_rejects_bad_flags_before_training(tmp_path, capsys, flags, message):
    (tmp_path / "results.md").write_text("a file, not a folder\n")
    flags = [str(tmp_path / f) if f.startswith("results.md") else f for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--quick", "--no-plots", "--out", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2  # argparse's usage error
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("sambayes demo: error: ") and message in last, captured.err
    assert captured.out == ""  # nothing ran


def test_cli_rejects_a_backend_or_device_that_is_not_here(tmp_path, capsys):
    import torch

    from sambayes import backends

    rejected = []
    if not torch.cuda.is_available():
        rejected.append((["--device", "cuda"], "--device cuda: this PyTorch"))
    for backend in backends.NAMES:
        if backends.why_unavailable(backend, "cpu") is not None:  # e.g. cuda; triton without TRITON_INTERPRET=1
            rejected.append((["--backend", backend], f"--backend {backend}: "))
    for flags, message in rejected:
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", "--quick", "--out", str(tmp_path), *flags])
        captured = capsys.readouterr()
        assert exit_info.value.code == 2 and f"sambayes demo: error: {message}" in captured.err, captured.err


def test_missing_extras_name_the_extra_to_install():
    # a child interpreter where scikit-learn cannot be imported
    code = "import sys; sys.modules['sklearn'] = None; from sambayes.__main__ import main; main(['demo', '--quick'])"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert result.returncode != 0
    assert "pip install 'sambayes[demo]'" in result.stderr and "scikit-learn" in result.stderr


def test_no_plots_does_not_need_matplotlib(tmp_path):
    # a child interpreter where matplotlib cannot be imported
    code = (
        "import sys; sys.modules['matplotlib'] = None; from sambayes.__main__ import main; "
        f"main(['demo', '--quick', '--no-plots', '--methods', 'SGD', '--seeds', '0', '--out', {str(tmp_path)!r}])"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "results.md").is_file() and not (tmp_path / "reliability.png").exists()
    # and with the figures it does need it
    code = code.replace("'--no-plots', ", "")
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert result.returncode == 2 and "needs matplotlib: pip install 'sambayes[demo]'" in result.stderr


def test_import_sambayes_does_not_need_the_demo_extras():
    code = "import sambayes, sambayes.metrics, sys; print('sklearn' in sys.modules, 'matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.split() == ["False", "False"], result.stderr


def _quick_table(out: pathlib.Path, seeds: list[int]) -> list[dict]:
    args = argparse.Namespace(
        quick=True,
        seeds=seeds,
        device="cpu",
        backend="auto",
        out=out,
        methods=["SGD", "bSAM"],
        threads=1,
        no_plots=True,
    )
    return demo.run(args)


def test_same_seed_same_table(tmp_path):
    first = _quick_table(tmp_path / "a", [3])
    second = _quick_table(tmp_path / "b", [3])
    other = _quick_table(tmp_path / "c", [4])
    metric_keys = [k for k in first[0] if k.endswith(("_mean", "_std")) and not k.startswith("train_s")]
    assert len(first) == 3  # SGD, bSAM (mean), bSAM (BMA)
    for a, b in zip(first, second):
        assert a["method"] == b["method"]
        assert all(a[k] == b[k] for k in metric_keys), (a, b)  # exactly, not approximately
    assert any(a[k] != c[k] for a, c in zip(first, other) for k in metric_keys)  # the seed matters


def test_lr_factor_warms_up_then_decays_to_zero():
    total, warmup = 100, 10
    factors = [demo.lr_factor(step, total, warmup) for step in range(total + 1)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0 and factors[10] == 1.0
    assert factors[55] == pytest.approx(0.5)  # cosine halfway
    assert factors[total] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_load_digits_split_sizes_and_shift():
    data = demo.load_digits()
    assert data.x_train.shape == (1347, 8, 8) and data.x_test.shape == (450, 8, 8)
    assert data.x_ood.shape == data.x_test.shape and not (data.x_ood == data.x_test).all()
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0
    val = demo.load_digits(validation=True)
    assert val.x_train.shape[0] == 1047 and val.x_test.shape[0] == 300
    # validation = the last 300 training images: the test images stay unseen
    assert (val.x_test == data.x_train[-300:]).all() and (val.x_train == data.x_train[:-300]).all()
