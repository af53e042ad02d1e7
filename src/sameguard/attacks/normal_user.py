"""A benign user: sends images drawn from the victim dataset's test split.

This is the negative class of the SAME paper's per-query evaluation (Xie et al., AAAI 2024,
reference implementation xythink/SAME): ``B`` attack queries are scored against ``B`` queries of a
normal user drawn from the victim's test split. Sending them through a
:class:`~sameguard.guard.Guard` as their own client gives the benign scores::

    user = NormalUser(test_data, seed=0)
    traffic = user.run(api, budget=4000)
    benign_scores = api.scores(traffic.client)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data import ImageDataset, adapt_to
from ..prediction_api import BoundClient, BudgetExceededError, PredictionAPI, fresh_client_id
from ..training import show_progress
from ..validation import check_int

logger = logging.getLogger(__name__)

__all__ = ["NormalUser", "TrafficResult"]


@dataclass(frozen=True)
class TrafficResult:
    """What a simulated user sent.

    Attributes:
        client: the client id it queried as.
        queries: images sent (``== budget``).
        indices: ``(queries,)`` int64 positions in the user's dataset of the images sent, in order.
        seconds: wall time.
    """

    client: str
    queries: int
    indices: torch.Tensor
    seconds: float


class NormalUser:
    """Benign traffic: images of the victim's test split, in random order.

    Args:
        data: the images to draw from (the victim dataset's test split; converted to the API's
            shape with :func:`~sameguard.data.adapt_to` if needed).
        query_batch_size: images per API call (64).
        replace: draw with replacement; by default without, starting a fresh permutation when the
            data runs out.
        seed: fixes the order; the same seed sends the same images.
        progress: progress bar (``None``: when stderr is a terminal).
    """

    name = "normal"

    def __init__(self, data: ImageDataset, *, query_batch_size: int = 64, replace: bool = False, seed: int = 0,
                 progress: bool | None = None) -> None:
        if not isinstance(data, ImageDataset) or len(data) == 0:
            raise ValueError(f"data must be a non-empty ImageDataset (the victim's test split), got {data!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}.")
        self.data = data
        self.query_batch_size = check_int(query_batch_size, "query_batch_size")
        self.replace = bool(replace)
        self.seed = seed
        self.progress = progress

    def indices(self, budget: int) -> torch.Tensor:
        """The ``(budget,)`` positions :meth:`run` sends, in order."""
        g = torch.Generator().manual_seed(self.seed)
        n = len(self.data)
        if self.replace:
            return torch.randint(0, n, (budget,), generator=g)
        return torch.cat([torch.randperm(n, generator=g) for _ in range(-(-budget // n))])[:budget]

    def run(self, api: PredictionAPI, budget: int, *, client: str | None = None) -> TrafficResult:
        """Send exactly ``budget`` test images to ``api`` as ``client`` (default: a fresh ``normal-*`` id)."""
        budget = check_int(budget, "budget")
        client = fresh_client_id(api, self.name) if client is None else client
        left = api.remaining(client)
        if left is not None and left < budget:
            raise BudgetExceededError(client, left + api.queries_used(client), api.queries_used(client), budget)
        oracle = BoundClient(api, client, budget)
        order = self.indices(budget)
        start = time.perf_counter()
        for s in tqdm(range(0, budget, self.query_batch_size), desc="normal user",
                      disable=not show_progress(self.progress), leave=False):
            idx = order[s:s + self.query_batch_size]
            oracle.query(adapt_to(self.data.images[idx], api.image_shape))
        seconds = time.perf_counter() - start
        logger.info("normal user %r sent %d test images in %.1f s", client, budget, seconds)
        return TrafficResult(client=client, queries=oracle.used, indices=order, seconds=seconds)
