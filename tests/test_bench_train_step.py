"""benchmarks/bench_train_step.py --model gpt, run for real at a tiny size on the CPU: every row
timed, the table and the summary lines printed, the rows returned as the CSV would get them."""

from __future__ import annotations

import csv
import importlib.util
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "benchmarks" / "bench_train_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train_step"] = module
    spec.loader.exec_module(module)
    return module


bench_train_step = sys.modules.get("bench_train_step") or _load_bench()

# a 7,664-parameter GPT (1 layer, 2 heads, 16 wide, 16 bytes of context), 4 sequences, 2 timed steps per case
TINY = ["--model", "gpt", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16"]
TINY += ["--batch", "4", "--reps", "2", "--warmup", "0", "--threads", "1", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_gpt_rows_time_every_optimizer_and_print_the_table(capsys, tmp_path):
    out = tmp_path / "train_step.csv"
    rows = bench_train_step.main([*TINY, "--csv", str(out), "--note", "test"])
    printed = capsys.readouterr().out
    assert "GPT 1 layers, 2 heads, 16 wide, block 16 (7,664 parameters), batch 4, amp bf16, 2 rounds" in printed
    methods = [r["method"] for r in rows]
    every = (
        "fwd+bwd",
        "sgd",
        "adamw",
        "sam",
        "bsam",
        "IVON",
        "sgd-opt",
        "adamw-opt",
        "sam-opt",
        "bsam-opt",
        "IVON-opt",
    )
    for method in every:
        assert method in methods
        assert any(line.split()[:1] == [method] for line in printed.splitlines()), method
    if bench_train_step.ivon is not None:
        assert "ivon" in methods and "ivon: step / AdamW step = " in printed
    for method in ("sam", "bsam"):
        assert f"{method} (auto, k=1): step / SGD step = " in printed
    assert "IVON (auto): step / AdamW step = " in printed
    for r in rows:
        assert r["model"] == "gpt-l1-h2-e16-t16"
        assert r["amp"] == "bf16" and r["batch"] == 4 and r["median_ms"] > 0
    adamw = next(r for r in rows if r["method"] == "adamw")
    assert adamw["backend"] in ("fused", "foreach") and adamw["vs_adamw"] == 1.0
    assert next(r for r in rows if r["method"] == "bsam")["backend"] != "auto"  # resolved
    with open(out, newline="") as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == list(bench_train_step.FIELDS)
    assert [r["method"] for r in written] == methods


def test_a_shape_of_the_other_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_train_step.main(["--model", "gpt", "--width", "8", "--csv", ""])
    assert exit_info.value.code == 2
    assert "--width is not a shape of --model gpt" in capsys.readouterr().err
