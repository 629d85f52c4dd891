"""examples/gpt.py, run for real at a tiny size on the CPU: bSAM against AdamW on one process,
kill-and-resume, and two processes on gloo with DDP and with FSDP2."""

import csv
import importlib.util
import json
import math
import os
import random
import shutil
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_examples import EXAMPLES, assert_same_tensors, logged, run_killed

import sambayes


def _load_gpt():
    """Import examples/gpt.py as ``gpt`` (registered first: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("gpt", EXAMPLES / "gpt.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpt"] = module
    spec.loader.exec_module(module)
    return module


gpt = sys.modules.get("gpt") or _load_gpt()

# a 34,688-parameter GPT (2 layers, 2 heads, 32 wide, 32 bytes of context), 8 sequences a step
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8"]
TINY += ["--no-progress", "--threads", "1"]
# 40 steps of each optimizer, a checkpoint every 10
LONG = [*TINY, "--steps", "40", "--log-every", "5", "--eval-every", "10", "--checkpoint-every", "10"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """``--optimizer both`` for 40 steps, uninterrupted, in this process."""
    out = tmp_path_factory.mktemp("straight")
    threads = torch.get_num_threads()
    try:
        gpt.main([*LONG, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out


def read_table(out) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_both_optimizers_train_and_write_the_comparison(straight):
    table = read_table(straight)
    assert [row["optimizer"] for row in table] == ["bsam", "adamw"]
    for row in table:
        assert row["steps"] == "40" and row["tokens"] == str(40 * 8 * 32)  # the same budget
        assert math.isfinite(float(row["final_val_loss"])) and float(row["tokens_per_second"]) > 0
    assert "| bsam |" in (straight / "results.md").read_text()
    assert (straight / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("bsam", "adamw"):
        rows = [json.loads(line) for line in (straight / name / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(0, 41, 5))
        assert [r["step"] for r in rows if "val_loss" in r] == [0, 10, 20, 30, 40]
        train = [r["train_loss"] for r in rows if "train_loss" in r]
        val = [r["val_loss"] for r in rows if "val_loss" in r]
        assert all(math.isfinite(x) for x in train + val)
        assert val[0] == pytest.approx(math.log(256), abs=0.2)  # a fresh model: about uniform over bytes
        # 40 steps of 256 bytes: both fall well below the uniform 5.55 nats (to about 3.1 for bSAM, 3.7 for AdamW)
        assert val[-1] < val[0] - 1.0 and train[-1] < train[0] - 1.0, name
        summary = json.loads((straight / name / "summary.json").read_text())
        assert summary["final_val_loss"] == val[-1] and summary["parameters"] == 34_688
    bsam, adamw = (json.loads((straight / n / "summary.json").read_text()) for n in ("bsam", "adamw"))
    # persistent state: bSAM's mean, precision and momentum, AdamW's two moments (float32 each), step counters aside
    assert bsam["state_bytes_per_param"] == pytest.approx(12, abs=0.01)
    assert adamw["state_bytes_per_param"] == pytest.approx(8, abs=0.01)
    assert bsam["held_bytes_per_param"] >= bsam["state_bytes_per_param"]
    assert bsam["in_step_bytes_per_param"] >= bsam["state_bytes_per_param"] + 4  # its curvature sum at least


def test_bsam_with_bfloat16_state_keeps_8_bytes_per_parameter(tmp_path):
    gpt.main([*TINY, "--steps", "6", "--optimizer", "bsam", "--bsam-state", "bfloat16", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "bsam" / "summary.json").read_text())
    assert summary["state_bytes_per_param"] == pytest.approx(8, abs=0.01)
    assert math.isfinite(summary["final_val_loss"])
    state = torch.load(tmp_path / "bsam" / "checkpoint.pt", weights_only=False)["optimizer"]["state"]
    assert {s["precision"].dtype for s in state.values()} == {torch.bfloat16}


@pytest.mark.parametrize("state", ["float32", "bfloat16"])
def test_ivon_trains_the_gpt_with_one_pass_per_step(tmp_path, state):
    """``--optimizer ivon``: one forward-backward pass per step, 12 B of state per parameter (8 in bfloat16), no
    sum kept between steps with one sample, and the loss goes down."""
    gpt.main([*TINY, "--steps", "8", "--optimizer", "ivon", "--ivon-state", state, "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "ivon" / "summary.json").read_text())
    assert summary["passes_per_step"] == 1
    assert summary["state_bytes_per_param"] == pytest.approx(12 if state == "float32" else 8, abs=0.01)
    assert summary["held_bytes_per_param"] == pytest.approx(summary["state_bytes_per_param"], abs=0.01)
    rows = gpt.read_log(tmp_path / "ivon" / "log.jsonl")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert [row["optimizer"] for row in read_table(tmp_path)] == ["ivon"]


@pytest.mark.slow
def test_killed_twice_resumes_to_the_same_end(straight, tmp_path):
    """SIGKILL after a random step of bSAM; the resumed run SIGKILLed again halfway through a random
    checkpoint write (bSAM's or AdamW's); a second resume ends exactly where the uninterrupted run ends:
    the same weights, optimizer states, log rows and results (the drawn moments are printed)."""
    rng = random.SystemRandom()
    kill_at, kill_in_checkpoint = rng.randint(10, 39), rng.randint(1, 3)
    print("kill at step", kill_at, "then in checkpoint write", kill_in_checkpoint)
    script = [str(EXAMPLES / "gpt.py"), *LONG, "--out", str(tmp_path)]
    run_killed([sys.executable, *script, "--kill-at", str(kill_at)])
    assert not (tmp_path / "adamw").exists()
    run_killed([sys.executable, *script, "--resume", "--kill-in-checkpoint", str(kill_in_checkpoint)])
    assert list(tmp_path.glob("*/checkpoint.pt.tmp")), "the cut-short write, never renamed into place"
    gpt.main([*LONG, "--out", str(tmp_path), "--resume"])
    for name in ("bsam", "adamw"):
        a = torch.load(straight / name / "checkpoint.pt", weights_only=False)
        b = torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)
        for key in ("model", "optimizer", "scheduler"):
            assert_same_tensors(a[key], b[key], f"{name}/{key}")
        assert b["step"] == 40
        assert logged(straight / name) == logged(tmp_path / name)
    # the same table, but for wall-clock times and the optimizers' few scalar flags (created anew on resume)
    memory = ("state_bytes_per_param", "held_bytes_per_param", "in_step_bytes_per_param")
    drop = ("train_seconds", "tokens_per_second", *memory)
    for a, b in zip(read_table(straight), read_table(tmp_path)):
        assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
        for key in memory:
            assert float(a[key]) == pytest.approx(float(b[key]), abs=0.01), key


# ---- two processes ------------------------------------------------------------------------------
DIST = [*TINY, "--steps", "12", "--log-every", "6", "--eval-every", "6", "--splits", "2", "--amp", "none"]
NAMES = ("bsam", "adamw")


def dist_worker(rank: int, world: int, init_file: str, runs: list) -> None:
    """Join a gloo group, then run gpt.main on each command line (it uses the group it finds); a pair
    (source, destination) is a folder that process 0 copies."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for argv in runs:
        if isinstance(argv, tuple):
            if rank == 0:
                shutil.copytree(*argv)
            dist.barrier()
        else:
            gpt.main(argv)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo's threads can abort interpreter teardown; the results are written already


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_ddp_and_fsdp2_on_two_processes_equal_one_process_and_resume(tmp_path):
    """Two processes, each optimizer stopped after step 6 and resumed from its checkpoint (FSDP2: sharded,
    with torch.distributed.checkpoint, and also resumed in one process): the same losses as one process
    with the same 2 sub-batches per step."""
    runs = []
    for mode in ("ddp", "fsdp2"):
        out = str(tmp_path / mode)
        runs += [[*DIST, "--dist", mode, "--out", out, "--optimizer", name, "--stop-after", "6"] for name in NAMES]
        if mode == "fsdp2":
            runs.append((out, str(tmp_path / "fsdp2-to-one")))
        runs += [[*DIST, "--dist", mode, "--out", out, "--optimizer", name, "--resume"] for name in NAMES]
    mp.spawn(dist_worker, args=(2, str(tmp_path / "init"), runs), nprocs=2)
    for name in ("bsam", "adamw"):
        assert [p.name for p in (tmp_path / "fsdp2-to-one" / name).glob("dcp-*")] == ["dcp-00000006"]
    for name in NAMES:  # DCP reshards into one process
        gpt.main([*DIST, "--out", str(tmp_path / "fsdp2-to-one"), "--optimizer", name, "--resume"])
    gpt.main([*DIST, "--out", str(tmp_path / "one")])

    reference = {row["optimizer"]: row for row in read_table(tmp_path / "one")}
    assert set(reference) == {"bsam", "adamw"}
    for mode, processes, finished_by in (("ddp", "2", "ddp"), ("fsdp2", "2", "fsdp2"), ("fsdp2-to-one", "1", "none")):
        table = read_table(tmp_path / mode)
        assert [row["optimizer"] for row in table] == ["bsam", "adamw"]
        for row in table:
            assert row["processes"] == processes and row["dist"] == finished_by
            one = reference[row["optimizer"]]
            assert float(row["final_val_loss"]) == pytest.approx(float(one["final_val_loss"]), rel=1e-5), mode
            # FSDP2: the shards' bytes summed over the processes, per parameter: what one process holds
            assert float(row["state_bytes_per_param"]) == pytest.approx(float(one["state_bytes_per_param"]), abs=0.02)
        for name in ("bsam", "adamw"):
            log = logged(tmp_path / mode / name)
            assert [r["step"] for r in log] == [0, 6, 12]  # the resumed run logged each step once
            for got, want in zip(log, logged(tmp_path / "one" / name)):
                assert got.keys() == want.keys(), (mode, name)  # step 0 has no training loss yet
                if "train_loss" in want:  # pytest 9's approx refuses None
                    assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5), (mode, name)
                assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5), (mode, name)
    for name in ("bsam", "adamw"):  # the older checkpoint deleted once the new one is in place
        assert [p.name for p in (tmp_path / "fsdp2" / name).glob("dcp-*")] == ["dcp-00000012"]


# ---- pieces -------------------------------------------------------------------------------------
def test_gpt2_small_preset_has_gpt2_small_shapes():
    args = gpt.parse_args(["--gpt2-small"])
    assert (args.n_layer, args.n_head, args.n_embd, args.block_size) == (12, 12, 768, 1024)
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig(args.n_layer, args.n_head, args.n_embd, args.block_size))
    # GPT-2 small's 124.4M minus the embedding rows of 50,257 - 256 tokens: 85.8M with a byte vocabulary
    assert gpt.count_parameters(model) == 124_439_808 - (50_257 - 256) * 768
    assert model.head.weight is model.wte.weight


def test_model_is_causal_and_shapes_follow_the_config():
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8)).eval()
    idx = torch.randint(256, (3, 8))
    logits = model(idx)
    assert logits.shape == (3, 8, 256)
    changed = idx.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 256
    other = model(changed)
    torch.testing.assert_close(other[:, :5], logits[:, :5])  # the past does not see the future
    assert not torch.allclose(other[:, 5:], logits[:, 5:])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_corpus_is_fixed_and_batches_are_a_function_of_seed_and_step():
    corpus = gpt.load_corpus(0.1)
    assert [p.stem if p.stem != "__init__" else p.parent.name for p in gpt.corpus_files()] == [
        m.split(".")[-1] for m in gpt.CORPUS_MODULES
    ]
    assert list(gpt.CORPUS_MODULES) == sorted(gpt.CORPUS_MODULES)
    assert len(corpus.train) > 1_000_000 and 0.09 < len(corpus.val) / (len(corpus.train) + len(corpus.val)) < 0.11
    assert corpus.description == gpt.load_corpus(0.1).description  # with its checksum
    a = gpt.batch_offsets(3, 0, 8, len(corpus.train), 32)
    assert torch.equal(a, gpt.batch_offsets(3, 0, 8, len(corpus.train), 32))
    assert not torch.equal(a, gpt.batch_offsets(4, 0, 8, len(corpus.train), 32))
    inputs, targets = gpt.windows(corpus.train, a, 32)
    assert torch.equal(inputs[:, 1:], targets[:, :-1]) and inputs.dtype == torch.int64


def test_process_shares_of_a_batch_keep_one_process_sub_batches():
    # 8 rows, 4 sub-batches of 2: DDP on 2 processes takes whole sub-batches 0, 2 and 1, 3
    assert gpt.local_rows(8, 4, 0, 2, "ddp").tolist() == [0, 1, 4, 5]
    assert gpt.local_rows(8, 4, 1, 2, "ddp").tolist() == [2, 3, 6, 7]
    # FSDP2: half of every sub-batch each
    assert gpt.local_rows(8, 4, 0, 2, "fsdp2").tolist() == [0, 2, 4, 6]
    assert gpt.local_rows(8, 4, 1, 2, "fsdp2").tolist() == [1, 3, 5, 7]
    assert gpt.local_rows(8, 2, 0, 1, "none").tolist() == list(range(8))


def test_optimizer_bytes_counts_state_and_scratch_not_parameters_or_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 3))
    n = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(8, 10), torch.randint(3, (8,))
    adamw = torch.optim.AdamW(model.parameters())
    torch.nn.functional.cross_entropy(model(x), y).backward()
    adamw.step()
    assert gpt.optimizer_bytes(adamw, model) == {"state": 8 * n + 4 * 4, "held": 8 * n + 4 * 4}  # + 4 step counters

    bsam = sambayes.BSAM(model, num_data=100)
    seen = {}

    def closure(j):
        loss = torch.nn.functional.cross_entropy(model(x[4 * j : 4 * j + 4]), y[4 * j : 4 * j + 4])
        loss.backward()
        seen.setdefault(j, []).append(gpt.optimizer_bytes(bsam, model))
        return loss

    bsam.step(closure, splits=2)
    assert gpt.optimizer_bytes(bsam, model)["state"] == 12 * n
    last_pass = seen[1][-1]
    # during the last pass: the curvature sums and the sums of the perturbed gradients over sub-batches
    assert last_pass["held"] >= 12 * n + 4 * n + 4 * n


def test_bad_flags_stop_with_a_message():
    for argv, message in (
        (["--splits", "3", "--batch-size", "8"], "does not divide"),
        (["--n-embd", "30", "--n-head", "4"], "not divisible by --n-head"),
    ):
        with pytest.raises(SystemExit, match=message):
            gpt.check_arguments(gpt.parse_args(argv), 1)
    with pytest.raises(SystemExit, match="not divisible by the 2 processes"):
        gpt.check_arguments(gpt.parse_args(["--splits", "1", "--dist", "ddp"]), 2)
    with pytest.raises(SystemExit, match="split over the 2 processes"):
        gpt.check_arguments(gpt.parse_args(["--splits", "16", "--dist", "fsdp2"]), 2)
