"""Plumbing shared by the baseline detectors (private): parameters, victims, windows, training loops.

Nothing here is an algorithm; each baseline's math lives in its own module.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..api import ArtifactError
from ..training import show_progress
from ..validation import check_images

logger = logging.getLogger(__name__)

#: ``images (N, C, H, W) in [-1, 1] -> probabilities (N, K)``: the black-box victim.
ProbabilityFn = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------- parameters
class ParamsMixin:
    """``get_params()`` and ``__repr__`` from the keyword-only constructor arguments."""

    #: Constructor arguments that are not hyper-parameters (not saved, not shown).
    _NOT_PARAMS: tuple[str, ...] = ("device", "progress")

    @classmethod
    def _param_defaults(cls) -> dict[str, Any]:
        sig = inspect.signature(cls.__init__)
        return {name: p.default for name, p in sig.parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in cls._NOT_PARAMS}

    def get_params(self) -> dict[str, Any]:
        """The constructor's hyper-parameters (JSON-serialisable)."""
        return {name: getattr(self, name) for name in self._param_defaults()}

    def __repr__(self) -> str:
        defaults = self._param_defaults()
        changed = {k: v for k, v in self.get_params().items() if v != defaults[k]}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


# ---------------------------------------------------------------------- victims
def victim_image_shape(victim: Any) -> tuple[int, int, int] | None:
    """The victim's ``(C, H, W)`` when it says (a :class:`~sameguard.victim.Victim` does)."""
    shape = getattr(victim, "image_shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def victim_probabilities(victim: ProbabilityFn, x: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """``(N, K)`` float32 CPU probabilities of the black-box ``victim`` on ``x``, checked."""
    p = torch.as_tensor(victim(x)).detach().cpu().float()
    if p.dim() != 2 or len(p) != len(x) or (num_classes is not None and p.shape[1] != num_classes):
        k = "K" if num_classes is None else num_classes
        raise ValueError(f"The victim returned shape {tuple(p.shape)}; expected probabilities of shape ({len(x)}, {k}).")
    if not torch.isfinite(p).all():
        raise ValueError("The victim returned NaN or infinite probabilities.")
    return p


def white_box_network(victim: Any, *, need_features: bool = False) -> nn.Module:
    """The victim's ``nn.Module`` (``victim.model``), for detectors that need white-box access."""
    model = getattr(victim, "model", None)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"This detector needs white-box access: a victim with a .model network (a "
            f"sameguard.victim.Victim), got {type(victim).__name__}."
        )
    if need_features and not callable(getattr(model, "forward_features", None)):
        raise ValueError(
            f"The victim's network {type(model).__name__} has no forward_features(x) -> (N, D) method "
            "(the penultimate representation); see sameguard.models."
        )
    return model


def module_device(module: nn.Module) -> torch.device:
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def check_victim_sha(directory: Any, victim: Any, saved_sha: str | None, check_victim: bool) -> None:
    """Refuse to attach a loaded detector to a different victim (when both SHA-256 are known)."""
    victim_sha = getattr(victim, "weights_sha256", None)
    if check_victim and saved_sha and victim_sha and victim_sha != saved_sha:
        raise ArtifactError(
            f"The detector in {directory} was fitted for a victim with weights SHA-256 {saved_sha}, but "
            f"the given victim's is {victim_sha}; refit the detector for this victim (sameguard fit --victim "
            "...), or give the victim it was fitted for."
        )


# ---------------------------------------------------------------------- data
def images_of(data: Any, name: str, image_shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Validated images from an :class:`~sameguard.data.ImageDataset` or an image tensor."""
    images = getattr(data, "images", data)
    return check_images(images, image_shape, name=name)


def labelled_images(data: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(images, labels, num_classes)`` of an :class:`~sameguard.data.ImageDataset`."""
    if not hasattr(data, "images") or not hasattr(data, "labels"):
        raise ValueError(f"{name} must be an ImageDataset (with .images and .labels), got {type(data).__name__}.")
    images = check_images(data.images, name=f"{name}.images")
    labels = torch.as_tensor(data.labels, dtype=torch.int64)
    if labels.shape != (len(images),):
        raise ValueError(f"{name}.labels must have shape ({len(images)},), got {tuple(labels.shape)}.")
    num_classes = int(getattr(data, "num_classes", int(labels.max()) + 1))
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"{name}.labels must lie in [0, {num_classes}).")
    return images, labels, num_classes


def subsample(n: int, limit: int | None, seed: int) -> torch.Tensor | None:
    """Indices of a random subset of at most ``limit`` of ``n`` items (``None``: keep all)."""
    if limit is None or n <= limit:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def windows(n: int, size: int) -> Iterator[slice]:
    """Consecutive non-overlapping slices of ``size`` covering ``range(n)`` (the last may be shorter)."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def per_query(window_scores: torch.Tensor, n: int, size: int) -> torch.Tensor:
    """``(n,)`` float32: each query gets the score of its window (see :func:`windows`)."""
    lengths = torch.tensor([s.stop - s.start for s in windows(n, size)])
    return torch.as_tensor(window_scores, dtype=torch.float32).repeat_interleave(lengths)


# ---------------------------------------------------------------------- training
def train_reconstructor(model: nn.Module, images: torch.Tensor,
                        loss_fn: Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor], *,
                        epochs: int, lr: float, batch_size: int, seed: int, device: torch.device,
                        progress: bool | None, desc: str) -> nn.Module:
    """Adam on ``loss_fn(model, batch, generator)`` over shuffled mini-batches; returns ``model.eval()``."""
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)
    device_generator = generator if device.type == "cpu" else torch.Generator(device).manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(images) + batch_size - 1) // batch_size)
    bar = tqdm(total=steps, desc=desc, disable=not show_progress(progress), leave=False)
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        loss_sum = 0.0
        for start in range(0, len(images), batch_size):
            x = images[order[start:start + batch_size]].to(device)
            if len(x) < 2:  # batch norm needs two samples in training mode
                continue
            loss = loss_fn(model, x, device_generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(x)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.4f}")
        logger.info("%s epoch %d/%d: loss %.5f", desc, epoch + 1, epochs, loss_sum / len(images))
    bar.close()
    return model.eval()

