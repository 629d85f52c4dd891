"""Accuracy, calibration and uncertainty metrics for classifiers, as the paper evaluates them.

Every function takes class probabilities ``probs`` [batch, classes] (values in [0, 1],
rows summing to 1 within ``1e-3``; for a Bayesian model average, the mean over samples
of the softmax) and integer ``labels`` [batch] in [0, classes), as torch tensors or
anything ``torch.as_tensor`` accepts, and returns a Python float. The math runs in
float64. Anything else raises ValueError, except NaN: a NaN in ``probs`` (or in the
scores of :func:`binary_auroc`) is let through and makes :func:`nll`, :func:`ece` and
the AUROCs NaN, so a diverged model shows up as NaN rather than as a plausible number.

- :func:`nll`: mean of -log p(y|x); :func:`bma_nll` from per-sample log-probabilities.
- :func:`ece`: expected calibration error over equal-width bins of the max probability.
- :func:`reliability`: the per-bin data behind a reliability diagram (and the ECE).
- :func:`auroc`: misclassification detection, max probability as the score, correct = positive.
- :func:`ood_auroc`: out-of-distribution detection, max probability as the score,
  in-distribution = positive.
- :func:`binary_auroc`: the rank statistic both are built on (ties count one half).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "Reliability",
    "accuracy",
    "auroc",
    "binary_auroc",
    "bma_log_probs",
    "bma_nll",
    "confidence",
    "ece",
    "nll",
    "ood_auroc",
    "reliability",
]


SUM_TOLERANCE = 1e-3  # |row sum − 1| allowed in probs: float16 softmax rows are off by a few 1e-4


def _probs(probs) -> torch.Tensor:
    probs = torch.as_tensor(probs).detach().to("cpu", torch.float64)
    if probs.dim() != 2:
        raise ValueError(f"probs: expected shape [batch, classes], got {tuple(probs.shape)}")
    outside = (probs < 0) | (probs > 1)  # NaN compares false: let through, the result is NaN
    if outside.any():
        raise ValueError(f"probs: {probs[outside][0].item()!r} is not a probability in [0, 1]")
    off = (probs.sum(dim=1) - 1).abs() > SUM_TOLERANCE
    if off.any():
        row = int(off.nonzero()[0])
        raise ValueError(
            f"probs: row {row} sums to {probs[row].sum().item()!r}, not 1 (pass probabilities, not logits)"
        )
    return probs


def _labels(labels, batch: int, classes: int) -> torch.Tensor:
    labels = torch.as_tensor(labels).detach().cpu()
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected integer class indices, got dtype {labels.dtype}")
    if labels.shape != (batch,):
        raise ValueError(f"labels: expected shape [{batch}], got {tuple(labels.shape)}")
    labels = labels.to(torch.int64)
    outside = (labels < 0) | (labels >= classes)
    if outside.any():
        raise ValueError(f"labels: {labels[outside][0].item()} is not a class index in [0, {classes})")
    return labels


def confidence(probs) -> torch.Tensor:
    """Max probability per row, [batch] float64: the score used by :func:`auroc`, :func:`ood_auroc`, :func:`ece`."""
    return _probs(probs).max(dim=1).values


def accuracy(probs, labels) -> float:
    """Fraction of rows whose argmax is the label, in [0, 1]."""
    probs = _probs(probs)
    return (probs.argmax(dim=1) == _labels(labels, *probs.shape)).double().mean().item()


def nll(probs, labels) -> float:
    """Mean negative log-likelihood, ``mean_i -log probs[i, labels[i]]`` (nats).

    A probability of exactly 0 gives ``inf`` (it is not clipped).
    """
    probs = _probs(probs)
    labels = _labels(labels, *probs.shape)
    return -probs[torch.arange(len(labels)), labels].log().mean().item()


def bma_log_probs(sample_log_probs) -> torch.Tensor:
    """Log of the Bayesian model average, [batch, classes] float64, from per-sample
    log-probabilities ``sample_log_probs`` [samples, batch, classes] (e.g. ``log_softmax``
    of each posterior sample's logits): ``log mean_s exp(log p_s)``, computed stably."""
    logp = torch.as_tensor(sample_log_probs).detach().to("cpu", torch.float64)
    if logp.dim() != 3:
        raise ValueError(f"sample_log_probs: expected shape [samples, batch, classes], got {tuple(logp.shape)}")
    return torch.logsumexp(logp, dim=0) - math.log(logp.shape[0])


def bma_nll(sample_log_probs, labels) -> float:
    """NLL of the Bayesian model average from per-sample log-probabilities [samples, batch, classes]:
    ``mean_i -log mean_s p_s(labels[i] | x_i)`` by log-mean-exp, so that tiny per-sample
    probabilities do not underflow to log 0."""
    logp = bma_log_probs(sample_log_probs)
    labels = _labels(labels, *logp.shape)
    return -logp[torch.arange(len(labels)), labels].mean().item()


class Reliability(NamedTuple):
    """Per-bin data of a reliability diagram (``bins`` equal-width bins of the max probability).

    Bin b holds the points whose confidence c lies in ``(edges[b], edges[b+1]]``
    (c = 0 falls in bin 0). ``accuracy`` and ``confidence`` are NaN for empty bins.
    """

    edges: torch.Tensor  # [bins + 1] float64, 0 .. 1
    counts: torch.Tensor  # [bins] int64, points per bin
    accuracy: torch.Tensor  # [bins] float64, fraction correct per bin
    confidence: torch.Tensor  # [bins] float64, mean max probability per bin

    @property
    def ece(self) -> float:
        """Σ_b |accuracy_b − confidence_b| · counts_b / Σ counts (empty bins add nothing)."""
        total = int(self.counts.sum())
        if total == 0:
            return float("nan")
        full = self.counts > 0
        gaps = (self.accuracy[full] - self.confidence[full]).abs() * self.counts[full]
        return (gaps.sum() / total).item()


def reliability(probs, labels, bins: int = 20) -> Reliability:
    """Reliability-diagram data of ``probs`` [batch, classes] against ``labels`` [batch]; see :class:`Reliability`."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins={bins!r}: expected an integer >= 1")
    probs = _probs(probs)
    labels = _labels(labels, *probs.shape)
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    # bin b = (b/bins, (b+1)/bins]: ceil(c·bins) − 1, and c = 0 joins bin 0
    index = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    counts = torch.bincount(index, minlength=bins)
    hits = torch.bincount(index, weights=correct, minlength=bins)
    conf_sum = torch.bincount(index, weights=conf, minlength=bins)
    nonempty = counts.double().clamp_min(1)
    nan = torch.full((bins,), float("nan"), dtype=torch.float64)
    return Reliability(
        edges=torch.linspace(0, 1, bins + 1, dtype=torch.float64),
        counts=counts,
        accuracy=torch.where(counts > 0, hits / nonempty, nan),
        confidence=torch.where(counts > 0, conf_sum / nonempty, nan),
    )


def ece(probs, labels, bins: int = 20) -> float:
    """Expected calibration error with ``bins`` equal-width bins (the paper uses 20):
    ``Σ_b |acc_b − conf_b| · n_b / n``. In [0, 1] (``probs`` are checked to be probabilities);
    NaN for an empty batch or a NaN in ``probs``."""
    return reliability(probs, labels, bins).ece


def binary_auroc(scores, positive) -> float:
    """Area under the ROC curve: the probability that a random positive scores higher
    than a random negative, ties counting one half (the Mann–Whitney U statistic).

    ``scores`` [n] float, ``positive`` [n] bool. NaN if either class is empty or any
    score is NaN (a NaN has no rank). Computed from average ranks, O(n log n).
    """
    scores = torch.as_tensor(scores).detach().to("cpu", torch.float64).flatten()
    positive = torch.as_tensor(positive).detach().to("cpu").flatten().bool()
    if scores.shape != positive.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positive {tuple(positive.shape)} differ in shape")
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0 or scores.isnan().any():
        return float("nan")
    # average rank (1-based) of each distinct score, so tied scores share it
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).double()
    ranks = (last - (counts.double() - 1) / 2)[inverse]
    u = ranks[positive].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def auroc(probs, labels) -> float:
    """Misclassification-detection AUROC: score = max probability, positives = correctly
    classified points. 1 means every correct prediction is more confident than every
    mistake; 0.5 is chance. NaN when all points are right (or all wrong)."""
    probs = _probs(probs)
    labels = _labels(labels, *probs.shape)
    conf, pred = probs.max(dim=1)
    return binary_auroc(conf, pred == labels)


def ood_auroc(probs_in, probs_out) -> float:
    """Out-of-distribution AUROC: score = max probability (higher = more in-distribution),
    positives = the in-distribution points ``probs_in`` [n_in, classes], negatives = the
    shifted points ``probs_out`` [n_out, classes]. 1 means every in-distribution point
    is more confident than every shifted one; 0.5 is chance."""
    conf_in, conf_out = confidence(probs_in), confidence(probs_out)
    scores = torch.cat([conf_in, conf_out])
    positive = torch.cat([torch.ones_like(conf_in, dtype=torch.bool), torch.zeros_like(conf_out, dtype=torch.bool)])
    return binary_auroc(scores, positive)
