"""Mahalanobis-distance baseline (Lee, Lee, Lee, Shin, NeurIPS 2018), on the penultimate layer.

On the defender's training data, the victim's penultimate features ``phi(x)`` (``D`` values,
``victim.model.forward_features``) are modelled by class-conditional Gaussians with a **tied**
covariance::

    mu_c  = mean of phi(x_i) over training images of class c
    Sigma = (1/N) * sum_i (phi(x_i) - mu_{y_i}) (phi(x_i) - mu_{y_i})^T      (P = pseudo-inverse of Sigma)

and a query is scored by its squared Mahalanobis distance to the closest class mean::

    score(x) = min_c (phi(x) - mu_c)^T P (phi(x) - mu_c)   >= 0

i.e. minus the paper's confidence score ``M(x)``; larger = more suspicious. With
``noise_magnitude = eps > 0`` the paper's input pre-processing is applied first:
``x~ = x - eps * sign(grad_x d_c*(x))`` with ``c*`` the closest class, which moves the query
towards its closest Gaussian (in-distribution queries move more), then ``score(x~)``. The
reference code's grid is ``eps in {0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01}``, for inputs
normalised by the channel standard deviation; ours are in ``[-1, 1]``. The default is no
pre-processing (0). The layer ensemble with a logistic regression, which needs validation
outlier data, is not implemented.

Needs: white-box access to the victim's features (and gradients when ``eps > 0``) and the
defender's labelled training data. No outlier data, no history, no change to the victim.

Paper: https://arxiv.org/abs/1807.03888 (NeurIPS 2018).
Reference implementation: https://github.com/pokaxpoka/deep_Mahalanobis_detector
(``lib_generation.py``: ``sample_estimator``, ``get_Mahalanobis_score``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..api import ArtifactError, Detector
from ..artifacts import load_artifact, save_artifact
from ..validation import check_images, check_int, check_non_negative, check_optional_int
from ._common import (ParamsMixin, check_victim_sha, labelled_images, module_device, subsample, victim_image_shape,
                      white_box_network)

if TYPE_CHECKING:
    from typing import Self

    from ..data import ImageDataset

logger = logging.getLogger(__name__)

__all__ = ["MahalanobisDetector", "fit_tied_gaussians", "mahalanobis_distances", "mahalanobis_score"]


def fit_tied_gaussians(features: torch.Tensor, labels: torch.Tensor, num_classes: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means and the shared precision matrix of ``features`` (pure function).

    Args:
        features: ``(N, D)`` feature vectors.
        labels: ``(N,)`` int class indices in ``[0, num_classes)``; every class must occur.
        num_classes: ``K``.

    Returns:
        ``(means, precision)``: ``(K, D)`` and ``(D, D)`` float64, where ``precision`` is the
        (Moore-Penrose) pseudo-inverse of the tied covariance
        ``(1/N) sum_i (f_i - mu_{y_i})(f_i - mu_{y_i})^T``, as ``sklearn.covariance.EmpiricalCovariance``
        computes it in the reference code.
    """
    f = torch.as_tensor(features).to(torch.float64)
    y = torch.as_tensor(labels).to(torch.int64)
    if f.dim() != 2 or y.shape != (len(f),):
        raise ValueError(f"features must be (N, D) and labels (N,), got {tuple(f.shape)} and {tuple(y.shape)}.")
    counts = torch.bincount(y, minlength=num_classes)
    if len(counts) > num_classes or (counts == 0).any():
        missing = [c for c in range(num_classes) if c >= len(counts) or counts[c] == 0]
        raise ValueError(f"Every class needs training examples to estimate its mean; classes {missing} have none "
                         f"(or labels exceed num_classes={num_classes}).")
    means = torch.zeros(num_classes, f.shape[1], dtype=torch.float64).index_add_(0, y, f) / counts[:, None]
    centred = f - means[y]
    covariance = centred.T @ centred / len(f)
    precision = torch.linalg.pinv(covariance, hermitian=True)
    return means, precision


def mahalanobis_distances(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` squared Mahalanobis distances ``(f_n - mu_k)^T P (f_n - mu_k)`` (pure, differentiable)."""
    f = features.to(precision.dtype)
    fp = f @ precision
    quad_f = (fp * f).sum(1, keepdim=True)
    quad_mu = ((means @ precision) * means).sum(1)[None, :]
    return (quad_f - 2.0 * fp @ means.T + quad_mu).clamp_min(0.0)


def mahalanobis_score(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """``(N,)`` float32 ``min_c (f - mu_c)^T P (f - mu_c)``: distance to the closest class (pure function).

    Args:
        features: ``(N, D)``; means: ``(K, D)``; precision: ``(D, D)`` symmetric positive semi-definite.
    """
    f = torch.as_tensor(features)
    if f.dim() != 2 or means.dim() != 2 or f.shape[1] != means.shape[1] or precision.shape != (f.shape[1],) * 2:
        raise ValueError(f"Shapes do not fit: features {tuple(f.shape)}, means {tuple(means.shape)}, "
                         f"precision {tuple(precision.shape)}; expected (N, D), (K, D), (D, D).")
    return mahalanobis_distances(f, means, precision).min(dim=1).values.to(torch.float32)


class MahalanobisDetector(ParamsMixin, Detector):
    """Squared Mahalanobis distance of the victim's penultimate features to the closest class.

    Needs: ``"white-box"`` (``victim.model.forward_features``, and input gradients when
    ``noise_magnitude > 0``) and ``"defender-data"`` (labelled training images).

    Args:
        noise_magnitude: the paper's input pre-processing step ``eps >= 0`` (0: none, the default).
        max_train_samples: estimate the Gaussians on a random subset of at most this many
            training images (``None``: all of them).
        batch_size: images per forward pass.
        seed: fixes the subset.

    Fitted state: ``means_`` ``(K, D)``, ``precision_`` ``(D, D)`` (float64), ``network_`` (the
    victim's network), ``image_shape_``, ``num_classes_``.
    """

    #: The manifest ``kind`` of a saved detector (see :class:`~sameguard.api.SaveableDetector`).
    KIND: ClassVar[str] = "mahalanobis-detector"
    NEEDS: frozenset[str] = frozenset({"white-box", "defender-data"})

    def __init__(self, *, noise_magnitude: float = 0.0, max_train_samples: int | None = None,
                 batch_size: int = 512, seed: int = 0) -> None:
        self.noise_magnitude = noise_magnitude
        self.max_train_samples = max_train_samples
        self.batch_size = batch_size
        self.seed = seed
        check_non_negative(noise_magnitude, "noise_magnitude")
        check_int(batch_size, "batch_size")
        check_int(seed, "seed", minimum=0)
        check_optional_int(max_train_samples, "max_train_samples", minimum=1)
        self.means_: torch.Tensor | None = None
        self.precision_: torch.Tensor | None = None
        self.network_: nn.Module | None = None
        self.image_shape_: tuple[int, int, int] | None = None
        self.num_classes_: int | None = None
        self.victim_sha256_: str | None = None
        self.fit_seconds_: float | None = None
        self.threshold_ = None
        self.calibration_fpr_ = None

    def is_fitted(self) -> bool:
        return self.means_ is not None and self.precision_ is not None and self.network_ is not None

    def fit(self, victim: Any, train_data: ImageDataset) -> Self:
        """Estimate the class means and tied covariance of ``victim``'s features on ``train_data``.

        Args:
            victim: a :class:`~sameguard.victim.Victim` (white box: ``.model.forward_features``).
            train_data: the defender's labelled training data, images ``(N, C, H, W)`` in ``[-1, 1]``.
        """
        start = time.perf_counter()
        network = white_box_network(victim, need_features=True)
        images, labels, num_classes = labelled_images(train_data, "train_data")
        shape = victim_image_shape(victim) or tuple(images.shape[1:])
        if tuple(images.shape[1:]) != shape:
            raise ValueError(f"train_data images are {tuple(images.shape[1:])} but the victim takes {shape}.")
        keep = subsample(len(images), self.max_train_samples, self.seed)
        if keep is not None:
            images, labels = images[keep], labels[keep]
        self.network_ = network.eval()
        features = self._features(images)
        self.means_, self.precision_ = fit_tied_gaussians(features, labels, num_classes)
        self.image_shape_ = shape
        self.num_classes_ = num_classes
        self.victim_sha256_ = getattr(victim, "weights_sha256", None)
        self.threshold_ = None
        self.calibration_fpr_ = None
        self.fit_seconds_ = time.perf_counter() - start
        logger.info("Mahalanobis: %d classes, %d-D features from %d images (%.1f s)",
                    num_classes, features.shape[1], len(images), self.fit_seconds_)
        return self

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        device = module_device(self.network_)
        out = []
        for i in range(0, len(images), self.batch_size):
            f = self.network_.forward_features(images[i:i + self.batch_size].to(device))
            if f.dim() != 2:
                raise ValueError(f"forward_features returned shape {tuple(f.shape)}; expected (N, D).")
            out.append(f.detach().cpu())
        return torch.cat(out)

    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's ``x - eps * sign(grad_x d_{c*}(x))`` (``c*`` the closest class)."""
        device = module_device(self.network_)
        means, precision = self.means_.to(device), self.precision_.to(device)
        x = x.detach().to(device).clone().requires_grad_(True)
        with torch.enable_grad():
            d = mahalanobis_distances(self.network_.forward_features(x), means, precision)
            closest = d.min(dim=1).values
            (grad,) = torch.autograd.grad(closest.sum(), x)
        return (x - self.noise_magnitude * torch.where(grad >= 0, 1.0, -1.0)).detach()

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` float32 squared distances to the closest class of ``x`` ``(N, C, H, W)`` in ``[-1, 1]``."""
        self._check_fitted()
        x = check_images(x, self.image_shape_)
        device = module_device(self.network_)
        means, precision = self.means_.to(device), self.precision_.to(device)
        out = []
        for i in range(0, len(x), self.batch_size):
            batch = x[i:i + self.batch_size]
            if self.noise_magnitude > 0:
                batch = self._preprocess(batch)
            with torch.no_grad():
                f = self.network_.forward_features(batch.to(device))
                out.append(mahalanobis_score(f, means, precision).cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``gaussians.safetensors`` (means, precision) and ``manifest.json`` to ``directory``."""
        self._check_fitted()
        config = {
            "params": self.get_params(),
            "image_shape": list(self.image_shape_),
            "num_classes": self.num_classes_,
            "feature_dim": int(self.means_.shape[1]),
            "normalisation": "x = 2 * pixel / 255 - 1, values in [-1, 1]",
            "threshold": self.threshold_,
            "calibration_fpr": self.calibration_fpr_,
            "victim_weights_sha256": self.victim_sha256_,
            "fit_seconds": self.fit_seconds_,
        }
        return save_artifact(directory, self.KIND, {"gaussians": {"means": self.means_, "precision": self.precision_}}, config)

    @classmethod
    def load(cls, directory: str | os.PathLike, victim: Any, *, check_victim: bool = True,
             device: str | torch.device | None = None) -> MahalanobisDetector:
        """Load a detector saved by :meth:`save` and attach it to ``victim`` (hashes verified).

        ``device`` is accepted for a uniform :class:`~sameguard.api.SaveableDetector` interface and
        ignored: the detector runs where the victim's network is.
        """
        parts, manifest = load_artifact(directory, cls.KIND)
        cfg = manifest["config"]
        check_victim_sha(directory, victim, cfg.get("victim_weights_sha256"), check_victim)
        detector = cls(**cfg["params"])
        try:
            means, precision = parts["gaussians"]["means"], parts["gaussians"]["precision"]
        except KeyError as exc:
            raise ArtifactError(f"{directory} lacks the Gaussian parameters its manifest promises: {exc}") from None
        feature_dim = cfg["feature_dim"]
        if means.shape != (cfg["num_classes"], feature_dim) or precision.shape != (feature_dim, feature_dim):
            raise ArtifactError(f"{directory} has Gaussian parameters of shapes {tuple(means.shape)} and "
                                f"{tuple(precision.shape)} that do not fit its manifest.")
        detector.network_ = white_box_network(victim, need_features=True).eval()
        detector.means_, detector.precision_ = means, precision
        detector.image_shape_ = tuple(cfg["image_shape"])
        detector.num_classes_ = cfg["num_classes"]
        detector.victim_sha256_ = cfg.get("victim_weights_sha256")
        detector.threshold_ = cfg.get("threshold")
        detector.calibration_fpr_ = cfg.get("calibration_fpr")
        detector.fit_seconds_ = cfg.get("fit_seconds")
        return detector
