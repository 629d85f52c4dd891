"""The example training scripts, run for real as a user would, at tiny sizes on the CPU."""

import importlib.util
import json
import math
import os
import pathlib
import pickle
import random
import signal
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _load_example_module(name: str):
    """Import ``examples/<name>.py`` without putting examples/ on sys.path for every other test."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cifar_resnet = _load_example_module("cifar_resnet")

# 64 synthetic images, a ResNet-18 with 4 channels in its first stage, 4 steps per epoch
TINY = [
    "--synthetic",
    "64",
    "--width",
    "4",
    "--epochs",
    "2",
    "--batch-size",
    "16",
    "--splits",
    "2",
    "--samples",
    "2",
    "--device",
    "cpu",
    "--no-progress",
]


def run(command: list[str], timeout: float = 120) -> str:
    """Run ``command`` from the repository root; its stdout, or a failure showing both streams."""
    # one thread: two threads per process on a busy 2-core machine run several times slower
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def load(out: pathlib.Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=False)


def assert_same_tensors(a, b, where: str = "") -> None:
    """Recursively: every tensor in ``a`` equals the one in ``b`` bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}/{i}")


def check_results(out: pathlib.Path, epochs: int, bma: bool) -> None:
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == list(range(1, epochs + 1))
    assert all(math.isfinite(row["train_loss"]) for row in log)
    results = json.loads((out / "results.json").read_text())
    assert set(results) == ({"at_mean", "bma_2"} if bma else {"at_mean"})
    for metrics in results.values():
        assert 0 <= metrics["accuracy"] <= 1 and math.isfinite(metrics["nll"]) and metrics["nll"] > 0


@pytest.mark.slow
def test_train_checkpoints_and_resumes_bit_for_bit(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    script = [sys.executable, str(EXAMPLES / "train.py"), *TINY]
    run([*script, "--out", str(straight)])
    run([*script, "--out", str(resumed), "--stop-after", "1"])
    assert load(resumed)["epoch"] == 1 and not (resumed / "results.json").exists()
    assert "resumed from" in run([*script, "--out", str(resumed), "--resume"])

    check_results(straight, epochs=2, bma=True)
    check_results(resumed, epochs=2, bma=True)
    a, b = load(straight), load(resumed)
    assert a["epoch"] == b["epoch"] == 2
    assert a["optimizer"]["param_groups"][0]["step"] == 8  # 2 epochs of 64 // 16 steps
    for key in ("model", "optimizer", "scheduler"):
        assert_same_tensors(a[key], b[key], key)
    assert json.loads((straight / "results.json").read_text()) == json.loads((resumed / "results.json").read_text())


def run_killed(command: list[str], timeout: float = 120) -> None:
    """Run ``command``, which must end by SIGKILL (its fault injection)."""
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == -signal.SIGKILL, f"expected SIGKILL, got {done.returncode}:\n{done.stdout}\n{done.stderr}"


def logged(out: pathlib.Path) -> list[dict]:
    """The epochs' log rows without their wall-clock seconds."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["after a step", "while writing a checkpoint"])
def test_train_killed_at_a_random_moment_resumes_to_the_same_end(tmp_path, where):
    """SIGKILL at a random step, or halfway through writing a checkpoint (the temporary file is cut
    short, the last whole checkpoint stays): --resume ends bitwise where an uninterrupted run ends.

    2 epochs of 4 steps, a checkpoint every 3 steps: checkpoints are written after steps 3, 4 (end of
    epoch 1), 6 and 8; a kill after step 3..7 or in writes 2..4 leaves one to resume from, and steps to
    replay after it (the drawn moment is printed: pytest shows it when the test fails)."""
    rng = random.SystemRandom()
    fault = (
        ["--kill-at", str(rng.randint(3, 7))]
        if where == "after a step"
        else ["--kill-in-checkpoint", str(rng.randint(2, 4))]
    )
    print("fault:", *fault)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    script = [sys.executable, str(EXAMPLES / "train.py"), *TINY, "--checkpoint-every", "3"]
    run([*script, "--out", str(straight)])
    run_killed([*script, "--out", str(killed), *fault])
    if where == "while writing a checkpoint":
        assert (killed / "checkpoint.pt.tmp").is_file()  # the cut-short write, never renamed into place
    assert "resumed from" in run([*script, "--out", str(killed), "--resume"])
    a, b = load(straight), load(killed)
    for key in ("model", "optimizer", "scheduler", "rng"):
        assert_same_tensors(a[key], b[key], key)
    assert a["optimizer"]["param_groups"][0]["step"] == 8
    assert json.loads((straight / "results.json").read_text()) == json.loads((killed / "results.json").read_text())
    assert logged(straight) == logged(killed)


@pytest.mark.slow
def test_train_killed_between_an_epoch_checkpoint_and_its_log_row_logs_it_once(tmp_path):
    """The epoch's checkpoint is written, then its log row: a run killed in between (here: the row is
    taken away, as such a kill leaves it) logs that row on resume, once, and the log ends as an
    uninterrupted run's."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    script = [sys.executable, str(EXAMPLES / "train.py"), *TINY]
    run([*script, "--out", str(straight)])
    run([*script, "--out", str(killed), "--stop-after", "1"])
    (killed / "log.jsonl").write_text("")
    run([*script, "--out", str(killed), "--resume"])
    assert [row["epoch"] for row in logged(killed)] == [1, 2]
    assert logged(straight) == logged(killed)


@pytest.mark.slow
def test_train_sgd_with_bfloat16_autocast_and_clipping(tmp_path):
    run(
        [
            sys.executable,
            str(EXAMPLES / "train.py"),
            *TINY,
            "--optimizer",
            "sgd",
            "--amp",
            "bf16",
            "--max-grad-norm",
            "1.0",
            "--out",
            str(tmp_path),
        ]
    )
    check_results(tmp_path, epochs=2, bma=False)
    assert load(tmp_path)["optimizer"]["state"], "SGD never stepped"


@pytest.mark.slow
def test_train_ddp_two_processes_checkpoints_and_resumes(tmp_path):
    def launch(*extra: str) -> str:
        return run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",  # torchrun picks a free port itself: no race for one
                "--nproc_per_node=2",
                str(EXAMPLES / "train_ddp.py"),
                *TINY,
                "--out",
                str(tmp_path),
                *extra,
            ],
            timeout=180,
        )

    launch("--stop-after", "1")
    first = load(tmp_path)
    assert first["epoch"] == 1 and first["world_size"] == 2
    assert "resumed from" in launch("--resume")
    check_results(tmp_path, epochs=2, bma=True)
    final = load(tmp_path)
    # 2 processes × 8 images: 4 steps per epoch, as train.py takes on the same batch size
    assert final["epoch"] == 2 and final["optimizer"]["param_groups"][0]["step"] == 8
    assert not torch.equal(final["model"]["head.weight"], first["model"]["head.weight"])


def write_cifar_batch(path: pathlib.Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """A batch file in the format of CIFAR-10's python version: rows of 3072 bytes, channel-major."""
    with open(path, "wb") as f:
        pickle.dump({b"data": images.reshape(len(images), -1).numpy(), b"labels": labels.tolist()}, f)


def test_cifar10_batches_are_read_in_order(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = torch.randint(256, (6, 5, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(10, (6, 5))
    for i in range(5):
        write_cifar_batch(folder / f"data_batch_{i + 1}", images[i], labels[i])
    write_cifar_batch(folder / "test_batch", images[5], labels[5])
    assert cifar_resnet.find_cifar10(tmp_path) == folder == cifar_resnet.find_cifar10(folder)
    train, test, described = cifar_resnet.load_data(str(tmp_path), synthetic=None)
    assert torch.equal(train.images, images[:5].flatten(0, 1)) and torch.equal(train.labels, labels[:5].flatten())
    assert torch.equal(test.images, images[5]) and torch.equal(test.labels, labels[5])
    assert "CIFAR-10" in described
    train, _, described = cifar_resnet.load_data(str(tmp_path), synthetic=40)  # --synthetic wins
    assert len(train) == 40 and "synthetic" in described
    train, _, described = cifar_resnet.load_data(str(tmp_path / "nowhere"), synthetic=None)
    assert train.images.shape == (5000, 3, 32, 32) and "no cifar-10-batches-py" in described


def test_augment_is_a_padded_crop_then_maybe_a_flip():
    images = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)  # no zeros: padding is visible
    out = cifar_resnet.augment(images, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flips = shifts = 0
    for image, result in zip(padded, out):
        matches = [
            (top, left, flip)
            for top in range(9)
            for left in range(9)
            for flip in (False, True)
            if torch.equal(result.flip(-1) if flip else result, image[:, top : top + 32, left : left + 32])
        ]
        assert len(matches) == 1, "not a single crop of the padded image"
        flips += matches[0][2]
        shifts += matches[0][:2] != (4, 4)
    assert 16 < flips < 48 and shifts > 48  # both happen, about half of the images flipped


def test_evaluate_bma_nll_of_a_confident_mistake_is_finite():
    # a linear model that puts logit 200 on class 1 for every image: in float32 the softmax
    # of class 0 underflows to 0, so averaging softmaxes and then taking the log gives inf
    import sambayes

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.0, 200.0]))
    opt = sambayes.BSAM(model.parameters(), num_data=10**9, init_precision=1.0)  # tiny posterior noise
    test = cifar_resnet.Images(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]))
    for samples in (0, 3):
        result = cifar_resnet.evaluate(model, opt, test, batch_size=3, samples=samples)
        assert result["accuracy"] == 0.5
        assert math.isfinite(result["nll"]) and result["nll"] == pytest.approx(100, rel=1e-3)  # (200 + 0) / 2
        assert result["ece"] == pytest.approx(0.5, abs=1e-6)
    assert model.training  # put back in its mode


@pytest.mark.slow
def test_bf16_state_evidence_runs_and_writes_its_table(tmp_path):
    out = run([sys.executable, str(EXAMPLES / "bf16_state.py"), "--quick", "--seeds", "0", "1", "--out", str(tmp_path)])
    table = (tmp_path / "bf16_state.md").read_text()
    assert table in out
    # two runs x (mean, BMA) x (accuracy, nll, ece)
    assert table.count("| demo (2 epochs") == 6 and table.count("| longer (8 epochs, β2 0.999)") == 6
    rows = (tmp_path / "bf16_state.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 2 * 2  # runs x states x seeds x predictions
    assert (tmp_path / "bf16_state.png").stat().st_size > 10_000
