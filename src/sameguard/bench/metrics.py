"""Detection metrics with attack queries as the positive class (label 1), benign as 0.

* ``auroc``: area under the ROC curve (``sklearn.metrics.roc_auc_score``); 0.5 is chance.
* ``aupr``: area under the precision-recall curve of the *attack* class, by the trapezoidal
  rule over ``precision_recall_curve`` (as the SAME authors' ``auc(recall, precision)``); with
  balanced classes chance is about 0.5.
* ``fpr_at_tpr(…, 0.95)``: the fraction of benign queries flagged at the lowest threshold that
  still catches at least 95 % of attack queries (the SAME convention "FPR95"). The authors
  interpolate the ROC curve; taking the first ROC point with TPR >= 0.95 instead is exact and
  unambiguous on plateaus.
* ``tpr_at_fpr(…, 0.01)``: the fraction of attack queries caught at the highest sensitivity whose
  benign false-positive rate stays at or below 1 %.

All take ``benign_scores`` and ``attack_scores`` (1-D, larger = more suspicious).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn import metrics as skm

__all__ = ["DetectionMetrics", "auroc", "aupr", "fpr_at_tpr", "tpr_at_fpr", "detection_metrics"]


def _labels_scores(benign_scores, attack_scores) -> tuple[np.ndarray, np.ndarray]:
    benign = np.asarray(benign_scores, dtype=np.float64).ravel()
    attack = np.asarray(attack_scores, dtype=np.float64).ravel()
    if benign.size == 0 or attack.size == 0:
        raise ValueError(f"Need at least one benign and one attack score, got {benign.size} and {attack.size}.")
    scores = np.concatenate([benign, attack])
    if not np.isfinite(scores).all():
        raise ValueError("Scores must be finite; found NaN or infinity.")
    labels = np.concatenate([np.zeros(benign.size), np.ones(attack.size)])
    return labels, scores


def auroc(benign_scores, attack_scores) -> float:
    labels, scores = _labels_scores(benign_scores, attack_scores)
    return float(skm.roc_auc_score(labels, scores))


def aupr(benign_scores, attack_scores) -> float:
    labels, scores = _labels_scores(benign_scores, attack_scores)
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    return float(skm.auc(recall, precision))


def fpr_at_tpr(benign_scores, attack_scores, tpr: float = 0.95) -> float:
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}.")
    labels, scores = _labels_scores(benign_scores, attack_scores)
    fprs, tprs, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    return float(fprs[np.argmax(tprs >= tpr - 1e-12)])


def tpr_at_fpr(benign_scores, attack_scores, fpr: float = 0.01) -> float:
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}.")
    labels, scores = _labels_scores(benign_scores, attack_scores)
    fprs, tprs, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    return float(tprs[fprs <= fpr + 1e-12].max())


@dataclass(frozen=True)
class DetectionMetrics:
    """The paper's metrics plus TPR at 1 % FPR, each in ``[0, 1]``."""

    auroc: float
    aupr: float
    fpr95: float
    tpr_at_1fpr: float
    n_benign: int
    n_attack: int

    def to_dict(self) -> dict:
        return asdict(self)


def detection_metrics(benign_scores, attack_scores) -> DetectionMetrics:
    """All metrics at once for one benign/attack score pair."""
    return DetectionMetrics(
        auroc=auroc(benign_scores, attack_scores),
        aupr=aupr(benign_scores, attack_scores),
        fpr95=fpr_at_tpr(benign_scores, attack_scores, 0.95),
        tpr_at_1fpr=tpr_at_fpr(benign_scores, attack_scores, 0.01),
        n_benign=int(np.asarray(benign_scores).size),
        n_attack=int(np.asarray(attack_scores).size),
    )
