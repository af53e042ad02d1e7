"""Detectors: one score per query, larger = more suspicious (see :class:`sameguard.api.Detector`)."""

from .same import SAME_PRESETS, SAMEDetector, SAMEScores, same_score

__all__ = ["SAMEDetector", "SAMEScores", "SAME_PRESETS", "same_score"]
