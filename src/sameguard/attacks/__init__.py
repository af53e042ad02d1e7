"""Model-extraction attacks, each querying only through a :class:`~sameguard.prediction_api.PredictionAPI`.

* ``knockoff``: :class:`KnockoffNets`, random policy (holds a proxy image pool);
* ``knockoff-adaptive``: :class:`KnockoffNets` with ``strategy="adaptive"`` (a labelled proxy pool);
* ``jbda``: :class:`JBDA` (a few in-distribution seed images);
* ``jbda-tr``: :class:`JBDATR` (a few in-distribution seed images);
* ``dfme``: :class:`DFME` (no data).

Adaptive attackers (issue 13; they know the defence, see ``docs/adaptive-attacks.md``), each a
Knockoff variant so that its substitute accuracy next to Knockoff's is the price of evasion:

* ``knockoff-blend``: :class:`BlendKnockoff`, queries ``lam * x_in + (1 - lam) * x_proxy``
  (a proxy pool and a few in-distribution images);
* ``knockoff-mixup``: :class:`MixupKnockoff`, pairs of proxy images mixed (a proxy pool);
* ``knockoff-interleave``: :class:`InterleaveKnockoff`, a fraction ``rho`` of in-distribution
  cover queries spread through the stream (a proxy pool and in-distribution images);
* ``knockoff-filtered``: :class:`FilteredKnockoff`, only the least suspicious candidates of a
  larger pool by the attacker's own SAME / MSP / Energy copy (a proxy pool, and in-distribution
  images for the SAME copy);
* ``knockoff-wide``: :class:`SlowAndWideKnockoff`, the budget spread over ``keys`` API keys
  through a :class:`KeyRing` (a proxy pool).

All of them work on label-only APIs (the hard-label variants).

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
from .blend import BlendKnockoff, MixupKnockoff, blend
from .filtered import FilteredKnockoff, least_suspicious
from .interleave import InterleaveKnockoff, interleave_schedule
from .knockoff import KnockoffNets
from .normal_user import NormalUser, TrafficResult
from .wide import KeyRing, SlowAndWideKnockoff, key_names, over_keys

__all__ = [
    "ATTACKS",
    "AttackResult",
    "ExtractionAttack",
    "UnsupportedOutputError",
    "KnockoffNets",
    "JBDA",
    "JBDATR",
    "DFME",
    "BlendKnockoff",
    "MixupKnockoff",
    "InterleaveKnockoff",
    "FilteredKnockoff",
    "SlowAndWideKnockoff",
    "KeyRing",
    "NormalUser",
    "TrafficResult",
    "attack_data",
    "attack_data_role",
    "blend",
    "build_attack",
    "interleave_schedule",
    "key_names",
    "least_suspicious",
    "over_keys",
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
    "knockoff-blend": BlendKnockoff,
    "knockoff-mixup": MixupKnockoff,
    "knockoff-interleave": InterleaveKnockoff,
    "knockoff-filtered": FilteredKnockoff,
    "knockoff-wide": SlowAndWideKnockoff,
}


def _check_name(name: str) -> None:
    if name not in ATTACKS:
        raise ValueError(f"Unknown attack {name!r}; choose one of {sorted(ATTACKS)}.")


def attack_data_role(name: str) -> str | None:
    """What data attack ``name`` is built with: ``"proxy"`` (first argument ``proxy``), ``"seeds"``
    (first argument ``seed_data``), ``"proxy+seeds"`` (``proxy`` then ``seed_data``) or ``None`` (data-free)."""
    _check_name(name)
    factory = ATTACKS[name]
    cls = factory.func if isinstance(factory, partial) else factory
    return cls.data_role  # type: ignore[union-attr]


def attack_data(name: str, proxy: Any = None, seeds: Any = None) -> tuple[Any, ...]:
    """The positional data arguments of attack ``name``: ``(proxy,)``, ``(seeds,)``, ``(proxy, seeds)`` or ``()``."""
    role = attack_data_role(name)
    return {"proxy": (proxy,), "seeds": (seeds,), "proxy+seeds": (proxy, seeds)}.get(role or "", ())


def build_attack(name: str, *args: Any, **kwargs: Any) -> ExtractionAttack:
    """Construct attack ``name`` (see :data:`ATTACKS`) with its constructor's arguments.

    Example: ``build_attack("knockoff", proxy, seed=0, epochs=20)``,
    ``build_attack("jbda", seed_data=held_out)``, ``build_attack("dfme", batch_size=64)``.
    """
    _check_name(name)
    return ATTACKS[name](*args, **kwargs)
