"""VarDetect-style detector: MMD between a client's latent codes and benign codes
(Pal, Gupta, Kanade, Shevade, arXiv 2107.05166, 2021).

A variational auto-encoder (:class:`~sameguard.models.vae.ConvVAE`) is trained on the
defender's data. Queries are encoded to their posterior means ``mu(x)``; a window of a client's
queries is compared with a fixed reference sample of benign codes (``reference_size`` training
images, drawn once at ``fit``) by the squared maximum mean discrepancy with an RBF kernel::

    k(a, b) = exp(-||a - b||^2 / (2 * sigma^2))
    MMD^2(X, Y) = mean_{i,j} k(x_i, x_j) + mean_{i,j} k(y_i, y_j) - 2 * mean_{i,j} k(x_i, y_j)

(the biased V-statistic: ``>= 0``, exactly 0 for identical samples). ``sigma`` is fixed at fit:
the given ``bandwidth``, or by default the median heuristic, the median pairwise distance
between reference codes, so that scores of different windows are comparable. Larger MMD =
further from benign traffic = more suspicious.

**Differences from the paper.** The paper's VAE is *modified* and also trained on an outlier
set so that outlier codes are pushed away from the benign ones; no reference code is public.
This is the plain-VAE variant (no outlier data). Architecture and training budget (latent 16,
Adam 1e-3, 20 epochs, ``beta = 1``) and the window of 64 queries are our choices.

**Scores.** :meth:`VarDetectDetector.score` cuts a stream into non-overlapping windows of
``window_size`` and gives each query its window's MMD^2 (per-window AUROC, as for PRADA);
:meth:`VarDetectDetector.observe` keeps, per client, a sliding window of the last
``window_size`` codes and returns the MMD^2 after each query.

Needs: per-client history (``"query-history"``) and the defender's training data
(``"defender-data"``). No white-box access, no change to the victim.

Paper: https://arxiv.org/abs/2107.05166. Reference implementation: none public.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..api import ArtifactError, Detector
from ..artifacts import load_artifact, save_artifact
from ..models.autoencoder import ConvAEConfig
from ..models.vae import ConvVAE, vae_loss
from ..training import predict_in_batches, resolve_device
from ..validation import check_images, check_int, check_non_negative, check_optional_int, check_positive
from ._common import (ParamsMixin, check_victim_sha, images_of, per_query, subsample, train_reconstructor,
                      victim_image_shape, windows)

if TYPE_CHECKING:
    from typing import Self

    from ..data import ImageDataset

logger = logging.getLogger(__name__)

__all__ = ["VarDetectDetector", "rbf_mmd2", "median_bandwidth"]


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2.0 * a @ b.T).clamp_min(0.0)


def rbf_mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """Biased squared MMD between samples ``x`` ``(n, d)`` and ``y`` ``(m, d)``, RBF kernel of width ``sigma``.

    ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))``; the result is ``>= 0`` and 0 when the two
    samples are identical (pure function, computed in float64).
    """
    check_positive(bandwidth, "bandwidth")
    x, y = torch.as_tensor(x).to(torch.float64), torch.as_tensor(y).to(torch.float64)
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or len(x) == 0 or len(y) == 0:
        raise ValueError(f"x and y must be non-empty (n, d) and (m, d) samples, got {tuple(x.shape)} and {tuple(y.shape)}.")
    gamma = 1.0 / (2.0 * bandwidth ** 2)
    kxx = torch.exp(-gamma * _sq_dists(x, x)).mean()
    kyy = torch.exp(-gamma * _sq_dists(y, y)).mean()
    kxy = torch.exp(-gamma * _sq_dists(x, y)).mean()
    return max(float(kxx + kyy - 2.0 * kxy), 0.0)


def median_bandwidth(z: torch.Tensor) -> float:
    """The median heuristic: median Euclidean distance between distinct rows of ``z`` ``(n, d)``, ``n >= 2``."""
    z = torch.as_tensor(z).to(torch.float64)
    if z.dim() != 2 or len(z) < 2:
        raise ValueError(f"The median heuristic needs at least two codes (n, d), got {tuple(z.shape)}.")
    d = _sq_dists(z, z).sqrt()
    i, j = torch.triu_indices(len(z), len(z), offset=1)
    median = float(d[i, j].median())
    if median <= 0:
        raise ValueError("All reference codes are identical; cannot choose an RBF bandwidth by the median heuristic.")
    return median


class VarDetectDetector(ParamsMixin, Detector):
    """MMD^2 between windows of a client's VAE codes and benign reference codes.

    Needs: ``"query-history"`` and ``"defender-data"`` (the VAE and the reference sample).

    Args:
        latent_dim: VAE code size.
        width: channels of the VAE's first convolution.
        epochs: VAE training epochs (Adam, learning rate ``lr``, batch ``batch_size``).
        lr: Adam learning rate.
        beta: weight of the KL term of the VAE loss.
        window_size: queries per window (in :meth:`score`, and the sliding window of :meth:`observe`).
        reference_size: number of benign training images whose codes form the reference sample.
        bandwidth: RBF ``sigma`` in latent units; ``None``: median heuristic on the reference codes.
        max_train_samples: train the VAE on at most this many images (``None``: all).
        batch_size: training and encoding batch size.
        seed: fixes initialisation, data order, sampling and the reference sample.
        device: ``"cpu"``, ``"cuda"``, or ``None``/``"auto"``.
        progress: progress bars (``None``: when stderr is a terminal).

    Fitted state: ``vae_``, ``reference_codes_`` ``(R, latent_dim)``, ``bandwidth_``,
    ``image_shape_``; per-client sliding windows in ``clients_``.
    """

    #: The manifest ``kind`` of a saved detector (see :class:`~sameguard.api.SaveableDetector`).
    KIND: ClassVar[str] = "vardetect-detector"
    NEEDS: frozenset[str] = frozenset({"query-history", "defender-data"})

    def __init__(self, *, latent_dim: int = 16, width: int = 32, epochs: int = 20, lr: float = 1e-3,
                 beta: float = 1.0, window_size: int = 64, reference_size: int = 500,
                 bandwidth: float | None = None, max_train_samples: int | None = None, batch_size: int = 128,
                 seed: int = 0, device: str | torch.device | None = "cpu", progress: bool | None = None) -> None:
        self.latent_dim = latent_dim
        self.width = width
        self.epochs = epochs
        self.lr = lr
        self.beta = beta
        self.window_size = window_size
        self.reference_size = reference_size
        self.bandwidth = bandwidth
        self.max_train_samples = max_train_samples
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.progress = progress
        for name in ("latent_dim", "width", "epochs", "window_size", "batch_size"):
            check_int(getattr(self, name), name)
        check_int(reference_size, "reference_size", minimum=2)
        check_int(seed, "seed", minimum=0)
        check_positive(lr, "lr")
        check_non_negative(beta, "beta")
        if bandwidth is not None:
            check_positive(bandwidth, "bandwidth")
        check_optional_int(max_train_samples, "max_train_samples", minimum=1)
        self.vae_: ConvVAE | None = None
        self.reference_codes_: torch.Tensor | None = None
        self.bandwidth_: float | None = None
        self.image_shape_: tuple[int, int, int] | None = None
        self.victim_sha256_: str | None = None
        self.fit_seconds_: float | None = None
        self.clients_: dict[Hashable, deque[torch.Tensor]] = {}
        self.threshold_ = None
        self.calibration_fpr_ = None

    def is_fitted(self) -> bool:
        return self.vae_ is not None and self.reference_codes_ is not None and self.bandwidth_ is not None

    def fit(self, victim: Any, train_data: ImageDataset | torch.Tensor) -> Self:
        """Train the VAE on ``train_data`` and encode the benign reference sample.

        Args:
            victim: the victim (only its ``image_shape`` and weights SHA-256 are used; may be ``None``).
            train_data: the defender's images ``(N, C, H, W)`` in ``[-1, 1]`` (an ImageDataset or a tensor).
        """
        start = time.perf_counter()
        shape = victim_image_shape(victim)
        images = images_of(train_data, "train_data", shape)
        c, h, w = images.shape[1:]
        if h != w:
            raise ValueError(f"The VAE needs square images, got {h}x{w}.")
        if len(images) < 2:
            raise ValueError("VarDetect needs at least two training images.")
        keep = subsample(len(images), self.max_train_samples, self.seed)
        train = images if keep is None else images[keep]
        device = resolve_device(self.device)
        torch.manual_seed(self.seed)
        vae = ConvVAE(ConvAEConfig(image_size=h, in_channels=c, width=self.width, latent_dim=self.latent_dim))
        logger.info("VarDetect: training a VAE (%d parameters) on %d images for %d epochs",
                    vae.num_parameters(), len(train), self.epochs)
        beta = self.beta

        def loss_fn(model: ConvVAE, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            x_hat, mu, logvar = model(x, generator)
            return vae_loss(x, x_hat, mu, logvar, beta)

        train_reconstructor(vae, train, loss_fn, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                            seed=self.seed, device=device, progress=self.progress, desc="VarDetect VAE")
        self.vae_ = vae.eval()
        ref_idx = subsample(len(images), self.reference_size, self.seed + 1)
        reference = images if ref_idx is None else images[ref_idx]
        self.reference_codes_ = self._encode(reference)
        self.bandwidth_ = float(self.bandwidth) if self.bandwidth is not None else median_bandwidth(self.reference_codes_)
        self.image_shape_ = (c, h, w)
        self.victim_sha256_ = getattr(victim, "weights_sha256", None)
        self.clients_ = {}
        self.threshold_ = None
        self.calibration_fpr_ = None
        self.fit_seconds_ = time.perf_counter() - start
        logger.info("VarDetect fitted in %.1f s (bandwidth %.4g)", self.fit_seconds_, self.bandwidth_)
        return self

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        device = next(self.vae_.parameters()).device
        return predict_in_batches(self.vae_.latent_means, x, self.batch_size, device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, latent_dim)`` posterior means of validated queries ``(N, C, H, W)`` in ``[-1, 1]``."""
        self._check_fitted()
        return self._encode(check_images(x, self.image_shape_))

    def window_scores(self, x: torch.Tensor) -> torch.Tensor:
        """One MMD^2 per non-overlapping window of ``window_size`` queries of ``x`` (the last may be shorter)."""
        codes = self.encode(x)
        return torch.tensor([rbf_mmd2(codes[s], self.reference_codes_, self.bandwidth_)
                             for s in windows(len(codes), self.window_size)], dtype=torch.float32)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` float32: each query of the stream ``x`` gets the MMD^2 of its window; larger = more suspicious."""
        scores = self.window_scores(x)
        return per_query(scores, len(x), self.window_size)

    def observe(self, x: torch.Tensor, client: Hashable) -> torch.Tensor:
        """Append ``x`` to ``client``'s sliding window; ``(N,)`` float32 MMD^2 of the window after each query."""
        codes = self.encode(x)
        window = self.clients_.setdefault(client, deque(maxlen=self.window_size))
        out = torch.empty(len(codes), dtype=torch.float32)
        for i, code in enumerate(codes):
            window.append(code)
            out[i] = rbf_mmd2(torch.stack(tuple(window)), self.reference_codes_, self.bandwidth_)
        return out

    def reset(self, client: Hashable | None = None) -> None:
        """Forget one client's window, or every client's with ``client=None``."""
        if client is None:
            self.clients_.clear()
        else:
            self.clients_.pop(client, None)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``vae.safetensors``, ``reference.safetensors`` and ``manifest.json`` (client windows are not saved)."""
        self._check_fitted()
        config = {
            "params": self.get_params(),
            "vae_config": self.vae_.config.to_dict(),
            "image_shape": list(self.image_shape_),
            "bandwidth": self.bandwidth_,
            "normalisation": "x = 2 * pixel / 255 - 1, values in [-1, 1]",
            "threshold": self.threshold_,
            "calibration_fpr": self.calibration_fpr_,
            "victim_weights_sha256": self.victim_sha256_,
            "fit_seconds": self.fit_seconds_,
        }
        parts = {"vae": self.vae_.state_dict(), "reference": {"codes": self.reference_codes_}}
        return save_artifact(directory, self.KIND, parts, config)

    @classmethod
    def load(cls, directory: str | os.PathLike, victim: Any = None, *, check_victim: bool = True,
             device: str | torch.device | None = "cpu") -> VarDetectDetector:
        """Load a detector saved by :meth:`save` (every file's SHA-256 verified)."""
        parts, manifest = load_artifact(directory, cls.KIND)
        cfg = manifest["config"]
        check_victim_sha(directory, victim, cfg.get("victim_weights_sha256"), check_victim)
        detector = cls(**cfg["params"], device=device)
        vae = ConvVAE(ConvAEConfig(**cfg["vae_config"]))
        try:
            vae.load_state_dict(parts["vae"])
            codes = parts["reference"]["codes"]
        except (KeyError, RuntimeError) as exc:
            raise ArtifactError(f"{directory} has weights that do not fit its manifest: {exc}") from None
        detector.vae_ = vae.to(resolve_device(device)).eval()
        detector.reference_codes_ = codes
        detector.bandwidth_ = float(cfg["bandwidth"])
        detector.image_shape_ = tuple(cfg["image_shape"])
        detector.victim_sha256_ = cfg.get("victim_weights_sha256")
        detector.threshold_ = cfg.get("threshold")
        detector.calibration_fpr_ = cfg.get("calibration_fpr")
        detector.fit_seconds_ = cfg.get("fit_seconds")
        return detector
