"""Supervised training and batched inference loops shared by victims, auxiliary models and substitutes."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .data.transforms import augment as augment_batch

logger = logging.getLogger(__name__)

__all__ = ["train_classifier", "predict_in_batches", "accuracy", "show_progress", "resolve_device"]

#: ``(x, generator) -> x'``: a differentiable-free transform applied to every training batch.
BatchTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def show_progress(progress: bool | None) -> bool:
    """Whether to draw progress bars: ``None`` means "when stderr is a terminal"."""
    return sys.stderr.isatty() if progress is None else bool(progress)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    augment: bool = True,
    hflip: bool = False,
    input_transform: BatchTransform | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    desc: str = "train",
) -> nn.Module:
    """Train ``model`` with SGD, momentum, weight decay and a cosine schedule (the authors' recipe).

    Args:
        model: a classifier returning logits ``(N, K)``.
        images: ``(N, C, H, W)`` float32 in ``[-1, 1]``.
        targets: ``(N,)`` int64 labels, or ``(N, K)`` probabilities (soft labels, e.g. an API's
            answers); the loss is cross-entropy in both cases.
        epochs: passes over the data (``>= 1``).
        augment: random crop with 4-pixel padding (and a horizontal flip when ``hflip``).
        input_transform: applied to each (augmented) batch before the model, e.g. the MAE's
            masked reconstruction for SAME's auxiliary model. Runs without gradient.
        seed: fixes the batch order, the augmentation and the transform's randomness.

    Returns:
        The trained model, in eval mode, on ``device``.
    """
    _check_training_args(images, targets, epochs, batch_size)
    device = torch.device(device)
    model.to(device)
    generator = torch.Generator().manual_seed(seed)
    device_generator = generator if device.type == "cpu" else torch.Generator(device).manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = (len(images) + batch_size - 1) // batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not show_progress(progress), leave=False)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        total, correct, loss_sum = 0, 0, 0.0
        for start in range(0, len(images), batch_size):
            idx = order[start:start + batch_size]
            x = _training_batch(images[idx], augment=augment, hflip=hflip, generator=generator, device=device,
                                input_transform=input_transform, device_generator=device_generator)
            batch_loss, batch_correct = _sgd_step(model, x, targets[idx].to(device), optimizer, scheduler)
            correct += batch_correct
            total += len(idx)
            loss_sum += batch_loss * len(idx)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / total:.3f}", acc=f"{correct / total:.3f}")
        logger.info("%s epoch %d/%d: loss %.4f, train accuracy %.4f", desc, epoch + 1, epochs, loss_sum / total, correct / total)
    bar.close()
    return model.eval()


def _check_training_args(images: torch.Tensor, targets: torch.Tensor, epochs: int, batch_size: int) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if len(images) != len(targets) or len(images) == 0:
        raise ValueError(f"images and targets must be non-empty and of equal length, got {len(images)} and {len(targets)}.")


def _sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[float, int]:
    """One optimiser and schedule step on ``(x, y)``: (the batch's mean loss, how many it classified right)."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    hard = y if y.dim() == 1 else y.argmax(1)
    return float(loss.detach()), int((logits.argmax(1) == hard).sum())


def _training_batch(x: torch.Tensor, *, augment: bool, hflip: bool, generator: torch.Generator, device: torch.device,
                    input_transform: BatchTransform | None, device_generator: torch.Generator) -> torch.Tensor:
    """One batch as the model sees it in training: augmented (on CPU), moved to ``device``, transformed."""
    if augment:
        x = augment_batch(x, generator, crop_padding=4, hflip=hflip)
    x = x.to(device)
    if input_transform is not None:
        with torch.no_grad():
            x = input_transform(x, device_generator)
    return x


@torch.no_grad()
def predict_in_batches(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 512,
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """Apply ``fn`` to ``x`` in chunks of ``batch_size`` on ``device``; results concatenated on the CPU.

    With one chunk (``len(x) <= batch_size``, every single-image request) the result is ``fn``'s own
    output moved to the CPU, not a copy: ``fn`` must return a fresh tensor (a model's output), not a
    view of its input or of a cached value.
    """
    if len(x) <= batch_size:
        return fn(x.to(device)).cpu()
    device = torch.device(device)
    outs = [fn(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs)


def accuracy(predict_proba: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 512) -> float:
    """Fraction of ``images`` whose top-1 prediction equals ``labels`` (in ``[0, 1]``)."""
    preds = predict_in_batches(lambda b: predict_proba(b).argmax(1), images, batch_size)
    return float((preds == labels).float().mean())
