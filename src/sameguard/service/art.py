"""IBM ART adapter: any :class:`~sameguard.prediction_api.PredictionAPI` (e.g. the live service) as an ART classifier.

ART's extraction attacks (``art.attacks.extraction.CopycatCNN``, ``KnockoffNets``) query a victim
*estimator* through ``predict(x, batch_size)`` on NumPy arrays. :func:`to_art_classifier` wraps
an API -- :class:`~sameguard.service.SameguardClient` against the HTTP service, or an in-process
:class:`~sameguard.guard.Guard` -- in ART's ``BlackBoxClassifierNeuralNetwork`` (a
``BlackBoxClassifier`` with ``channels_first``, which some ART attacks need; ART issue #2094),
so ART's own attacks run against the defended service unchanged::

    from art.attacks.extraction import CopycatCNN
    victim = to_art_classifier(SameguardClient(url, key))
    thief = CopycatCNN(victim, nb_stolen=500, nb_epochs=10).extract(x_pool, thieved_classifier=art_net)

ART is an optional dependency (``pip install 'sameguard[art]'``): importing this module does not
import ART; calling :func:`to_art_classifier` does.

Reference: Trusted-AI/adversarial-robustness-toolbox, ``art/estimators/classification/blackbox.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["to_art_classifier", "art_predict_fn"]


def _require_art() -> Any:
    try:
        from art.estimators.classification import BlackBoxClassifierNeuralNetwork
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("The ART adapter needs IBM's adversarial-robustness-toolbox: "
                          "pip install 'sameguard[art]' (or adversarial-robustness-toolbox).") from exc
    return BlackBoxClassifierNeuralNetwork


def art_predict_fn(api: Any, client: str = "art") -> Any:
    """``numpy (N, C, H, W) float in [-1, 1] -> numpy (N, K) float32`` through ``api.query``.

    Labels (a label-only API) become one-hot rows; refused images are whatever the API answers
    for them (the uniform vector by default).
    """
    k = int(api.num_classes)

    def predict(x: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        out = api.query(batch, client)
        if out.dim() == 1:
            out = torch.nn.functional.one_hot(out.clamp_min(0), k).float()
        return out.detach().cpu().numpy().astype(np.float32)

    return predict


def to_art_classifier(api: Any, *, client: str = "art", clip_values: tuple[float, float] = (-1.0, 1.0)) -> Any:
    """An ART ``BlackBoxClassifierNeuralNetwork`` that answers through ``api`` (a PredictionAPI).

    Args:
        api: e.g. a :class:`~sameguard.service.SameguardClient`; needs ``image_shape``,
            ``num_classes`` and ``query``.
        client: the client name passed to ``api.query``.
        clip_values: the input range (sameguard's ``[-1, 1]``).
    """
    cls = _require_art()
    return cls(predict_fn=art_predict_fn(api, client), input_shape=tuple(api.image_shape),
               nb_classes=int(api.num_classes), channels_first=True, clip_values=clip_values)
