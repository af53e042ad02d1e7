"""sameguard: detect model-extraction queries against an image-classifier API.

The package implements SAME (*Sample Reconstruction against Model Extraction Attacks*,
Xie et al., AAAI 2024): a masked auto-encoder trained on the provider's own data and an
auxiliary classifier trained on its reconstructions give every query an anomaly score.

Conventions used throughout the package:

* images are ``float32`` tensors of shape ``(N, C, H, W)`` with values in ``[-1, 1]``
  (``x = 2 * pixel / 255 - 1``, as in the authors' code); see :mod:`sameguard.data.transforms`;
* every detector returns one score per query, **larger = more suspicious**;
* fitted state ends in an underscore (``threshold_``); using a detector before ``fit`` raises
  :class:`sameguard.api.NotFittedError`;
* weights are stored as safetensors with a JSON manifest; pickles are never loaded.
"""

from __future__ import annotations

import logging

__version__ = "0.3.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__"]
