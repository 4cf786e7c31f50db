"""runtime.metrics against sklearn and hand computation."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from runtime.metrics import average_precision, multilabel_metrics


def test_ap_equals_sklearn_on_tie_free_scores():
    rng = np.random.default_rng(0)
    scores = rng.random((500, 20))                     # continuous: no ties
    targets = (rng.random((500, 20)) < 0.15).astype(np.uint8)
    assert len(np.unique(scores)) == scores.size
    m = multilabel_metrics(scores, targets)
    ref = [average_precision_score(targets[:, k], scores[:, k]) for k in range(20)]
    np.testing.assert_allclose(m["AP"], ref, rtol=0, atol=1e-9)
    assert m["mAP"] == pytest.approx(np.mean(ref), abs=1e-9)


def test_ap_with_ties_matches_sklearn_and_ignores_order_of_tied_items():
    rng = np.random.default_rng(1)
    scores = np.round(rng.random((300, 6)), 1)         # heavy ties, like FP16 outputs near 1.0
    targets = (rng.random((300, 6)) < 0.3).astype(np.uint8)
    ap = average_precision(scores, targets)
    ref = [average_precision_score(targets[:, k], scores[:, k]) for k in range(6)]
    np.testing.assert_allclose(ap, ref, atol=1e-12)
    perm = rng.permutation(300)
    np.testing.assert_allclose(average_precision(scores[perm], targets[perm]), ap, atol=1e-12)


def test_classes_without_positives_are_skipped_and_reported():
    rng = np.random.default_rng(2)
    scores = rng.random((50, 4))
    targets = (rng.random((50, 4)) < 0.3).astype(np.uint8)
    targets[:, 2] = 0
    m = multilabel_metrics(scores, targets)
    assert m["AP"][2] is None and m["skipped_classes"] == [2] and m["num_classes_evaluated"] == 3
    kept = [0, 1, 3]
    ref = np.mean([average_precision_score(targets[:, k], scores[:, k]) for k in kept])
    assert m["mAP"] == pytest.approx(ref, abs=1e-12)


def test_hand_computed_example():
    # 4 images x 4 classes; class 3 is never predicted at 0.5 (counts precision 0).
    scores = np.array([[0.9, 0.6, 0.4, 0.1],
                       [0.2, 0.7, 0.1, 0.2],
                       [0.6, 0.3, 0.8, 0.3],
                       [0.55, 0.1, 0.2, 0.4]])
    targets = np.array([[1, 0, 1, 0],
                        [0, 1, 0, 0],
                        [1, 1, 0, 0],
                        [0, 0, 0, 1]])
    m = multilabel_metrics(scores, targets, threshold=0.5)
    # per class (Nc, Np, Ng): (2,3,2) (1,2,2) (0,1,1) (0,0,1)
    assert m["CP"] == pytest.approx((2 / 3 + 1 / 2 + 0 + 0) / 4)          # 7/24
    assert m["CR"] == pytest.approx((1 + 1 / 2 + 0 + 0) / 4)              # 3/8
    assert m["CF1"] == pytest.approx(21 / 64)                              # 2*CP*CR/(CP+CR), not mean F1
    assert m["OP"] == pytest.approx(3 / 6)
    assert m["OR"] == pytest.approx(3 / 6)
    assert m["OF1"] == pytest.approx(0.5)
    # AP by hand: class 0 ranks (+,+,-,-) -> 1; class 1 ranks (+,-,+,-) -> (1 + 2/3)/2;
    # class 2 ranks (-,+,...) -> 1/2; class 3 ranks (+,-,-,-) -> 1 (ranked first, never predicted).
    np.testing.assert_allclose(m["AP"], [1.0, 5 / 6, 0.5, 1.0])
    assert m["mAP"] == pytest.approx((1 + 5 / 6 + 0.5 + 1) / 4)


def test_top3_keeps_only_three_labels_per_image():
    scores = np.array([[0.9, 0.8, 0.7, 0.6]])
    targets = np.array([[1, 0, 0, 1]])
    m = multilabel_metrics(scores, targets)
    assert (m["OP"], m["OR"]) == pytest.approx((2 / 4, 2 / 2))
    assert (m["OP_top3"], m["OR_top3"]) == pytest.approx((1 / 3, 1 / 2))


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        multilabel_metrics(np.zeros((3, 2)), np.zeros((3, 3)))
