"""Detection metrics (sameguard.bench.metrics) on hand-made scores whose answers are known."""

import numpy as np
import pytest

from sameguard.bench.metrics import aupr, auroc, detection_metrics, fpr_at_tpr, tpr_at_fpr


def test_perfect_separation():
    m = detection_metrics([0, 1, 2], [3, 4, 5])
    assert (m.auroc, m.aupr, m.fpr95, m.tpr_at_1fpr) == (1.0, 1.0, 0.0, 1.0)


def test_hand_made_overlap():
    benign, attack = [0, 1, 2, 3], [2.5, 4, 5, 6]
    assert auroc(benign, attack) == pytest.approx(15 / 16)
    # Catching all 4 attacks needs threshold 2.5, which flags benign 3 -> FPR 1/4.
    assert fpr_at_tpr(benign, attack, 0.95) == pytest.approx(0.25)
    # With no false positive allowed, 3 of 4 attacks are caught.
    assert tpr_at_fpr(benign, attack, 0.01) == pytest.approx(0.75)
    # PR points (recall, precision) by falling threshold: (.25,1) (.5,1) (.75,1) at 4, then threshold 3
    # adds a benign query (.75, 3/4), threshold 2.5 the last attack (1, 4/5); plus (0, 1).
    # Trapezoids: 0.75 * 1 + 0 + 0.25 * (3/4 + 4/5) / 2.
    assert aupr(benign, attack) == pytest.approx(0.75 + 0.25 * (0.75 + 0.8) / 2)


def test_reversed_sign_gives_low_auroc():
    assert auroc([3, 4, 5], [0, 1, 2]) == 0.0


def test_errors():
    with pytest.raises(ValueError, match="at least one"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        auroc([np.nan], [1.0])
    with pytest.raises(ValueError, match="tpr"):
        fpr_at_tpr([0], [1], 0)
