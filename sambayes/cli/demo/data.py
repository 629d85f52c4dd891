"""The demo's data: scikit-learn's digits, the fixed train/test split, the rotated
(out-of-distribution) test set, the graded shifts of the test set (Gaussian noise and
Gaussian blur), and the check for the ``[demo]`` extra."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

NUM_TEST = 450  # of the 1,797 digits; the rest train

# The graded shifts of the test images: severity k (1..5) applies the k-th value; severity 0
# is the clean test set. Pixels are in [0, 1].
SHIFTS: dict[str, tuple[float, ...]] = {
    "noise": (0.1, 0.2, 0.3, 0.4, 0.5),  # std of additive Gaussian noise per pixel (then clipped to [0, 1])
    "blur": (0.5, 0.75, 1.0, 1.25, 1.5),  # std, in pixels, of a Gaussian blur (edges replicated)
}
SHIFT_UNITS = {"noise": "noise std", "blur": "blur std (pixels)"}


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


def shift_images(x: torch.Tensor, shift: str, severity: int) -> torch.Tensor:
    """``x`` [n, 8, 8] in [0, 1] at ``severity`` (0 .. 5) of ``shift`` (a key of :data:`SHIFTS`).

    Severity 0 returns ``x`` itself. The noise is drawn from a generator seeded by the
    severity alone, so every method and seed sees the very same shifted images.
    """
    if shift not in SHIFTS:
        raise ValueError(f"shift={shift!r}: choose one of {tuple(SHIFTS)}")
    if not 0 <= severity <= len(SHIFTS[shift]):
        raise ValueError(f"severity={severity}: choose 0 .. {len(SHIFTS[shift])}")
    if severity == 0:
        return x
    level = SHIFTS[shift][severity - 1]
    if shift == "noise":
        generator = torch.Generator().manual_seed(1000 + severity)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return (x + level * noise).clamp(0.0, 1.0)
    radius = math.ceil(3 * level)
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / level) ** 2)
    kernel = kernel / kernel.sum()
    # separable: blur the rows, then the columns
    padded = F.pad(x[:, None], (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))[:, 0]
