"""Training frameworks driving bSAM: PyTorch Lightning (automatic and manual optimization) and
Hugging Face accelerate, run for real on a tiny model through the examples' own code
(examples/lightning_bsam.py, examples/accelerate_bsam.py), each against a plain loop of
``opt.step(closure)`` with the same seed, data order and backend: the same trajectory, bit for bit."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import pathlib

import pytest
import torch
import torch.nn.functional as F

import sambayes

# Lightning's advice for real runs (worker processes, a validation loader), and a deprecation inside it
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*(num_workers|val_dataloader|LeafSpec).*"),
]
EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
#: 256 training examples in batches of 32: 8 steps per epoch, an MLP 16 -> 16 -> 4
TINY = ["--train", "256", "--test", "64", "--batch-size", "32", "--hidden", "16", "--epochs", "1", "--samples", "2"]
STEPS = 8


def load_example(name: str, framework: str, install: str):
    """``examples/<name>.py`` as a module, or a skip saying which package is missing."""
    pytest.importorskip(framework, reason=f"{framework} is not installed (pip install {install})")
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lightning_example():
    example = load_example("lightning_bsam", "lightning", "lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" lines per Trainer
    return example


@pytest.fixture(scope="module")
def accelerate_example():
    return load_example("accelerate_bsam", "accelerate", "accelerate")


def tiny_args(example, *flags: str) -> argparse.Namespace:
    """The example's own command-line arguments, at the tiny size."""
    return example.parse_args([*TINY, *flags])


def flat(parameters) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in parameters])


def plain_loop(example, args, steps: int, total_steps: int, *, scaler=None, autocast=None) -> tuple[torch.Tensor, list]:
    """The reference: the example's model, data order and hyperparameters, trained by a plain loop
    of ``opt.step(closure, splits=...)`` with a cosine schedule over ``total_steps``; (final
    parameters, losses returned by the steps)."""
    train, _ = example.synthetic_data(args.train, args.test, seed=args.seed)
    net = example.mlp(train.tensors[0].shape[1], args.hidden, 4, seed=args.seed)
    opt = sambayes.BSAM(net, **example.bsam_hyperparameters(args, len(train)))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    losses = []
    batches = (batch for _ in range(args.epochs) for batch in example.train_loader(train, args.batch_size, args.seed))
    for _, (x, y) in zip(range(steps), batches):
        chunks = sambayes.split_batch(x, y, splits=args.splits)

        def closure(j=0):
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                loss = F.cross_entropy(net(chunks[j][0]), chunks[j][1])
            (scaler.scale(loss) if scaler is not None else loss).backward()
            return loss

        losses.append(opt.step(closure, splits=args.splits, grad_scaler=scaler, max_grad_norm=args.max_grad_norm))
        if scaler is not None:
            scaler.update()
        schedule.step()
    return flat(net.parameters()), losses


# ---------------------------------------------------------------------------------------
# PyTorch Lightning


def fit(lightning_example, args, module=None, **trainer_options):
    """Build the example's module (unless given) and trainer for ``args``, and fit; (module, trainer)."""
    built, loader, _ = lightning_example.build(args)
    module = module or built
    trainer = lightning_example.make_trainer(args, **trainer_options)
    trainer.fit(module, loader)
    return module, trainer


@pytest.mark.parametrize("variant", ["bsam-zeroes", "lightning-zero-grad", "bf16-mixed"])
def test_lightning_automatic_optimization_equals_the_plain_loop(lightning_example, variant):
    """Lightning's closure (training_step, zero_grad, backward), called twice per step by
    BSAM.step: the plain loop's trajectory and losses, max_grad_norm passed through
    optimizer_step, the schedule stepped per step. Also with Lightning's own
    optimizer_zero_grad (.grad set to None before each backward pass) and a parameter the model
    does not use; and with precision="bf16-mixed" (autocast, no scaler)."""
    import lightning

    args = tiny_args(lightning_example, "--no-progress", "--max-grad-norm", "0.5")
    module, _, _ = lightning_example.build(args)
    calls = []  # training_step calls: one forward pass each
    module.net.register_forward_pre_hook(lambda *_: calls.append(1))
    if variant == "lightning-zero-grad":
        module.optimizer_zero_grad = functools.partial(lightning.LightningModule.optimizer_zero_grad, module)
        module.unused = torch.nn.Linear(3, 3)  # never gets a gradient: Lightning leaves its .grad None
        unused = flat(module.unused.parameters())
    bf16 = variant == "bf16-mixed"
    module, trainer = fit(lightning_example, args, module, precision="bf16-mixed" if bf16 else "32-true")

    expected, losses = plain_loop(lightning_example, args, STEPS, STEPS, autocast=torch.bfloat16 if bf16 else None)
    assert torch.equal(flat(module.net.parameters()), expected)
    assert len(calls) == 2 * STEPS and trainer.global_step == STEPS  # two closure calls per step
    assert torch.equal(trainer.callback_metrics["train_loss"], losses[-1])  # logged: the adversarial point's
    if variant == "lightning-zero-grad":
        assert torch.equal(flat(module.unused.parameters()), unused)


def test_lightning_manual_optimization_with_splits_equals_the_plain_loop(lightning_example):
    """The phase API in training_step with 2 sub-batches: the plain loop's step(closure, splits=2),
    bit for bit; and count_step makes max_steps stop training (Lightning alone counts 0 steps)."""
    args = tiny_args(
        lightning_example, "--no-progress", "--manual", "--splits", "2", "--max-grad-norm", "0.5", "--epochs", "2"
    )
    module, trainer = fit(lightning_example, args, max_steps=5)
    assert trainer.global_step == 5
    expected, losses = plain_loop(lightning_example, args, 5, 5)
    assert torch.equal(flat(module.net.parameters()), expected)
    assert torch.equal(trainer.callback_metrics["train_loss"], losses[-1])


def test_lightning_manual_optimization_hands_the_grad_scaler_to_the_phases(lightning_example):
    """precision="16-mixed" (a GradScaler; here Lightning's plugin on the CPU): Lightning scales
    manual_backward, the phases unscale as they read, the scaler is updated after each step:
    the plain loop with autocast, GradScaler and step(..., grad_scaler=...), bit for bit."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    args = tiny_args(lightning_example, "--no-progress", "--manual", "--splits", "2")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    module, _ = fit(lightning_example, args, max_steps=3, precision=None, plugins=[plugin])  # float16 is slow on CPUs
    reference_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    expected, _ = plain_loop(lightning_example, args, 3, 3, scaler=reference_scaler, autocast=torch.float16)
    assert torch.equal(flat(module.net.parameters()), expected)
    assert scaler.get_scale() == reference_scaler.get_scale() == 2.0**13  # update() after each of the 3 steps


@pytest.mark.parametrize(
    "option, match",
    [
        (dict(gradient_clip_val=1.0), "gradient_clip_val"),
        (dict(accumulate_grad_batches=2), "accumulate_grad_batches"),
        ("fp16", "16-mixed"),
    ],
    ids=["gradient_clip_val", "accumulate_grad_batches", "16-mixed"],
)
def test_lightning_automatic_optimization_refuses_what_breaks_bsam(lightning_example, option, match):
    """Options under which Lightning's automatic optimization computes other gradients than
    bSAM's: refused before the first step, naming the option."""
    if option == "fp16":
        from lightning.pytorch.plugins.precision import MixedPrecision

        option = dict(precision=None, plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    args = tiny_args(lightning_example, "--no-progress")
    module, _, _ = lightning_example.build(args)
    before = flat(module.net.parameters())
    with pytest.raises(ValueError, match=match):
        fit(lightning_example, args, module, **option)
    assert torch.equal(flat(module.net.parameters()), before)


def test_lightning_example_main(lightning_example):
    for flags in ([], ["--manual", "--splits", "2"]):
        results = lightning_example.main([*TINY, "--no-progress", *flags])
        assert results["steps"] == STEPS
        assert 0.0 <= results["accuracy_mean"] <= 1.0 and 0.0 <= results["accuracy_bma"] <= 1.0


# ---------------------------------------------------------------------------------------
# Hugging Face accelerate


@pytest.fixture
def accelerator(accelerate_example):
    from accelerate import Accelerator

    return Accelerator(mixed_precision="no", cpu=True)


@pytest.mark.parametrize("splits", [1, 2])
def test_accelerate_loop_with_the_phase_api_equals_the_plain_loop(accelerate_example, accelerator, splits):
    args = tiny_args(accelerate_example, "--cpu", "--splits", str(splits), "--max-grad-norm", "0.5")
    model, optimizer, schedule, loader, _ = accelerate_example.setup(args, accelerator)
    assert type(optimizer).__name__ == "AcceleratedOptimizer" and isinstance(optimizer.optimizer, sambayes.BSAM)
    assert accelerate_example.train(args, accelerator, model, optimizer, schedule, loader) == STEPS
    expected, _ = plain_loop(accelerate_example, args, STEPS, STEPS)
    assert torch.equal(flat(model.parameters()), expected)


def test_accelerated_optimizer_step_passes_the_closure_through(accelerate_example, accelerator):
    """AcceleratedOptimizer.step(closure) without a scaler is BSAM.step(closure) (splits=1), but
    returns None, not the loss; with a GradScaler it cannot drive a two-pass step."""
    from accelerate.optimizer import AcceleratedOptimizer

    args = tiny_args(accelerate_example, "--cpu")
    model, optimizer, schedule, loader, _ = accelerate_example.setup(args, accelerator)
    for x, y in loader:

        def closure(x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            return loss

        assert optimizer.step(closure) is None
        schedule.step()
    expected, _ = plain_loop(accelerate_example, args, STEPS, STEPS)
    assert torch.equal(flat(model.parameters()), expected)

    scaled = AcceleratedOptimizer(optimizer.optimizer, scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(AssertionError, match="scale"):  # the scaler's step() before any scaled backward
        scaled.step(closure)
    optimizer.optimizer.state_dict()  # at rest: BSAM.step never started (mid-step, this would raise)


def test_accelerate_fp16_recipe_with_a_grad_scaler(accelerate_example, accelerator, monkeypatch):
    """With mixed_precision="fp16" (GPU), accelerator.backward scales the loss by accelerator.scaler:
    the example hands it to perturb() and update() and updates it. Here a CPU GradScaler in its place
    (without autocast): the plain loop's step(closure, grad_scaler=...), bit for bit."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    monkeypatch.setattr(accelerator, "scaler", scaler)
    args = tiny_args(accelerate_example, "--cpu", "--splits", "2")
    model, optimizer, schedule, loader, _ = accelerate_example.setup(args, accelerator)
    accelerate_example.train(args, accelerator, model, optimizer, schedule, loader)
    reference_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    expected, _ = plain_loop(accelerate_example, args, STEPS, STEPS, scaler=reference_scaler)
    assert torch.equal(flat(model.parameters()), expected)
    assert scaler.get_scale() == reference_scaler.get_scale() == 2.0**12


def test_accelerate_save_state_and_load_state_resume_exactly(accelerate_example, tmp_path):
    """accelerator.save_state / load_state go through the AcceleratedOptimizer's state_dict: a run
    resumed after 3 steps ends where the uninterrupted run ends."""
    args = tiny_args(accelerate_example, "--cpu", "--splits", "2")
    batches = None

    def run(resume: bool, save: bool) -> torch.Tensor:
        nonlocal batches
        from accelerate import Accelerator

        accelerator = Accelerator(mixed_precision="no", cpu=True)  # its own list of prepared objects
        model, optimizer, schedule, loader, _ = accelerate_example.setup(args, accelerator)
        accelerator.register_for_checkpointing(schedule)
        batches = batches or list(loader)
        bsam = optimizer.optimizer
        if resume:
            accelerator.load_state(tmp_path / "state")
        for i, (x, y) in enumerate(batches[: 3 if save else 6]):
            if resume and i < 3:
                continue
            accelerate_example.train_step(accelerator, model, bsam, x, y, splits=2, max_grad_norm=None)
            schedule.step()
        if save:
            accelerator.save_state(tmp_path / "state")
        return flat(model.parameters())

    uninterrupted = run(resume=False, save=False)
    run(resume=False, save=True)
    assert torch.equal(run(resume=True, save=False), uninterrupted)


def test_accelerate_example_main(accelerate_example):
    results = accelerate_example.main([*TINY, "--cpu", "--splits", "2"])
    assert results["steps"] == STEPS
    assert 0.0 <= results["accuracy_mean"] <= 1.0 and 0.0 <= results["accuracy_bma"] <= 1.0
