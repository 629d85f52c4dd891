"""Bayesian model averaging with the posterior of a BSAM or an IVON."""

from __future__ import annotations

import torch


@torch.no_grad()
def predict(model: torch.nn.Module, opt, inputs: torch.Tensor, samples: int = 32, seed: int = 0) -> torch.Tensor:
    """Class probabilities ``p(y|x)``, shape [batch, classes], float32.

    ``samples > 0``: the mean over ``samples`` posterior samples θ_s ~ q of
    ``softmax(model(inputs; θ_s))`` (Bayesian model averaging; sample s uses
    ``opt.sampled_params(seed=seed + s)``). ``samples=0``: softmax at the mean.
    The model runs in eval mode (BatchNorm uses its running statistics) and is
    put back in the mode it had.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"samples={samples!r}: expected an integer >= 0")
    if samples > 0 and not callable(getattr(opt, "sampled_params", None)):
        raise TypeError(f"samples={samples} needs an optimizer with a posterior (BSAM, IVON); got {type(opt).__name__}")
    was_training = model.training
    model.eval()
    try:
        if samples == 0:
            return torch.softmax(model(inputs).float(), dim=-1)
        total = None
        for s in range(samples):
            with opt.sampled_params(seed=seed + s):
                probs = torch.softmax(model(inputs).float(), dim=-1)
            total = probs if total is None else total + probs
        return total / samples
    finally:
        model.train(was_training)
