"""The small networks of the demo."""

from __future__ import annotations

import torch


class MLP(torch.nn.Sequential):
    """Flatten, then ``Linear -> ReLU`` for each hidden width, then a linear readout to logits.

    ``MLP(64, (128,), 10)`` maps [batch, 8, 8] (or [batch, 64]) float32 images to
    [batch, 10] logits. No BatchNorm, so a posterior sample changes nothing but the weights.
    """

    def __init__(self, in_features: int, hidden: tuple[int, ...], classes: int) -> None:
        layers: list[torch.nn.Module] = [torch.nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        layers.append(torch.nn.Linear(width, classes))
        super().__init__(*layers)
