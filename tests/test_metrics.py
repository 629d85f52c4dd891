"""sambayes.metrics against answers computed by hand, edge cases, and sklearn's AUROC."""

import math

import pytest
import torch

from sambayes import metrics

# Four 3-class predictions whose metrics are worked out by hand below.
#   point  probs               label  prediction  confidence  bin of 20 (lo, hi]
#   A      [0.92, 0.08, 0.00]  0      0 (right)   0.92        18: (0.90, 0.95]
#   B      [0.08, 0.92, 0.00]  0      1 (wrong)   0.92        18
#   C      [0.66, 0.34, 0.00]  0      0 (right)   0.66        13: (0.65, 0.70]
#   D      [0.42, 0.33, 0.25]  2      0 (wrong)   0.42         8: (0.40, 0.45]
PROBS = torch.tensor([[0.92, 0.08, 0.0], [0.08, 0.92, 0.0], [0.66, 0.34, 0.0], [0.42, 0.33, 0.25]])
LABELS = torch.tensor([0, 0, 0, 2])


def test_accuracy_and_nll_by_hand():
    assert metrics.accuracy(PROBS, LABELS) == 0.5
    # -log p(label): A 0.92, B 0.08, C 0.66, D 0.25
    expected = -(math.log(0.92) + math.log(0.08) + math.log(0.66) + math.log(0.25)) / 4
    assert metrics.nll(PROBS, LABELS) == pytest.approx(expected, rel=1e-6)


def test_nll_of_a_zero_probability_is_inf():
    assert metrics.nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) == math.inf


def test_bma_nll_by_hand():
    # two samples, one point of label 0: p_1 = (0.2, 0.8), p_2 = (0.6, 0.4); the average gives 0.4
    log_probs = torch.tensor([[[0.2, 0.8]], [[0.6, 0.4]]]).log()
    assert metrics.bma_nll(log_probs, torch.tensor([0])) == pytest.approx(-math.log(0.4), rel=1e-6)
    assert torch.allclose(metrics.bma_log_probs(log_probs).exp(), torch.tensor([[0.4, 0.6]], dtype=torch.float64))


def test_bma_nll_does_not_underflow():
    # per-sample log-probs -1000 and -1001: exp underflows to 0, log-mean-exp does not
    log_probs = torch.tensor([[[-1000.0, 0.0]], [[-1001.0, 0.0]]], dtype=torch.float64)
    expected = 1000 - math.log((1 + math.exp(-1)) / 2)
    assert metrics.bma_nll(log_probs, torch.tensor([0])) == pytest.approx(expected, rel=1e-12)


def test_bma_of_one_sample_is_that_sample():
    log_probs = torch.log_softmax(torch.randn(1, 5, 3, dtype=torch.float64), -1)
    labels = torch.tensor([0, 1, 2, 0, 1])
    assert metrics.bma_nll(log_probs, labels) == pytest.approx(metrics.nll(log_probs[0].exp(), labels), rel=1e-12)


def test_ece_by_hand():
    # bin 18: A right, B wrong: |0.5 - 0.92| * 2/4 = 0.21
    # bin 13: C right:          |1 - 0.66|   * 1/4 = 0.085
    # bin  8: D wrong:          |0 - 0.42|   * 1/4 = 0.105
    assert metrics.ece(PROBS, LABELS, bins=20) == pytest.approx(0.4, abs=1e-6)


def test_reliability_by_hand_and_empty_bins():
    rel = metrics.reliability(PROBS, LABELS, bins=20)
    assert rel.edges.shape == (21,) and rel.edges[0] == 0 and rel.edges[-1] == 1
    expected_counts = torch.zeros(20, dtype=torch.int64)
    expected_counts[[8, 13, 18]] = torch.tensor([1, 1, 2])
    assert torch.equal(rel.counts, expected_counts)
    full = expected_counts > 0
    assert torch.allclose(rel.accuracy[full], torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64))
    assert torch.allclose(rel.confidence[full], torch.tensor([0.42, 0.66, 0.92], dtype=torch.float64))
    assert rel.accuracy[~full].isnan().all() and rel.confidence[~full].isnan().all()  # empty bins
    assert rel.ece == pytest.approx(0.4, abs=1e-6)


def test_reliability_bin_edges_are_closed_on_the_right():
    # bins of 4: (0, .25], (.25, .5], (.5, .75], (.75, 1]; 0.5, 0.75 and 1.0 are exact in binary
    probs = torch.tensor([[0.5, 0.5], [0.75, 0.25], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    rel = metrics.reliability(probs, torch.tensor([0, 0, 0, 1]), bins=4)
    assert rel.counts.tolist() == [0, 1, 1, 2]


def test_ece_all_correct():
    # confidence 1 and always right: perfectly calibrated
    certain = torch.eye(3)[[0, 1, 2, 1]]
    assert metrics.ece(certain, torch.tensor([0, 1, 2, 1])) == 0.0
    # confidence 0.75 and always right: gap 0.25
    probs = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    assert metrics.ece(probs, torch.tensor([0, 1])) == pytest.approx(0.25, abs=1e-7)


def test_ece_of_an_empty_batch_is_nan():
    assert math.isnan(metrics.ece(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)))


def test_binary_auroc_by_hand():
    # positives score 0.35 and 0.8, negatives 0.1 and 0.4: 3 of the 4 pairs ordered right
    assert metrics.binary_auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert metrics.binary_auroc([3.0, 2.0, 1.0], [True, True, False]) == 1.0
    assert metrics.binary_auroc([1.0, 2.0, 3.0], [True, True, False]) == 0.0


def test_binary_auroc_ties_count_one_half():
    # pairs (pos, neg): (1, .5) 1, (1, 0) 1, (.5, .5) tie 1/2, (.5, 0) 1 -> 3.5 / 4
    assert metrics.binary_auroc([1.0, 0.5, 0.5, 0.0], [True, True, False, False]) == 0.875
    assert metrics.binary_auroc([0.5, 0.5, 0.5], [True, False, False]) == 0.5


def test_binary_auroc_with_one_class_is_nan():
    assert math.isnan(metrics.binary_auroc([0.1, 0.2], [True, True]))
    assert math.isnan(metrics.binary_auroc([0.1, 0.2], [False, False]))


def test_binary_auroc_matches_sklearn():
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    generator = torch.Generator().manual_seed(0)
    for n in (2, 17, 1000):
        scores = torch.round(torch.rand(n, generator=generator) * 20) / 20  # coarse: many ties
        positive = torch.rand(n, generator=generator) < 0.7
        positive[0], positive[1] = True, False  # both classes present
        expected = roc_auc_score(positive.numpy(), scores.numpy())
        assert metrics.binary_auroc(scores, positive) == pytest.approx(expected, abs=1e-12)


def test_misclassification_auroc_by_hand():
    # correct A (0.92), C (0.66) are positives; wrong B (0.92), D (0.42) negatives:
    # (A, B) tie 1/2, (A, D) 1, (C, B) 0, (C, D) 1 -> 2.5 / 4
    assert metrics.auroc(PROBS, LABELS) == 0.625


def test_misclassification_auroc_all_correct_is_nan():
    assert math.isnan(metrics.auroc(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 1])))


def test_ood_auroc_by_hand():
    probs_in = torch.tensor([[0.9, 0.1], [0.4, 0.6]])  # confidence 0.9, 0.6
    probs_out = torch.tensor([[0.3, 0.7], [0.5, 0.5], [0.6, 0.4]])  # 0.7, 0.5, 0.6
    # 0.9 beats all three; 0.6 beats 0.5, ties 0.6, loses to 0.7: (3 + 1.5) / 6
    assert metrics.ood_auroc(probs_in, probs_out) == 0.75


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="probs"):
        metrics.ece(torch.ones(3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        metrics.nll(PROBS, LABELS[:3])
    with pytest.raises(ValueError, match="sample_log_probs"):
        metrics.bma_nll(PROBS.log(), LABELS)
    with pytest.raises(ValueError, match="bins"):
        metrics.reliability(PROBS, LABELS, bins=0)


def test_nan_propagates_to_nll_ece_and_auroc():
    probs = PROBS.clone()
    probs[1] = float("nan")  # a diverged prediction
    assert math.isnan(metrics.nll(probs, LABELS))
    assert math.isnan(metrics.ece(probs, LABELS))
    assert math.isnan(metrics.auroc(probs, LABELS))
    assert math.isnan(metrics.ood_auroc(PROBS, probs))
    assert math.isnan(metrics.bma_nll(probs.log()[None], LABELS))


def test_binary_auroc_of_a_nan_score_is_nan():
    # without the check, torch.unique sorts NaN last and the AUROC looks finite (here 1.0)
    assert math.isnan(metrics.binary_auroc([0.1, 0.4, float("nan"), 0.8], [False, False, True, True]))
    assert math.isnan(metrics.binary_auroc([float("nan")] * 2, [True, False]))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([0, 0, 0, -1]), "-1 is not a class index in \\[0, 3\\)"),
        (torch.tensor([0, 3, 0, 2]), "3 is not a class index in \\[0, 3\\)"),
        (torch.tensor([0.0, 0.0, 0.0, 2.0]), "integer class indices, got dtype torch.float32"),
        ([0.0, 0.9, 0.0, 2.0], "integer class indices, got dtype torch.float32"),
        (torch.tensor([True, False, True, False]), "integer class indices, got dtype torch.bool"),
    ],
)
def test_labels_must_be_class_indices(labels, message):
    for metric in (metrics.accuracy, metrics.nll, metrics.ece, metrics.auroc, metrics.reliability):
        with pytest.raises(ValueError, match=message):
            metric(PROBS, labels)
    with pytest.raises(ValueError, match=message):
        metrics.bma_nll(PROBS.log()[None], labels)


def test_labels_of_any_integer_dtype_are_accepted():
    for dtype in (torch.uint8, torch.int32, torch.int64):
        assert metrics.accuracy(PROBS, LABELS.to(dtype)) == 0.5
    assert metrics.accuracy(PROBS, [0, 0, 0, 2]) == 0.5


def test_probs_must_be_probabilities():
    with pytest.raises(ValueError, match="1.5 is not a probability"):
        metrics.ece(torch.tensor([[1.5, -0.5]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="row 1 sums to 2.0, not 1"):
        metrics.ece(torch.tensor([[0.5, 0.5], [1.0, 1.0]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="not 1 \\(pass probabilities, not logits\\)"):
        metrics.nll(torch.tensor([[0.2, 0.3]]), torch.tensor([0]))
    # float32 softmax rows are off by ~1e-7: accepted
    probs = torch.softmax(torch.randn(100, 7, generator=torch.Generator().manual_seed(0)), dim=1)
    assert 0 <= metrics.ece(probs, torch.zeros(100, dtype=torch.int64)) <= 1
