"""Real training loops (sambayes/optimizer.py's step in use, sambayes/_batchnorm.py): autocast,
clipping, accumulation, BatchNorm statistics, torch.compile. The GradScaler's loops are in
test_skipping.py."""

import pytest
import torch
import torch.nn.functional as F
from harness import flat

import sambayes


def mlp():
    """6 → 16 → 4 with a ReLU, seeded (test_skipping.py uses it too)."""
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def batch(n=32):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def make(method, model, **kwargs):
    if method == "bsam":
        return sambayes.BSAM(model, num_data=1000, lr=0.05, rho=0.05, seed=4, **kwargs)
    return sambayes.SAM(model, lr=0.05, **kwargs)


# ---------------------------------------------------------------------------------------
# AMP


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["bsam", "sam"])
def test_autocast_trains_close_to_float32(method, dtype):
    x, y = batch()
    finals, losses = {}, {}
    for amp in (None, dtype):
        model = mlp()
        opt = make(method, model)

        def closure():
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        losses[amp] = [opt.step(closure).item() for _ in range(30)]
        finals[amp] = flat(model)
    assert losses[dtype][-1] < losses[dtype][0] - 0.1  # it learns
    torch.testing.assert_close(finals[dtype], finals[None], rtol=0, atol=0.05)  # and stays near float32


# ---------------------------------------------------------------------------------------
# clipping and accumulation


def test_max_grad_norm_clips_the_averaged_perturbed_gradient():
    x, y = batch()
    model = mlp()
    beta1, clip = 0.9, 1e-3
    opt = sambayes.BSAM(model, num_data=1e30, betas=(beta1, 0.999), weight_decay=0.0, lr=0.1)

    def closure(j):
        xb, yb = sambayes.split_batch(x, y, splits=2)[j]
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        return loss

    opt.step(closure, splits=2, max_grad_norm=clip)
    # first step from zero momentum: momentum = (1 - β1)·clip(h̄)
    momentum = torch.cat([opt.state[p]["momentum"].flatten() for p in model.parameters()])
    assert momentum.norm().item() / (1 - beta1) == pytest.approx(clip, rel=1e-5)
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        opt.step(closure, splits=2, max_grad_norm=0)


@pytest.mark.parametrize("method", ["bsam", "sam"])
def test_gradient_accumulation_equals_one_big_batch(method):
    """Accumulating micro-batches in each pass (one ascent for the whole batch) is splits=1 on the batch."""
    x, y = batch()
    big_model, micro_model = mlp(), mlp()
    big, micro = make(method, big_model), make(method, micro_model)
    for _ in range(3):
        big.step(lambda: (F.cross_entropy(big_model(x), y).backward(), None)[1] or torch.zeros(()))
        micro.sample()
        for xb, yb in sambayes.split_batch(x, y, splits=4):
            (F.cross_entropy(micro_model(xb), yb) / 4).backward()
        micro.perturb()
        for xb, yb in sambayes.split_batch(x, y, splits=4):
            (F.cross_entropy(micro_model(xb), yb) / 4).backward()
        micro.update()
    torch.testing.assert_close(flat(micro_model), flat(big_model), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# BatchNorm


def bn_model():
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


@pytest.mark.parametrize("policy, updates_per_split", [("noisy", 1), ("perturbed", 1), ("both", 2)])
def test_batchnorm_statistics_follow_the_policy(policy, updates_per_split):
    x, y = batch()
    model = bn_model()
    opt = sambayes.BSAM(model, num_data=50, rho=0.5, seed=0, bn_stats=policy)
    bn = model[1]
    seen = []
    # which pass saw the statistics being updated: record the running mean after every forward
    model[1].register_forward_hook(lambda m, i, o: seen.append((m.num_batches_tracked.item(), m.running_mean.clone())))

    def closure(j):
        xb, yb = sambayes.split_batch(x, y, splits=2)[j]
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        return loss

    opt.step(closure, splits=2)
    assert bn.num_batches_tracked.item() == 2 * updates_per_split
    counts = [c for c, _ in seen]  # forwards: noisy j=0, perturbed j=0, noisy j=1, perturbed j=1
    expected = {"noisy": [1, 1, 2, 2], "perturbed": [0, 1, 1, 2], "both": [1, 2, 3, 4]}[policy]
    assert counts == expected
    assert bn.track_running_stats  # restored after the step


@pytest.mark.filterwarnings("ignore:.*bare parameters of a model with BatchNorm:UserWarning")
@pytest.mark.filterwarnings("ignore:.*gave no parameter a gradient:RuntimeWarning")
def test_batchnorm_noisy_policy_uses_noisy_point_statistics():
    """With policy 'noisy' the running mean is exactly the one of a forward at the noisy sample."""
    x, y = batch()
    model = bn_model()
    opt = sambayes.BSAM(model, num_data=20, rho=0.5, seed=0)
    twin = bn_model()
    twin_opt = sambayes.BSAM(twin.parameters(), num_data=20, rho=0.5, seed=0)  # no BN management
    twin_opt.sample()
    twin(x)  # the noisy forward: the only one that may touch the statistics
    twin_opt.perturb()
    twin_opt.update()
    opt.step(lambda: (F.cross_entropy(model(x), y).backward(), torch.zeros(()))[1])
    torch.testing.assert_close(model[1].running_mean, twin[1].running_mean)
    torch.testing.assert_close(model[1].running_var, twin[1].running_var)


def test_frozen_bn_stats_context_manager():
    model = bn_model()
    x, _ = batch()
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    expected = model(x)
    for k, v in model.state_dict().items():  # a normal forward updated them
        if k in buffers and "num_batches" in k:
            assert v.item() == 1
    buffers = {k: v.clone() for k, v in model.state_dict().items() if k in buffers}
    with pytest.raises(KeyError), sambayes.frozen_bn_stats(model):
        out = model(x)
        raise KeyError("restored anyway")
    torch.testing.assert_close(out, expected)  # same outputs
    for k, v in model.state_dict().items():
        if k in buffers:
            assert torch.equal(v, buffers[k]), k
    assert model[1].track_running_stats


def test_bad_bn_policy_and_model():
    with pytest.raises(ValueError, match="bn_stats='mean'"):
        sambayes.BSAM(bn_model(), num_data=10, bn_stats="mean")
    with pytest.raises(TypeError, match="model="):
        sambayes.SAM(bn_model().parameters(), lr=0.1, model="net")


# ---------------------------------------------------------------------------------------
# torch.compile


# torch's own deprecation, raised as torch.compile first imports its inductor (torch 2.13)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.slow
@pytest.mark.parametrize("method", ["bsam", "sam"])
def test_compiled_model_trains_like_the_eager_model(method):
    x, y = batch()
    finals = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = bn_model()
        net = torch.compile(model) if compiled else model
        opt = make(method, net)

        def closure():
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        for _ in range(5):
            opt.step(closure)
        finals.append(flat(model))
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-4, atol=1e-5)
