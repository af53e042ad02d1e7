"""Detectors: one score per query, larger = more suspicious (see :class:`sameguard.api.Detector`).

Each class says in ``NEEDS`` what it requires beyond black-box access to the victim:
``defender-data`` (the provider's training data), ``outlier-data``, ``query-history`` (per-client
state), ``white-box`` (logits, features or weights) or ``training-change`` (a modified victim).
"""

# The paper's detector
from .same import AUTHORS_SCORING, DEFAULT_SCORING, SAME_PRESETS, SAMEDetector, SAMEScores, same_score
from .same_base import ReconstructionDetector

# Stateless baselines on the victim's outputs
from .energy import EnergyDetector, energy_score
from .msp import MSPDetector, msp_score

# Baselines that use features, training or outlier data
from .mahalanobis import MahalanobisDetector, mahalanobis_score
from .outlier_exposure import OutlierExposureDetector, oe_loss
from .same_conv_ae import CONV_AE_SAME_PRESETS, ConvAESAMEDetector

# Stateful, per-client baselines
from .prada import PRADADetector, PradaState
from .vardetect import VarDetectDetector, rbf_mmd2

# The one registry: name -> class, manifest kind -> class, build / fit / load by name
from .registry import DETECTOR_KINDS, DETECTORS, build_detector, detector_class, fit_detector, load_detector

__all__ = ["SAMEDetector", "SAMEScores", "SAME_PRESETS", "AUTHORS_SCORING", "DEFAULT_SCORING", "same_score",
           "MSPDetector", "msp_score",
           "EnergyDetector", "energy_score", "MahalanobisDetector", "mahalanobis_score",
           "OutlierExposureDetector", "oe_loss", "ConvAESAMEDetector", "CONV_AE_SAME_PRESETS",
           "PRADADetector", "PradaState", "VarDetectDetector", "rbf_mmd2", "ReconstructionDetector",
           "DETECTORS", "DETECTOR_KINDS", "build_detector", "detector_class", "fit_detector", "load_detector"]
