"""bSAM with noise that matters (small N), three sub-batches, two parameter groups with their own
hyperparameters and a cosine schedule, against an implementation of ALGORITHM.md written here from
scratch in float64, with z from the reference Philox (sambayes._philox)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import AVAILABLE_BACKENDS, DEVICE
from torch.func import functional_call, grad

import sambayes
from sambayes import _philox

STEPS, SPLITS = 4, 3
GROUPS = [  # (parameter names, hyperparameters): each group its own
    (("0.weight", "0.bias"), dict(lr=0.2, betas=(0.8, 0.99), rho=0.05, weight_decay=0.01, damping=0.1,
                                  init_precision=1.0, num_data=50.0, seed=11)),
    (("2.weight", "2.bias"), dict(lr=0.05, betas=(0.9, 0.999), rho=0.2, weight_decay=0.001, damping=0.3,
                                  init_precision=2.0, num_data=20.0, seed=2**63 + 5)),
]  # fmt: skip


def model():
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()


def data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(STEPS, 12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (STEPS, 12), generator=g)


def cosine(step):
    return 0.5 * (1 + math.cos(math.pi * step / STEPS))


def reference(net):
    """ALGORITHM.md's step, line by line, on a dict of float64 tensors; the noise of sub-batch j of step t
    in group g is element i of the group's flat concatenation: randn4x(noise_seed(seed, g, t, j), i div 4)."""
    m = {n: p.detach().clone() for n, p in net.named_parameters()}
    s = {n: torch.full_like(m[n], hyper["init_precision"]) for names, hyper in GROUPS for n in names}
    gm = {n: torch.zeros_like(m[n]) for n in m}
    xs, ys = data()

    def gradient(theta, x, y):
        return grad(lambda t: F.cross_entropy(functional_call(net, t, (x,)), y))(theta)

    for step, (x, y) in enumerate(zip(xs, ys)):
        h_sum = {n: torch.zeros_like(m[n]) for n in m}
        a_sum = {n: torch.zeros_like(m[n]) for n in m}
        for j, (xb, yb) in enumerate(zip(x.chunk(SPLITS), y.chunk(SPLITS))):
            theta = {}
            for index, (names, hyper) in enumerate(GROUPS):
                seed = sambayes.noise_seed(hyper["seed"], index, step, j)
                offset = 0
                for n in names:
                    z = _philox.randn_range(seed, offset, m[n].numel()).double().view(m[n].shape)
                    offset += m[n].numel()
                    # noisy sample
                    theta[n] = m[n] + z / torch.sqrt(hyper["num_data"] * s[n])
            g = gradient(theta, xb, yb)
            for names, hyper in GROUPS:
                for n in names:
                    # adversarial point, from the mean
                    theta[n] = m[n] + hyper["rho"] * g[n] / s[n]
                    a_sum[n] += torch.sqrt(s[n] * g[n] ** 2)
            h = gradient(theta, xb, yb)
            for n in m:
                h_sum[n] += h[n]
        for names, hyper in GROUPS:
            beta1, beta2 = hyper["betas"]
            lr, delta = hyper["lr"] * cosine(step), hyper["weight_decay"]
            for n in names:
                h_bar, a_bar = h_sum[n] / SPLITS, a_sum[n] / SPLITS
                gm[n] = beta1 * gm[n] + (1 - beta1) * (h_bar + delta * m[n])
                m[n] = m[n] - lr * gm[n] / s[n]
                s[n] = beta2 * s[n] + (1 - beta2) * (a_bar + delta + hyper["damping"])
    return {"mean": m, "precision": s, "momentum": gm}


def run(net, backend):
    params = dict(net.named_parameters())
    groups = [{"params": [params[n] for n in names], **hyper} for names, hyper in GROUPS]
    opt = sambayes.BSAM(groups, num_data=1.0, backend=backend)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    xs, ys = (t.to(DEVICE) for t in data())
    for x, y in zip(xs, ys):
        chunks = sambayes.split_batch(x, y, splits=SPLITS)

        def closure(j, chunks=chunks):
            loss = F.cross_entropy(net(chunks[j][0]), chunks[j][1])
            loss.backward()
            return loss

        opt.step(closure, splits=SPLITS)
        schedule.step()
    return {key: {n: opt.state[p][key] for n, p in params.items()} for key in ("mean", "precision", "momentum")}


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_noisy_bsam_equals_the_written_out_algorithm(backend):
    want = reference(model())
    net = model().to(DEVICE)  # the backends under test run on DEVICE; the reference on the CPU
    got = run(net, backend)
    # eager and foreach draw the reference's very noise: float64 rounding apart. The fused backends'
    # z differs by a few float32 ulps (their log, sin and cos), scaled by σ up to 1/sqrt(20)
    tolerance = 1e-12 if backend in ("eager", "foreach") else 2e-6
    moved = 0.0
    for key in want:
        for n in want[key]:
            torch.testing.assert_close(
                got[key][n].cpu(), want[key][n], rtol=tolerance, atol=tolerance, msg=f"{key} {n}"
            )
            moved = max(
                moved, (want[key][n] - dict(model().named_parameters())[n]).abs().max().item() if key == "mean" else 0
            )
    assert moved > 1e-2  # the run went somewhere: noise and steps that matter
    for n, p in net.named_parameters():
        assert torch.equal(p.detach().cpu(), got["mean"][n].cpu())  # at rest the model holds the mean
