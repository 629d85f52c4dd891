"""The demo's data: scikit-learn's digits, the fixed train/test split and the rotated
(out-of-distribution) test set, and the check for the ``[demo]`` extra."""

from __future__ import annotations

from typing import NamedTuple

import torch

NUM_TEST = 450  # of the 1,797 digits; the rest train


class Data(NamedTuple):
    """Float32 images [n, 8, 8] in [0, 1] and int64 labels [n]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_ood: torch.Tensor  # the test images rotated by 90°: same pixels, not a digit pose seen in training


def _missing_extras(plots: bool) -> list[str]:
    """The packages of the ``[demo]`` extra that cannot be imported (matplotlib only for ``plots``)."""
    missing = []
    for module in ("sklearn", "matplotlib") if plots else ("sklearn",):
        try:
            __import__(module)
        except ImportError:
            missing.append({"sklearn": "scikit-learn"}.get(module, module))
    return missing


def load_digits(validation: bool = False, device: torch.device | str = "cpu") -> Data:
    """The digits split: 1,347 train / 450 test (fixed permutation, seed 0).

    ``validation=True`` holds out the last 300 training images as the evaluation set
    instead (for tuning; the test images stay unseen).
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # pixel values are 0..16
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[NUM_TEST:], order[:NUM_TEST]
    if validation:
        train, test = train[:-300], train[-300:]
    x_test = images[test]
    data = Data(images[train], labels[train], x_test, labels[test], torch.rot90(x_test, 1, dims=(1, 2)))
    return Data(*(t.to(device) for t in data))
