"""benchmarks/bench_memory.py: its accounting finds what each optimizer keeps, byte for byte, and
the peak of a step; an extra buffer or a transient shows (so these tests can fail)."""

from __future__ import annotations

import csv
import importlib.util
import pathlib
import types

import pytest
import torch

import sambayes
from sambayes import backends
from sambayes.cli import bench

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "benchmarks" / "bench_memory.py")
bench_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_memory)

CPU = torch.device("cpu")
SHAPES = bench.synthetic_shapes(30_000, 3)  # odd sizes
NUMEL = sum(s[0] for s in SHAPES)
#: the fused CPU tier when the extension is there (no temporaries of its own), else the spec
FUSED = "cpu" if backends.why_unavailable("cpu", CPU, load=False) is None else "eager"
#: bytes a step's views of one buffer may add: each view padded to 16 bytes, two sums
PADDING = 2 * 16 * len(SHAPES)


def measure(optimizer, tier="", splits=1, dtype=torch.float32, keep_sums=False):
    """As on a GPU by default (keep_sums=False: the step's sums dropped between steps)."""
    make = bench_memory.maker(optimizer, tier, splits, keep_sums)
    return bench_memory.measure(make, SHAPES, dtype, CPU, steps=2)


def per_parameter(m) -> dict[str, float]:
    """What the optimizer keeps, bytes per parameter by where, the 0-dim counters and flags aside."""
    return {name: nbytes / m.numel for name, nbytes in m.held.by_name.items()}


@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("tier", sorted({"eager", FUSED}))
def test_bsam_keeps_12_bytes_per_float32_parameter(tier, splits):
    m = measure("bsam", tier, splits)
    assert m.numel == NUMEL
    assert m.held.bytes - m.held.scalar_bytes == 12 * NUMEL, m.held
    assert per_parameter(m) == {"state[*].mean": 4.0, "state[*].precision": 4.0, "state[*].momentum": 4.0}
    assert 0 < m.held.scalar_bytes < 100  # step counters and flags
    assert m.params_grads == 8 * NUMEL
    assert m.other == 0  # nothing else lives between steps: no cache, no leak


@pytest.mark.parametrize("splits", [1, 2])
def test_bsam_keeps_its_sums_on_the_cpu_by_default(splits):
    # keep_sums=None: kept between steps on the CPU, where allocating them again costs a page-faulting pass
    m = measure("bsam", FUSED, splits, keep_sums=None)
    sums = {"_pool.kept.curvature_sum[*]": 4.0} | ({"_pool.kept.grad_sum[*]": 4.0} if splits == 2 else {})
    assert per_parameter(m) == {"state[*].mean": 4.0, "state[*].precision": 4.0, "state[*].momentum": 4.0} | sums


@pytest.mark.parametrize("splits", [1, 2])
def test_bsam_peak_is_at_most_16_bytes_plus_parameters_gradients_and_grad_sum(splits):
    m = measure("bsam", FUSED, splits)
    # kept 12 + the step's curvature sum 4 (+ the sum over sub-batches 4), parameters 4 and gradients 4
    bound = (16 + 4 + 4 + (4 if splits == 2 else 0)) * NUMEL + m.held.scalar_bytes + PADDING
    if FUSED == "cpu":  # the fused kernels allocate nothing of their own
        assert (16 + 8 + 4 * (splits - 1)) * NUMEL <= m.peak <= bound
    assert m.peak > m.params_grads + m.held.bytes  # the step's sums do live within it


@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("tier", sorted({"eager", FUSED}))
def test_bsam_with_bfloat16_state_keeps_8_bytes_per_float32_parameter(tier, splits):
    m = measure("bsam-bf16", tier, splits)
    assert per_parameter(m) == {"state[*].mean": 4.0, "state[*].precision": 2.0, "state[*].momentum": 2.0}
    if tier == "cpu":  # the fused kernels allocate nothing of their own: 4 B less than float32 state
        assert m.peak == measure("bsam", tier, splits).peak - 4 * NUMEL
    # (eager draws the rounding's random words one tensor at a time through int64 temporaries: with
    # these three tensors, more than the 4 B per parameter saved; with 1,000,000 in 7, less: README)


def test_bsam_bfloat16_keeps_float32_state():
    m = measure("bsam", FUSED, 1, torch.bfloat16)
    assert m.held.bytes - m.held.scalar_bytes == 12 * NUMEL
    assert m.params_grads == 4 * NUMEL


@pytest.mark.parametrize(
    ("optimizer", "tier", "kept"),
    [
        ("sam-sgd", FUSED, {"state[*].weight": 4.0, "state[*].momentum": 4.0}),
        ("sam-adamw", FUSED, {"state[*].weight": 4.0, "state[*].momentum": 4.0, "state[*].variance": 4.0}),
        ("adamw", "foreach", {"state[*].exp_avg": 4.0, "state[*].exp_avg_sq": 4.0}),
        ("adamw", "fused", {"state[*].exp_avg": 4.0, "state[*].exp_avg_sq": 4.0}),
    ],
)
def test_what_sam_and_adamw_keep(optimizer, tier, kept):
    m = measure(optimizer, tier)
    assert per_parameter(m) == kept
    assert m.other == 0
    assert m.peak >= m.params_grads + m.held.bytes


@pytest.mark.parametrize("keep_sums", [False, None], ids=["dropped", "kept-on-cpu"])
@pytest.mark.parametrize("tier", sorted({"eager", FUSED}))
def test_ivon_keeps_12_bytes_per_float32_parameter_and_8_with_bfloat16_state(tier, keep_sums):
    """One sample: no running sum at all (the update computes the curvature from the gradient and the noise), so
    even where sums are kept between steps there are none; two samples keep theirs where asked."""
    for optimizer, stored in (("sambayes-ivon", 4.0), ("sambayes-ivon-bf16", 2.0)):
        m = measure(optimizer, tier, 1, keep_sums=keep_sums)
        assert per_parameter(m) == {"state[*].mean": 4.0, "state[*].precision": stored, "state[*].momentum": stored}
        assert m.other == 0
        if tier == "cpu":  # the fused kernels allocate nothing: the step adds to what is kept only 0-dim counters
            assert 0 <= m.peak - (m.params_grads + m.held.bytes) < 100
    two = per_parameter(measure("sambayes-ivon", tier, 2, keep_sums=keep_sums))
    sums = {"_pool.kept.grad_sum[*]": 4.0, "_pool.kept.curvature_sum[*]": 4.0} if keep_sums is None else {}
    assert two == {"state[*].mean": 4.0, "state[*].precision": 4.0, "state[*].momentum": 4.0} | sums


def test_peers_pytorch_optimizer_and_ivon():
    pytest.importorskip("pytorch_optimizer")
    pytest.importorskip("ivon")
    m = measure("pytorch_optimizer")
    assert per_parameter(m) == {"state[*].s": 4.0, "state[*].noisy_gradient": 4.0, "state[*].momentum": 4.0}
    m = measure("ivon")  # its parameters are views of one flat buffer after a step: counted once, as parameters
    assert per_parameter(m) == {"param_groups[*].momentum": 4.0, "param_groups[*].hess": 4.0}
    assert m.params_grads == 8 * NUMEL
    assert m.other == 0


class KeepsCurvatureSum(sambayes.BSAM):
    """The layout before: the curvature sums stay between steps."""

    def _end_step(self):
        self.kept = list(self._step.sums["curvature_sum"].values())
        super()._end_step()


def test_a_kept_buffer_is_counted():
    def make(params, grads):
        opt = KeepsCurvatureSum(params, num_data=100.0, seed=1, backend=FUSED, keep_sums=False)
        closure = bench.closure_for(params, grads)
        return opt, lambda: opt.step(closure)

    m = bench_memory.measure(make, SHAPES, torch.float32, CPU, steps=2)
    assert m.held.bytes - m.held.scalar_bytes in range(16 * NUMEL, 16 * NUMEL + PADDING + 1)
    assert "kept[*]" in m.held.by_name


def test_storages_are_counted_once_and_parameters_and_gradients_never():
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = sambayes.BSAM(params, num_data=100.0, backend="eager")
    opt.step(bench.closure_for(params, [torch.ones(s) for s in SHAPES]))
    base = bench_memory.held_by(opt, params)
    mean = opt.state[params[0]]["mean"]
    opt.views = [mean[1:], mean.view(-1, 1)]  # views of kept state: no new storage
    opt.aliases = {"param": params[1], "grad": params[1].grad, "nested": [(params[2].grad[:5],)]}
    assert bench_memory.held_by(opt, params) == base
    opt.cache = {"deep": [types.SimpleNamespace(buffer=torch.zeros(1000))]}  # a kept extra buffer
    held = bench_memory.held_by(opt, params)
    assert held.bytes == base.bytes + 4000
    assert held.by_name["cache.deep[*].buffer"] == 4000


def test_a_transient_shows_in_the_peak():
    def make(params, grads, extra):
        closure = bench.closure_for(params, grads)

        def step():
            closure()
            if extra:
                torch.ones(NUMEL).sum()  # 4 B per parameter, freed at once

        return types.SimpleNamespace(), step

    plain = bench_memory.measure(lambda p, g: make(p, g, False), SHAPES, torch.float32, CPU, steps=2)
    extra = bench_memory.measure(lambda p, g: make(p, g, True), SHAPES, torch.float32, CPU, steps=2)
    assert plain.peak == plain.params_grads == 8 * NUMEL
    assert 12 * NUMEL <= extra.peak <= 12 * NUMEL + 64  # + the 0-dim sum
    assert extra.held.bytes == 0 and extra.other == 0


def test_command_writes_rows_and_the_tables(tmp_path, capsys):
    out = tmp_path / "memory.csv"
    args = ["--numel", "4096", "--tensors", "3", "--dtypes", "float32", "--steps", "2", "--out", str(out)]
    bench_memory.main([*args, "--optimizers", "bsam", "--tiers", FUSED, "--label", "before"])
    rows = bench_memory.main([*args, "--optimizers", "bsam,adamw", "--tiers", f"{FUSED},triton", "--markdown"])
    printed = capsys.readouterr().out
    assert [(r["optimizer"], r["tier"], r["splits"]) for r in rows] == [
        ("bsam", FUSED, 1),
        ("bsam", FUSED, 2),
        ("adamw", "foreach", 1),
        ("adamw", "fused", 1),
    ]
    assert all(not r["error"] for r in rows)
    with open(out, newline="", encoding="utf-8") as f:
        saved = list(csv.DictReader(f))
    assert len(saved) == 6 and list(saved[0]) == bench_memory.FIELDS
    assert {r["label"] for r in saved} == {"before", ""}
    assert all(r["commit"] and r["date"] and r["device"] for r in saved)
    assert "skipped triton on cpu" in printed
    assert "| optimizer, tier | fp32 kept | fp32 peak k=1 | fp32 peak k=2 |" in printed
    # keep_sums=None on the CPU: bSAM's sums stay between steps (12 + 4 B, + 4 with two sub-batches)
    assert f"| bSAM, {FUSED} | 16.01 / 20.01 |" in printed and "| torch AdamW, fused | 8.0" in printed
    assert f"| {FUSED} | 1 | 16.01 -> 16.01" in printed  # before -> now, here the same code twice
    dropped = bench_memory.main([*args, "--optimizers", "bsam", "--tiers", FUSED, "--keep-sums", "no", "--markdown"])
    assert [r["tier"] for r in dropped] == [f"{FUSED} keep_sums=False"] * 2
    assert f"| bSAM, {FUSED} keep_sums=False | 12.0" in capsys.readouterr().out
