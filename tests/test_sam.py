"""SAM, sambayes/sam.py: the algorithm (against a hand-written reference), its variants (adaptive,
Nesterov, AdamW base), the backends against the eager backend, and its groups (SGD's for base='sgd',
with schedulers that cycle momentum). What SAM shares with BSAM is in test_optimizer.py and the files
beside it."""

import pytest
import torch
import torch.nn.functional as F
from harness import CPU_BACKENDS, data, small_mlp
from test_bsam import assert_eager_and_foreach_agree_on_cnn, closure_for
from torch.func import functional_call, grad

import sambayes


def reference_sam_step(model, w, buf, chunks, *, lr, mu, rho, wd):
    def loss_grad(theta, x, y):
        return grad(lambda t: F.cross_entropy(functional_call(model, t, (x,)), y))(theta)

    hs = []
    for x, y in chunks:
        g = loss_grad(dict(w), x, y)
        norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
        hs.append(loss_grad({n: w[n] + rho * g[n] / norm for n in w}, x, y))
    for n in w:
        buf[n] = mu * buf[n] + sum(h[n] for h in hs) / len(hs) + wd * w[n]
        w[n] = w[n] - lr * buf[n]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("splits", [1, 2])
def test_sam_matches_written_out_algorithm(backend, splits):
    model = small_mlp(torch.float64)
    x, y = data(dtype=torch.float64)
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    buf = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    opt = sambayes.SAM(model.parameters(), lr=0.1, momentum=0.9, rho=0.05, weight_decay=0.01, backend=backend)
    chunks = sambayes.split_batch(x, y, splits=splits)
    for _ in range(5):
        reference_sam_step(model, w, buf, chunks, lr=0.1, mu=0.9, rho=0.05, wd=0.01)
        opt.step(closure_for(model, chunks), splits=splits)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[n], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(opt.state[p]["momentum"], buf[n], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sam_adaptive_and_adamw_match_eager(backend):
    """The variants against the eager backend (the spec), including nesterov."""
    for kwargs in (dict(adaptive=True), dict(base="adamw", lr=0.01, weight_decay=0.1), dict(nesterov=True)):
        finals = []
        for name in ("eager", backend):
            model = small_mlp()
            x, y = data()
            opt = sambayes.SAM(model.parameters(), **{"lr": 0.1, **kwargs}, backend=name)
            for _ in range(5):
                opt.step(closure_for(model, [(x, y)]))
            finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        torch.testing.assert_close(finals[1], finals[0], rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*bare parameters of a model with BatchNorm:UserWarning")
@pytest.mark.slow
def test_eager_and_foreach_agree_on_cnn_with_batchnorm():
    assert_eager_and_foreach_agree_on_cnn(lambda ps, backend: sambayes.SAM(ps, lr=0.05, backend=backend))


# ---------------------------------------------------------------------------------------
# SAM-SGD's groups are SGD's


def test_sam_sgd_groups_carry_momentum_and_no_betas():
    p = [torch.nn.Parameter(torch.zeros(2))]
    sgd_group = sambayes.SAM(p, lr=0.1).param_groups[0]
    assert "momentum" in sgd_group and "betas" not in sgd_group and "eps" not in sgd_group
    adamw_group = sambayes.SAM(p, lr=0.1, base="adamw").param_groups[0]
    assert "betas" in adamw_group and "momentum" not in adamw_group and "nesterov" not in adamw_group
    with pytest.raises(ValueError, match="belong to base='adamw'"):
        sambayes.SAM(p, lr=0.1, betas=(0.8, 0.9))
    with pytest.raises(ValueError, match="belong to base='sgd'"):
        sambayes.SAM(p, lr=0.1, base="adamw", momentum=0.5)


@pytest.mark.parametrize("scheduler", ["OneCycleLR", "CyclicLR"])
def test_schedulers_cycle_sam_momentum_as_for_sgd(scheduler):
    def make(cls, **kw):
        p = [torch.nn.Parameter(torch.zeros(2))]
        opt = cls(p, lr=0.1, momentum=0.9, **kw)
        if scheduler == "OneCycleLR":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10, cycle_momentum=True)
        else:
            sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.1, max_lr=1.0, step_size_up=3, cycle_momentum=True)
        return opt, sched

    sam, sam_sched = make(sambayes.SAM)
    sgd, sgd_sched = make(torch.optim.SGD)
    for _ in range(5):
        sam._opt_called = sgd._opt_called = True  # a step happened, as far as the scheduler is concerned
        sam_sched.step()
        sgd_sched.step()
        assert sam.param_groups[0]["momentum"] == sgd.param_groups[0]["momentum"]
        assert sam.param_groups[0]["lr"] == sgd.param_groups[0]["lr"]
