"""The demo end to end (``python -m sambayes demo --quick`` as a user runs it), its schedule,
its determinism, the graded shifts, IVON as an optional peer, and the figures' labels."""

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

import itertools

from sambayes.cli import demo, main

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROWS = ["SGD", "Adam", "SAM", "bSAM (mean)", "bSAM (4-sample BMA)", "IVON (mean)", "IVON (4-sample BMA)"]
ROWS += ["IVON (sambayes) (mean)", "IVON (sambayes) (4-sample BMA)"]
SEVERITIES = {shift: list(range(len(levels) + 1)) for shift, levels in demo.SHIFTS.items()}


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


@pytest.mark.slow
def test_cli_demo_quick_writes_table_and_figures(tmp_path):
    out = tmp_path / "demo"
    result = _run("demo", "--quick", "--seeds", "0", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"backend auto -> {demo.backend_name('auto', 'cpu')}," in result.stdout  # it says which backend ran
    assert "IVON skipped" not in result.stdout  # ivon-opt is part of the [test] extra
    pictures = ("reliability.png", "training_curves.png", "shift.png", "two_moons.png")
    tables = ("results.md", "results.csv", "runs.csv", "shift_runs.csv", "shift_results.csv", "shift_results.md")
    tables += ("verdicts.md", "verdicts.csv")
    for name in tables + pictures:
        assert (out / name).stat().st_size > 0, name
    for name in pictures:
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
        runs = list(csv.DictReader(f))
    assert len(runs) == 2 * len(ROWS)
    _check_shift_files(out, runs, seeds=["0", "1"])
    verdicts = (out / "verdicts.md").read_text()
    assert verdicts in result.stdout  # printed as written
    assert "| bSAM (4-sample BMA) − SAM | NLL | 2 |" in verdicts and "| SAM − SGD | blur: ECE | 2 |" in verdicts


def _check_shift_files(out: pathlib.Path, runs: list[dict], seeds: list[str]) -> None:
    with open(out / "shift_runs.csv") as f:
        shifted = list(csv.DictReader(f))
    assert list(shifted[0]) == ["method", "seed", "shift", "severity", "level", "accuracy", "nll", "ece"]
    keys = [(r["method"], r["seed"], r["shift"], int(r["severity"])) for r in shifted]
    expected = [(m, s, shift, k) for m in ROWS for s in seeds for shift in demo.SHIFTS for k in SEVERITIES[shift]]
    assert sorted(keys) == sorted(expected)  # every method x seed x shift x severity, once
    by_key = dict(zip(keys, shifted))
    clean = {(r["method"], r["seed"]): r for r in runs}
    for (method, seed, shift, severity), row in by_key.items():
        for key in ("accuracy", "nll", "ece"):
            assert math.isfinite(float(row[key])), (method, shift, severity, key)
        assert float(row["level"]) == ([0.0, *demo.SHIFTS[shift]])[severity]
        if severity == 0:  # the clean test set: the same numbers as runs.csv
            assert all(row[k] == clean[method, seed][k] for k in ("accuracy", "nll", "ece")), (row, clean[method, seed])
    for method in ROWS:
        for seed in seeds:
            for shift in demo.SHIFTS:
                first, last = by_key[method, seed, shift, 0], by_key[method, seed, shift, SEVERITIES[shift][-1]]
                # the strongest shift costs even a 2-epoch model >= 10 accuracy points and raises its NLL
                assert float(last["accuracy"]) < float(first["accuracy"]) - 10, (method, seed, shift)
                assert float(last["nll"]) > float(first["nll"]), (method, seed, shift)
    with open(out / "shift_results.csv") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == len(ROWS) * sum(len(v) for v in SEVERITIES.values())
    assert all(row["seeds"] == str(len(seeds)) for row in summary)
    assert "| IVON (4-sample BMA) |" in (out / "shift_results.md").read_text()


@pytest.mark.slow
def test_cli_info_lists_the_backends():
    result = _run("info")
    assert result.returncode == 0, result.stderr
    assert "eager" in result.stdout and "foreach" in result.stdout


@pytest.mark.slow
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


@pytest.mark.slow
def test_missing_extras_name_the_extra_to_install():
    # a child interpreter where scikit-learn cannot be imported
    code = "import sys; sys.modules['sklearn'] = None; from sambayes.cli import main; main(['demo', '--quick'])"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert result.returncode != 0
    assert "pip install 'sambayes[demo]'" in result.stderr and "scikit-learn" in result.stderr


@pytest.mark.slow
def test_no_plots_does_not_need_matplotlib(tmp_path):
    # a child interpreter where matplotlib cannot be imported
    code = (
        "import sys; sys.modules['matplotlib'] = None; from sambayes.cli import main; "
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


@pytest.mark.slow
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
        methods=["SGD", "bSAM", "IVON"],
        threads=1,
        no_plots=True,
    )
    return demo.run(args)


@pytest.mark.slow
def test_same_seed_same_table(tmp_path):
    first = _quick_table(tmp_path / "a", [3])
    second = _quick_table(tmp_path / "b", [3])
    other = _quick_table(tmp_path / "c", [4])
    metric_keys = [k for k in first[0] if k.endswith(("_mean", "_std")) and not k.startswith("train_s")]
    assert [row["method"] for row in first] == [
        "SGD",
        "bSAM (mean)",
        "bSAM (4-sample BMA)",
        "IVON (mean)",
        "IVON (4-sample BMA)",
    ]
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
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))  # decays after the warm-up


def test_load_digits_split_sizes_and_shift():
    data = demo.load_digits()
    assert data.x_train.shape == (1347, 8, 8) and data.x_test.shape == (450, 8, 8)
    assert data.x_ood.shape == data.x_test.shape and not (data.x_ood == data.x_test).all()
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0
    val = demo.load_digits(validation=True)
    assert val.x_train.shape[0] == 1047 and val.x_test.shape[0] == 300
    # validation = the last 300 training images: the test images stay unseen
    assert (val.x_test == data.x_train[-300:]).all() and (val.x_train == data.x_train[:-300]).all()


def test_default_seeds_are_five():
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args([])
    assert args.seeds == [0, 1, 2, 3, 4] and args.methods is None  # None: every method that is installed


@pytest.mark.slow
def test_without_ivon_the_demo_skips_its_rows_in_one_line(tmp_path):
    # a child interpreter where ivon cannot be imported
    code = (
        "import sys; sys.modules['ivon'] = None; from sambayes.cli import main; "
        f"main(['demo', '--quick', '--no-plots', '--seeds', '0', '--out', {str(tmp_path)!r}] + sys.argv[1:])"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert result.returncode == 0, result.stderr
    skipped = [line for line in result.stdout.splitlines() if "IVON" in line and "ivon-opt" in line]
    assert skipped == ["sambayes demo: IVON skipped: ivon-opt is not installed (pip install 'sambayes[demo]')"]
    with open(tmp_path / "results.csv") as f:  # sambayes's IVON needs no ivon-opt
        assert [row["method"] for row in csv.DictReader(f)] == ROWS[:5] + ROWS[7:]
    # asked for by name, it is a usage error before anything trains
    result = subprocess.run(
        [sys.executable, "-c", code, "--methods", "SGD", "IVON"],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 2 and "--methods IVON needs ivon-opt" in result.stderr, result.stderr
    assert "SGD" not in result.stdout


def test_the_verdicts_tell_the_two_ivons_apart():
    """IVON (sambayes) − IVON, both BMAs: a row of its own, not taken for ivon-opt's."""
    values = demo.verdicts.per_seed(
        _runs({"IVON (4-sample BMA)": [0.5, 0.6, 0.7], "IVON (sambayes) (4-sample BMA)": [0.51, 0.58, 0.72]}), []
    )
    (verdict,) = demo.verdicts.compare(values)
    assert (verdict["a"], verdict["b"]) == ("IVON (sambayes) (4-sample BMA)", "IVON (4-sample BMA)")
    assert verdict["verdict"] == "no clear difference"


def test_ivon_bma_draws_the_same_samples_and_leaves_the_global_generator_alone():
    import torch

    data = demo.load_digits()
    recipe = demo.Recipe().quick()
    trained = demo.train("IVON", data, recipe, seed=0)
    mean = [p.detach().clone() for p in trained.model.parameters()]
    state = torch.get_rng_state()
    first = demo.evaluate("IVON", trained, data, recipe, shifts=False)
    second = demo.evaluate("IVON", trained, data, recipe, shifts=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, m) for p, m in zip(trained.model.parameters(), mean))  # back at the mean
    assert [r["method"] for r in first] == ["IVON (mean)", "IVON (4-sample BMA)"]
    assert torch.equal(first[1]["probs"], second[1]["probs"]) and first[1]["nll"] == second[1]["nll"]
    assert not torch.equal(first[0]["probs"], first[1]["probs"])  # the samples are not the mean


@pytest.mark.parametrize("shift", list(demo.SHIFTS))
def test_shift_images_grade_and_repeat(shift):
    import torch

    x = demo.load_digits().x_test[:50]
    assert demo.shift_images(x, shift, 0) is x
    shifted = [demo.shift_images(x, shift, k) for k in SEVERITIES[shift][1:]]
    distances = [float((s - x).abs().mean()) for s in shifted]
    assert all(a < b for a, b in itertools.pairwise(distances)), distances  # graded: each level moves further
    for k, s in enumerate(shifted, start=1):
        assert s.shape == x.shape and s.dtype == x.dtype
        assert float(s.min()) >= 0 and float(s.max()) <= 1
        assert torch.equal(s, demo.shift_images(x, shift, k))  # the same images every time
    with pytest.raises(ValueError, match="severity=6"):
        demo.shift_images(x, shift, 6)


def test_blur_spreads_an_impulse_and_keeps_a_constant():
    import torch

    impulse = torch.zeros(1, 8, 8)
    impulse[0, 4, 4] = 1.0
    peaks = []
    for k in SEVERITIES["blur"][1:]:
        blurred = demo.shift_images(impulse, "blur", k)
        assert torch.allclose(blurred[0], blurred[0].T) and torch.allclose(
            blurred[0, 1:, 1:], blurred[0, 1:, 1:].flip(0, 1)
        )
        peaks.append(float(blurred[0, 4, 4]))
    assert all(a > b for a, b in itertools.pairwise(peaks))  # a wider blur, a lower peak
    assert float(demo.shift_images(impulse, "blur", 1).sum()) == pytest.approx(1.0, abs=1e-6)  # std 0.5: all inside
    constant = torch.full((2, 8, 8), 0.3)
    assert torch.allclose(demo.shift_images(constant, "blur", 5), constant)  # edges replicated: no dark border
    with pytest.raises(ValueError, match="shift='rotate'"):
        demo.shift_images(impulse, "rotate", 1)


def test_figures_say_mean_only_where_there_is_a_posterior(tmp_path):
    fig = demo.two_moons(tmp_path / "moons.png", steps=5, samples=2)
    sam, bsam = (ax for ax in fig.axes if ax.get_legend() is not None)
    sam_labels = [t.get_text() for t in sam.get_legend().get_texts()] + [sam.get_title()]
    bsam_labels = [t.get_text() for t in bsam.get_legend().get_texts()] + [bsam.get_title()]
    assert not any("mean" in label for label in sam_labels), sam_labels  # SAM has no posterior
    assert any("at the mean" in label for label in bsam_labels), bsam_labels
    filled = [c for ax in (sam, bsam) for c in ax.collections if getattr(c, "filled", False)]
    assert len(filled) == 2 and all(c.extend == "neither" for c in filled)  # no arrow below 0.5 on the colour bar
    assert fig.axes[-1].get_ylim() == (0.5, 1.0)  # confidence max(p, 1 − p) spans 0.5 .. 1
    curves = {
        m: [{"train_loss": [1.0, 0.5], "test_accuracy": [0.8, 0.9], "test_nll": [0.5, 0.3]}] for m in demo.METHODS
    }
    fig = demo.plot_curves(curves, tmp_path / "curves.png")
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert labels == ["SGD", "Adam", "SAM", "bSAM (mean)", "IVON (mean)", "IVON (sambayes) (mean)"]


def test_sweep_grid_changes_real_recipe_fields_around_every_default():
    import dataclasses
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_digits", ROOT / "examples" / "sweep_digits.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    fields = {f.name for f in dataclasses.fields(demo.Recipe)}
    for method, change in sweep.GRID:
        assert method in demo.METHODS and set(change) <= fields, (method, change)
        dataclasses.replace(demo.Recipe(), **change)  # a tuple knob stays a tuple, etc.
    assert [m for m, change in sweep.GRID if not change] == list(demo.METHODS)  # each default is scored once


def _runs(values: dict[str, list[float]], metric: str = "nll") -> list[dict]:
    return [{"method": m, "seed": str(i), metric: str(v)} for m, vs in values.items() for i, v in enumerate(vs)]


def test_a_verdict_is_a_paired_t_interval_over_seeds():
    # SAM − SGD per seed: -0.020, -0.021, -0.022 -> mean -0.021, sd 0.001, t(0.975, 2) = 4.302653
    values = demo.verdicts.per_seed(_runs({"SGD": [0.50, 0.60, 0.70], "SAM": [0.48, 0.579, 0.678]}), [])
    (verdict,) = demo.verdicts.compare(values)
    assert (verdict["a"], verdict["b"], verdict["claim"], verdict["seeds"]) == ("SAM", "SGD", "NLL", 3)
    half = 4.302653 * 0.001 / math.sqrt(3)
    assert verdict["difference"] == pytest.approx(-0.021)
    assert (verdict["low"], verdict["high"]) == pytest.approx((-0.021 - half, -0.021 + half), abs=1e-7)
    assert verdict["verdict"] == "SAM better"  # lower NLL, interval below 0
    # the seeds' spread (0.1 between seeds) does not enter: the differences are paired
    noisy = demo.verdicts.per_seed(_runs({"SGD": [0.5, 0.6, 0.7], "SAM": [0.51, 0.58, 0.72]}), [])
    assert demo.verdicts.compare(noisy)[0]["verdict"] == "no clear difference"
    higher = demo.verdicts.per_seed(_runs({"SGD": [98.0, 97.0, 96.0], "SAM": [98.5, 97.6, 96.4]}, "accuracy"), [])
    assert demo.verdicts.compare(higher)[0]["verdict"] == "SAM better"  # higher accuracy is better
    tiny = demo.verdicts.per_seed(_runs({"SGD": [0.5, 0.6, 0.7], "SAM": [0.49999, 0.60001, 0.69999]}), [])
    shown = demo.verdicts.format_verdicts(demo.verdicts.compare(tiny))  # -3e-6 [-1.8e-5, +1.2e-5]: no "-0.0000"
    assert "| SAM − SGD | NLL | 3 | +0.0000 [+0.0000, +0.0000] | no clear difference |" in shown, shown
    one = demo.verdicts.compare(demo.verdicts.per_seed(_runs({"SGD": [0.5], "SAM": [0.4]}), []))
    assert one[0]["verdict"] == "one seed: no verdict" and math.isnan(one[0]["low"])


def test_shift_verdicts_average_severities_one_to_five_only():
    shifted = [
        {
            "method": m,
            "seed": str(seed),
            "shift": "noise",
            "severity": str(k),
            "accuracy": "0",
            "ece": "0",
            "nll": str(base + (100 if k == 0 else k) + seed),
        }
        for m, base in (("SGD", 1.0), ("SAM", 0.0))
        for seed in range(3)
        for k in range(6)
    ]
    values = demo.verdicts.per_seed([], shifted)
    assert values["SAM", "noise_nll"] == {0: 3.0, 1: 4.0, 2: 5.0}  # mean of 1..5 (+ seed); severity 0 left out
    by_claim = {v["claim"]: v for v in demo.verdicts.compare(values)}
    assert by_claim["noise: NLL"]["difference"] == pytest.approx(-1.0)


def test_side_by_side_says_where_the_verdicts_differ(tmp_path):
    first = demo.verdicts.compare(
        demo.verdicts.per_seed(_runs({"SGD": [0.5, 0.6, 0.7], "SAM": [0.48, 0.579, 0.678]}), [])
    )
    second = demo.verdicts.compare(
        demo.verdicts.per_seed(_runs({"SGD": [0.5, 0.6, 0.7], "SAM": [0.51, 0.58, 0.72]}), [])
    )
    table = demo.verdicts.format_side_by_side({"cpu": first, "eager": second})
    assert "| SAM − SGD | NLL | -0.0210 [" in table and table.rstrip().endswith("| no clear difference | **no** |")
    same = demo.verdicts.format_side_by_side({"cpu": first, "eager": first})
    assert same.rstrip().endswith("| SAM better | yes |")


def test_verdicts_from_a_run_folder_are_the_ones_it_wrote(tmp_path):
    _quick_table(tmp_path, [0, 1])
    # and examples/demo_verdicts.py sets runs side by side: this one twice, under two names
    import importlib.util
    import shutil

    shutil.copytree(tmp_path, tmp_path / "again")
    spec = importlib.util.spec_from_file_location("demo_verdicts", ROOT / "examples" / "demo_verdicts.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    table = script.main([str(tmp_path), str(tmp_path / "again"), "--out", str(tmp_path / "side.md")])
    assert (tmp_path / "side.md").read_text() == table
    assert f"| {tmp_path.name}: difference | {tmp_path.name}: verdict | again: difference |" in table
    rows = [line for line in table.splitlines()[2:] if line]
    assert rows and all(line.endswith("| yes |") for line in rows)
    again = demo.verdicts.from_folder(tmp_path)
    assert demo.verdicts.format_verdicts(again) == (tmp_path / "verdicts.md").read_text()
    with open(tmp_path / "verdicts.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["a"], r["b"], r["claim"]) for r in rows] == [(v["a"], v["b"], v["claim"]) for v in again]
    compared = {(r["a"], r["b"]) for r in rows}  # SAM is not in this run: only the comparisons it holds
    assert compared == {("bSAM (4-sample BMA)", "IVON (4-sample BMA)"), ("bSAM (4-sample BMA)", "bSAM (mean)")}


def test_methods_are_case_insensitive_and_help_has_no_markup(capsys):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert parser.parse_args(["--methods", "sgd", "BSAM", "ivon", "ivon-SAMBAYES", "--backend", "CPU"]).methods == [
        "SGD",
        "bSAM",
        "IVON",
        "IVON (sambayes)",
    ]
    with pytest.raises(SystemExit):
        parser.parse_args(["--methods", "sgd", "nesterov"])
    assert "unknown method 'nesterov'; choose from SGD Adam SAM bSAM IVON IVON-sambayes" in capsys.readouterr().err
    for argv in (["demo", "--help"], ["--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "``" not in out and ":data:" not in out and ":func:" not in out, out
    assert all(method in out for method in demo.METHODS)  # the top-level help names every method
