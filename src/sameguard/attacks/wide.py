"""Slow and wide: one extraction budget spread over ``k`` API keys (Sybil accounts).

Family 5 of the adaptive attacks in ``reference/methods.md`` A6: stateful per-client defences
(PRADA, VarDetect, HODA, D-ADD, SEAT, and this package's per-client alarms in
:mod:`sameguard.alarms`) accumulate evidence per API key, so an attacker who opens ``k`` keys
gives each only ``B / k`` queries; when a key's alarm needs more queries than that, the whole
budget is bought unnoticed. FDINet (arXiv 2306.11338) proposes catching such colluding keys by
the similarity of their statistics; nothing here links keys.

:class:`KeyRing` is the multi-key oracle: it looks like the attack's
:class:`~sameguard.prediction_api.BoundClient` (same attributes, same ``query``), sends each image
as one of its keys and charges the attack's one budget, so any attack's ``_extract`` runs
unchanged over many keys. Key ``0`` is the attack's own client id; key ``i > 0`` is
``"<client>-key<i>"``. Rotations:

* ``"round-robin"`` (default): image ``j`` of the whole stream goes to key ``j mod k``: every key
  sees a thinned copy of the same stream, and after ``n`` images each has ``n / k`` of them;
* ``"blocks"``: key ``i`` sends images ``[i B / k, (i + 1) B / k)``: one account after the other.

:class:`SlowAndWideKnockoff` (``knockoff-wide``) is Knockoff Nets (random policy) over a key ring;
the keys it used and how many images each sent are in the result's ``details``. The hard-label
variant is the same attack on a label-only API. :func:`over_keys` spreads any other attack (a
blending or filtering one, say) over keys the same way.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..data import ImageDataset
from ..prediction_api import BoundClient, BudgetExceededError
from ..validation import check_choice, check_int
from .base import ExtractionAttack
from .knockoff import KnockoffNets

__all__ = ["KeyRing", "SlowAndWideKnockoff", "key_names", "over_keys", "ROTATIONS"]

ROTATIONS = ("round-robin", "blocks")


def key_names(client: str, keys: int) -> list[str]:
    """The ``keys`` client ids of a key ring whose first key is ``client``."""
    return [client] + [f"{client}-key{i}" for i in range(1, check_int(keys, "keys"))]


class KeyRing:
    """A :class:`~sameguard.prediction_api.BoundClient` look-alike that spreads images over ``keys`` API keys.

    Args:
        oracle: the attack's bound client; its budget is the ring's, and its client id is key 0.
        keys: number of API keys ``k >= 1``.
        rotation: ``"round-robin"`` or ``"blocks"`` (see the module docstring).
        budget: the whole budget (needed by ``"blocks"``; default: the oracle's).
    """

    def __init__(self, oracle: BoundClient, keys: int, rotation: str = "round-robin",
                 budget: int | None = None) -> None:
        self.oracle = oracle
        self.keys = key_names(oracle.client, keys)
        self.rotation = check_choice(rotation, "rotation", ROTATIONS)
        self.budget = oracle.budget if budget is None else check_int(budget, "budget")
        if self.rotation == "blocks" and self.budget is None:
            raise ValueError("rotation='blocks' needs the whole budget to cut it into blocks.")
        self.sent = {key: 0 for key in self.keys}

    # the BoundClient interface the attacks use
    @property
    def api(self) -> Any:
        return self.oracle.api

    @property
    def client(self) -> str:
        return self.oracle.client

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.oracle.image_shape

    @property
    def num_classes(self) -> int:
        return self.oracle.num_classes

    @property
    def output(self) -> str:
        return self.oracle.output

    @property
    def used(self) -> int:
        return self.oracle.used

    @property
    def remaining(self) -> int | None:
        return self.oracle.remaining

    def key_of(self, index: torch.Tensor) -> torch.Tensor:
        """The key number of each 0-based stream position in ``index``."""
        k = len(self.keys)
        if self.rotation == "round-robin":
            return index % k
        assert self.budget is not None
        return torch.clamp(index * k // self.budget, max=k - 1)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Send ``x`` spread over the keys; the answers in the order of ``x``."""
        n = int(x.shape[0])
        o = self.oracle
        if o.budget is not None and o.used + n > o.budget:
            raise BudgetExceededError(o.client, o.budget, o.used, n)
        which = self.key_of(torch.arange(o.used, o.used + n))
        answers: torch.Tensor | None = None
        for i, key in enumerate(self.keys):
            rows = torch.nonzero(which == i).flatten()
            if len(rows) == 0:
                continue
            part = o.api.query(x[rows], key)
            if answers is None:
                answers = torch.empty((n, *part.shape[1:]), dtype=part.dtype)
            answers[rows] = part
            o.used += len(rows)  # the one budget of the attack, charged as each key's batch is answered
            self.sent[key] += len(rows)
        assert answers is not None
        return answers


class SlowAndWideKnockoff(KnockoffNets):
    """Knockoff Nets (random policy) with its budget spread over ``keys`` API keys.

    Args:
        proxy: the attacker's proxy pool.
        keys: number of API keys ``k`` (4).
        rotation: ``"round-robin"`` (default) or ``"blocks"``.
        **kwargs: as :class:`~sameguard.attacks.knockoff.KnockoffNets` (``strategy`` is ``"random"``).
    """

    def __init__(self, proxy: ImageDataset, *, keys: int = 4, rotation: str = "round-robin", **kwargs: Any) -> None:
        kwargs.pop("strategy", None)
        super().__init__(proxy, strategy="random", **kwargs)
        self.keys = check_int(keys, "keys")
        self.rotation = check_choice(rotation, "rotation", ROTATIONS)

    @property
    def name(self) -> str:  # type: ignore[override]
        return "knockoff-wide"

    def _extract(self, oracle: BoundClient, budget: int) -> tuple[nn.Module, dict[str, Any]]:
        ring = KeyRing(oracle, self.keys, self.rotation, budget)
        model, details = self._random(ring, budget)  # type: ignore[arg-type]
        return model, {**details, "keys": list(ring.keys), "per_key": dict(ring.sent), "rotation": self.rotation}


def over_keys(attack: ExtractionAttack, keys: int, rotation: str = "round-robin") -> ExtractionAttack:
    """A shallow copy of ``attack`` whose every query goes through a :class:`KeyRing` of ``keys`` keys.

    Works for any attack here (they query only through the oracle they are given). The result's
    ``details`` gain ``keys`` (the key ids), ``per_key`` (images each sent) and ``rotation``.
    """
    keys = check_int(keys, "keys")
    rotation = check_choice(rotation, "rotation", ROTATIONS)
    wrapped = copy.copy(attack)
    inner = type(attack)._extract.__get__(wrapped)  # bound to the copy, which run() configures

    def _extract(oracle: BoundClient, budget: int) -> tuple[nn.Module, dict[str, Any]]:
        ring = KeyRing(oracle, keys, rotation, budget)
        model, details = inner(ring, budget)  # type: ignore[arg-type]
        return model, {**details, "keys": list(ring.keys), "per_key": dict(ring.sent), "rotation": rotation}

    wrapped._extract = _extract  # type: ignore[method-assign]
    return wrapped
