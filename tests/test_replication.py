"""Replication, sambayes/_replication.py (and sambayes/_distributed.py): one process, DDP and FSDP2, with
two real processes on gloo (CPU); the workers are in tests/dist_workers.py. DCP checkpoints under
FSDP2 are in test_checkpoints.py."""

import dist_workers
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sambayes import _distributed

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def run_two_ranks(tmp_path, method, wrapper, splits=1):
    mp.spawn(dist_workers.worker, args=(2, str(tmp_path / "init"), str(tmp_path), method, wrapper, splits), nprocs=2)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bsam", "sam"])
def test_ddp_replicas_agree_and_equal_single_process_m_sharpness(tmp_path, method):
    rank0, rank1 = run_two_ranks(tmp_path, method, "ddp")
    for a, b in zip(rank0, rank1):
        assert torch.equal(a, b)  # replicas identical
    # each rank drew its own noise and ascent: 2 ranks x 1 split = 1 process x 2 splits
    reference = dist_workers.single_process(method, splits=2)
    for a, r in zip(rank0, reference):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    moved = max((a - p).abs().max().item() for a, p in zip(rank0, dist_workers.model_and_data()[0].parameters()))
    assert moved > 1e-3  # and training did move the weights


@pytest.mark.slow
def test_ddp_with_splits_all_reduces_the_sum_once(tmp_path):
    """2 ranks x 2 splits (perturbed passes synced only on the last split) = 1 process x 4 splits.

    Rank r's sub-batch j draws the noise of sub-batch 2j + r, which holds chunk 2r + j of the batch.
    """
    rank0, rank1 = run_two_ranks(tmp_path, "bsam", "ddp", splits=2)
    reference = dist_workers.single_process("bsam", splits=4, order=[0, 2, 1, 3])
    for a, b, r in zip(rank0, rank1, reference):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ivon_under_ddp_averages_each_replicas_sums_once(tmp_path):
    """Each replica draws its own sample (sample r on rank r) and keeps its pass local; the gradient and
    curvature sums are averaged once per step: 2 ranks x 1 sample = 1 process x 2 samples, sample j's gradient
    on rank j's half of the batch. sync=True with bare parameters and two ranks is refused."""
    rank0, rank1 = run_two_ranks(tmp_path, "ivon", "ddp")
    reference = dist_workers.single_process("ivon", splits=2)
    for a, b, r in zip(rank0, rank1, reference):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    moved = max((a - p).abs().max().item() for a, p in zip(rank0, dist_workers.model_and_data()[0].parameters()))
    assert moved > 1e-3
    for rank in range(2):
        assert "pass the DDP (or FSDP2) module" in torch.load(tmp_path / f"sync{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bsam", "sam", "ivon"])
def test_fsdp2_shards_sample_what_the_whole_model_samples(tmp_path, method):
    rank0, rank1 = run_two_ranks(tmp_path, method, "fsdp2")
    for a, b in zip(rank0, rank1):
        assert torch.equal(a, b)
    # one global sample, one ascent on the averaged gradient (SAM: the norm over all shards):
    # 1 process x 1 split on the whole batch
    reference = dist_workers.single_process(method, splits=1)
    for a, r in zip(rank0, reference):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    if method != "sam":  # after an evaluation, the samples are samples (FSDP2 had left the root gathered)
        at_mean, averaged, again = torch.load(tmp_path / "predict0.pt")
        assert (averaged - at_mean).abs().max() > 1e-4
        assert torch.equal(again, at_mean)  # and the mean is back


@pytest.mark.slow
def test_ddp_with_float32_and_float64_state(tmp_path):
    """Statistics of two dtypes are all-reduced in the same order on every rank."""
    rank0, rank1 = run_two_ranks(tmp_path, "bsam", "ddp-mixed")
    reference = dist_workers.single_process("bsam", splits=2, mixed=True)
    for a, b, r in zip(rank0, rank1, reference):
        assert torch.equal(a, b) and a.dtype == r.dtype
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_global_offset_of_a_plain_tensor_is_zero():
    assert _distributed.global_offset(torch.zeros(3, 4)) == 0


@pytest.mark.slow
def test_compiled_ddp_module_keeps_the_ddp_handling(tmp_path):
    """torch.compile(DDP(net)): the optimizer looks inside the compiled wrapper, so each rank still
    draws its own noise and the noisy pass is not all-reduced (equal to plain DDP's result)."""
    rank0, rank1 = run_two_ranks(tmp_path, "bsam", "ddp-compiled")
    reference = dist_workers.single_process("bsam", splits=2)
    for a, b, r in zip(rank0, rank1, reference):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_parameters_without_the_module_under_ddp_warn(tmp_path):
    messages = run_two_ranks(tmp_path, "bsam", "ddp-params")
    for caught in messages:
        assert any("no model" in m and "same noise" in m for m in caught), caught
