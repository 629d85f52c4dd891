"""Real training loops: AMP and GradScaler, clipping, accumulation, BatchNorm, torch.compile."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import sambayes


def mlp():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def batch(n=32):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def make(method, model, **kwargs):
    if method == "bsam":
        return sambayes.BSAM(model, num_data=1000, lr=0.05, rho=0.05, seed=4, **kwargs)
    return sambayes.SAM(model, lr=0.05, **kwargs)


# ---------------------------------------------------------------------------------------
# AMP


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


@pytest.mark.parametrize("method", ["bsam", "sam"])
def test_grad_scaler_is_exact_and_skips_on_inf(method):
    x, y = batch()
    plain_model, scaled_model = mlp(), mlp()
    plain, scaled = make(method, plain_model), make(method, scaled_model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)

    def closure_for(model, scale_by=None, poison_call=None):
        calls = []

        def closure():
            loss = F.cross_entropy(model(x), y)
            if len(calls) == poison_call:
                loss = loss * float("inf")
            calls.append(1)
            (scale_by.scale(loss) if scale_by else loss).backward()
            return loss

        return closure

    for _ in range(3):
        plain.step(closure_for(plain_model))
        scaled.step(closure_for(scaled_model, scaler), grad_scaler=scaler)
        scaler.update()
    # scaling by a power of two and unscaling once per pass is exact
    assert torch.equal(flat(plain_model), flat(scaled_model))
    assert scaler.get_scale() == 2.0**13  # grew after two clean steps

    for bad_pass in (0, 1):
        before = flat(scaled_model)
        scale = scaler.get_scale()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a scaler's skipped steps are its calibration: no warning
            scaled.step(closure_for(scaled_model, scaler, poison_call=bad_pass), grad_scaler=scaler)
        scaler.update()
        assert scaler.get_scale() == scale / 2  # backed off, as PyTorch would
        assert torch.equal(flat(scaled_model), before)
    assert scaled.param_groups[0]["skipped_steps"] == 2


def test_grad_scaler_with_the_phase_api():
    x, y = batch()
    model = mlp()
    opt = sambayes.BSAM(model, num_data=100, seed=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    reference_model = mlp()
    reference = sambayes.BSAM(reference_model, num_data=100, seed=1)
    for _ in range(2):
        for xb, yb in sambayes.split_batch(x, y, splits=2):
            opt.sample()
            scaler.scale(F.cross_entropy(model(xb), yb)).backward()
            opt.perturb(grad_scaler=scaler)
            scaler.scale(F.cross_entropy(model(xb), yb)).backward()
        opt.update(grad_scaler=scaler)
        scaler.update()
        chunks = sambayes.split_batch(x, y, splits=2)

        def closure(j):
            loss = F.cross_entropy(reference_model(chunks[j][0]), chunks[j][1])
            loss.backward()
            return loss

        reference.step(closure, splits=2)
    assert torch.equal(flat(model), flat(reference_model))


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 autocast + GradScaler on CUDA needs a GPU")
@pytest.mark.parametrize("method", ["bsam", "sam"])
def test_float16_autocast_with_grad_scaler_on_cuda(method):
    x, y = (t.cuda() for t in batch())
    finals = {}
    for amp in (False, True):
        model = mlp().cuda()
        opt = make(method, model)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)

        def closure():
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            return loss

        losses = []
        for _ in range(30):
            losses.append(opt.step(closure, grad_scaler=scaler if amp else None).item())
            scaler.update()
        assert losses[-1] < losses[0] - 0.1
        finals[amp] = flat(model)
    torch.testing.assert_close(finals[True], finals[False], rtol=0, atol=0.05)
