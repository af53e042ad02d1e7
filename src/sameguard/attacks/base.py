"""What every model-extraction attack shares: the result type, the run loop, substitute training.

An attack is built with all its hyper-parameters (and the data it is assumed to hold: a proxy
pool, a seed set) and then :meth:`ExtractionAttack.run` against any
:class:`~sameguard.prediction_api.PredictionAPI` with a query budget::

    attack = KnockoffNets(proxy, seed=0)
    result = attack.run(api, budget=4000, victim=victim, test_data=test)
    result.queries, result.test_accuracy, result.fidelity

The attack queries **only** through the API, as one dedicated client (see
:func:`~sameguard.prediction_api.fresh_client_id`), and never sends more than ``budget`` images: the
budget is enforced by a :class:`~sameguard.prediction_api.BoundClient` before anything reaches the API.
Every attack here spends the budget exactly. Evaluation (substitute accuracy on the victim's test
set and fidelity, the top-1 agreement with the victim there) uses the victim **offline**: it is
not sent through the API and does not count as queries.

Metrics follow the model-extraction literature (Orekondy et al. 2019; Jagielski et al. 2020):
accuracy of the clone on the victim's test set, and fidelity = fraction of test inputs where
``argmax F_A(x) == argmax F_V(x)``.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..api import SameguardError
from ..models import build_classifier
from ..prediction_api import BoundClient, BudgetExceededError, PredictionAPI, fresh_client_id
from ..training import predict_in_batches, resolve_device, train_classifier
from ..validation import check_int, check_non_negative, check_positive

if TYPE_CHECKING:
    from ..data import ImageDataset

logger = logging.getLogger(__name__)

__all__ = [
    "AttackResult",
    "ExtractionAttack",
    "UnsupportedOutputError",
    "evaluate_substitute",
]

#: ``images (N, C, H, W) in [-1, 1] -> probabilities (N, K)``: the victim used offline for evaluation.
ProbabilityFn = Callable[[torch.Tensor], torch.Tensor]


class UnsupportedOutputError(SameguardError, ValueError):
    """The attack needs probability outputs but the API returns labels only."""


@dataclass(frozen=True)
class AttackResult:
    """What an extraction attack returns.

    Attributes:
        attack: the attack's name, e.g. ``"knockoff"``.
        client: the client id it queried the API as (read its detector scores with
            ``Guard.scores(client)``).
        substitute: the extracted model (logits ``(N, K)``), in eval mode.
        queries: images sent to the API (``== budget`` for every attack here).
        budget: the budget it was given.
        output: what the API answered, ``"probabilities"`` or ``"labels"``.
        test_accuracy: substitute accuracy on the given test set in ``[0, 1]``, or ``None``.
        fidelity: top-1 agreement with the victim on the test set in ``[0, 1]``, or ``None``
            (no offline victim given).
        seconds: wall time of the attack (querying and training, without evaluation).
        details: attack-specific facts (rounds, iterations, the final policy, ...).
    """

    attack: str
    client: str
    substitute: nn.Module
    queries: int
    budget: int
    output: str
    test_accuracy: float | None
    fidelity: float | None
    seconds: float
    details: Mapping[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        acc = "-" if self.test_accuracy is None else f"{self.test_accuracy:.4f}"
        fid = "-" if self.fidelity is None else f"{self.fidelity:.4f}"
        return (f"{self.attack}: {self.queries}/{self.budget} queries as {self.client!r}, "
                f"accuracy {acc}, fidelity {fid}, {self.seconds:.1f} s")


@torch.no_grad()
def evaluate_substitute(
    substitute: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    victim: ProbabilityFn | None = None,
    *,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> tuple[float | None, float | None]:
    """Accuracy and fidelity of ``substitute`` on ``images`` ``(N, C, H, W)`` in ``[-1, 1]``.

    Args:
        substitute: a model returning logits ``(N, K)``.
        labels: ``(N,)`` int64 true labels; ``None`` skips the accuracy.
        victim: the victim used **offline** (not through an API); ``None`` skips the fidelity.

    Returns:
        ``(accuracy, fidelity)``, each in ``[0, 1]`` or ``None``.
    """
    substitute.eval()
    device = torch.device(device)
    preds = predict_in_batches(lambda b: substitute(b).argmax(1), images, batch_size, device)
    acc = None if labels is None else float((preds == labels.cpu()).float().mean())
    fid = None
    if victim is not None:
        victim_preds = predict_in_batches(lambda b: victim(b).argmax(1), images, batch_size)
        fid = float((preds == victim_preds.cpu()).float().mean())
    return acc, fid


class ExtractionAttack(abc.ABC):
    """Base class of the extraction attacks: the shared run loop and substitute training.

    Subclasses implement :meth:`_extract`. The substitute-training knobs are shared:

    Args:
        substitute_arch: architecture of the substitute (see :func:`sameguard.models.build_classifier`);
            ``None`` (default) takes the victim's architecture when the API (or the victim given to
            :meth:`run`) has an ``arch`` attribute, else ``"lenet5"`` for 1-channel and
            ``"resnet18"`` for 3-channel inputs.
        substitute: a ready, untrained model to use instead (it is deep-copied for each run).
        epochs, batch_size, lr, momentum, weight_decay: SGD training of the substitute (cosine
            schedule, see :func:`sameguard.training.train_classifier`).
        augment: random-crop augmentation during substitute training (off by default: the
            answers belong to the exact images queried).
        use_probabilities: train on the answered probability vectors (soft cross-entropy); with
            ``False`` on their argmax. A label-only API always gives hard labels.
        query_batch_size: images per API call.
        seed: fixes every random choice; the same seed gives the same substitute.
        device: where the substitute is trained (``None``/``"auto"``: CUDA when available).
        progress: progress bars (``None``: when stderr is a terminal).
    """

    #: Registry name, e.g. ``"knockoff"``.
    name: ClassVar[str] = "attack"
    #: Which data the attack holds: ``"proxy"`` (an unlabelled pool), ``"seeds"`` (a few
    #: in-distribution images) or ``None`` (data-free).
    data_role: ClassVar[str | None] = None

    def __init__(
        self,
        *,
        substitute_arch: str | None = None,
        substitute: nn.Module | None = None,
        epochs: int = 10,
        batch_size: int = 64,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        augment: bool = False,
        use_probabilities: bool = True,
        query_batch_size: int = 64,
        seed: int = 0,
        device: str | torch.device | None = "cpu",
        progress: bool | None = None,
    ) -> None:
        if substitute_arch is not None and not isinstance(substitute_arch, str):
            raise ValueError(f"substitute_arch must be an architecture name or None, got {substitute_arch!r}.")
        if substitute is not None and not isinstance(substitute, nn.Module):
            raise ValueError(f"substitute must be a torch.nn.Module or None, got {type(substitute).__name__}.")
        self.substitute_arch = substitute_arch
        self.substitute = substitute
        self.epochs = check_int(epochs, "epochs")
        self.batch_size = check_int(batch_size, "batch_size")
        self.lr = check_positive(lr, "lr")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}.")
        self.momentum = float(momentum)
        self.weight_decay = check_non_negative(weight_decay, "weight_decay")
        self.augment = bool(augment)
        self.use_probabilities = bool(use_probabilities)
        self.query_batch_size = check_int(query_batch_size, "query_batch_size")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}.")
        self.seed = int(seed)
        self.device = resolve_device(device)
        self.progress = progress
        self._arch_hint: str | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, seed={self.seed})"

    # -- what subclasses may override ----------------------------------------------------------
    def requires_probabilities(self) -> bool:
        """Whether the attack needs probability outputs (it cannot run on a label-only API)."""
        return False

    @abc.abstractmethod
    def _extract(self, oracle: BoundClient, budget: int) -> tuple[nn.Module, dict[str, Any]]:
        """Spend exactly ``budget`` queries through ``oracle``; return the substitute and details."""

    # -- the run loop ------------------------------------------------------------------------
    def run(
        self,
        api: PredictionAPI,
        budget: int,
        *,
        client: str | None = None,
        victim: ProbabilityFn | None = None,
        test_data: ImageDataset | None = None,
    ) -> AttackResult:
        """Extract a substitute of the model behind ``api`` with exactly ``budget`` queries.

        Args:
            api: the prediction API to attack.
            budget: images to send (``>= 1``); the attack sends exactly this many, never more.
            client: the client id to query as; default: a fresh id named after the attack.
            victim: the victim, used **offline** only for evaluation (fidelity); by default the
                API's ``victim`` attribute when it has one (in-process APIs do).
            test_data: the victim's test set for evaluation; ``None`` skips it.

        Raises:
            UnsupportedOutputError: the attack needs probabilities and the API returns labels.
            BudgetExceededError: the API's budget for ``client`` is smaller than ``budget``
                (checked before anything is sent).
        """
        budget = check_int(budget, "budget")
        if api.output not in ("probabilities", "labels"):
            raise ValueError(f"The API's output must be 'probabilities' or 'labels', got {api.output!r}.")
        if api.output == "labels" and self.requires_probabilities():
            raise UnsupportedOutputError(
                f"The {self.name} attack needs the victim's probability vectors, but this API returns "
                "top-1 labels only (output='labels'); use an API with output='probabilities' or a "
                "label-capable attack (knockoff, jbda, jbda-tr)."
            )
        client = fresh_client_id(api, self.name) if client is None else client
        left = api.remaining(client)
        if left is not None and left < budget:
            raise BudgetExceededError(client, left + api.queries_used(client), api.queries_used(client), budget)
        if victim is None:
            victim = getattr(api, "victim", None)
        self._arch_hint = getattr(victim, "arch", None) or getattr(api, "arch", None)
        oracle = BoundClient(api, client, budget)
        logger.info("%s: extracting with %d queries as client %r", self.name, budget, client)
        start = time.perf_counter()
        substitute, details = self._extract(oracle, budget)
        seconds = time.perf_counter() - start
        if oracle.used != budget:  # every attack here spends its budget exactly
            raise RuntimeError(f"{self.name} used {oracle.used} queries instead of its budget {budget}.")
        substitute.eval()
        acc = fid = None
        if test_data is not None:
            acc, fid = evaluate_substitute(substitute, test_data.images, test_data.labels, victim,
                                           device=self.device)
        result = AttackResult(attack=self.name, client=client, substitute=substitute, queries=oracle.used,
                              budget=budget, output=api.output, test_accuracy=acc, fidelity=fid,
                              seconds=seconds, details=details)
        logger.info("%s", result.summary())
        return result

    # -- shared helpers ----------------------------------------------------------------------
    def _generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + offset)

    def _new_substitute(self, image_shape: tuple[int, int, int], num_classes: int, seed_offset: int = 0) -> nn.Module:
        """A fresh substitute, initialised deterministically from the attack's seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + seed_offset)
            if self.substitute is not None:
                import copy

                model = copy.deepcopy(self.substitute)
                for module in model.modules():  # a fresh, seeded initialisation
                    if module is not model and hasattr(module, "reset_parameters"):
                        module.reset_parameters()
            else:
                c, h, _ = image_shape
                arch = self.substitute_arch or self._arch_hint or ("lenet5" if c == 1 else "resnet18")
                model = build_classifier(arch, c, h, num_classes)
        return model.to(self.device)

    def _targets(self, answers: torch.Tensor) -> torch.Tensor:
        """Training targets from API answers: probabilities ``(N, K)`` or labels ``(N,)`` int64."""
        if answers.dim() == 2 and not self.use_probabilities:
            return answers.argmax(1)
        return answers

    def _train(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, epochs: int | None = None,
               seed_offset: int = 0, desc: str | None = None) -> nn.Module:
        """Train ``model`` on ``(images, targets)`` with the attack's SGD knobs (soft or hard CE)."""
        return train_classifier(
            model, images, targets, epochs=self.epochs if epochs is None else epochs,
            batch_size=self.batch_size, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
            augment=self.augment, seed=self.seed + seed_offset, device=self.device, progress=self.progress,
            desc=desc or f"{self.name} substitute",
        )

    @staticmethod
    def _as_distribution(answers: torch.Tensor, num_classes: int) -> torch.Tensor:
        """``(N, K)`` probabilities from answers (labels become one-hot vectors)."""
        if answers.dim() == 1:
            return F.one_hot(answers, num_classes).float()
        return answers.float()
