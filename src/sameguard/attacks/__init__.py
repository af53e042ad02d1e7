"""Model-extraction attacks, each querying only through a :class:`~sameguard.prediction_api.PredictionAPI`.

* ``knockoff``: :class:`KnockoffNets`, random policy (holds a proxy image pool);
* ``knockoff-adaptive``: :class:`KnockoffNets` with ``strategy="adaptive"`` (a labelled proxy pool);
* ``jbda``: :class:`JBDA` (a few in-distribution seed images);
* ``jbda-tr``: :class:`JBDATR` (a few in-distribution seed images);
* ``dfme``: :class:`DFME` (no data).

``build_attack(name, **kwargs)`` constructs one by name; ``attack.run(api, budget, victim=...,
test_data=...)`` returns an :class:`AttackResult`. :class:`NormalUser` sends benign traffic (the
victim's test split) the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from .base import AttackResult, ExtractionAttack, UnsupportedOutputError, evaluate_substitute
from .dfme import DFME, dfme_query_cost, recover_logits
from .jbda import JBDA
from .jbda_tr import JBDATR
from .knockoff import KnockoffNets
from .normal_user import NormalUser, TrafficResult

__all__ = [
    "ATTACKS",
    "AttackResult",
    "ExtractionAttack",
    "UnsupportedOutputError",
    "KnockoffNets",
    "JBDA",
    "JBDATR",
    "DFME",
    "NormalUser",
    "TrafficResult",
    "attack_data_role",
    "build_attack",
    "dfme_query_cost",
    "evaluate_substitute",
    "recover_logits",
]

#: Attack constructors by registry name.
ATTACKS: dict[str, Callable[..., ExtractionAttack]] = {
    "knockoff": partial(KnockoffNets, strategy="random"),
    "knockoff-adaptive": partial(KnockoffNets, strategy="adaptive"),
    "jbda": JBDA,
    "jbda-tr": JBDATR,
    "dfme": DFME,
}


def _check_name(name: str) -> None:
    if name not in ATTACKS:
        raise ValueError(f"Unknown attack {name!r}; choose one of {sorted(ATTACKS)}.")


def attack_data_role(name: str) -> str | None:
    """What data attack ``name`` is built with: ``"proxy"`` (first argument ``proxy``), ``"seeds"``
    (first argument ``seed_data``) or ``None`` (data-free)."""
    _check_name(name)
    factory = ATTACKS[name]
    cls = factory.func if isinstance(factory, partial) else factory
    return cls.data_role  # type: ignore[union-attr]


def build_attack(name: str, *args: Any, **kwargs: Any) -> ExtractionAttack:
    """Construct attack ``name`` (see :data:`ATTACKS`) with its constructor's arguments.

    Example: ``build_attack("knockoff", proxy, seed=0, epochs=20)``,
    ``build_attack("jbda", seed_data=held_out)``, ``build_attack("dfme", batch_size=64)``.
    """
    _check_name(name)
    return ATTACKS[name](*args, **kwargs)
