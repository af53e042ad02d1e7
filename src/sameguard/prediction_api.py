"""The prediction interface every attack, every simulated user and the service speak: :class:`PredictionAPI`.

A prediction API takes a batch of images ``(N, C, H, W)`` in ``[-1, 1]`` (the package's
normalisation convention, see :mod:`sameguard.data.transforms`) from a named client and answers
with class probabilities ``(N, K)`` ``float32`` -- or, when it is configured with
``output="labels"``, with top-1 labels ``(N,)`` ``int64`` only (the hard-label setting of the
model-extraction literature). Nothing else crosses the interface: attacks never see the victim's
weights, logits or gradients, so an HTTP client implements the same protocol and every attack
runs unchanged against a remote service.

This module holds the protocol and what every implementation shares:

* :class:`QueryLedger` -- per-client query counts with an optional budget. A batch that would go
  over the budget is refused **whole** (:class:`BudgetExceededError`): nothing is answered and
  nothing is counted; a batch whose answering fails is given back.
* :class:`BoundClient` and :func:`fresh_client_id` -- an API seen by one client, with an optional
  budget of its own: what an attack holds while it runs.

The in-process implementation is :class:`sameguard.guard.Guard` (the victim, optionally behind a
detector and an action policy); the remote one is :class:`sameguard.service.SameguardClient`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, Protocol, runtime_checkable

import torch

from .api import SameguardError
from .validation import check_choice, check_name, check_optional_int

__all__ = [
    "ANONYMOUS",
    "OUTPUTS",
    "Output",
    "PredictionAPI",
    "BudgetExceededError",
    "QueryLedger",
    "BoundClient",
    "fresh_client_id",
    "check_output",
    "victim_geometry",
    "victim_probabilities",
]

#: What a prediction API answers: full probability vectors or top-1 labels only.
Output = Literal["probabilities", "labels"]
OUTPUTS: tuple[str, ...] = ("probabilities", "labels")

#: The client id used when a caller does not name one.
ANONYMOUS = "anonymous"


@runtime_checkable
class PredictionAPI(Protocol):
    """A classifier served as a black box: images in, probabilities (or labels) out.

    Attributes:
        image_shape: ``(C, H, W)`` of the images it accepts.
        num_classes: ``K``, the number of classes.
        output: ``"probabilities"`` (answers ``(N, K)`` float32, rows sum to 1) or ``"labels"``
            (answers ``(N,)`` int64 in ``[0, K)``).
    """

    image_shape: tuple[int, int, int]
    num_classes: int
    output: Output

    def query(self, x: torch.Tensor, client: str = ANONYMOUS) -> torch.Tensor:
        """Answer a batch ``x`` ``(N, C, H, W)`` in ``[-1, 1]`` sent by ``client``.

        Raises:
            BudgetExceededError: the batch would take ``client`` over its budget; nothing is
                answered and nothing is counted.
            ValueError: ``x`` is not a valid image batch of shape ``(N, *image_shape)``.
        """
        ...

    def queries_used(self, client: str) -> int:
        """Number of images ``client`` has had answered so far."""
        ...

    def remaining(self, client: str) -> int | None:
        """Images ``client`` may still send, or ``None`` when there is no budget."""
        ...


class BudgetExceededError(SameguardError, RuntimeError):
    """A query batch would take a client over its query budget; the whole batch was refused.

    Attributes:
        client: the client id.
        budget: the client's budget (images).
        used: images already answered for the client.
        requested: images in the refused batch.
    """

    def __init__(self, client: str, budget: int, used: int, requested: int) -> None:
        self.client, self.budget, self.used, self.requested = client, int(budget), int(used), int(requested)
        super().__init__(
            f"Query budget exceeded for client {client!r}: the budget is {self.budget} images, "
            f"{self.used} were used and {self.requested} more were requested "
            f"({self.budget - self.used} left); the whole batch was refused and nothing was counted."
        )


def check_output(output: object) -> Output:
    """``output`` if it is ``"probabilities"`` or ``"labels"``."""
    return check_choice(output, "output", OUTPUTS)  # type: ignore[return-value]


def victim_geometry(victim: object, image_shape: object = None, num_classes: object = None
                    ) -> tuple[tuple[int, int, int], int]:
    """``((C, H, W), K)`` of a victim: the given values, else its ``image_shape``/``num_classes``.

    Raises:
        ValueError: the victim is not callable, or the shape or class count is unknown or invalid.
    """
    if not callable(victim):
        raise ValueError(f"victim must be callable (images -> probabilities), got {type(victim).__name__}.")
    shape = image_shape if image_shape is not None else getattr(victim, "image_shape", None)
    if shape is None or len(tuple(shape)) != 3 or any(int(s) < 1 for s in shape):  # type: ignore[arg-type]
        raise ValueError("The victim's input shape (C, H, W) is needed: pass image_shape=... or a victim with an "
                         f"image_shape attribute; got {shape!r}.")
    k = num_classes if num_classes is not None else getattr(victim, "num_classes", None)
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError("The number of classes (at least 2) is needed: pass num_classes=... or a victim with a "
                         f"num_classes attribute; got {k!r}.")
    return tuple(int(s) for s in shape), int(k)  # type: ignore[return-value, union-attr]


def victim_probabilities(victim: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                         num_classes: int) -> torch.Tensor:
    """``(N, K)`` float32 CPU probabilities of ``victim`` on ``x``, with the shape checked."""
    with torch.no_grad():
        probs = victim(x)
    if not isinstance(probs, torch.Tensor) or probs.shape != (x.shape[0], num_classes):
        raise ValueError(f"The victim must return probabilities of shape ({x.shape[0]}, {num_classes}), got "
                         f"{tuple(getattr(probs, 'shape', ()))}.")
    return probs.detach().to("cpu", torch.float32)


class QueryLedger:
    """Per-client image counts with an optional per-client budget; thread-safe.

    Args:
        budget: images each client may have answered; ``None`` (default): unlimited.

    Use :meth:`charge` around the work of answering a batch: the images are reserved atomically
    before the work and given back if the work raises, so a failed batch is never counted::

        with ledger.charge(client, len(x)):
            answer = work(x)
    """

    def __init__(self, budget: int | None = None) -> None:
        self.budget = check_optional_int(budget, "budget")
        self._used: dict[str, int] = {}
        self._lock = threading.Lock()

    def used(self, client: str) -> int:
        """Images counted for ``client`` (0 for a client never seen)."""
        with self._lock:
            return self._used.get(check_name(client, "client"), 0)

    def remaining(self, client: str) -> int | None:
        """Images ``client`` may still send; ``None`` without a budget."""
        return None if self.budget is None else max(self.budget - self.used(client), 0)

    @property
    def total(self) -> int:
        """Images counted for all clients together."""
        with self._lock:
            return sum(self._used.values())

    def clients(self) -> list[str]:
        """Clients with at least one image counted, in order of first query."""
        with self._lock:
            return [c for c, n in self._used.items() if n > 0]

    def forget(self, client: str) -> None:
        """Drop ``client``'s count: its budget starts afresh."""
        with self._lock:
            self._used.pop(check_name(client, "client"), None)

    @contextmanager
    def charge(self, client: str, n: int) -> Iterator[None]:
        """Reserve ``n`` images for ``client`` for the ``with`` block; give them back if it raises.

        Raises:
            BudgetExceededError: ``used + n > budget``; nothing is reserved.
        """
        client = check_name(client, "client")
        with self._lock:
            used = self._used.get(client, 0)
            if self.budget is not None and used + n > self.budget:
                raise BudgetExceededError(client, self.budget, used, n)
            self._used[client] = used + n
        try:
            yield
        except BaseException:
            with self._lock:
                self._used[client] -= n
                if self._used[client] <= 0:
                    del self._used[client]
            raise


class BoundClient:
    """A prediction API as seen by one client, with an optional budget of its own.

    This is what an attack holds while it runs: ``query(x)`` goes to ``api.query(x, client)``, and
    a batch that would take the client over ``budget`` is refused whole with
    :class:`BudgetExceededError` *before* anything is sent, so the attack can never spend more
    than it was given even against an API without budgets.

    Args:
        api: any :class:`PredictionAPI`.
        client: the client id to query as.
        budget: the most images this handle may send; ``None`` for no local limit.
    """

    def __init__(self, api: PredictionAPI, client: str, budget: int | None = None) -> None:
        self.api = api
        self.client = check_name(client, "client")
        self.budget = check_optional_int(budget, "budget")
        self.used = 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.api.image_shape)  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(self.api.num_classes)

    @property
    def output(self) -> Output:
        return self.api.output

    @property
    def remaining(self) -> int | None:
        """Images this handle may still send (its own budget), ``None`` when unlimited."""
        return None if self.budget is None else self.budget - self.used

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Send ``x`` as this client; see :meth:`PredictionAPI.query`."""
        shape = getattr(x, "shape", ())
        n = int(shape[0]) if len(shape) > 0 else 0  # tensors and numpy arrays alike
        if self.budget is not None and self.used + n > self.budget:
            raise BudgetExceededError(self.client, self.budget, self.used, n)
        answer = self.api.query(x, self.client)
        self.used += n
        return answer

    def __repr__(self) -> str:
        return f"BoundClient(client={self.client!r}, used={self.used}, budget={self.budget}, api={self.api!r})"


def fresh_client_id(api: PredictionAPI, prefix: str) -> str:
    """A client id for a new attacker or user: ``prefix``, else ``prefix-2``, ``prefix-3``, ...

    The first candidate that has no query counted at ``api`` is returned, so the ids are
    deterministic for a given history and an attack's queries never mix with earlier ones.
    """
    prefix = check_name(prefix, "prefix")
    candidate, k = prefix, 1
    while api.queries_used(candidate) > 0:
        k += 1
        candidate = f"{prefix}-{k}"
    return candidate


